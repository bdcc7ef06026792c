"""End-to-end tuning of a weight-only graph's scales by distillation from the fp32 model.

GPTQ, AWQ and the range search choose each layer's codes and scales against that layer's own output error; the
errors of every layer then add up in the model's output. Tuning keeps every code and zero point and trains what the
graph's format leaves free: each block's scale (as a factor e^t on it, so a step moves every scale by the same
fraction) and the float parameters beside the codes (norm weights, biases), with Adam, to bring the quantized
model's next-token distributions on the calibration windows to the fp32 model's (KL divergence per token). This is
EfficientQAT's end-to-end training of the quantization parameters (Chen et al. 2024, "E2E-QP"), the norms trained
with them. It runs in PyTorch on the loaded model's own modules: torch.func.functional_call swaps in the graph's
weights, found by the parameter names the exporter restored (a copy AWQ or SmoothQuant divided is "<name>.smoothed",
a transposed one "<name>.T"). Before any step the swapped-in model is checked against ONNX Runtime on the graph
itself; where they differ (weights that do not map back to the module's parameters) tuning is skipped and the
record says why. Measured on SmolLM2, every layer int4 (benchmarks/RESULTS.md, session 40).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F

from gptkiln.graph.initializers import half_exact, stored_half
from gptkiln.progress import QUIET, Progress

SCALE_LR = 1e-3  # Adam on the log of each scale factor: about 0.1% of a scale a step at first
FLOAT_LR = 1e-4  # Adam on the norm weights and biases
BATCH = 8  # calibration windows a step
MICRO_BATCH = 2  # windows a forward pass: a window's logits alone are 25 MB for a 49,152-token vocabulary
CHECK_TOLERANCE = 1e-2  # of max |logit|: the module with the graph's weights against ONNX Runtime on the graph


@dataclass
class QuantizedWeight:
    """One DequantizeLinear's weight: its codes less their zero points, and its scales, in the graph's layout."""

    layer: str  # the weight's name in the graph: the codes are "<layer>.<code type>"
    parameter: str  # the module's parameter it stands for
    transposed: bool  # the graph holds the parameter transposed ("….T")
    steps: torch.Tensor  # codes - zero points, split into blocks: [K/B, B, N] (axis 0) or [N, K/B, B] (axis 1)
    scales: np.ndarray  # [K/B, N] or [N, K/B]: fp16 values, as float32
    axis: int  # the blocked axis: 0 for a linear layer's [K, N], 1 for a table's [V, K]

    @classmethod
    def read(cls, layer: str, parameter: str, transposed: bool, codes: np.ndarray, scales: np.ndarray,
             zeros: np.ndarray, axis: int, block: int) -> "QuantizedWeight":
        steps = codes.astype(np.float32) - np.repeat(zeros.astype(np.float32), block, axis=axis)
        shape = (-1, block, steps.shape[1]) if axis == 0 else (steps.shape[0], -1, block)
        return cls(layer, parameter, transposed, torch.from_numpy(steps.reshape(shape)), scales.astype(np.float32),
                   axis)

    def weight(self, log_factor: torch.Tensor | None = None) -> torch.Tensor:
        """The parameter the codes stand for, scaled by e^log_factor where given (the scales broadcast over each
        block, so autograd keeps no weight-sized copy of them)."""
        scales = torch.from_numpy(self.scales)
        if log_factor is not None:
            scales = scales * torch.exp(log_factor)
        blocks = self.steps * scales.unsqueeze(1 if self.axis == 0 else 2)
        weight = blocks.flatten(0, 1) if self.axis == 0 else blocks.flatten(1, 2)
        return weight.T if self.transposed else weight

    def scales_as_quantized(self, log_factor: torch.Tensor) -> np.ndarray:
        """The tuned scales, fp16-exact, [K/B, N] as calibration.weight_only keeps them (a table's transposed)."""
        tuned = half_exact((torch.from_numpy(self.scales) * torch.exp(log_factor)).detach().numpy())
        return tuned.T if self.axis == 1 else tuned


@dataclass
class Tuned:
    scales: dict[str, np.ndarray]  # layer -> its tuned scales (QuantizedWeight.scales_as_quantized)
    floats: dict[str, np.ndarray]  # float initializer -> its tuned value
    record: dict  # what ran and the KL it reached, or why it was skipped

    @classmethod
    def skipped(cls, reason: str) -> "Tuned":
        return cls({}, {}, {"skipped": reason})


def _parameter_name(graph_name: str) -> tuple[str, bool]:
    """(the module parameter a graph weight stands for, whether the graph holds it transposed)."""
    name = graph_name.removesuffix(".smoothed")
    return (name.removesuffix(".T"), True) if name.endswith(".T") else (name, False)


def _graph_weights(model: ir.Model, parameters: dict[str, torch.Tensor]):
    """(the quantized weights, the float initializers) of the graph that stand for the module's parameters; raises
    ValueError where two graph weights stand for one parameter (they could not be swapped in as one)."""
    quantized, floats, seen = {}, {}, {}
    for node in model.graph:
        if node.op_type != "DequantizeLinear" or node.attributes.get_int("block_size", 0) == 0:
            continue
        codes, scales = node.inputs[0], stored_half(node.inputs[1])
        if codes.const_value is None or scales is None:
            continue
        layer = codes.name.rsplit(".", 1)[0]  # "<weight>.int4", ".uint4" (a lookup table), ...
        parameter, transposed = _parameter_name(layer)
        if parameter not in parameters:
            continue
        scale_array = scales.const_value.numpy()
        zeros = (node.inputs[2].const_value.numpy() if len(node.inputs) > 2 and node.inputs[2] is not None
                 else np.zeros(scale_array.shape, np.float32))
        quantized[layer] = QuantizedWeight.read(layer, parameter, transposed, codes.const_value.numpy(), scale_array,
                                                zeros, node.attributes.get_int("axis", 1),
                                                node.attributes.get_int("block_size"))
        seen.setdefault(parameter, []).append(layer)
    for name, value in model.graph.initializers.items():
        parameter, transposed = _parameter_name(name)
        array = value.const_value.numpy() if value.const_value is not None else None
        if parameter in parameters and array is not None and array.dtype == np.float32 and value.uses():
            if tuple(array.T.shape if transposed else array.shape) == tuple(parameters[parameter].shape):
                floats[name] = (parameter, transposed, array)
                seen.setdefault(parameter, []).append(name)
    twice = {parameter: names for parameter, names in seen.items() if len(names) > 1}
    if twice:
        parameter, names = next(iter(twice.items()))
        raise ValueError(f"the graph holds '{parameter}' {len(names)} times ({', '.join(names)})")
    return quantized, floats


def _onnx_logits(graph_path: Path, ids: np.ndarray, spec) -> np.ndarray:
    """The graph's logits for one window, in float (MatMulNBits without int8 activations)."""
    import onnxruntime as ort

    from gptkiln.targets.onnxruntime import OnnxRuntimeRunner, providers

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    runner = OnnxRuntimeRunner(spec, ort.InferenceSession(str(graph_path), options, providers=providers()))
    positions = np.arange(ids.shape[1])[None]
    return runner.step(ids, np.ones_like(ids), positions, runner.empty_cache(1))[0]


def tune_scales(module: torch.nn.Module, graph_path: Path, layers: set[str], windows: np.ndarray, epochs: int,
                spec, progress: Progress = QUIET, seed: int = 0) -> Tuned:
    """Tune the scales of `layers` (graph weight names) and the graph's float parameters on `windows` [n, seq]."""
    start = time.perf_counter()
    parameters = {name: p.detach() for name, p in module.named_parameters()}
    try:
        quantized, floats = _graph_weights(ir.load(graph_path), parameters)
    except ValueError as error:
        return Tuned.skipped(str(error))
    log_factors = {layer: torch.zeros(q.scales.shape, requires_grad=True) for layer, q in quantized.items()
                   if layer in layers}
    # trained: the vectors (norm weights, biases); a float matrix (a layer left in fp32) is swapped in as it is
    tuned_floats = {name: torch.tensor(array, requires_grad=array.ndim == 1) for name, (_, _, array) in floats.items()}

    def swapped() -> dict[str, torch.Tensor]:
        weights = dict(parameters)
        for layer, q in quantized.items():
            weights[q.parameter] = q.weight(log_factors.get(layer))
        for name, (parameter, transposed, _) in floats.items():
            weights[parameter] = tuned_floats[name].T if transposed else tuned_floats[name]
        return weights

    def logits(ids: torch.Tensor, weights: dict | None = None) -> torch.Tensor:
        if weights is None:
            return module(input_ids=ids, use_cache=False).logits
        return torch.func.functional_call(module, weights, (), {"input_ids": ids, "use_cache": False}).logits

    check = windows[:1]
    with torch.no_grad():
        ours = logits(torch.from_numpy(check), swapped()).numpy()
    graph = _onnx_logits(graph_path, check, spec)
    difference = float(np.abs(ours - graph).max() / max(np.abs(graph).max(), 1e-12))
    if not difference <= CHECK_TOLERANCE:
        return Tuned.skipped(f"the module with the graph's weights differs from the graph by {difference:.3g} of "
                             f"max |logit| (limit {CHECK_TOLERANCE:g}): its weights do not map back by name")

    optimizer = torch.optim.Adam([{"params": list(log_factors.values()), "lr": SCALE_LR},
                                  {"params": [v for v in tuned_floats.values() if v.requires_grad], "lr": FLOAT_LR}])
    steps = epochs * math.ceil(len(windows) / BATCH)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    bar = progress.bar(steps, "tuning scales", "steps")
    epoch_kl = []
    for _ in range(epochs):
        total = 0.0
        for batch in torch.randperm(len(windows), generator=generator).split(BATCH):
            optimizer.zero_grad()
            for part in batch.split(MICRO_BATCH):  # the gradient of the step's mean KL, a few windows at a time
                ids = torch.from_numpy(windows[part.numpy()])
                with torch.no_grad():
                    target = F.log_softmax(logits(ids).flatten(0, 1), -1)
                ours = F.log_softmax(logits(ids, swapped()).flatten(0, 1), -1)
                loss = F.kl_div(ours, target, log_target=True, reduction="batchmean")
                (loss * len(part) / len(batch)).backward()
                total += loss.item() * len(part)
            optimizer.step()
            schedule.step()
            bar.step()
        epoch_kl.append(round(total / len(windows), 6))
    bar.close()
    scales = {layer: quantized[layer].scales_as_quantized(factor) for layer, factor in log_factors.items()}
    tuned = {name: value.detach().numpy().astype(np.float32) for name, value in tuned_floats.items()
             if value.requires_grad}
    record = {"epochs": epochs, "windows": len(windows), "steps": steps, "scales_tuned": len(scales),
              "floats_tuned": len(tuned), "kl_per_epoch": epoch_kl, "check_difference": float(f"{difference:.3g}"),
              "seconds": round(time.perf_counter() - start, 1)}
    return Tuned(scales, tuned, record)
