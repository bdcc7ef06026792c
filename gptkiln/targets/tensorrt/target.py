"""TensorRT (NVIDIA GPU): a strongly typed engine with prefill and decode optimization profiles.

compile() always optimizes the graph (portable fusions: TensorRT fuses attention itself), checks
it against TensorRT's published ONNX support (readiness.py) and writes the ONNX. Where TensorRT
and a GPU are present it then builds the engine and proves it like every target; elsewhere the
output is that checked ONNX with its profiles and a trtexec command, marked "compiled": false,
with the list of what is missing to finish.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from gptkiln.cache import cache_root
from gptkiln.config import BuildConfig, Precision
from gptkiln.errors import ArtifactError, ExportError, TargetUnavailableError, UsageError
from gptkiln.exporter.io_spec import DATA_FILE, MODEL_FILE
from gptkiln.models.spec import DecoderSpec
from gptkiln.targets.base import Runner, Target
from gptkiln.targets.tensorrt.compat import (EngineRequirements, build_problems, compatibility_problems,
                                             parse_version)
from gptkiln.targets.tensorrt.profiles import Profile, check_settings, derive_profiles
from gptkiln.targets.tensorrt.onnx_support import INT4_BLOCK_SIZES

ENGINE_FILE = "model.engine"
TRTEXEC_SCRIPT = "build_engine.sh"  # the same engine build with NVIDIA's trtexec
INSTALL = "pip install tensorrt --extra-index-url https://pypi.nvidia.com"


def host_missing(minimum: str = "10.0") -> list[str]:
    """What this machine lacks to build and run TensorRT engines (empty: nothing)."""
    missing = []
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        missing.append(f"TensorRT {minimum} or newer: {INSTALL}")
    try:
        import torch
    except ImportError:
        missing.append("torch with CUDA (the runner keeps its buffers in torch CUDA tensors)")
    else:
        if not torch.cuda.is_available():
            missing.append("an NVIDIA GPU visible to CUDA (torch.cuda.is_available() is False)")
    return missing


def compute_capability() -> str:
    import torch

    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


class TensorRTTarget(Target):
    name = "tensorrt"
    description = "TensorRT (NVIDIA GPU), strongly typed, prefill and decode profiles"
    fusion_sets = ("portable",)
    # int8-dynamic: TensorRT has no MatMulInteger/DynamicQuantizeLinear; W8A8 and int4 are explicit Q/DQ
    precisions = (Precision.FP32, Precision.FP16, Precision.BF16, Precision.W8A8, Precision.INT4)
    runtime_module = "tensorrt"

    def build_settings(self) -> dict:
        return {"engine": asdict(self.engine)}

    def requirements(self, settings: dict) -> dict:
        return {"runtime": self.runtime_module, "minimum_version": settings["requires"]["tensorrt"],
                "device": "cuda", "engine": settings["requires"]}

    def host_problems(self, requirements: dict) -> list[str]:
        """TensorRT, torch with CUDA and a GPU, then the engine's version and compute-capability rules."""
        missing = host_missing(requirements["minimum_version"])
        if missing:
            return missing
        import tensorrt as trt

        return compatibility_problems(EngineRequirements(**requirements["engine"]), trt.__version__,
                                      compute_capability())

    def check_available(self) -> None:
        missing = host_missing()
        if missing:
            raise TargetUnavailableError(f"TensorRT cannot run here: missing {'; '.join(missing)}",
                                         "run this on a machine with an NVIDIA GPU and TensorRT 10")

    def check_build(self, config: BuildConfig) -> None:
        """A missing TensorRT is no reason to refuse: the checked ONNX is still prepared (see compile)."""
        self.check_precision(config.precision)
        check_settings(self.engine)
        quant = config.quant
        if config.precision is Precision.INT4:
            fixes = [] if quant.int4_symmetric else ["--int4-symmetric"]
            fixes += [] if quant.int4_block_size in INT4_BLOCK_SIZES else ["--int4-block-size 128 (or 64)"]
            fixes += [] if quant.int4_fine_block_size in INT4_BLOCK_SIZES else ["--int4-fine-block-size 64"]
            if fixes:
                raise UsageError("TensorRT runs int4 only symmetric (no zero points) in blocks of 64 or 128",
                                 f"add {' '.join(fixes)}")

    def compile(self, onnx_path: Path, out_dir: Path, spec: DecoderSpec) -> dict:
        import onnx_ir as ir

        from gptkiln.graph import optimize
        from gptkiln.graph.initializers import fold_half_constants
        from gptkiln.graph.lookup_tables import dequantize_lookup_tables
        from gptkiln.targets.tensorrt.readiness import check as readiness_check, weight_types

        model = ir.load(onnx_path)
        fold_half_constants(model)  # fp32 scales: TensorRT's DequantizeLinear takes them as plain constants
        fusion = optimize(model, spec, self.fusion_sets)
        float_tables = dequantize_lookup_tables(model)  # TensorRT dequantizes weights in front of a MatMul only
        profiles = derive_profiles(spec, self.engine)
        readiness = readiness_check(model, spec, profiles)
        if not readiness.ready:
            raise ExportError(f"the graph is not ready for TensorRT ({len(readiness.problems)} problem(s)):\n    "
                              + "\n    ".join(readiness.problems),
                              "fix what is listed (each line names the node and the rule), or build for another target")
        out_dir.mkdir(parents=True, exist_ok=True)
        ir.save(model, out_dir / MODEL_FILE, external_data=DATA_FILE)
        bf16 = ir.DataType.BFLOAT16 in weight_types(model)
        sparse = readiness.sparse_layers > 0
        script = out_dir / TRTEXEC_SCRIPT
        script.write_text(f"#!/bin/sh\n# {TRTEXEC_SCRIPT}: builds {ENGINE_FILE} from {MODEL_FILE} with the profiles gptkiln "
                          f"derived\nset -e\ncd \"$(dirname \"$0\")\"\n{trtexec_command(profiles, spec, self.engine, sparse)}\n")
        script.chmod(0o755)
        settings = {"model": MODEL_FILE, "readiness": readiness.to_dict(), "profiles": [p.to_dict() for p in profiles],
                    "hardware_compatibility": self.engine.hardware_compatibility,
                    "version_compatible": self.engine.version_compatible, "trtexec_script": TRTEXEC_SCRIPT,
                    "sparse_weights": sparse, "fusion": fusion.to_dict(), "float_lookup_tables": float_tables}
        missing = host_missing(readiness.minimum_tensorrt)
        if missing:
            return {**settings, "compiled": False, "missing": missing}
        return {**settings, **self._build(out_dir, spec, profiles, readiness.minimum_tensorrt,
                                          "bf16" if bf16 else "", sparse)}

    def _build(self, out_dir: Path, spec: DecoderSpec, profiles: list[Profile], minimum: str, precision: str,
               sparse: bool) -> dict:
        import tensorrt as trt
        import torch

        from gptkiln.targets.tensorrt.engine import build_engine

        if parse_version(trt.__version__) < parse_version(minimum):
            raise TargetUnavailableError(f"this graph needs TensorRT {minimum} or newer (its ops); "
                                         f"this host has {trt.__version__}",
                                         "upgrade TensorRT, or export with --opset 18 (no ONNX Attention op)")
        capability = compute_capability()
        problems = build_problems(precision, self.engine.hardware_compatibility, capability)
        if problems:
            raise TargetUnavailableError("; ".join(problems), "build on a newer GPU, or change the options named")
        cache = cache_root() / "tensorrt" / f"timing-{trt.__version__}-sm{capability.replace('.', '')}.cache"
        built = build_engine(out_dir / MODEL_FILE, out_dir / ENGINE_FILE, spec, profiles, self.engine, cache, sparse)
        requires = EngineRequirements(trt.__version__, capability, self.engine.hardware_compatibility,
                                      self.engine.version_compatible)
        self.save_runtime_config(out_dir, {"profiles": [p.to_dict() for p in profiles], "requires": requires.to_dict()})
        self.load(out_dir, spec)  # fail here, not on the user's device
        return {"compiled": True, "engine": ENGINE_FILE, "tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(),
                "requires": requires.to_dict(), **built}

    def load(self, out_dir: Path, spec: DecoderSpec, threads: int | None = None) -> Runner:  # threads: GPU, unused
        self.check_available()
        import tensorrt as trt

        from gptkiln.targets.tensorrt.engine import collecting_logger
        from gptkiln.targets.tensorrt.runner import TensorRTRunner

        config = self.read_runtime_config(out_dir, {})
        if not (out_dir / ENGINE_FILE).is_file() or "requires" not in config:
            raise ArtifactError(f"'{out_dir}' holds the ONNX prepared for TensorRT but no engine",
                                "export again on a machine with TensorRT and an NVIDIA GPU")
        requires = EngineRequirements(**config["requires"])
        problems = compatibility_problems(requires, trt.__version__, compute_capability())
        if problems:
            raise TargetUnavailableError("this host cannot load the engine: " + "; ".join(problems),
                                         "load it where it was built, or export again on this host")
        logger = collecting_logger(trt)
        runtime = trt.Runtime(logger)
        if requires.version_compatible:
            runtime.engine_host_code_allowed = True  # the plan carries its own lean runtime
        engine = runtime.deserialize_cuda_engine((out_dir / ENGINE_FILE).read_bytes())
        if engine is None:
            raise ArtifactError(f"TensorRT cannot load '{out_dir / ENGINE_FILE}': {' '.join(logger.messages[-3:])}",
                                "the engine file is damaged: export again")
        return TensorRTRunner(spec, engine, [Profile.from_dict(p) for p in config["profiles"]])


def trtexec_command(profiles: list[Profile], spec: DecoderSpec, engine, sparse: bool = False) -> str:
    """The same build with NVIDIA's trtexec, for machines that have TensorRT but not gptkiln."""
    parts = ["trtexec", f"--onnx={MODEL_FILE}", "--stronglyTyped", "--noTF32"]
    for index, profile in enumerate(profiles):
        shapes = profile.shapes(spec)
        parts.append(f"--profile={index}")
        for which, flag in enumerate(("--minShapes", "--optShapes", "--maxShapes")):
            spec_text = ",".join(f"{name}:{'x'.join(map(str, dims[which]))}" for name, dims in shapes.items())
            parts.append(f"{flag}={spec_text}")
    if engine.hardware_compatibility == "ampere+":
        parts.append("--hardwareCompatibilityLevel=ampere+")
    if engine.version_compatible:
        parts.append("--versionCompatible")
    if sparse:
        parts.append("--sparsity=enable")
    parts += ["--timingCacheFile=timing.cache", f"--saveEngine={ENGINE_FILE}", "--skipInference"]
    return " ".join(parts)
