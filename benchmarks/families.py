"""Per-family fp32 parity on every CPU target: the suite's tiny configs (tests/conftest.py), one table.

    python benchmarks/families.py [--out benchmarks/results/families.json]

Each family is exported once and compiled for onnxruntime, openvino and openvino-stateless; the
table gives the gate's numbers per target (batch-1 and padded-batch logits relative to the logit
scale, greedy tokens matched) and the expected graph ops each one got.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from conftest import TINY_CONFIGS, save_tiny_model  # noqa: E402

from gptkiln.summary import text_table  # noqa: E402
from gptkiln.config import BuildConfig  # noqa: E402
from gptkiln.pipeline import build  # noqa: E402

TARGETS = ("onnxruntime", "openvino", "openvino-stateless")
CLAIMS = ("rms_normalization", "rotary_embedding", "onnx_attention", "gqa_attention", "skip_rms_norm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "families.json")
    args = parser.parse_args()
    rows, records = [("family", "target", "logits rel (b1)", "padded rel", "greedy", "graph (expected/actual)", "result")], {}
    with tempfile.TemporaryDirectory() as tmp:
        for model_type in sorted(TINY_CONFIGS):
            directory = save_tiny_model(model_type, Path(tmp) / model_type)
            result = build(BuildConfig(model=str(directory), output=Path(tmp) / f"{model_type}-out", targets=TARGETS))
            for target in result.targets:
                rel = {c.name: c.rel for c in target.parity.comparisons}
                greedy = " ".join(f"{g.matched}/{g.tokens}" for g in target.parity.greedy)
                fusions = {f["name"]: f for f in target.settings["fusion"]["fusions"]}
                graph = ", ".join(f"{name} {fusions[name]['expected']}/{fusions[name]['actual']}" for name in CLAIMS
                                  if name in fusions and fusions[name]["expected"] is not None)
                rows.append((result.spec.family, target.name, f"{rel['batch1/logits']:.2e}",
                             f"{rel['padded/logits']:.2e}", greedy, graph or "-", "PASS" if not target.failures else "FAIL"))
                records[f"{model_type}/{target.name}"] = {"rel": rel, "greedy": greedy, "fusions": fusions,
                                                          "failures": target.failures}
    print(text_table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(records, indent=1, default=str))


if __name__ == "__main__":
    main()
