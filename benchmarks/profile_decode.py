"""Where a decode step's time goes in ONNX Runtime: kernel time per op type, unfused vs fused.

    python benchmarks/profile_decode.py [MODEL] [--steps N]     (default: preset:gpt2, 40 steps)
    python benchmarks/profile_decode.py [MODEL] --onnx NAME=PATH ...   (graphs already built for MODEL,
                                                                        e.g. a gptkiln onnxruntime engine)

Batch 1, one token on a 128-token cache, 2 threads, ORT_ENABLE_ALL, ORT's own profiler.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import onnx_ir as ir
import onnxruntime as ort

from fusion_speed import PAST, feeds
from gptkiln.exporter.to_onnx import export_onnx
from gptkiln.graph import optimize
from gptkiln.models.loading import load_model


def kernel_times(path: Path, data: dict, steps: int, prefix: Path) -> collections.Counter:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 2
    options.enable_profiling = True
    options.profile_file_prefix = str(prefix)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(steps):
        session.run(None, data)
    per_op: collections.Counter = collections.Counter()
    for event in json.loads(Path(session.end_profiling()).read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"] / steps / 1000  # ms per step
    return per_op


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default="preset:gpt2")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--onnx", nargs="+", metavar="NAME=PATH", help="profile these graphs instead")
    args = parser.parse_args()
    loaded = load_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.onnx:
            graphs = [tuple(item.split("=", 1)) for item in args.onnx]
        else:
            raw = export_onnx(loaded, tmp / "raw", opset=18).path
            model = ir.load(raw)
            optimize(model, loaded.spec, ("portable", "onnxruntime"))
            fused = tmp / "fused.onnx"
            ir.save(model, fused, external_data="fused.onnx.data")
            graphs = [("unfused", raw), ("fused", fused)]
        data = feeds(loaded.spec, 1, PAST)
        for name, path in graphs:
            per_op = kernel_times(path, data, args.steps, tmp / name)
            print(f"{name}: {sum(per_op.values()):.1f} ms of kernels per decode step")
            for op, ms in per_op.most_common(10):
                print(f"    {op:26s} {ms:6.2f} ms")


if __name__ == "__main__":
    main()
