"""Run the builds of a build file: a dry-run plan, then every build, several at once if asked.

The file's compressions run first, one at a time (each uses every core), and each build of a compressed model
carries its compression's outcome; where a compression failed, its builds fail with its error, unbuilt.

Builds are independent (each publishes its own output directory); stages they share (one
model's export, used by each precision) are built once and found by the others through the
stage cache, whose per-key lock makes a second build wait for the first. Parallel builds run in
separate processes, each with its share of the cores for PyTorch.
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import time
import traceback

from gptkiln.build_file import Compression, MatrixBuild
from gptkiln.cache import cache_root
from gptkiln.summary import text_table
from gptkiln.errors import GptkilnError
from gptkiln.parity import worst_logits_rel
from gptkiln.stage_cache import StageCache


def dry_run(builds: list[MatrixBuild], compressions: list[Compression] = ()) -> list[dict]:
    """What each build would do: up to date, or which stages are cached and which would be built (a build of a
    checkpoint that is not compressed yet: everything, after its compression)."""
    from gptkiln.compression.run import up_to_date as compressed
    from gptkiln.pipeline import prepare_build, up_to_date

    cache = StageCache(cache_root() / "stages")
    pending = set()
    plan = []
    for compression in compressions:
        entry = {"name": f"compress {compression.name}", "output": str(compression.settings.output), "targets": [],
                 "skipped_targets": []}
        try:
            done = compressed(compression.settings)
        except GptkilnError as error:
            plan.append({**entry, "error": error.to_dict()})
            pending.add(compression.name)
            continue
        pending |= set() if done else {compression.name}
        plan.append({**entry, "up_to_date": done, "stages": {} if done else {"compress": "build"}})
    for item in builds:
        entry = {"name": item.name, "output": str(item.config.output), "targets": list(item.config.targets),
                 "skipped_targets": item.skipped}
        if item.compression in pending:
            plan.append({**entry, "up_to_date": False, "stages": {f"after compress {item.compression}": "build"}})
            continue
        try:
            _, _, keys = prepare_build(item.config)
        except GptkilnError as error:
            plan.append({**entry, "error": error.to_dict()})
            continue
        stages = {"export": keys.export, "quantize": keys.quantize, "half": keys.half,
                  **{f"target-{name}": key for name, key in keys.targets.items()}}
        entry["up_to_date"] = up_to_date(item.config.output.resolve(), keys) is not None
        entry["stages"] = {stage: "cached" if item.config.cache and cache.status(stage, key) else "build"
                           for stage, key in stages.items() if key is not None}
        entry["build_key"] = keys.key
        plan.append(entry)
    return plan


def run_matrix(builds: list[MatrixBuild], jobs: int, compressions: list[Compression] = ()) -> list[dict]:
    """Every build's outcome, in the file's order. A failed build does not stop the others."""
    compressed = {c.name: run_compression(c) for c in compressions}
    failed = {name: outcome for name, outcome in compressed.items() if not outcome["ok"]}
    runnable = [item for item in builds if item.compression not in failed]
    outcomes = iter(_run_builds(runnable, jobs))
    results = []
    for item in builds:
        if item.compression in failed:
            error = failed[item.compression]["error"]
            outcome = {"name": item.name, "output": str(item.config.output), "targets": list(item.config.targets),
                       "skipped_targets": item.skipped, "ok": False, "seconds": 0.0,
                       "error": {**error, "cause": f"compress {item.compression}: {error['cause']}"}}
        else:
            outcome = next(outcomes)
        if item.compression:
            outcome["compression"] = compressed[item.compression]
        results.append(outcome)
    return results


def run_compression(compression: Compression) -> dict:
    """Compress (or find up to date) one checkpoint of a build file: its outcome, as a build's is recorded."""
    from dataclasses import replace

    from gptkiln.compression.run import RECORD, compress, up_to_date
    from gptkiln.progress import Progress

    started = time.perf_counter()
    outcome = {"name": compression.name, "output": str(compression.settings.output)}
    try:
        fresh = not up_to_date(compression.settings)
        if fresh:
            record = compress(replace(compression.settings, force=True),
                              Progress(enabled=True, prefix=f"[compress {compression.name}] ")).record
        else:
            record = json.loads((compression.settings.output / RECORD).read_text())
    except GptkilnError as error:
        return {**outcome, "ok": False, "seconds": round(time.perf_counter() - started, 2), "error": error.to_dict()}
    except Exception as exc:  # a bug in gptkiln: report it, keep the other builds
        return {**outcome, "ok": False, "seconds": round(time.perf_counter() - started, 2), "error": _bug(exc)}
    return {**outcome, "ok": True, "up_to_date": not fresh, "seconds": round(time.perf_counter() - started, 2),
            "gate": record["gate"], "removed": record["removed"]}


def _run_builds(builds: list[MatrixBuild], jobs: int) -> list[dict]:
    if jobs == 1 or len(builds) == 1:
        return [run_one(item) for item in builds]
    threads = max(1, (os.cpu_count() or 1) // jobs)
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch/ORT thread pools
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context, initializer=_limit_threads,
                                                initargs=(threads,)) as pool:
        futures = [pool.submit(run_one, item) for item in builds]
        try:
            return [future.result() for future in futures]
        except KeyboardInterrupt:
            pool.shutdown(cancel_futures=True)
            raise


def _limit_threads(threads: int) -> None:
    import torch

    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def run_one(item: MatrixBuild) -> dict:
    from gptkiln.pipeline import build
    from gptkiln.progress import Progress

    started = time.perf_counter()
    outcome = {"name": item.name, "output": str(item.config.output), "targets": list(item.config.targets),
               "skipped_targets": item.skipped}
    try:
        result = build(item.config, Progress(enabled=True, prefix=f"[{item.name}] "))
    except GptkilnError as error:
        return {**outcome, "ok": False, "seconds": round(time.perf_counter() - started, 2), "error": error.to_dict()}
    except Exception as exc:  # a bug in gptkiln: report it with the traceback, keep the other builds
        return {**outcome, "ok": False, "seconds": round(time.perf_counter() - started, 2), "error": _bug(exc)}
    return {**outcome, "ok": True, "seconds": round(time.perf_counter() - started, 2), "result": result.to_dict()}


def _bug(exc: Exception) -> dict:
    return {"type": type(exc).__name__, "cause": f"{exc}\n{traceback.format_exc()}", "fix": "report this bug",
            "exit_code": 1, "details": None}


def plan_summary(plan: list[dict]) -> str:
    rows = [("build", "targets", "plan")]
    for entry in plan:
        if "error" in entry:
            what = f"ERROR (exit {entry['error']['exit_code']}): {entry['error']['cause']}"
        elif entry["up_to_date"]:
            what = "up to date: nothing to do"
        else:
            what = ", ".join(f"{stage} {status}" for stage, status in entry["stages"].items())
        rows.append((entry["name"], _targets(entry), what))
    return text_table(rows)


def matrix_summary(outcomes: list[dict]) -> str:
    rows = [("build", "targets", "result", "work", "seconds", "gate", "output")]
    compressions = {o["compression"]["name"]: o["compression"] for o in outcomes if "compression" in o}
    for compression in compressions.values():
        name = f"compress {compression['name']}"
        if not compression["ok"]:
            error = compression["error"]
            rows.append((name, "-", f"FAIL ({error['type']}, exit {error['exit_code']})", "-",
                         f"{compression['seconds']:.1f}", error["cause"].splitlines()[0][:100], "-"))
            continue
        rows.append((name, "-", "PASS", "up to date" if compression["up_to_date"] else "compressed",
                     f"{compression['seconds']:.1f}", f"ppl {compression['gate']['ppl_increase_pct']:+.2f}% vs the "
                     "original", compression["output"]))
    for outcome in outcomes:
        if outcome["ok"]:
            result = outcome["result"]
            work = ("up to date" if result["up_to_date"] else
                    f"{len(result['cached_stages'])}/{len(result['stage_seconds'])} stages cached")
            rows.append((outcome["name"], _targets(outcome), "PASS", work, f"{outcome['seconds']:.1f}",
                         _gate_line(result), outcome["output"]))
        else:
            error = outcome["error"]
            rows.append((outcome["name"], _targets(outcome), f"FAIL ({error['type']}, exit {error['exit_code']})",
                         "-", f"{outcome['seconds']:.1f}", error["cause"].splitlines()[0][:100], "-"))
    failed = [o for o in outcomes if not o["ok"]]
    tail = (f"\n\n{len(failed)} of {len(outcomes)} builds failed; the first: {failed[0]['name']}:\n"
            f"{failed[0]['error']['cause']}\n  fix: {failed[0]['error']['fix']}" if failed else "")
    return text_table(rows) + tail


def _gate_line(result: dict) -> str:
    """The number that decided the gate: worst logits rel (fp32 / half) or perplexity increase (quantized)."""
    lines = []
    for name, target in result["targets"].items():
        if not target["compiled"]:
            lines.append(f"{name} prepared only")
        elif target["accuracy"]:
            lines.append(f"{name} ppl {target['accuracy']['ppl_increase_pct']:+.2f}%")
        else:
            lines.append(f"{name} rel {worst_logits_rel(target['parity']):.1e}")
    return "; ".join(lines)


def _targets(entry: dict) -> str:
    skipped = f" (skipped: {', '.join(entry['skipped_targets'])})" if entry["skipped_targets"] else ""
    return ", ".join(entry["targets"]) + skipped
