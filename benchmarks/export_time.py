"""Export time and peak memory of `gptkiln export`, per model, in a fresh process each.

    python benchmarks/export_time.py [MODEL ...]      (default: reference preset:gpt2)

Each model is exported by the real CLI in a child process (so the peak resident memory is
that build's alone: ru_maxrss of the child), to ONNX Runtime, with the fp32 parity gate.
Prints a markdown table for benchmarks/RESULTS.md and writes benchmarks/results/export_time.json.
"""

from __future__ import annotations

import json
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from tables import markdown_table

HERE = Path(__file__).parent


def measure(model: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, "-m", "gptkiln", "export", model, "-o", f"{tmp}/out", "--json",
                               "--no-cache"],
                              capture_output=True, text=True)
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # max over children so far
        result = json.loads(proc.stdout)
        if not result["ok"]:
            raise SystemExit(f"{model}: {result['error']['cause']}")
        size = sum(p.stat().st_size for p in Path(f"{tmp}/out").rglob("*") if p.is_file())
    parity = result["targets"]["onnxruntime"]["parity"]["comparisons"]
    return {
        "model": model, "layers": result["spec"]["num_layers"], "export_s": result["stage_seconds"]["export to ONNX"],
        "stage_seconds": result["stage_seconds"], "peak_rss_gib": round(peak_kib / 2**20, 2),
        "output_mb": round(size / 1e6, 1), "onnx_nodes": result["export"]["nodes"],
        "logits_rel_batch1": max(c["rel"] for c in parity if c["name"] == "batch1/logits"),
    }


def main() -> None:
    models = sys.argv[1:] or ["reference", "preset:gpt2"]
    # run the largest last: ru_maxrss of children is a running maximum
    rows = [measure(model) for model in models]
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "export_time.json").write_text(json.dumps(
        {"machine": f"{platform.processor() or platform.machine()}, {sys.platform}", "rows": rows}, indent=2) + "\n")
    print(markdown_table(
        ["model", "layers", "load + export (s)", "whole build (s)", "peak RSS (GiB)", "output (MB)", "nodes",
         "batch-1 logits rel"],
        [[r["model"], str(r["layers"]), f"{r['export_s']:.1f}", f"{sum(r['stage_seconds'].values()):.1f}",
          f"{r['peak_rss_gib']:.2f}", f"{r['output_mb']:.0f}", str(r["onnx_nodes"]), f"{r['logits_rel_batch1']:.1e}"]
         for r in rows]))


if __name__ == "__main__":
    main()
