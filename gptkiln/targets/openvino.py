"""OpenVINO (CPU): IR with the KV cache kept inside the model as state (default) or the plain contract.

Stateful: every past_key_values.{i}.* input becomes a ReadValue and present.{i}.* an Assign
(OpenVINO's make-stateful transformation); a `beam_idx` input gathers the cache rows
before each step (beam reordering; greedy passes arange(batch)). The state starts as a
zero-length cache of the request's batch size. The Runner hides all of it: the cache it
returns is a handle, and `cache_arrays` reads the state back for parity.

Inference precision is pinned (OpenVINO otherwise picks bf16/f16 on capable CPUs, so one
build would compute differently on different hosts), and so is the KV-cache precision (u8
by default on CPU): f32 by default, held to the fp32 parity bars; bf16 or f16 when asked
(`--inference-precision`), held to the half-precision bars. A quantized build's cache is f16
unless asked (OpenVinoTarget.for_precision): its accuracy gate decodes through it. A CPU without native support
emulates bf16 (much slower) and runs f16 requests in f32: the build warns.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from gptkiln.config import BuildConfig, EngineSettings, Precision, RuntimeSettings, Tolerances
from gptkiln.errors import ArtifactError, ExportError, TargetUnavailableError, UsageError
from gptkiln.ecosystem.openvino_genai import carry_runtime_options
from gptkiln.exporter import io_spec
from gptkiln.models.spec import DecoderSpec
from gptkiln.targets.base import PROMPT_PASS_TOKENS, Runner, Target

IR_FILE = "openvino_model.xml"  # weights in openvino_model.bin beside it; the name openvino-genai and optimum read
BEAM_INPUT = "beam_idx"
# the CPU plugin's own default: the activations of integer-weight layers quantized to int8 per 32 at run time
CPU_DYNAMIC_QUANTIZATION_GROUP = 32
SAFER_ACTIVATION_GROUPS = (16, 0)  # OpenVinoTarget.fallback, in order: int8 per 16, then float activations
# the KV cache of an engine with integer weights where gptkiln chooses it; a quantized build's gate decodes through
# it (calibration.perplexity.PREFILL), and its last fallback is f32
QUANTIZED_KV_CACHE = "f16"


def _import_openvino():
    try:
        import openvino
    except ImportError:
        raise TargetUnavailableError("openvino is not installed", "pip install 'gptkiln[openvino]'") from None
    return openvino


def compile_config(runtime: RuntimeSettings | None = None) -> dict:
    runtime = runtime or RuntimeSettings()
    precision = runtime.inference_precision
    config = {"INFERENCE_PRECISION_HINT": precision, "KV_CACHE_PRECISION": runtime.kv_cache_precision or precision,
              "PERFORMANCE_HINT": runtime.performance_hint}
    if runtime.threads:
        config["INFERENCE_NUM_THREADS"] = runtime.threads
    group = runtime.dynamic_quantization_group
    config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = CPU_DYNAMIC_QUANTIZATION_GROUP if group is None else group
    return config


def kv_element_bytes(compiled) -> int:
    """Bytes per element of the KV cache a compiled stateful model keeps (u8: 1, f16/bf16: 2, f32: 4)."""
    return max(1, compiled.get_property("KV_CACHE_PRECISION").bitwidth // 8)


def make_stateful(model, spec: DecoderSpec) -> None:
    """Move the KV cache into the model as state, with a beam_idx reorder in front of it."""
    import openvino as ov
    import openvino.opset13 as opset
    from openvino._offline_transformations import apply_make_stateful_transformation

    past = io_spec.past_names(spec.num_layers)
    batch_dim = model.input("input_ids").get_partial_shape()[0]
    beam = opset.parameter(ov.PartialShape([batch_dim]), ov.Type.i32, name=BEAM_INPUT)
    beam.output(0).get_tensor().set_names({BEAM_INPUT})
    model.add_parameters([beam])
    for name in past:
        port = model.input(name)
        consumers = port.get_target_inputs()
        reordered = opset.gather(port, beam, opset.constant(0))
        for consumer in consumers:
            consumer.replace_source_output(reordered.output(0))
    model.validate_nodes_and_infer_types()
    apply_make_stateful_transformation(model, dict(zip(past, io_spec.present_names(spec.num_layers))))
    # each state starts as an empty cache [batch, kv_heads, 0, head_dim] for the request's batch
    batch = opset.gather(opset.shape_of(model.input("input_ids"), output_type="i64"),
                         opset.constant(np.array([0], np.int64)), opset.constant(0))
    for op in model.get_ops():
        if op.get_type_name() == "ReadValue":
            dims = [batch, *(opset.constant(np.array([d], np.int64)) for d in (spec.num_kv_heads, 0, spec.head_dim))]
            zero = opset.constant(np.array(0.0, np.float32))
            op.set_arguments([opset.broadcast(zero, opset.concat(dims, 0))])
    model.validate_nodes_and_infer_types()


def stable_names(model) -> None:
    """OpenVINO names the nodes it makes `<Type>_<process-wide counter>` (and a folded constant keeps such a
    name), so a second build in one process would write a different IR; number them by position instead."""
    for index, op in enumerate(model.get_ordered_ops()):
        old = op.get_friendly_name()
        generated = re.fullmatch(r"([A-Za-z][A-Za-z0-9]*)_\d+((?:\.\d+)*)", old)  # Convert_27143, Convert_27143.0
        if generated:
            new = f"{generated.group(1)}_{index}{generated.group(2)}"
            op.set_friendly_name(new)
            for output in op.outputs():  # a tensor named after its node (openvino-tokenizers' Parameters)
                names = output.get_tensor().get_names()
                if old in names:
                    output.get_tensor().set_names(names - {old} | {new})


def store_half_constants(model, names: set[str]) -> int:
    """The conversion folds each fp16 constant of the ONNX graph (graph.initializers.half_constant: the quantized
    weights' scales) into an f32 one; put it back in fp16 behind a Convert marked as decompression, the form of
    OpenVINO's own compressed IRs. Same values (they are fp16-exact), half the bytes. Returns how many."""
    import openvino as ov
    import openvino.opset13 as opset

    stored = 0
    for op in model.get_ops():
        if op.get_type_name() != "Constant" or op.get_friendly_name() not in names:
            continue
        values = op.get_data()
        half = values.astype(np.float16)
        if values.dtype != np.float32 or not np.array_equal(half.astype(np.float32), values):
            continue
        convert = opset.convert(opset.constant(half), ov.Type.f32)
        convert.get_rt_info()["decompression"] = ""
        convert.set_friendly_name(op.get_friendly_name())
        for target in op.output(0).get_target_inputs():
            target.replace_source_output(convert.output(0))
        stored += 1
    return stored


def keep_last_logits(model) -> bool:
    """In a model read for gptkiln's runner: a `num_logits_to_keep` input (int64 [1]; 0 every position, 1 the last)
    slicing the hidden states in front of the LM head, as the ONNX Runtime engine's graph has it
    (gptkiln.graph.last_logits). Generation needs one row of logits a step; every position of a SmolLM2 prefill's
    49,152-wide logits is 7 GFLOP and 25 MB a row of batch. The IR on disk keeps the contract: openvino-genai
    slices in front of the LM head itself. False (the model unchanged) where the logits are not a MatMul's."""
    import openvino as ov
    import openvino.opset13 as opset

    logits = next((r for r in model.get_results() if "logits" in r.input_value(0).get_names()), None)
    head = logits.input_value(0).get_node() if logits is not None else None
    while head is not None and _per_element(head):  # casts, soft-capping
        head = head.input_value(0).get_node()
    if head is None or head.get_type_name() != "MatMul" or head.get_input_partial_shape(0).rank != 3:
        return False  # a dynamic rank is not 3 either
    reader, hidden = head, head.input_value(0)
    while hidden.get_node().get_type_name() in ("Convert", "FakeQuantize") and len(hidden.get_target_inputs()) == 1:
        reader, hidden = hidden.get_node(), hidden.get_node().input_value(0)  # a W8A8 head's activation quantizer
    keep = opset.parameter([1], ov.Type.i64, name=io_spec.LOGITS_TO_KEEP)
    keep.output(0).get_tensor().set_names({io_spec.LOGITS_TO_KEEP})
    kept = opset.slice(hidden, opset.negative(keep), np.array([np.iinfo(np.int64).max]), np.array([1]), np.array([1]))
    reader.input(0).replace_source_output(kept.output(0))
    model.add_parameters([keep])
    model.validate_nodes_and_infer_types()
    return True


def _per_element(node) -> bool:
    """A Convert or Tanh, or a Multiply/Divide of its first input by a constant (Gemma 2's soft-capping)."""
    kind = node.get_type_name()
    return kind in ("Convert", "Tanh") or (kind in ("Multiply", "Divide") and
                                          node.input_value(1).get_node().get_type_name() == "Constant")


@dataclass(frozen=True)
class StateHandle:
    """The cache of a stateful request: valid only until the next step."""

    generation: int
    batch: int


def ir_runner(path: Path, spec: DecoderSpec, config: dict, stateful: bool = True) -> OpenVinoRunner:
    """An IR (gptkiln's or another tool's with the same inputs) compiled for the CPU with `config`, its last-position
    logits added (keep_last_logits), behind the Runner contract."""
    core = _import_openvino().Core()
    model = core.read_model(str(path))
    keeps_logits = keep_last_logits(model)
    compiled = core.compile_model(model, "CPU", config)
    return (StatefulRunner if stateful else StatelessRunner)(spec, compiled, keeps_logits)


class OpenVinoRunner(Runner):
    prompt_pass_tokens = PROMPT_PASS_TOKENS

    def __init__(self, spec: DecoderSpec, compiled, keeps_logits: bool):
        super().__init__(spec)
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.keeps_logits = keeps_logits  # keep_last_logits

    def feeds(self, input_ids, attention_mask, position_ids, last_only: bool) -> dict:
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        if self.keeps_logits:
            feeds[io_spec.LOGITS_TO_KEEP] = io_spec.KEEP_LAST if last_only else io_spec.KEEP_EVERY
        return feeds


class StatefulRunner(OpenVinoRunner):
    def __init__(self, spec: DecoderSpec, compiled, keeps_logits: bool):
        super().__init__(spec, compiled, keeps_logits)
        self.generation = 0
        # state names are input + output name, e.g. "past_key_values.3.keypresent.3.key"
        order = {name: i for i, name in enumerate(io_spec.past_names(spec.num_layers))}
        self.state_order = order

    def empty_cache(self, batch: int, capacity: int = 0) -> StateHandle:
        self.request.reset_state()
        self.generation += 1
        return StateHandle(self.generation, batch)

    def step(self, input_ids, attention_mask, position_ids, cache, last_only: bool = False):
        if not isinstance(cache, StateHandle) or cache.generation != self.generation:
            raise RuntimeError("a stateful OpenVINO runner continues only from the cache its last step returned")
        out = self.request.infer({**self.feeds(input_ids, attention_mask, position_ids, last_only),
                                  BEAM_INPUT: np.arange(cache.batch, dtype=np.int32)})
        self.generation += 1
        return out["logits"].copy(), StateHandle(self.generation, cache.batch)

    def cache_arrays(self, cache) -> list[np.ndarray]:
        states = {}
        for state in self.request.query_state():
            past_name = next(n for n in self.state_order if state.name.startswith(n))
            states[past_name] = state.state.data.copy()
        return [states[name] for name in self.state_order]


class StatelessRunner(OpenVinoRunner):
    def __init__(self, spec: DecoderSpec, compiled, keeps_logits: bool):
        super().__init__(spec, compiled, keeps_logits)
        self.past_names = io_spec.past_names(spec.num_layers)
        self.present_names = io_spec.present_names(spec.num_layers)

    def step(self, input_ids, attention_mask, position_ids, cache, last_only: bool = False):
        feeds = self.feeds(input_ids, attention_mask, position_ids, last_only)
        feeds.update(zip(self.past_names, cache))
        out = self.request.infer(feeds)
        return out["logits"].copy(), [out[name].copy() for name in self.present_names]


class OpenVinoTarget(Target):
    name = "openvino"
    description = "OpenVINO CPU, KV cache kept as model state"
    fusion_sets = ("portable", "grouped_attention")
    # int8-dynamic's MatMulInteger is decomposed by OpenVINO into an fp32 MatMul over int32
    # weights (4x the int8 size; slower than fp32 in a side study), so it is refused;
    # w8a8 and int4 stay int8/int4 inside OpenVINO
    precisions = (Precision.FP32, Precision.W8A8, Precision.INT8, Precision.INT4)
    runtime_module = "openvino"
    scores_trials = True
    stateful = True

    def __init__(self, runtime: RuntimeSettings | None = None, engine: EngineSettings | None = None,
                 safer: tuple[dict, ...] | None = None):
        super().__init__(runtime, engine)
        # the runtime settings fallback() tries after these, in order: the activation groups unless one was asked for
        chosen = self.runtime.dynamic_quantization_group is None
        groups = SAFER_ACTIVATION_GROUPS if chosen else ()
        self.safer = safer if safer is not None else tuple({"dynamic_quantization_group": g} for g in groups)

    def for_precision(self, precision: Precision) -> Target:
        """An engine with integer weights keeps an f16 KV cache unless one was asked for, and its last fallback (float
        activations where the group is gptkiln's) keeps an f32 one: the engine closest to the graph. SmolLM2 int4 on
        a 2-core Xeon, against f32: 1.14x the decode speed at batch 8, 1.03x at batch 1 (u8: 1.19x, 1.09x); the gate
        moves by less than its noise with f16 (int8 +0.198% against +0.241%), while u8 costs int8 0.14 points of its
        0.5 (benchmarks/RESULTS.md, session 41)."""
        if not (self.stateful and precision.quantized and self.runtime.kv_cache_precision is None):
            return self
        f32_cache = {"kv_cache_precision": "f32"}
        safer = self.safer[:-1] + ({**self.safer[-1], **f32_cache},) if self.safer else (f32_cache,)
        return type(self)(replace(self.runtime, kv_cache_precision=QUANTIZED_KV_CACHE), self.engine, safer)

    def check_available(self) -> None:
        _import_openvino()

    def build_settings(self) -> dict:
        return {**super().build_settings(), "fallbacks": list(self.safer)}  # what a failed gate tries next

    def tolerances(self, build: Tolerances) -> Tolerances:
        reduced = {self.runtime.inference_precision, self.runtime.kv_cache_precision or "f32"} != {"f32"}
        return Tolerances.half() if reduced and build == Tolerances() else build  # an explicit --logits-rel holds

    def precision_warnings(self, ov) -> list[str]:
        """What this CPU does with a bf16 / f16 request (its OPTIMIZATION_CAPABILITIES name what it runs natively)."""
        precision = self.runtime.inference_precision
        capabilities = set(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
        if precision == "bf16" and "BF16" not in capabilities:
            return ["this CPU has no native bf16: OpenVINO emulates it, far slower than f32 (5.5x on GPT-2 small, "
                    "benchmarks/RESULTS.md); build on the deployment CPU, or use f32"]
        if precision == "f16" and "FP16" not in capabilities:
            return ["this CPU has no native f16: OpenVINO runs this engine in f32 here (held to the f16 bars)"]
        return []

    def fallback(self) -> tuple[Target, str] | None:
        """The CPU's run-time int8 activations per 32 (the default) -> per 16 -> float ones, where gptkiln chose the
        group: on a VNNI/AMX CPU int8 activations decode SmolLM2 int4 1.3x faster at batch 1 and 1.5x at batch 8 (per
        16: 1.2x, 1.5x), and round differently from ONNX Runtime's (the engine the quantize stage scores where the
        build names it: targets.trial_target), so a build at the edge of its budget may pass on one and not the
        other; a smaller group is closer to float (SmolLM2 int4: +5.006% per 32, +4.933% per 16, +4.894% float).
        The last try also keeps an f32 KV cache where gptkiln chose f16 (for_precision)."""
        if not self.safer:
            return None
        change, rest = self.safer[0], self.safer[1:]
        what = []
        if "dynamic_quantization_group" in change:
            group = change["dynamic_quantization_group"]
            what.append(f"{f'int8 activations per {group}' if group else 'float activations'} "
                        f"(DYNAMIC_QUANTIZATION_GROUP_SIZE {group})")
        if "kv_cache_precision" in change:
            what.append(f"an {change['kv_cache_precision']} KV cache")
        return type(self)(replace(self.runtime, **change), self.engine, rest), " and ".join(what)

    def compile(self, onnx_path: Path, out_dir: Path, spec: DecoderSpec) -> dict:
        return self.compile_and_load(onnx_path, out_dir, spec)[0]

    def compile_and_load(self, onnx_path: Path, out_dir: Path, spec: DecoderSpec) -> tuple[dict, Runner]:
        import onnx_ir as ir

        from gptkiln.graph import optimize
        from gptkiln.graph.initializers import is_half_cast
        from gptkiln.graph.packed_linears import pack_linears

        ov = _import_openvino()
        model = ir.load(onnx_path)
        fusion = optimize(model, spec, self.fusion_sets)
        packed = pack_linears(model)
        halves = {node.name for node in model.graph if is_half_cast(node)}
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            portable = Path(tmp) / "model.onnx"
            ir.save(model, portable, external_data="model.onnx.data")
            try:
                converted = ov.convert_model(str(portable))
                if self.stateful:
                    make_stateful(converted, spec)
            except Exception as exc:
                raise ExportError(f"compile (openvino): conversion failed: {str(exc).splitlines()[0][:300]}",
                                  "report this with the model config") from exc
            half_constants = store_half_constants(converted, halves)
            stable_names(converted)
            carry_runtime_options(converted, compile_config(self.runtime))
            ov.save_model(converted, str(out_dir / IR_FILE), compress_to_fp16=False)
        self.save_runtime_config(out_dir, compile_config(self.runtime))
        runner = self.load(out_dir, spec)  # fail here, not on the user's device
        return {"model": IR_FILE, "stateful": self.stateful, "device": "CPU", "config": compile_config(self.runtime),
                "openvino": ov.__version__, "fusion": fusion.to_dict(), "packed_linears": packed,
                "half_constants": half_constants,
                "warnings": self.precision_warnings(ov)}, runner

    def write_ecosystem_files(self, out_dir: Path, spec: DecoderSpec, settings: dict, model_files: Path) -> dict:
        if not self.stateful:
            return {}  # openvino-genai runs stateful IRs only
        from gptkiln.ecosystem import copy_model_files
        from gptkiln.ecosystem.openvino_genai import TOKENIZER_IR, write_tokenizer_irs

        copied = copy_model_files(model_files, out_dir)
        missing = write_tokenizer_irs(out_dir)
        return {"model_files": copied, **({"openvino_genai_missing": missing} if missing else
                                          {"openvino_genai": TOKENIZER_IR})}

    def load(self, out_dir: Path, spec: DecoderSpec, threads: int | None = None) -> Runner:
        _import_openvino()  # absent: TargetUnavailableError, not a damaged IR
        try:
            config = self.read_runtime_config(out_dir, compile_config())
            if threads is not None:
                config = {**config, "INFERENCE_NUM_THREADS": threads}
            return ir_runner(out_dir / IR_FILE, spec, config, self.stateful)
        except Exception as exc:  # truncated or edited IR: OpenVINO raises RuntimeError with a long trace
            raise ArtifactError(f"OpenVINO cannot load '{out_dir / IR_FILE}': {str(exc).strip().splitlines()[0][:300]}",
                                "the IR files are damaged or from another version: export again") from None


class OpenVinoStatelessTarget(OpenVinoTarget):
    name = "openvino-stateless"
    description = "OpenVINO CPU, the plain past/present IO contract"
    # OpenVINO 2026.4's CPU plugin runs a stateless ONNX Attention with 1 < kv_heads < heads into a
    # shape error ("Incompatible MatMul batch dimension"); the stateful SDPA takes it. So this target
    # keeps transformers' repeated K/V.
    fusion_sets = ("portable",)
    stateful = False

    def check_build(self, config: BuildConfig) -> None:
        super().check_build(config)
        if (self.runtime.kv_cache_precision or "f32") != "f32":
            raise UsageError("--kv-cache-precision sets the KV cache that the stateful openvino target keeps "
                             "inside the model; openvino-stateless passes it in and out as fp32 tensors",
                             "drop --kv-cache-precision for openvino-stateless (keep it for openvino)")
