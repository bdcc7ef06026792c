"""ONNX Runtime: the portable baseline. CPU everywhere, CUDA where onnxruntime-gpu and a GPU exist."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from gptkiln.config import Precision
from gptkiln.errors import ArtifactError, ExportError, TargetUnavailableError
from gptkiln.exporter import io_spec
from gptkiln.exporter.io_spec import DATA_FILE, KEEP_EVERY, KEEP_LAST, LOGITS_TO_KEEP, MODEL_FILE
from gptkiln.models.spec import DecoderSpec
from gptkiln.targets.base import PROMPT_PASS_TOKENS, Runner, Target

# Every optimisation ORT has, applied when the session is created: the result is specific
# to the host's CPU/GPU, so it is never saved; the portable graph is what we ship.
OPTIMIZATION_LEVEL = "ORT_ENABLE_ALL"
KV_BLOCK = 64  # the in-place cache grows by this many positions at a time


def providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def create_session(model_path: Path, threads: int = 0):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # 0: ORT's default (every core)
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPTIMIZATION_LEVEL)
    options.log_severity_level = 3
    return ort.InferenceSession(str(model_path), options, providers=providers())


class OnnxRuntimeRunner(Runner):
    """The Concat form: the cache is the contract's arrays, a new set returned by every step. Also runs a graph
    without position_ids (onnxruntime-genai's builder derives them from the mask: benchmarks/anchor_accuracy.py)."""

    prompt_pass_tokens = PROMPT_PASS_TOKENS

    def __init__(self, spec: DecoderSpec, session):
        super().__init__(spec)
        self.session = session
        self.past_names = io_spec.past_names(spec.num_layers)
        self.present_names = io_spec.present_names(spec.num_layers)
        inputs = {i.name: i.type for i in session.get_inputs()}
        self.takes_positions = "position_ids" in inputs
        # an fp16 graph keeps its KV cache in fp16 (gptkiln.graph.half)
        self.cache_dtype = np.float16 if inputs.get(self.past_names[0]) == "tensor(float16)" else np.float32
        self.keeps_logits = LOGITS_TO_KEEP in inputs  # gptkiln.graph.last_logits

    def empty_cache(self, batch: int, capacity: int = 0) -> list[np.ndarray]:
        return [array.astype(self.cache_dtype) for array in super().empty_cache(batch)]

    def cache_arrays(self, cache) -> list[np.ndarray]:
        return [array.astype(np.float32, copy=False) for array in cache]

    def step(self, input_ids, attention_mask, position_ids, cache, last_only: bool = False):
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, **dict(zip(self.past_names, cache))}
        if self.takes_positions:
            feeds["position_ids"] = position_ids
        if self.keeps_logits:
            feeds[LOGITS_TO_KEEP] = KEEP_LAST if last_only else KEEP_EVERY
        logits, *present = self.session.run(["logits", *self.present_names], feeds)
        return logits, present


@dataclass(frozen=True)
class KVBuffer:
    """The in-place cache (gptkiln.graph.kv_buffer): per cache tensor a [batch, kv_heads, capacity, head_dim]
    array, zero where never written, bound as both the step's past and its present. A step writes at
    positions length.. of the buffer, so a cache is spent by the step it is passed to."""

    arrays: list[np.ndarray]
    binding: object  # the session's IOBinding: logits first, then every past and present on `arrays`
    length: int  # positions written

    @property
    def capacity(self) -> int:
        return self.arrays[0].shape[2]


class InPlaceRunner(OnnxRuntimeRunner):
    """The buffer form: the session writes each step's keys and values into the cache where it lies
    (IO binding: no copy of the cache, no numpy round trip). Capacity grows in blocks of KV_BLOCK."""

    def empty_cache(self, batch: int, capacity: int = 0) -> KVBuffer:
        return self._buffer(batch, _blocks(capacity))  # capacity known: no copy as it grows

    def cache_arrays(self, cache: KVBuffer) -> list[np.ndarray]:
        return [array[:, :, :cache.length].astype(np.float32) for array in cache.arrays]

    def prefill(self, input_ids, attention_mask, position_ids, cache):
        """GroupQueryAttention continues a prompt (a pass after the cache's first positions) one row at a time, so
        a batch whose prompt is not one first pass runs in groups of rows, each on its rows of the buffer."""
        batch, length = input_ids.shape
        budget, past = self.prompt_pass_tokens, attention_mask.shape[1] - length
        if budget is None or batch == 1 or (not past and batch * length <= budget):
            return super().prefill(input_ids, attention_mask, position_ids, cache)
        rows = 1 if past else max(1, budget // length)
        cache = self._ready(cache, attention_mask, length)
        parts = []
        for start in range(0, batch, rows):
            group = slice(start, start + rows)
            view = self._bound([array[group] for array in cache.arrays], cache.length)  # the same memory
            parts.append(super().prefill(input_ids[group], attention_mask[group], position_ids[group], view)[0])
        return np.concatenate(parts), replace(cache, length=attention_mask.shape[1])

    def step(self, input_ids, attention_mask, position_ids, cache, last_only: bool = False):
        cache = self._ready(cache, attention_mask, input_ids.shape[1])
        total = attention_mask.shape[1]
        binding = cache.binding
        binding.bind_output("logits")  # ORT allocates it at this step's shape
        for name, array in (("input_ids", input_ids), ("attention_mask", attention_mask),
                            ("position_ids", position_ids)):
            binding.bind_cpu_input(name, np.ascontiguousarray(array, dtype=np.int64))
        if self.keeps_logits:
            binding.bind_cpu_input(LOGITS_TO_KEEP, KEEP_LAST if last_only else KEEP_EVERY)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy(), replace(cache, length=total)

    def _ready(self, cache, attention_mask, length: int) -> KVBuffer:
        """The buffer a step of `length` new positions writes into: checked, grown where it is full."""
        if isinstance(cache, list):  # the contract's arrays (another runner's cache)
            cache = self._grown(KVBuffer([np.asarray(a, self.cache_dtype) for a in cache], None, cache[0].shape[2]),
                                cache[0].shape[2], cache[0].shape[2])
        batch, total = attention_mask.shape
        past = total - length
        if past > cache.length or cache.arrays[0].shape[0] != batch:
            raise ValueError(f"a step after {past} positions on a batch of {batch} got a cache of {cache.length} "
                             f"positions and {cache.arrays[0].shape[0]} rows")
        return self._grown(cache, past, total) if total > cache.capacity else cache

    def _buffer(self, batch: int, capacity: int) -> KVBuffer:
        shape = (batch, self.spec.num_kv_heads, capacity, self.spec.head_dim)
        return self._bound([np.zeros(shape, self.cache_dtype) for _ in self.past_names], 0)

    def _bound(self, arrays: list[np.ndarray], length: int) -> KVBuffer:
        """`arrays` (C-contiguous: a buffer or a range of its rows) bound as every layer's past and present."""
        import onnxruntime as ort

        binding = self.session.io_binding()
        binding.bind_output("logits")
        for past_name, present_name, array in zip(self.past_names, self.present_names, arrays):
            value = ort.OrtValue.ortvalue_from_numpy(array)  # shares the array's memory
            binding.bind_ortvalue_input(past_name, value)
            binding.bind_ortvalue_output(present_name, value)
        return KVBuffer(arrays, binding, length)

    def _grown(self, cache: KVBuffer, keep: int, needed: int) -> KVBuffer:
        """A buffer of `needed` positions or more (a multiple of KV_BLOCK) holding cache's first `keep`."""
        grown = self._buffer(cache.arrays[0].shape[0], _blocks(max(needed, 1)))
        for new, old in zip(grown.arrays, cache.arrays):
            new[:, :, :keep] = old[:, :, :keep]
        return replace(grown, length=keep)


def _blocks(positions: int) -> int:
    """`positions` rounded up to a whole number of KV_BLOCK."""
    return -(-positions // KV_BLOCK) * KV_BLOCK


class OnnxRuntimeTarget(Target):
    name = "onnxruntime"
    description = "ONNX Runtime (CPU; CUDA when onnxruntime-gpu sees a GPU)"
    fusion_sets = ("portable", "grouped_attention", "onnxruntime")
    # bf16: ORT's CPU kernels lack it (no Where, MatMul, ... for bfloat16)
    precisions = (Precision.FP32, Precision.W8A8, Precision.INT8_DYNAMIC, Precision.INT8, Precision.INT4,
                  Precision.FP16)
    runtime_module = "onnxruntime"
    scores_trials = True

    def build_settings(self) -> dict:
        return {"threads": self.runtime.threads}  # ORT has no performance hint

    def check_available(self) -> None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise TargetUnavailableError("onnxruntime is not installed", "pip install onnxruntime") from None

    def compile(self, onnx_path: Path, out_dir: Path, spec: DecoderSpec) -> dict:
        return self.compile_and_load(onnx_path, out_dir, spec)[0]

    def compile_and_load(self, onnx_path: Path, out_dir: Path, spec: DecoderSpec) -> tuple[dict, Runner]:
        import onnx_ir as ir
        import onnxruntime as ort

        from gptkiln.graph import optimize
        from gptkiln.graph.kv_buffer import share_kv_buffers
        from gptkiln.graph.last_logits import keep_last_logits
        from gptkiln.graph.lookup_tables import gather_block_quantized
        from gptkiln.graph.matmul_nbits import lower_blocked_matmuls
        from gptkiln.graph.packed_linears import pack_linears
        from gptkiln.graph.rotary_attention import rotary_into_attention
        from gptkiln.graph.skip_layer_norm import unname_statistics

        model = ir.load(onnx_path)
        fusion = optimize(model, spec, self.fusion_sets)
        concat_reason = share_kv_buffers(model, spec)
        kv_cache = "concat" if concat_reason else "in-place"
        all_logits_reason = keep_last_logits(model)
        tables = gather_block_quantized(model)  # the quantize stage's tables, gathered without a full dequantize
        packed = pack_linears(model)
        weight_only = lower_blocked_matmuls(model)  # after packing: it packs the standard form
        rows = _blocks(spec.max_positions)  # a rotary table row for every slot of the buffer
        rotary_reason = rotary_into_attention(model, spec, rows)
        unname_statistics(model)
        out_dir.mkdir(parents=True, exist_ok=True)
        ir.save(model, out_dir / MODEL_FILE, external_data=DATA_FILE)
        self.save_runtime_config(out_dir, {"intra_op_num_threads": self.runtime.threads, "kv_cache": kv_cache})
        try:
            session = create_session(out_dir / MODEL_FILE, self.runtime.threads)  # fail here, not on the user's device
        except Exception as exc:
            raise ExportError(f"compile (onnxruntime): the session cannot be created: {exc}",
                              "report this with the model config; the exported graph is invalid for ORT") from exc
        settings = {"model": MODEL_FILE, "graph_optimization_level": OPTIMIZATION_LEVEL,
                "providers": providers(), "onnxruntime": ort.__version__,
                "intra_op_num_threads": self.runtime.threads, "kv_cache": kv_cache,
                **({"kv_cache_concat_reason": concat_reason} if concat_reason else {}),
                "last_logits": all_logits_reason is None, "quantized_lookup_tables": tables, "packed_linears": packed,
                "matmul_nbits": weight_only,
                "rotary_in_attention": rotary_reason is None, **({"rotary_reason": rotary_reason} if rotary_reason else {}),
                **({"last_logits_reason": all_logits_reason} if all_logits_reason else {}), "fusion": fusion.to_dict()}
        return settings, _runner(spec, session, kv_cache)

    def write_ecosystem_files(self, out_dir: Path, spec: DecoderSpec, settings: dict, model_files: Path) -> dict:
        from gptkiln.ecosystem import copy_model_files
        from gptkiln.ecosystem.onnxruntime_genai import CONFIG_FILE, write_genai_config

        copied = copy_model_files(model_files, out_dir)
        write_genai_config(out_dir, spec, settings)
        return {"model_files": copied, "onnxruntime_genai": CONFIG_FILE}

    def load(self, out_dir: Path, spec: DecoderSpec, threads: int | None = None) -> Runner:
        self.check_available()
        try:
            config = self.read_runtime_config(out_dir, {"intra_op_num_threads": 0})
            session = create_session(out_dir / MODEL_FILE, config["intra_op_num_threads"] if threads is None else threads)
        except Exception as exc:  # ORT raises its own exception types
            raise ArtifactError(f"ONNX Runtime cannot load '{out_dir / MODEL_FILE}': {str(exc).splitlines()[0][:300]}",
                                "check the onnxruntime version against the manifest's, or export again") from None
        return _runner(spec, session, config.get("kv_cache", "concat"))


def _runner(spec: DecoderSpec, session, kv_cache: str) -> OnnxRuntimeRunner:
    return (InPlaceRunner if kv_cache == "in-place" else OnnxRuntimeRunner)(spec, session)
