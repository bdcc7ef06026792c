"""compress(settings) -> CompressResult: prune a checkpoint by measured importance, distil it from the
original, gate it against the original on held-out text, and write a standard checkpoint, atomically.

The result is `save_pretrained` output (config updated, tokenizer and generation config beside it) that
transformers loads and `gptkiln export` takes like any local model; `compression.json` records what was
removed, the importance scores, the distillation run and the gate. Over budget, nothing is written.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from gptkiln.cache import cache_root
from gptkiln.calibration.data import calibration_set, read_texts
from gptkiln.calibration.perplexity import AccuracyReport, EvalText, Evaluation
from gptkiln.compression import importance as imp
from gptkiln.compression import sparsity
from gptkiln.compression.distill import DistillRecord, distill, loss_curve
from gptkiln.compression.settings import CompressSettings
from gptkiln.compression.structure import check_head_groups, mlp_layout, prune_head_groups, prune_mlp, remove_blocks
from gptkiln.config import CalibrationSettings
from gptkiln.ecosystem import save_model_files
from gptkiln.errors import ParityError
from gptkiln.extras import require_export_stack
from gptkiln.output_dir import check_output, make_work_dir, publish
from gptkiln.progress import QUIET, Progress
from gptkiln.stage_cache import stage_key

RECORD = "compression.json"
LOSS_CURVE = "distillation.png"
@dataclass
class CompressResult:
    output: Path
    record: dict
    accuracy: AccuracyReport

    def to_dict(self) -> dict:
        return {"output": str(self.output), **self.record}


def compress(settings: CompressSettings, progress: Progress = QUIET) -> CompressResult:
    from gptkiln.models.loading import load_model
    from gptkiln.runtime.torch_runner import TorchRunner

    require_export_stack("compress")
    output = settings.output.expanduser().resolve()
    check_output(output, settings.force, RECORD)
    texts = read_texts(settings.calibration)
    evaluation_text = EvalText.read(settings.eval_text)
    started = time.perf_counter()
    with progress.stage(f"load {settings.model}"):
        original = load_model(settings.model)
    spec = original.spec
    settings.check(spec.num_layers)
    if settings.prune_mlp:
        mlp_layout(spec)
    if settings.prune_heads:
        check_head_groups(spec, settings.prune_heads)
    calibration = calibration_set(texts, original.tokenizer, CalibrationSettings(
        samples=settings.calibration_samples, seq_len=settings.calibration_seq_len, decode_steps=0,
        seed=settings.calibration_seed), str(settings.calibration))
    with progress.stage("score the original on the held-out text"):
        evaluation = Evaluation.prepare(original, evaluation_text, settings.eval_tokens, progress)
    with progress.stage("measure importance on the calibration text"):
        scores = imp.measure(original.model, spec, calibration.windows, bool(settings.prune_mlp),
                             bool(settings.prune_heads), progress)
    student, removed = _pruned(original, settings, scores)
    masks = None
    if settings.sparsity:
        with progress.stage(f"{settings.sparsity} sparsity ({settings.sparsity_score})"):
            masks = sparsity.two_four_masks(student, spec, calibration.windows, settings.sparsity_score, progress)
            sparsity.apply_masks(student, masks)
        removed["sparsity"] = _sparsity_record(settings, masks)
    work = make_work_dir(output)
    try:
        with progress.stage("write the pruned checkpoint"):
            _save(student, original.tokenizer, work)
            pruned = load_model(str(work))  # what transformers makes of it: the checkpoint we ship
        distilled = None
        if settings.distill.steps:
            with progress.stage(f"distil {settings.distill.steps} steps"):
                key = _run_key(original.source, settings, calibration.sha256)
                distilled = distill(original.model, pruned.model, calibration.windows, settings.distill,
                                    cache_root() / "distill" / key, progress, masks)
                _save(pruned.model, original.tokenizer, work)
        if masks:
            sparsity.check_two_four(pruned.model, pruned.spec)
        with progress.stage("gate: the compressed model against the original"):
            accuracy = evaluation.measure(TorchRunner(pruned.model, pruned.spec), progress)
        record = _record(settings, original, pruned, removed, scores, calibration.source, distilled, accuracy,
                         time.perf_counter() - started)
        record["key"] = request_key(settings)
        if accuracy.ppl_increase_pct > settings.max_ppl_increase:
            error = ParityError(
                f"compression gate failed: perplexity {accuracy.ppl_reference:.3f} -> {accuracy.ppl:.3f} "
                f"({accuracy.ppl_increase_pct:+.2f}%, limit +{settings.max_ppl_increase:g}%) on "
                f"{accuracy.tokens} tokens of {accuracy.text}; top-1 agreement {accuracy.top1_agreement:.1%}",
                "remove less, distil longer (--distill-steps), or raise --max-ppl-increase if that is the "
                "trade you want; nothing was written")
            error.details = record
            raise error
        if distilled:
            why_not = loss_curve(distilled, work / LOSS_CURVE)
            record["distillation"]["loss_curve"] = why_not or LOSS_CURVE
        (work / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        publish(work, output, settings.force, RECORD)
        if settings.distill.steps:
            shutil.rmtree(cache_root() / "distill" / key, ignore_errors=True)
        return CompressResult(output, record, accuracy)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def request_key(settings: CompressSettings) -> str:
    """A hash of everything the checkpoint depends on (the model's files, the settings, the texts' content,
    gptkiln's source): a build file reuses a checkpoint whose compression.json holds the same key."""
    from gptkiln.build_plan import source_digest, texts_digest
    from gptkiln.models.loading import model_source

    request = {k: v for k, v in asdict(settings).items() if k not in ("model", "output", "force", "calibration", "eval_text")}
    return stage_key("compress", model_source(settings.model)["sha256"], request,
                     texts_digest(read_texts(settings.calibration)), texts_digest(EvalText.read(settings.eval_text).texts),
                     source_digest())


def up_to_date(settings: CompressSettings) -> bool:
    record = settings.output.expanduser() / RECORD
    return record.is_file() and json.loads(record.read_text()).get("key") == request_key(settings)


def _pruned(original, settings: CompressSettings, scores: imp.Importance):
    """A copy of the model with the least important parts removed, and what was removed."""
    spec = original.spec
    student = copy.deepcopy(original.model)
    removed = {"blocks": imp.least_important_blocks(scores, settings.prune_layers)}
    if settings.prune_mlp:
        width = len(scores.mlp_channels[0])
        keep = width - round(width * settings.prune_mlp)
        prune_mlp(student, spec, [imp.top_indices(norms, keep) for norms in scores.mlp_channels])
        removed["mlp_channels"] = {"per_block": width - keep, "of": width}
    if settings.prune_heads:
        keep = spec.num_kv_heads - settings.prune_heads
        kept = [imp.top_indices(norms, keep).tolist() for norms in scores.head_groups]
        prune_head_groups(student, spec, kept)
        removed["kv_groups"] = {str(i): sorted(set(range(spec.num_kv_heads)) - set(k)) for i, k in enumerate(kept)}
    remove_blocks(student, spec, removed["blocks"])
    return student, removed


def _sparsity_record(settings: CompressSettings, masks: dict) -> dict:
    weights = sum(mask.numel() for mask in masks.values())
    return {"pattern": settings.sparsity, "score": settings.sparsity_score, "layers": len(masks),
            "weights": weights, "zeroed": weights - sum(int(mask.sum()) for mask in masks.values()),
            "runs": "sparse on TensorRT (SPARSE_WEIGHTS; sparse tensor cores, Ampere and newer, fp16/bf16/int8 layers); "
                    "dense on ONNX Runtime and OpenVINO, which store and compute every zero"}


def _save(model, tokenizer, directory: Path) -> None:
    """The weights, and beside them the model files every gptkiln output has."""
    model.save_pretrained(directory)
    save_model_files(model, tokenizer, directory)


def _run_key(source: dict, settings: CompressSettings, calibration_sha256: str) -> str:
    """Everything a distillation run depends on: a resumed run continues only the same run."""
    parts = {"model": source["sha256"], "calibration": calibration_sha256,
             "prune": [settings.prune_layers, settings.prune_mlp, settings.prune_heads, settings.sparsity,
                       settings.sparsity_score],
             "distill": asdict(settings.distill)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _record(settings, original, pruned, removed, scores, calibration, distilled: DistillRecord | None,
            accuracy: AccuracyReport, seconds: float) -> dict:
    def size(model) -> int:
        return sum(p.numel() for p in model.parameters())

    return {
        "format": 1,
        "source": original.source,
        "removed": removed,
        "importance": {"block_influence": [round(x, 6) for x in scores.block_influence]},
        "parameters": {"original": size(original.model), "compressed": size(pruned.model)},
        "spec": {"original": original.spec.to_dict(), "compressed": pruned.spec.to_dict()},
        "calibration": calibration,
        "distillation": distilled.to_dict() if distilled else None,
        "gate": {"max_ppl_increase_pct": settings.max_ppl_increase, **accuracy.to_dict()},
        "seconds": round(seconds, 1),
    }
