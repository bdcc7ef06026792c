"""Decode speed of compressed models against the original, interleaved in one run: every gptkiln output under
a directory (e.g. the int4 builds `benchmarks/compression.py --int4` writes under WORK/int4), each target it
compiled, and PyTorch eager fp32 of the original as the baseline.

    python benchmarks/compression_speed.py MODEL DIR [--threads 2] [--batch 1 --batch 8] [--repeats 3]

`gptkiln bench` takes one model's builds; this takes builds of several models (the original and its pruned
variants), so their rows come from the same rounds (rotated order, one process per variant). Each row's
bandwidth floor uses its own model's KV cache. The table goes to stdout, the report to
benchmarks/results/compression-speed-<model>.json.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from gptkiln.bench.measure import BenchSettings
from gptkiln.bench.run import find_outputs, measure_all, output_variants, pytorch_variant
from gptkiln.manifest import read_manifest
from gptkiln.models.spec import DecoderSpec
from gptkiln.progress import Progress
from gptkiln.summary import text_table

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="the original model (its PyTorch eager fp32 is the baseline)")
    parser.add_argument("directory", type=Path, help="gptkiln outputs at or below it")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, action="append", help="default 1 and 8")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    settings = BenchSettings(threads=args.threads, new_tokens=args.new_tokens, repeats=args.repeats,
                             batches=tuple(args.batch or (1, 8)))
    outputs = find_outputs(args.directory)
    manifests = {output: read_manifest(output) for output in outputs}
    variants = [pytorch_variant(args.model)]
    for output, manifest in manifests.items():
        variants += [replace(v, name=f"{output.relative_to(args.directory)} {v.name}")
                     for v in output_variants(output, manifest)]
    first = next(iter(manifests.values()))
    report = measure_all(variants, DecoderSpec.from_dict(first["spec"]), outputs[0], settings, Progress(enabled=True))
    rows = [("variant", "precision", "MB", *(f"b{b} tok/s (min-max)" for b in settings.batches), "b1 % floor",
             "prefill ms")]
    for row in report["results"]:
        decode = [row["decode"][str(batch)] for batch in settings.batches]
        rows.append((row["name"], row["precision"], f"{row['artifact_mb']:.0f}" if row["artifact_mb"] else "-",
                     *(f"{d['tokens_per_s']['median']:.1f} ({d['tokens_per_s']['min']:.1f}-"
                       f"{d['tokens_per_s']['max']:.1f})" for d in decode),
                     f"{decode[0]['floor_pct']:.0f}%", f"{row['prefill_ms']['median']:.0f}"))
    print(text_table(rows))
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"compression-speed-{Path(args.model).stem}.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
