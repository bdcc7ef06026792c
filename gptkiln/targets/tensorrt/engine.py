"""Build a strongly typed TensorRT engine from the readiness-checked ONNX (needs TensorRT and an NVIDIA GPU).

Strongly typed: every layer runs in the type the graph gives it (fp32, the fp16/bf16 graph of
gptkiln.graph.half, or the explicit Q/DQ of calibration), so no precision builder flag is set
and TF32 is turned off (fp32 builds are held to fp32 parity). A graph with 2:4 sparse weights gets
SPARSE_WEIGHTS: TensorRT may then pick sparse tensor-core kernels for those layers where they are faster.
Two optimization profiles (profiles.py). The timing cache is read before and written after every build: rebuilds on the
same GPU and TensorRT version reuse the kernel choices, so they are fast and pick the same kernels.
"""

from __future__ import annotations

import os
from pathlib import Path

from gptkiln.config import EngineSettings
from gptkiln.errors import ExportError
from gptkiln.models.spec import DecoderSpec
from gptkiln.targets.tensorrt.profiles import Profile

WORKSPACE_BYTES = 8 << 30


def collecting_logger(trt):
    class CollectingLogger(trt.ILogger):
        """Keeps warnings and errors, so a failed build can say why."""

        def __init__(self):
            trt.ILogger.__init__(self)
            self.messages: list[str] = []

        def log(self, severity, message):
            if severity in kept:
                self.messages.append(str(message))

    levels = trt.ILogger.Severity
    kept = (levels.INTERNAL_ERROR, levels.ERROR, levels.WARNING)

    return CollectingLogger()


def build_engine(onnx_path: Path, engine_path: Path, spec: DecoderSpec, profiles: list[Profile],
                 settings: EngineSettings, timing_cache: Path, sparse_weights: bool = False) -> dict:
    """Write the serialized engine; return what the build used (for the manifest)."""
    import tensorrt as trt

    logger = collecting_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ExportError("compile (tensorrt): the ONNX parser refused the graph:\n    " + "\n    ".join(errors),
                          "report this with the model config and the TensorRT version")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    config.clear_flag(trt.BuilderFlag.TF32)
    for profile in profiles:
        optimization = builder.create_optimization_profile()
        for name, (low, opt, high) in profile.shapes(spec).items():
            optimization.set_shape(name, low, opt, high)
        config.add_optimization_profile(optimization)
    config.hardware_compatibility_level = _hardware_level(trt, settings.hardware_compatibility)
    if settings.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if sparse_weights:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    reused = timing_cache.is_file()
    config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError("compile (tensorrt): the engine build failed:\n    " + "\n    ".join(logger.messages[-10:]),
                          "report this with the model config and the TensorRT version")
    engine_path.write_bytes(bytes(plan))
    _save_atomically(timing_cache, bytes(config.get_timing_cache().serialize()))
    return {"timing_cache": str(timing_cache), "timing_cache_reused": reused, "sparse_weights_flag": sparse_weights,
            "builder_warnings": logger.messages[-20:]}


def _hardware_level(trt, level: str):
    names = {"none": "NONE", "ampere+": "AMPERE_PLUS", "same-cc": "SAME_COMPUTE_CAPABILITY"}
    member = getattr(trt.HardwareCompatibilityLevel, names[level], None)
    if member is None:
        raise ExportError(f"this TensorRT ({trt.__version__}) has no hardware compatibility level '{level}'",
                          "use --trt-hardware-compat none or ampere+, or a newer TensorRT")
    return member


def _save_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    partial.write_bytes(data)
    partial.replace(path)
