"""build(config) -> BuildResult: load, export, compile and prove each target, publish atomically.

Every stage (export, quantize, half, each target's compile + parity) is looked up in the stage
cache by its key (build_plan.py) and built only when absent; a build whose output already holds
the same build key and verified files is up to date and does nothing. The output is assembled
in a hidden sibling directory; only when every target has passed its gate is the manifest
written (last) and the directory renamed into place. A failed or interrupted build leaves no
output directory behind.
"""

from __future__ import annotations

import functools
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gptkiln.build_plan import BuildPlan, plan_build
from gptkiln.cache import cache_root
from gptkiln.calibration.build_inputs import QuantInputs, quantize_stage, read_quant_inputs
from gptkiln.calibration.perplexity import AccuracyReport, EvalText, Evaluation, accuracy_failures
from gptkiln.config import AccuracyBudget, BuildConfig, ParitySettings, Precision, Tolerances
from gptkiln.ecosystem import copy_model_files, save_model_files
from gptkiln.errors import ArtifactError, ParityError, TargetUnavailableError
from gptkiln.exporter import io_spec
from gptkiln.exporter.io_spec import DATA_FILE, MODEL_FILE
from gptkiln.extras import require_export_stack
from gptkiln.manifest import (BENCHMARK_CHART, BENCHMARK_FILE, MANIFEST, host_cpu, read_manifest, tool_versions,
                              write_manifest)
from gptkiln.models.loading import LoadedModel, load_model
from gptkiln.models.spec import DecoderSpec
from gptkiln.output_dir import check_output, make_work_dir, publish
from gptkiln.parity import ParityReport, consistency_gate, gate, parity_prompts, run_parity
from gptkiln.progress import Progress
from gptkiln.stage_cache import ENTRY, Entry, StageCache
from gptkiln.targets import Target, get_target, trial_target

STAGES_DIR = "_stages"  # inside the build directory: stages built without a cache; removed before publishing
MODEL_FILES_DIR = "model-files"  # inside the export stage: tokenizer, chat template and configs every output gets


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

    @classmethod
    def from_dict(cls, name: str, data: dict) -> "TargetResult":
        return cls(name, data["settings"], data["parity"] and ParityReport.from_dict(data["parity"]),
                   data["failures"], data["accuracy"] and AccuracyReport.from_dict(data["accuracy"]))


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
    cached_stages: list[str] = field(default_factory=list)
    up_to_date: bool = False  # the output already held this build: nothing was done
    plan: BuildPlan | None = None

    @property
    def ok(self) -> bool:
        return all(not t.failures for t in self.targets)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "output": str(self.output), "model": self.model, "spec": self.spec.to_dict(),
                "family": {"name": self.spec.family, "tested": self.spec.tested},
                "export": self.export, "precision": self.precision.value, "quantization": self.quantization,
                "half": self.half, "targets": {t.name: t.to_dict() for t in self.targets},
                "stage_seconds": self.stage_seconds, "cached_stages": self.cached_stages,
                "up_to_date": self.up_to_date, "build_key": self.plan.key if self.plan else None}


def prepare_build(config: BuildConfig) -> tuple[list[Target], QuantInputs | None, BuildPlan]:
    """Everything that is checked and keyed before any work: the targets, the texts, the plan."""
    if not config.targets:
        raise TargetUnavailableError("no target to build: no target runtime is installed here",
                                     "pip install onnxruntime, or name a target with --target")
    targets = [get_target(name, config.runtime_for(name), config.engine).for_precision(config.precision)
               for name in config.targets]
    for target in targets:
        target.check_build(config)
    inputs = read_quant_inputs(config)
    return targets, inputs, plan_build(config, targets, inputs.texts() if inputs else {})


def build(config: BuildConfig, progress: Progress | None = None) -> BuildResult:
    require_export_stack("an export")
    progress = progress or Progress(enabled=False)
    targets, inputs, plan = prepare_build(config)
    output = config.output.expanduser().resolve()
    current = up_to_date(output, plan)
    if current is not None:
        progress.say(f"up to date: {output} holds this build (key {plan.key[:12]}); nothing to do")
        return current
    check_output(output, config.force)
    cache = StageCache(cache_root() / "stages" if config.cache else None)
    work = make_work_dir(output)
    try:
        state = _BuildState(config, plan, cache, work / STAGES_DIR, progress, inputs)
        exported = state.stage("export to ONNX", "export", plan.export, state.export)
        result = BuildResult(output, plan.source, DecoderSpec.from_dict(exported.record["spec"]),
                             exported.record["export"], config.precision, plan=plan)
        graph = exported
        if config.precision.quantized:
            graph = state.stage(f"quantize {config.precision.value}", "quantize", plan.quantize,
                                state.quantize(graph, trial_target(targets)))
            result.quantization = graph.record
        if config.precision.half:
            graph = state.stage(f"convert to {config.precision.value}", "half", plan.half, state.to_half(graph))
            result.half = graph.record
        for target in targets:
            entry = state.stage(f"{target.name}: compile and prove", f"target-{target.name}", plan.targets[target.name],
                                state.compile_and_prove(target, graph.path / MODEL_FILE, result.spec,
                                                        result.export.get("parameters")))  # absent: older caches
            outcome = TargetResult.from_dict(target.name, entry.record)
            if not outcome.compiled:
                progress.say(f"    {target.name}: prepared, not compiled here: {'; '.join(outcome.settings['missing'])}")
            result.targets.append(outcome)
            shutil.copytree(entry.path, work / target.name, ignore=shutil.ignore_patterns(ENTRY))
            if outcome.compiled:
                outcome.settings["ecosystem"] = target.write_ecosystem_files(
                    work / target.name, result.spec, outcome.settings, exported.path / MODEL_FILES_DIR)
                if "openvino_genai_missing" in outcome.settings["ecosystem"]:
                    progress.say(f"    note: {target.name}: {outcome.settings['ecosystem']['openvino_genai_missing']}")
        result.stage_seconds, result.cached_stages = progress.seconds, progress.cached
        _raise_if_failed(result)
        copy_model_files(exported.path / MODEL_FILES_DIR, work)
        shutil.rmtree(work / STAGES_DIR, ignore_errors=True)
        write_manifest(work, _manifest_body(config, result))
        publish(work, output, config.force)
        return result
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


class _BuildState:
    """One build's stages. The model, its reference runner and the fp32 evaluation are made on
    first use, so a build whose stages are all cached never loads PyTorch weights."""

    def __init__(self, config: BuildConfig, plan: BuildPlan, cache: StageCache, scratch: Path, progress: Progress,
                 inputs: QuantInputs | None):
        self.config, self.plan, self.cache, self.scratch = config, plan, cache, scratch
        self.progress, self.inputs = progress, inputs

    def stage(self, name: str, stage: str, key: str, produce) -> Entry:
        timing = f"{stage}:{self.config.precision.value}:{self.plan.source['sha256']}"  # the estimate's key
        with self.progress.stage(name, timing):
            return self.progress.cached_stage(name, self.cache.get_or_build(stage, key, produce, self.scratch / stage))

    @functools.cached_property
    def loaded(self) -> LoadedModel:
        self.progress.say(f"    load {self.config.model}")
        return load_model(self.config.model)

    @functools.cached_property
    def reference(self):
        return _reference_runner(self.loaded)

    @functools.cached_property
    def evaluation(self) -> Evaluation:
        self.progress.say("    score the fp32 model on the evaluation text")
        return Evaluation.prepare(self.loaded, self.inputs.eval_text, self.config.quant.eval_tokens, self.progress)

    def export(self, directory: Path) -> dict:
        from gptkiln.exporter.to_onnx import export_onnx

        exported = export_onnx(self.loaded, directory, self.plan.opset)
        save_model_files(self.loaded.model, self.loaded.tokenizer, directory / MODEL_FILES_DIR)
        parameters = sum(p.numel() for p in self.loaded.model.parameters())  # torch lists a tied table once
        return {"export": {"opset": self.plan.opset, "nodes": exported.node_count, "op_counts": exported.op_counts,
                           "parameters": parameters},
                "spec": self.loaded.spec.to_dict()}

    def quantize(self, exported: Entry, scorer: Target):
        def produce(directory: Path) -> dict:
            evaluation = self.evaluation
            quantized = quantize_stage(self.loaded, exported.path / MODEL_FILE, self.scratch / "quantize-work",
                                       self.config, self.inputs, evaluation, scorer, self.progress)
            for name in (MODEL_FILE, DATA_FILE):
                shutil.move(quantized.path.parent / name, directory / name)
            shutil.rmtree(self.scratch / "quantize-work")
            record = {**quantized.to_dict(), "scored_on": scorer.name}  # the engine the trials ran on
            record.pop("statistics_cached")  # how this run went, not what was built
            return record
        return produce

    def to_half(self, graph: Entry):
        def produce(directory: Path) -> dict:
            from gptkiln.graph.half import convert_file

            return convert_file(graph.path / MODEL_FILE, directory / MODEL_FILE, self.config.precision.value).to_dict()
        return produce

    def compile_and_prove(self, target: Target, graph: Path, spec: DecoderSpec, parameters: int | None):
        """The target's engine files and its TargetResult (a failed gate is a result too: it is cached).
        `parameters`: the fp32 model's weights, for the engine's bits per weight."""
        def produce(directory: Path) -> dict:
            tolerances = target.tolerances(self.config.tolerances)
            trying = target
            result = self._compile_and_gate(trying, graph, directory, spec, parameters, tolerances)
            earlier = []  # a setting gptkiln chose failed: the next safer one, in the same directory
            while result.failures and self.config.precision.quantized and (fallback := trying.fallback()):
                trying, change = fallback
                self.progress.say(f"    {target.name}: {result.failures[0]}; compiling again with {change}")
                earlier.append({"config": result.settings.get("config"), "failures": result.failures,
                                "accuracy": result.accuracy.to_dict() if result.accuracy else None})
                result = self._compile_and_gate(trying, graph, directory, spec, parameters, tolerances)
            if earlier:
                result.settings["earlier_tries"] = earlier
            return result.to_dict()
        return produce

    def _compile_and_gate(self, target: Target, graph: Path, directory: Path, spec: DecoderSpec,
                          parameters: int | None, tolerances: Tolerances) -> TargetResult:
        compiled, runner = target.compile_and_load(graph, directory, spec)
        settings = {**compiled, "tolerances": asdict(tolerances)}
        settings.update(_engine_size(directory, parameters))
        _warn_short_fusions(self.progress, target.name, settings["fusion"])
        for warning in settings.get("warnings", []):
            self.progress.say(f"    warning: {target.name}: {warning}")
        if not settings.get("compiled", True):
            return TargetResult(target.name, settings, None, [])
        evaluation = self.evaluation if self.config.precision.quantized else None
        report = run_parity(runner, self.reference, parity_prompts(self.loaded.tokenizer), self.config.parity)
        accuracy = evaluation.measure(runner, self.progress) if evaluation else None
        failures = _gate(self.config.precision, report, accuracy, tolerances,
                         self.config.quant.budget_for(self.config.precision))
        return TargetResult(target.name, settings, report, failures, accuracy)


def _engine_size(directory: Path, parameters: int | None) -> dict:
    """What the compiled engine stores: its files' bytes, and those as bits per weight of the fp32 model
    (embeddings included; a tied table counts once in the model, and as often as the engine stores it)."""
    size = sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())
    return {"engine_bytes": size, **({"bits_per_weight": round(8 * size / parameters, 3)} if parameters else {})}


def up_to_date(output: Path, plan: BuildPlan) -> BuildResult | None:
    """The output's result when it holds exactly this build (same key, every file as written)."""
    if not (output / MANIFEST).is_file():
        return None
    try:
        manifest = read_manifest(output)
    except ArtifactError:
        return None
    present = ({p.relative_to(output).as_posix() for p in output.rglob("*") if p.is_file()}
               - {MANIFEST, BENCHMARK_FILE, BENCHMARK_CHART})
    if manifest.get("build", {}).get("key") != plan.key or present != set(manifest["files"]):
        return None
    result = result_from_manifest(output, manifest)
    result.up_to_date, result.plan = True, plan
    return result


def result_from_manifest(output: Path, manifest: dict) -> BuildResult:
    return BuildResult(output, manifest["model"], DecoderSpec.from_dict(manifest["spec"]), manifest["export"],
                       Precision(manifest["precision"]), manifest.get("quantization"), manifest.get("half"),
                       [TargetResult.from_dict(name, data) for name, data in manifest["targets"].items()])


def verify(output: Path, tolerances: Tolerances | None, settings: ParitySettings,
           progress: Progress | None = None) -> BuildResult:
    """Check every file against the manifest, then rerun parity for every target in it
    (against the tolerances the build was held to, unless others are given)."""
    require_export_stack("verify (parity against PyTorch)")
    progress = progress or Progress(enabled=False)
    with progress.stage("check files"):
        manifest = read_manifest(output)
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
        held_to = tolerances or Tolerances(**built["settings"].get("tolerances", manifest["tolerances"]))
        result.targets.append(TargetResult(name, built["settings"], report,
                                           _gate(precision, report, accuracy, held_to, budget), accuracy))
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
        "gated_on": host_cpu(),  # the gates were measured on this CPU's kernels
        "build": {"key": result.plan.key, "stages": {k: v for k, v in result.plan.to_dict().items()
                                                     if k not in ("source", "key")}},
    }
