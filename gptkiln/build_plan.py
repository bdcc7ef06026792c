"""The keys of a build, computed before any work: each stage's key is a hash of everything it reads.

    export    model files (weights, config, tokenizer), opset, tool versions, gptkiln's source
    quantize  export key, precision, the quantization settings that precision uses, the
              calibration and evaluation texts (their content), the accuracy budget, the engine
              its trials are scored on (targets.trial_target: name, settings, runtime version),
              the host CPU's kernel features (trials are scored on this host's kernels)
    half      the key of its input graph, precision
    target    the key of the graph it compiles, target name, the settings that target reads,
              its runtime's version, the parity settings and the gate it is held to, the host
              CPU's kernel features (the gate is measured on them)
    build     every target key (and the manifest format): equal key, equal output

So a rerun with nothing changed finds every key; changing one target's settings changes only
that target's key.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

from gptkiln.config import BuildConfig, Precision, QuantSettings
from gptkiln.manifest import FORMAT, host_cpu, sha256_file, tool_versions
from gptkiln.models.loading import model_source
from gptkiln.stage_cache import stage_key
from gptkiln.targets import trial_target
from gptkiln.targets.base import Target


@dataclass(frozen=True)
class BuildPlan:
    source: dict  # the model: kind, name, sha256
    opset: int
    export: str
    quantize: str | None
    half: str | None
    targets: dict[str, str]  # target name -> key
    key: str  # the whole build

    def to_dict(self) -> dict:
        return asdict(self)


def plan_build(config: BuildConfig, targets: list[Target], texts: dict[str, list[str] | None]) -> BuildPlan:
    """`texts`: the calibration and evaluation texts the build reads (None where it reads none)."""
    source = model_source(config.model)
    opset = effective_opset(config)
    tools = {**tool_versions(), "gptkiln-source": source_digest()}
    features = host_cpu()["features"]
    export = stage_key("export", source["sha256"], opset, tools)
    graph = export
    quantize = half = None
    if config.precision.quantized:
        scorer = trial_target(targets)
        quantize = stage_key("quantize", export, config.precision.value, quant_settings(config.precision, config.quant),
                             {name: texts_digest(t) for name, t in texts.items()},
                             [scorer.name, scorer.build_settings(), scorer.runtime_version()], features)
        graph = quantize
    if config.precision.half:
        half = graph = stage_key("half", graph, config.precision.value)
    gate = {"parity": asdict(config.parity), "tolerances": asdict(config.tolerances),
            "budget": asdict(config.quant.budget_for(config.precision)) if config.precision.quantized else None}
    keys = {t.name: stage_key("target", graph, t.name, t.build_settings(), t.runtime_version(), gate, features)
            for t in targets}
    return BuildPlan(source, opset, export, quantize, half, keys, stage_key("build", FORMAT, keys))


def effective_opset(config: BuildConfig) -> int:
    from gptkiln.calibration.weight_only import MIN_OPSET  # blocked DequantizeLinear

    return max(config.opset, MIN_OPSET) if config.precision.weight_only else config.opset


def quant_settings(precision: Precision, quant: QuantSettings) -> dict:
    """The settings a quantized build of this precision reads (others do not change its key)."""
    settings = {"fallback": quant.fallback, "eval_text": quant.eval_text, "eval_tokens": quant.eval_tokens,
                "budget": asdict(quant.budget_for(precision))}
    if precision is Precision.W8A8:
        settings.update(activations=quant.activations.value, percentile=quant.percentile,
                        smoothquant_alpha=quant.smoothquant_alpha, float_channels=quant.float_channels)
    smoothed = precision.smoothed_when_calibrated and quant.calibration.path is not None
    if smoothed:  # SmoothQuant from the calibration text
        settings.update(smoothquant_alpha=quant.smoothquant_alpha)
    if precision is Precision.INT4:
        settings.update(method=quant.int4_method.value, block_size=quant.int4_block_size,
                        symmetric=quant.int4_symmetric, fine_block_size=quant.int4_fine_block_size,
                        backup_block_size=quant.int8_block_size)  # the fallback's int8
    if precision is Precision.INT8:
        settings.update(block_size=quant.int8_block_size)
    calibrated_int4 = precision is Precision.INT4 and quant.int4_method.calibrated
    if calibrated_int4:
        settings.update(tune_epochs=quant.int4_tune_epochs)
    if precision is Precision.W8A8 or smoothed or calibrated_int4:
        settings["calibration"] = asdict(quant.calibration)
    return settings


@functools.cache
def source_digest() -> str:
    """sha256 over gptkiln's own source: a changed gptkiln never reuses an older one's stages."""
    package = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode())
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def texts_digest(texts: list[str] | None) -> str | None:
    if texts is None:
        return None
    digest = hashlib.sha256()
    for text in texts:
        digest.update(hashlib.sha256(text.encode()).digest())
    return digest.hexdigest()
