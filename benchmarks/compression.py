"""Pruning and distillation on one model: size and perplexity against the original on held-out text, for
depth pruning by a quarter and by a third, MLP-width pruning and 2:4 sparsity (wanda and magnitude), each
without and with distillation; optionally each distilled variant, and the original, quantized to int4.

    python benchmarks/compression.py MODEL --calibration TEXT [--eval-text FILE] [--steps 200] [--work DIR]
        [--only SUBSTRING ...] [--int4 TARGET]

Each variant is one `gptkiln.compress` run (the gate budget set out of the way: this measures, it does not
gate) and writes its checkpoint under --work. `--only` keeps the variants whose name holds one of the
substrings. `--int4 TARGET` then builds every distilled variant and the original as int4 for TARGET (its own
gate: int4 within budget of that variant's fp32) and the original once more without the int8 fallback (the
simplest smaller model a user has: the original quantized harder); their perplexity is read against the
original's on the same windows. The tables and a JSON record go to stdout and
benchmarks/results/compression-<model>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import tempfile
import time
from pathlib import Path

import gptkiln
from gptkiln.summary import text_table

RESULTS = Path(__file__).parent / "results"


def variants(layers: int, steps: int) -> list[tuple[str, dict]]:
    quarter, third = max(1, layers // 4), max(1, math.ceil(layers / 3))
    return [(f"depth -{quarter} of {layers}", {"prune_layers": quarter}),
            (f"depth -{quarter} of {layers}, distilled {steps}", {"prune_layers": quarter, "distill_steps": steps}),
            (f"depth -{third} of {layers}", {"prune_layers": third}),
            (f"depth -{third} of {layers}, distilled {steps}", {"prune_layers": third, "distill_steps": steps}),
            ("MLP -25%", {"prune_mlp": 0.25}),
            (f"MLP -25%, distilled {steps}", {"prune_mlp": 0.25, "distill_steps": steps}),
            ("2:4 wanda", {"sparsity": "2:4"}),
            (f"2:4 wanda, distilled {steps}", {"sparsity": "2:4", "distill_steps": steps}),
            ("2:4 magnitude", {"sparsity": "2:4", "sparsity_score": "magnitude"})]


def int4_rows(model: str, checkpoints: dict[str, Path], original_ppl: float, args) -> tuple[list, list]:
    """Each checkpoint (and the original, with and without the int8 fallback) built as int4 for one target."""
    from gptkiln.errors import GptkilnError

    builds = [("original", model, {}), ("original, no int8 fallback", model, {"no_fallback": True}),
              *((name, str(path), {}) for name, path in checkpoints.items())]
    rows, records = [("int4 of", "engine MB", "bits/weight (engine)", "perplexity", "vs original", "gate", "build s")], []
    for name, source, options in builds:
        started = time.perf_counter()
        out = args.work / "int4" / name.replace(" ", "_").replace(",", "")
        try:
            built = gptkiln.export(source, out, targets=[args.int4], quantize="int4", calibration=args.calibration,
                                   eval_text=args.eval_text, eval_tokens=args.eval_tokens, force=True, progress=True,
                                   **options).to_dict()
            gate = "pass"
        except GptkilnError as error:  # over its own budget: still a point on the curve
            built, gate = error.details or {}, f"refused: {error.cause.splitlines()[0][:60]}"
        target = built.get("targets", {}).get(args.int4, {})
        settings = target.get("settings", {})
        accuracy, bits = target.get("accuracy"), settings.get("bits_per_weight")  # the engine's files, not the tokenizer's
        size = settings["engine_bytes"] / 1e6 if "engine_bytes" in settings else None
        seconds = time.perf_counter() - started
        ppl = accuracy["ppl"] if accuracy else None
        rows.append((name, f"{size:.1f}" if size else "-", f"{bits:.2f}" if bits else "-",
                     f"{ppl:.3f}" if ppl else "-", f"{100 * (ppl / original_ppl - 1):+.1f}%" if ppl else "-", gate,
                     f"{seconds:.0f}"))
        records.append({"int4_of": name, "engine_mb": size, "bits_per_weight": bits, "accuracy": accuracy,
                        "gate": gate, "seconds": seconds})
    return rows, records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--calibration", required=True, type=Path)
    parser.add_argument("--eval-text", type=Path)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--work", type=Path, help="where the checkpoints go (default: a temporary directory)")
    parser.add_argument("--only", action="append", help="run the variants whose name holds this (repeatable)")
    parser.add_argument("--int4", metavar="TARGET", help="also build the distilled variants and the original as int4")
    args = parser.parse_args()
    from gptkiln.models.loading import load_model

    layers = load_model(args.model).spec.num_layers
    args.work = work = args.work or Path(tempfile.mkdtemp(prefix="gptkiln-compression-"))
    rows, records = [("variant", "parameters", "size MB", "perplexity", "vs original", "top-1", "distil s")], []
    checkpoints = {}
    for name, options in variants(layers, args.steps):
        if args.only and not any(part in name for part in args.only):
            continue
        started = time.perf_counter()
        result = gptkiln.compress(args.model, work / name.replace(" ", "_").replace(",", ""),
                                  calibration=args.calibration, eval_text=args.eval_text, eval_tokens=args.eval_tokens,
                                  max_ppl_increase=1e9, force=True, progress=True, **options)
        record, gate = result.record, result.record["gate"]
        size = sum(p.stat().st_size for p in result.output.glob("*.safetensors")) / 1e6
        distilled = record["distillation"]
        if not records:
            rows.append(("original", f"{record['parameters']['original'] / 1e6:.1f}M", "", f"{gate['ppl_reference']:.3f}",
                         "", "", ""))
        rows.append((name, f"{record['parameters']['compressed'] / 1e6:.1f}M", f"{size:.0f}", f"{gate['ppl']:.3f}",
                     f"{gate['ppl_increase_pct']:+.1f}%", f"{gate['top1_agreement']:.1%}",
                     f"{distilled['seconds']:.0f}" if distilled else "-"))
        records.append({"variant": name, "options": options, "size_mb": size, "seconds": time.perf_counter() - started,
                        **{k: v for k, v in record.items() if k not in ("spec",)}})
        if distilled:
            checkpoints[name] = result.output
    print(text_table(rows))
    output = {"variants": records}
    if args.int4:
        int4_table, output["int4"] = int4_rows(args.model, checkpoints, records[0]["gate"]["ppl_reference"], args)
        print(text_table(int4_table))
    RESULTS.mkdir(exist_ok=True)
    subset = "-" + re.sub(r"[^A-Za-z0-9]+", "_", "-".join(args.only)) if args.only else ""
    path = RESULTS / f"compression-{Path(args.model).stem}{subset}.json"
    path.write_text(json.dumps(output, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
