"""build(config) -> BuildResult: load, export, compile and prove each target, publish atomically.

The build happens in a hidden sibling directory of the output; only when every target has
passed its parity gate is the manifest written (last) and the directory renamed into place.
A failed or interrupted build leaves no output directory behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from gptkiln.calibration.perplexity import AccuracyReport, EvalText, Evaluation, accuracy_failures
from gptkiln.config import (AccuracyBudget, BuildConfig, Int4Method, ParitySettings, Precision, QuantSettings,
                            Tolerances)
from gptkiln.errors import (ArtifactError, ExportError, GptkilnError, OutputError, ParityError, TargetUnavailableError,
                            UsageError)
from gptkiln.exporter import io_spec
from gptkiln.exporter.to_onnx import MODEL_FILE
from gptkiln.manifest import MANIFEST, read_manifest, tool_versions, write_manifest
from gptkiln.models.loading import LoadedModel, load_model
from gptkiln.models.spec import DecoderSpec
from gptkiln.parity import ParityReport, consistency_gate, gate, parity_prompts, run_parity
from gptkiln.targets import get_target

EXPORT_DIR = "_export"  # inside the build directory; removed before publishing
QUANT_DIR = "_quantize"  # likewise: the prepared, smoothed and trial graphs
HALF_DIR = "_half"  # likewise: the fp16 / bf16 graph
INT4_MIN_OPSET = 21  # blocked DequantizeLinear


class Progress:
    """Stage lines on stderr; a failure names the stage and the stages that finished before it."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.finished: list[str] = []
        self.seconds: dict[str, float] = {}

    def say(self, message: str) -> None:
        if self.enabled:
            print(message, file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def stage(self, name: str):
        self.say(f"[{len(self.finished) + 1}] {name} ...")
        started = time.perf_counter()
        try:
            yield
        except GptkilnError:
            raise
        except Exception as exc:
            after = f" after {', '.join(self.finished)}" if self.finished else ""
            raise ExportError(f"stage '{name}' failed{after}: {type(exc).__name__}: {exc}",
                              "rerun with GPTKILN_DEBUG=1 for the traceback and report it") from exc
        self.seconds[name] = round(time.perf_counter() - started, 2)
        self.finished.append(name)
        self.say(f"    {name}: done in {self.seconds[name]:.1f}s")


@dataclass
class TargetResult:
    name: str
    settings: dict
    parity: ParityReport | None  # None: prepared only, no engine to run here
    failures: list[str]
    accuracy: AccuracyReport | None = None  # quantized builds: perplexity and top-1 against fp32

    @property
    def compiled(self) -> bool:
        return self.settings.get("compiled", True)

    def to_dict(self) -> dict:
        return {"settings": self.settings, "compiled": self.compiled,
                "parity": self.parity.to_dict() if self.parity else None,
                "accuracy": self.accuracy.to_dict() if self.accuracy else None,
                "passed": not self.failures, "failures": self.failures}


@dataclass
class BuildResult:
    output: Path
    model: dict
    spec: DecoderSpec
    export: dict
    precision: Precision = Precision.FP32
    quantization: dict | None = None  # QuantResult.to_dict(): method, kept layers, trials
    half: dict | None = None  # fp16 / bf16 builds: gptkiln.graph.half's report
    targets: list[TargetResult] = field(default_factory=list)
    stage_seconds: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(not t.failures for t in self.targets)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "output": str(self.output), "model": self.model, "spec": self.spec.to_dict(),
                "export": self.export, "precision": self.precision.value, "quantization": self.quantization,
                "half": self.half, "targets": {t.name: t.to_dict() for t in self.targets},
                "stage_seconds": self.stage_seconds}


def build(config: BuildConfig, progress: Progress | None = None) -> BuildResult:
    progress = progress or Progress(enabled=False)
    if not config.targets:
        raise TargetUnavailableError("no target to build: no target runtime is installed here",
                                     "pip install onnxruntime, or name a target with --target")
    targets = [get_target(name, config.runtime, config.engine) for name in config.targets]
    for target in targets:
        target.check_build(config)
    inputs = _read_quant_inputs(config)
    output = config.output.expanduser().resolve()
    _check_output(output, config.force)
    work = _make_work_dir(output)
    try:
        with progress.stage(f"load {config.model}"):
            loaded = load_model(config.model)
        opset = max(config.opset, INT4_MIN_OPSET) if config.precision is Precision.INT4 else config.opset
        with progress.stage("export to ONNX"):
            exported = _export(loaded, work / EXPORT_DIR, opset)
        result = BuildResult(output, loaded.source, loaded.spec, exported, config.precision)
        reference = _reference_runner(loaded)
        compile_input, evaluation = work / EXPORT_DIR / MODEL_FILE, None
        if config.precision.quantized:
            with progress.stage("score the fp32 model on the evaluation text"):
                evaluation = Evaluation.prepare(loaded, inputs.eval_text, config.quant.eval_tokens)
            with progress.stage(f"quantize {config.precision.value}"):
                quantized = _quantize(loaded, compile_input, work / QUANT_DIR, config, inputs, evaluation, progress)
            result.quantization = quantized.to_dict()
            compile_input = quantized.path
        if config.precision.half:
            with progress.stage(f"convert to {config.precision.value}"):
                result.half = _to_half(compile_input, work / HALF_DIR / MODEL_FILE, config.precision).to_dict()
            compile_input = work / HALF_DIR / MODEL_FILE
        budget = config.quant.budget_for(config.precision)
        for target in targets:
            with progress.stage(f"compile {target.name}"):
                settings = target.compile(compile_input, work / target.name, loaded.spec)
            _warn_short_fusions(progress, target.name, settings["fusion"])
            if not settings.get("compiled", True):
                progress.say(f"    {target.name}: prepared, not compiled here: {'; '.join(settings['missing'])}")
                result.targets.append(TargetResult(target.name, settings, None, []))
                continue
            with progress.stage(f"parity {target.name}"):
                runner = target.load(work / target.name, loaded.spec)
                report = run_parity(runner, reference, parity_prompts(loaded.tokenizer), config.parity)
                accuracy = evaluation.measure(runner) if evaluation else None
            failures = _gate(config.precision, report, accuracy, config.tolerances, budget)
            result.targets.append(TargetResult(target.name, settings, report, failures, accuracy))
        result.stage_seconds = progress.seconds
        _raise_if_failed(result)
        shutil.rmtree(work / EXPORT_DIR)
        shutil.rmtree(work / QUANT_DIR, ignore_errors=True)
        shutil.rmtree(work / HALF_DIR, ignore_errors=True)
        loaded.tokenizer.save_pretrained(work)
        write_manifest(work, _manifest_body(config, result))
        _publish(work, output, config.force)
        return result
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def verify(output: Path, tolerances: Tolerances | None, settings: ParitySettings,
           progress: Progress | None = None) -> BuildResult:
    """Check every file against the manifest, then rerun parity for every target in it
    (against the tolerances the build was held to, unless others are given)."""
    progress = progress or Progress(enabled=False)
    with progress.stage("check files"):
        manifest = read_manifest(output)
    tolerances = tolerances or Tolerances(**manifest["tolerances"])
    precision = Precision(manifest["precision"])
    quantization = manifest.get("quantization")
    with progress.stage(f"load {manifest['model']['name']}"):
        loaded = load_model(manifest["model"]["name"])
    if loaded.source["sha256"] != manifest["model"]["sha256"]:
        raise ArtifactError(f"the model '{loaded.source['name']}' changed since this output was exported "
                          f"(sha256 {loaded.source['sha256'][:12]} != {manifest['model']['sha256'][:12]})",
                          "export again from the current model")
    result = BuildResult(output, loaded.source, loaded.spec, manifest["export"], precision, quantization)
    reference = _reference_runner(loaded)
    evaluation, budget = None, None
    if precision.quantized:
        budget = AccuracyBudget(**manifest["budget"])
        with progress.stage("score the fp32 model on the evaluation text"):
            scored = quantization["accuracy"]  # the same text and windows the build was held to
            evaluation = Evaluation.prepare(loaded, EvalText.read(Path(scored["text"])), scored["tokens"])
    for name, built in manifest["targets"].items():
        if not built.get("compiled", True):  # prepared for a machine with the runtime: nothing to run
            result.targets.append(TargetResult(name, built["settings"], None, []))
            continue
        target = get_target(name)
        with progress.stage(f"parity {name}"):
            runner = target.load(output / name, loaded.spec)
            report = run_parity(runner, reference, parity_prompts(loaded.tokenizer), settings)
            accuracy = evaluation.measure(runner) if evaluation else None
        result.targets.append(TargetResult(name, manifest["targets"][name]["settings"], report,
                                           _gate(precision, report, accuracy, tolerances, budget), accuracy))
    result.stage_seconds = progress.seconds
    _raise_if_failed(result)
    return result


def _gate(precision: Precision, report: ParityReport, accuracy: AccuracyReport | None, tolerances: Tolerances,
          budget: AccuracyBudget | None) -> list[str]:
    """fp32, fp16, bf16: the parity bars of that precision. Quantized: the accuracy budget, and padded
    rows that keep their tokens."""
    if not precision.quantized:
        return gate(report, tolerances)
    return accuracy_failures(accuracy, budget) + consistency_gate(report, budget.min_padded_top1_agreement)


def needs_calibration(precision: Precision, quant: QuantSettings) -> bool:
    return precision is Precision.W8A8 or (precision is Precision.INT4 and quant.int4_method is Int4Method.GPTQ)


@dataclass
class QuantInputs:
    """The texts a quantized build reads, read (and so checked) before any work is done."""

    calibration: list[str] | None
    eval_text: EvalText


def _read_quant_inputs(config: BuildConfig) -> QuantInputs | None:
    """Refuse a quantized build that cannot be calibrated or evaluated before any work is done."""
    from gptkiln.calibration.data import read_texts

    quant = config.quant
    if not config.precision.quantized:
        return None
    calibration = None
    if needs_calibration(config.precision, quant):
        if quant.calibration.path is None:
            what = "W8A8 (static activation scales)" if config.precision is Precision.W8A8 else "int4 with GPTQ"
            raise UsageError(f"{what} needs calibration text and none was given",
                             "pass --calibration PATH (a text file, a JSONL file or a directory of text files)"
                             + ("; or --int4-method rtn, which needs none" if config.precision is Precision.INT4 else "")
                             + "; gptkiln never calibrates on random tokens")
        calibration = read_texts(quant.calibration.path, quant.calibration.jsonl_field)
    return QuantInputs(calibration, EvalText.read(quant.eval_text))


def _quantize(loaded: LoadedModel, exported: Path, directory: Path, config: BuildConfig, inputs: QuantInputs,
              evaluation: Evaluation, progress: Progress):
    """The exported graph, prepared and quantized; the targets' fusions run on the result."""
    from gptkiln.calibration.data import calibration_set
    from gptkiln.calibration.quantize import prepare, quantize
    from gptkiln.targets.onnxruntime import OnnxRuntimeRunner, create_session

    prepared = directory / "prepared" / MODEL_FILE
    prepare(exported, prepared, loaded.spec)
    quant = config.quant
    calibration = None
    if inputs.calibration is not None:
        calibration = calibration_set(inputs.calibration, loaded.tokenizer, quant.calibration, str(quant.calibration.path))

    def evaluate(path: Path) -> AccuracyReport:  # trials run on ONNX Runtime CPU; every target is gated itself
        return evaluation.measure(OnnxRuntimeRunner(loaded.spec, create_session(path)))

    return quantize(prepared, directory, config.precision, quant, loaded.spec, calibration, evaluate,
                    quant.budget_for(config.precision), progress.say)


def _to_half(source: Path, destination: Path, precision: Precision):
    from gptkiln.graph.half import convert_file

    return convert_file(source, destination, precision.value)


def _warn_short_fusions(progress: Progress, target: str, fusion: dict) -> None:
    """A fusion that fired fewer times than the DecoderSpec says is slower, not wrong: warn, with why."""
    for count in fusion["fusions"]:
        if count["short"]:
            progress.say(f"    warning: {target}: fusion {count['name']} fired {count['actual']} of "
                         f"{count['expected']} times; best partial match: {count['reason']}")


def _raise_if_failed(result: BuildResult) -> None:
    failures = [f"{t.name} {line}" for t in result.targets for line in t.failures]
    if failures:
        error = ParityError(f"{'accuracy' if result.precision.quantized else 'parity'} gate failed "
                            f"({len(failures)} check(s)):\n    " + "\n    ".join(failures),
                            "do not ship this build; --json output has the full report")
        error.details = result.to_dict()
        raise error


def _check_output(output: Path, force: bool) -> None:
    """Refuse an output we could lose data in: --force replaces only an earlier gptkiln output."""
    if output.is_file():
        raise OutputError(f"output '{output}' is a file", "choose a directory path for -o")
    if not output.is_dir() or not any(output.iterdir()):
        return
    if not force:
        raise OutputError(f"output directory '{output}' exists and is not empty",
                          "choose another -o, or pass --force to replace an earlier gptkiln output")
    if output == Path.cwd() or output in Path.cwd().parents:
        raise OutputError(f"--force would replace '{output}', which holds the current directory",
                          "choose an output directory below the current one")
    if not (output / MANIFEST).is_file():
        raise OutputError(f"'{output}' is not a gptkiln output (no {MANIFEST}); --force replaces only those",
                          "choose another -o, or empty the directory yourself")


def _make_work_dir(output: Path) -> Path:
    """The hidden sibling the build happens in (same file system, so publishing is a rename)."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
    except OSError as exc:
        raise OutputError(f"cannot write next to '{output}': {exc.strerror}",
                          "choose an -o location you can write to") from None
    work.chmod(0o755)  # mkdtemp makes it private; the published output is an ordinary directory
    return work


def _export(loaded: LoadedModel, directory: Path, opset: int) -> dict:
    from gptkiln.exporter.to_onnx import export_onnx

    exported = export_onnx(loaded, directory, opset)
    return {"opset": opset, "seconds": round(exported.seconds, 2), "nodes": exported.node_count,
            "op_counts": exported.op_counts}


def _reference_runner(loaded: LoadedModel):
    from gptkiln.runtime.torch_runner import TorchRunner

    return TorchRunner(loaded.model, loaded.spec)


def _manifest_body(config: BuildConfig, result: BuildResult) -> dict:
    return {
        "model": result.model,
        "spec": result.spec.to_dict(),
        "io_contract": io_spec.contract(result.spec),
        "precision": config.precision.value,
        "quantization": result.quantization,
        "half": result.half,
        "budget": vars(config.quant.budget_for(config.precision)) if config.precision.quantized else None,
        "export": result.export,
        "targets": {t.name: t.to_dict() for t in result.targets},
        "tolerances": vars(config.tolerances),
        "versions": tool_versions(),
    }


def _publish(work: Path, output: Path, force: bool) -> None:
    """Rename the finished build into place. An old output (--force) is moved aside first and
    deleted only after the rename succeeded; if the rename fails it is moved back."""
    _check_output(output, force)  # the directory may have changed during the build
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        output.rename(old)
    try:
        work.rename(output)
    except OSError as exc:
        if old is not None:
            old.rename(output)
        raise OutputError(f"cannot move the finished build to '{output}': {exc.strerror}",
                          "check the permissions of the output location") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
