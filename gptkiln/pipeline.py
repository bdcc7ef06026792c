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

from gptkiln.config import BuildConfig, ParitySettings, Tolerances
from gptkiln.errors import ArtifactError, ExportError, GptkilnError, OutputError, ParityError, TargetUnavailableError
from gptkiln.exporter import io_spec
from gptkiln.manifest import MANIFEST, read_manifest, tool_versions, write_manifest
from gptkiln.models.loading import LoadedModel, load_model
from gptkiln.models.spec import DecoderSpec
from gptkiln.parity import ParityReport, gate, parity_prompts, run_parity
from gptkiln.targets import get_target

EXPORT_DIR = "_export"  # inside the build directory; removed before publishing


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
    parity: ParityReport
    failures: list[str]

    def to_dict(self) -> dict:
        return {"settings": self.settings, "parity": self.parity.to_dict(),
                "passed": not self.failures, "failures": self.failures}


@dataclass
class BuildResult:
    output: Path
    model: dict
    spec: DecoderSpec
    export: dict
    targets: list[TargetResult] = field(default_factory=list)
    stage_seconds: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(not t.failures for t in self.targets)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "output": str(self.output), "model": self.model, "spec": self.spec.to_dict(),
                "export": self.export, "targets": {t.name: t.to_dict() for t in self.targets},
                "stage_seconds": self.stage_seconds}


def build(config: BuildConfig, progress: Progress | None = None) -> BuildResult:
    progress = progress or Progress(enabled=False)
    if not config.targets:
        raise TargetUnavailableError("no target to build: no target runtime is installed here",
                                     "pip install onnxruntime, or name a target with --target")
    targets = [get_target(name) for name in config.targets]
    for target in targets:
        target.check_available()
    output = config.output.expanduser().resolve()
    _check_output(output, config.force)
    work = _make_work_dir(output)
    try:
        with progress.stage(f"load {config.model}"):
            loaded = load_model(config.model)
        with progress.stage("export to ONNX"):
            exported = _export(loaded, work / EXPORT_DIR, config.opset)
        result = BuildResult(output, loaded.source, loaded.spec, exported)
        reference = _reference_runner(loaded)
        for target in targets:
            with progress.stage(f"compile {target.name}"):
                settings = target.compile(work / EXPORT_DIR / "model.onnx", work / target.name, loaded.spec)
            _warn_short_fusions(progress, target.name, settings["fusion"])
            with progress.stage(f"parity {target.name}"):
                report = run_parity(target.load(work / target.name, loaded.spec), reference,
                                    parity_prompts(loaded.tokenizer), config.parity)
            result.targets.append(TargetResult(target.name, settings, report, gate(report, config.tolerances)))
        result.stage_seconds = progress.seconds
        _raise_if_failed(result)
        shutil.rmtree(work / EXPORT_DIR)
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
    with progress.stage(f"load {manifest['model']['name']}"):
        loaded = load_model(manifest["model"]["name"])
    if loaded.source["sha256"] != manifest["model"]["sha256"]:
        raise ArtifactError(f"the model '{loaded.source['name']}' changed since this output was exported "
                          f"(sha256 {loaded.source['sha256'][:12]} != {manifest['model']['sha256'][:12]})",
                          "export again from the current model")
    result = BuildResult(output, loaded.source, loaded.spec, manifest["export"])
    reference = _reference_runner(loaded)
    for name in manifest["targets"]:
        target = get_target(name)
        with progress.stage(f"parity {name}"):
            report = run_parity(target.load(output / name, loaded.spec), reference,
                                parity_prompts(loaded.tokenizer), settings)
        result.targets.append(TargetResult(name, manifest["targets"][name]["settings"], report,
                                           gate(report, tolerances)))
    result.stage_seconds = progress.seconds
    _raise_if_failed(result)
    return result


def _warn_short_fusions(progress: Progress, target: str, fusion: dict) -> None:
    """A fusion that fired fewer times than the DecoderSpec says is slower, not wrong: warn, with why."""
    for count in fusion["fusions"]:
        if count["short"]:
            progress.say(f"    warning: {target}: fusion {count['name']} fired {count['actual']} of "
                         f"{count['expected']} times; best partial match: {count['reason']}")


def _raise_if_failed(result: BuildResult) -> None:
    failures = [f"{t.name} {line}" for t in result.targets for line in t.failures]
    if failures:
        error = ParityError(f"parity failed ({len(failures)} check(s)):\n    " + "\n    ".join(failures),
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
