"""What a quantized build reads (calibration and evaluation text, checked before any work) and
the quantize stage itself: the exported graph prepared, calibrated and quantized, gated by accuracy."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gptkiln.calibration.perplexity import AccuracyReport, EvalText, Evaluation, Probe
from gptkiln.config import BuildConfig, Precision, QuantSettings
from gptkiln.errors import UsageError
from gptkiln.exporter.io_spec import MODEL_FILE
from gptkiln.models.loading import LoadedModel
from gptkiln.progress import Progress

if TYPE_CHECKING:
    from gptkiln.models.spec import DecoderSpec
    from gptkiln.targets.base import Runner, Target


def needs_calibration(precision: Precision, quant: QuantSettings) -> bool:
    return precision is Precision.W8A8 or (precision is Precision.INT4 and quant.int4_method.calibrated)


@dataclass
class QuantInputs:
    """The texts a quantized build reads, read (and so checked) before any work is done."""

    calibration: list[str] | None
    eval_text: EvalText

    def texts(self) -> dict[str, list[str] | None]:
        return {"calibration": self.calibration, "eval_text": self.eval_text.texts}


def read_quant_inputs(config: BuildConfig) -> QuantInputs | None:
    """Refuse a quantized build that cannot be calibrated or evaluated before any work is done."""
    from gptkiln.calibration.data import read_texts

    quant = config.quant
    if not config.precision.quantized:
        return None
    calibration = None
    if config.precision.smoothed_when_calibrated and quant.calibration.path is not None:  # optional: SmoothQuant
        calibration = read_texts(quant.calibration.path, quant.calibration.jsonl_field)
    if needs_calibration(config.precision, quant):
        if quant.calibration.path is None:
            what = ("W8A8 (static activation scales)" if config.precision is Precision.W8A8 else
                    f"int4 with {quant.int4_method.value.upper()}")
            raise UsageError(f"{what} needs calibration text and none was given",
                             "pass --calibration PATH (a text file, a JSONL file or a directory of text files)"
                             + ("; or --int4-method rtn, which needs none" if config.precision is Precision.INT4 else "")
                             + "; gptkiln never calibrates on random tokens")
        calibration = read_texts(quant.calibration.path, quant.calibration.jsonl_field)
    return QuantInputs(calibration, EvalText.read(quant.eval_text))


@contextmanager
def trial_engine(path: Path, spec: DecoderSpec, target: Target) -> Iterator[Runner]:
    """A trial graph compiled as `target` compiles its engine, loaded: the fallback stops at the first count that
    meets the budget, so a trial scored on any other form (the unfused graph, whose attention and table kernels
    round differently; another runtime) hands on a graph the engine's gate can refuse; SmolLM2's int4 scored
    +4.98% as a graph and +5.01% as the ONNX Runtime engine on an AVX2 host. The engine lives while it is used."""
    with tempfile.TemporaryDirectory(dir=path.parent) as directory:
        yield target.compile_and_load(path, Path(directory), spec)[1]


def quantize_stage(loaded: LoadedModel, exported: Path, directory: Path, config: BuildConfig, inputs: QuantInputs,
                   evaluation: Evaluation, scorer: Target, progress: Progress):
    """The exported graph, prepared and quantized; the targets' fusions run on the result. Trials and the
    fallback's ranking run on `scorer`'s engine (targets.trial_target)."""
    from gptkiln.calibration.data import calibration_set
    from gptkiln.calibration.quantize import prepare, quantize
    from gptkiln.calibration.scale_tuning import Tuned, tune_scales

    prepared = directory / "prepared" / MODEL_FILE
    prepare(exported, prepared, loaded.spec)
    quant = config.quant
    calibration = None
    if inputs.calibration is not None:
        calibration = calibration_set(inputs.calibration, loaded.tokenizer, quant.calibration, str(quant.calibration.path))

    def evaluate(path: Path) -> AccuracyReport:
        with trial_engine(path, loaded.spec, scorer) as runner:
            return evaluation.measure(runner, progress)

    probe = None

    def diverge(path: Path) -> float:  # the fallback's ranking, on the evaluation's first windows
        nonlocal probe
        probe = probe or Probe.prepare(loaded, evaluation.windows)
        with trial_engine(path, loaded.spec, scorer) as runner:
            return probe.divergence(runner)

    def tune(path: Path, layers: set[str]) -> Tuned:  # int4's scales, trained against the fp32 module
        return tune_scales(loaded.model, path, layers, calibration.windows, quant.int4_tune_epochs, loaded.spec,
                           progress, quant.calibration.seed)

    return quantize(prepared, directory, config.precision, quant, loaded.spec, calibration, evaluate,
                    quant.budget_for(config.precision), progress, diverge, tune)
