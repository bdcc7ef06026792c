"""ONNX Runtime: the portable baseline. CPU everywhere, CUDA where onnxruntime-gpu and a GPU exist."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gptkiln.config import Precision
from gptkiln.errors import ArtifactError, ExportError, TargetUnavailableError
from gptkiln.exporter import io_spec
from gptkiln.exporter.io_spec import DATA_FILE, MODEL_FILE
from gptkiln.models.spec import DecoderSpec
from gptkiln.targets.base import Runner, Target

# Every optimisation ORT has, applied when the session is created: the result is specific
# to the host's CPU/GPU, so it is never saved; the portable graph is what we ship.
OPTIMIZATION_LEVEL = "ORT_ENABLE_ALL"


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
    def __init__(self, spec: DecoderSpec, session):
        super().__init__(spec)
        self.session = session
        self.past_names = io_spec.past_names(spec.num_layers)
        inputs = {i.name: i.type for i in session.get_inputs()}
        # an fp16 graph keeps its KV cache in fp16 (gptkiln.graph.half)
        self.cache_dtype = np.float16 if inputs.get(self.past_names[0]) == "tensor(float16)" else np.float32

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        return [array.astype(self.cache_dtype) for array in super().empty_cache(batch)]

    def cache_arrays(self, cache) -> list[np.ndarray]:
        return [array.astype(np.float32, copy=False) for array in cache]

    def step(self, input_ids, attention_mask, position_ids, cache):
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        feeds.update(zip(self.past_names, cache))
        logits, *present = self.session.run(None, feeds)
        return logits, present


class OnnxRuntimeTarget(Target):
    name = "onnxruntime"
    description = "ONNX Runtime (CPU; CUDA when onnxruntime-gpu sees a GPU)"
    fusion_sets = ("portable", "grouped_attention", "onnxruntime")
    # bf16: ORT's CPU kernels lack it (no Where, MatMul, ... for bfloat16)
    precisions = (Precision.FP32, Precision.W8A8, Precision.INT8_DYNAMIC, Precision.INT8, Precision.INT4,
                  Precision.FP16)
    runtime_module = "onnxruntime"

    def build_settings(self) -> dict:
        return {"threads": self.runtime.threads}  # ORT has no performance hint

    def check_available(self) -> None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise TargetUnavailableError("onnxruntime is not installed", "pip install onnxruntime") from None

    def compile(self, onnx_path: Path, out_dir: Path, spec: DecoderSpec) -> dict:
        import onnx_ir as ir
        import onnxruntime as ort

        from gptkiln.graph import optimize

        model = ir.load(onnx_path)
        fusion = optimize(model, spec, self.fusion_sets)
        out_dir.mkdir(parents=True, exist_ok=True)
        ir.save(model, out_dir / MODEL_FILE, external_data=DATA_FILE)
        self.save_runtime_config(out_dir, {"intra_op_num_threads": self.runtime.threads})
        try:
            create_session(out_dir / MODEL_FILE, self.runtime.threads)  # fail here, not on the user's device
        except Exception as exc:
            raise ExportError(f"compile (onnxruntime): the session cannot be created: {exc}",
                              "report this with the model config; the exported graph is invalid for ORT") from exc
        return {"model": MODEL_FILE, "graph_optimization_level": OPTIMIZATION_LEVEL,
                "providers": providers(), "onnxruntime": ort.__version__,
                "intra_op_num_threads": self.runtime.threads, "fusion": fusion.to_dict()}

    def load(self, out_dir: Path, spec: DecoderSpec, threads: int | None = None) -> Runner:
        self.check_available()
        try:
            if threads is None:
                threads = self.read_runtime_config(out_dir, {"intra_op_num_threads": 0})["intra_op_num_threads"]
            session = create_session(out_dir / MODEL_FILE, threads)
        except Exception as exc:  # ORT raises its own exception types
            raise ArtifactError(f"ONNX Runtime cannot load '{out_dir / MODEL_FILE}': {str(exc).splitlines()[0][:300]}",
                                "check the onnxruntime version against the manifest's, or export again") from None
        return OnnxRuntimeRunner(spec, session)
