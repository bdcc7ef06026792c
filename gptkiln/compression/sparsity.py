"""2:4 semi-structured pruning of every linear layer inside the blocks (embeddings and lm_head stay dense).

In each output row, every group of 4 consecutive input weights keeps the 2 of highest score:
- "magnitude": |W|;
- "wanda" (Sun et al., 2023): |W_ij| * ||X_j||, the weight times the L2 norm of its input feature over the
  calibration tokens, so a small weight on a large activation outranks a large weight on a silent one.
The masks are what the distillation holds fixed (distill.py zeroes the pruned weights after every step).
TensorRT runs such layers on sparse tensor cores; ONNX Runtime and OpenVINO run them dense.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from gptkiln.compression.importance import hooked_pass
from gptkiln.graph.sparsity import GROUP, KEPT, is_two_four
from gptkiln.models.spec import DecoderSpec
from gptkiln.progress import QUIET, Progress


def sparse_layers(model, spec: DecoderSpec) -> dict[str, nn.Module]:
    """name -> the Linear (weight [out, in]) or GPT-2 Conv1D (weight [in, out]) modules inside the blocks whose
    input size is a multiple of 4."""
    prefix = spec.blocks_path + "."
    return {name: module for name, module in model.named_modules()
            if name.startswith(prefix) and _kind(module) and _input_size(module) % GROUP == 0}


@torch.no_grad()
def two_four_masks(model, spec: DecoderSpec, windows: np.ndarray, score: str,
                   progress: Progress = QUIET) -> dict[str, torch.Tensor]:
    """parameter name -> boolean mask of the weight's shape (True: kept)."""
    layers = sparse_layers(model, spec)
    norms = _input_norms(model, layers, windows, progress) if score == "wanda" else {}
    masks = {}
    for name, module in layers.items():
        weight = _rows_by_input(module)  # [out, in]
        scores = weight.abs() * norms[name] if norms else weight.abs()
        groups = scores.reshape(len(scores), -1, GROUP)
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(KEPT, dim=-1).indices, True)
        keep = keep.reshape(weight.shape)
        masks[f"{name}.weight"] = keep.T.contiguous() if _kind(module) == "conv1d" else keep
    return masks


@torch.no_grad()
def apply_masks(model, masks: dict[str, torch.Tensor]) -> None:
    parameters = dict(model.named_parameters())
    for name, mask in masks.items():
        parameters[name].mul_(mask.to(parameters[name].device))


def check_two_four(model, spec: DecoderSpec) -> int:
    """The number of 2:4 sparse layers; raises where one lost the pattern (a bug, not a user error)."""
    layers = sparse_layers(model, spec)
    broken = [name for name, module in layers.items()
              if not is_two_four(_rows_by_input(module).detach().cpu().numpy(), axis=1)]
    if broken:
        raise RuntimeError(f"2:4 sparsity lost in {len(broken)} layers, e.g. {broken[0]}")
    return len(layers)


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    return "conv1d" if type(module).__name__ == "Conv1D" else None


def _input_size(module: nn.Module) -> int:
    return module.weight.shape[0 if _kind(module) == "conv1d" else 1]


def _rows_by_input(module: nn.Module) -> torch.Tensor:
    return module.weight.T if _kind(module) == "conv1d" else module.weight


def _input_norms(model, layers: dict[str, nn.Module], windows: np.ndarray, progress: Progress) -> dict[str, torch.Tensor]:
    squares: dict[str, torch.Tensor] = {}

    def hook(name):
        def accumulate(module, args):
            x = args[0].float().reshape(-1, args[0].shape[-1])
            total = (x * x).sum(dim=0)
            squares[name] = squares[name] + total if name in squares else total
        return accumulate

    hooked_pass(model, windows, [module.register_forward_pre_hook(hook(name)) for name, module in layers.items()],
                "input norms", progress)
    return {name: total.sqrt() for name, total in squares.items()}
