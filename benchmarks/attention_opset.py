"""Why the default export opset is 23: decode with ONNX Attention (opset 23) against the
opset-18 export with gptkiln's ORT MultiHeadAttention fusion, on ONNX Runtime CPU.

    python benchmarks/attention_opset.py [MODEL] [--rounds 3]     (default: preset:gpt2)

Both graphs get the onnxruntime target's fusions (portable + onnxruntime); timed like
fusion_speed.py (decode: batch 1, one token on a 128-token cache, median of 40; prefill:
batch 1 x 128, median of 8), alternating between the two graphs for --rounds rounds.
Writes results/attention_opset.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import onnx_ir as ir

from fusion_speed import feeds, ort_session, timed
from gptkiln.exporter.io_spec import DATA_FILE
from gptkiln.exporter.to_onnx import export_onnx
from gptkiln.graph import optimize
from gptkiln.models.loading import load_model
from tables import markdown_table

HERE = Path(__file__).parent
OPSETS = (18, 23)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="preset:gpt2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    loaded = load_model(args.model)
    rounds = {opset: [] for opset in OPSETS}
    with tempfile.TemporaryDirectory(dir=HERE) as tmp:
        sessions, fusions = {}, {}
        for opset in OPSETS:
            model = ir.load(export_onnx(loaded, Path(tmp) / f"raw{opset}", opset).path)
            report = optimize(model, loaded.spec, ("portable", "onnxruntime"))
            fusions[opset] = {c.name: c.actual for c in report.counts}
            path = Path(tmp) / f"fused{opset}" / "model.onnx"
            path.parent.mkdir()
            ir.save(model, path, external_data=DATA_FILE)
            sessions[opset] = ort_session(path, args.threads)
        step, prompt = feeds(loaded.spec, 1, 128), feeds(loaded.spec, 128, 0)
        for _ in range(args.rounds):
            for opset, session in sessions.items():
                rounds[opset].append({"decode": timed(lambda: session.run(None, step), 40),
                                      "prefill": timed(lambda: session.run(None, prompt), 8)})
    result = {"model": args.model, "threads": args.threads, "fusions": fusions, "rounds": rounds}
    (HERE / "results" / "attention_opset.json").write_text(json.dumps(result, indent=2) + "\n")
    print(markdown_table(["opset", "fusions", "decode ms per round", "prefill ms per round"],
                         [[str(opset), ", ".join(f"{k} {v}" for k, v in fusions[opset].items()),
                           " / ".join(f"{r['decode']['median_ms']:.2f}" for r in rounds[opset]),
                           " / ".join(f"{r['prefill']['median_ms']:.1f}" for r in rounds[opset])] for opset in OPSETS]))


if __name__ == "__main__":
    main()
