"""Pruning and distillation on one model: size and perplexity against the original on held-out text, for
depth pruning by a quarter and by a third (without and with distillation), and MLP-width pruning.

    python benchmarks/compression.py MODEL --calibration TEXT [--eval-text FILE] [--steps 200] [--work DIR]

Each variant is one `gptkiln.compress` run (the gate budget set out of the way: this measures, it does not
gate) and writes its checkpoint under --work; the table and a JSON record go to stdout and
benchmarks/results/compression-<model>.json.
"""

from __future__ import annotations

import argparse
import json
import math
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
            (f"MLP -25%, distilled {steps}", {"prune_mlp": 0.25, "distill_steps": steps})]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--calibration", required=True, type=Path)
    parser.add_argument("--eval-text", type=Path)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--work", type=Path, help="where the checkpoints go (default: a temporary directory)")
    args = parser.parse_args()
    from gptkiln.models.loading import load_model

    layers = load_model(args.model).spec.num_layers
    work = args.work or Path(tempfile.mkdtemp(prefix="gptkiln-compression-"))
    rows, records = [("variant", "parameters", "size MB", "perplexity", "vs original", "top-1", "distil s")], []
    for name, options in variants(layers, args.steps):
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
    print(text_table(rows))
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"compression-{Path(args.model).stem}.json"
    path.write_text(json.dumps(records, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
