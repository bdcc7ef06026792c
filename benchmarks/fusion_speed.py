"""Prefill and decode latency on ONNX Runtime CPU: unfused export, gptkiln fused, ONNX Runtime's
own transformer optimizer on the same export, and PyTorch eager — one run, same weights.

    python benchmarks/fusion_speed.py [MODEL] [--repeats N]     (default: preset:gpt2)

Prefill: batch 1, 128 tokens, empty cache. Decode: batch 1, one token on a 128-token cache
(the same cache every repeat). Median and spread (p10-p90) over repeats after warm-up;
ORT sessions use graph_optimization_level=ORT_ENABLE_ALL (as the ORT target does) and
every runtime gets the same thread count. Writes benchmarks/results/fusion_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

from gptkiln.exporter import io_spec
from tables import markdown_table
from gptkiln.exporter.to_onnx import export_onnx
from gptkiln.graph import optimize
from gptkiln.models.loading import load_model
from gptkiln.runtime.torch_runner import TorchRunner

HERE = Path(__file__).parent
PROMPT, PAST = 128, 128


def timed(fn, repeats: int, warmup: int = 3) -> dict:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1e3)
    samples.sort()
    return {"median_ms": statistics.median(samples), "p10_ms": samples[len(samples) // 10],
            "p90_ms": samples[(9 * len(samples)) // 10]}


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def feeds(spec, seq: int, past: int) -> dict:
    rng = np.random.default_rng(0)
    kv = (1, spec.num_kv_heads, past, spec.head_dim)
    data = {"input_ids": rng.integers(0, spec.vocab_size, (1, seq), dtype=np.int64),
            "attention_mask": np.ones((1, past + seq), np.int64),
            "position_ids": np.arange(past, past + seq, dtype=np.int64)[None]}
    data.update({name: rng.standard_normal(kv).astype(np.float32) for name in io_spec.past_names(spec.num_layers)})
    return data


def ort_optimizer_model(src: Path, dst: Path, spec) -> Path:
    from onnxruntime.transformers import optimizer

    model = optimizer.optimize_model(str(src), model_type="gpt2", num_heads=spec.num_heads,
                                     hidden_size=spec.hidden_size, opt_level=1)
    model.save_model_to_file(str(dst), use_external_data_format=True)
    return dst


def op_histogram(path: Path) -> dict:
    counts: dict[str, int] = {}
    for node in ir.load(path).graph:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default="preset:gpt2")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    spec = loaded.spec
    prefill, decode = feeds(spec, PROMPT, 0), feeds(spec, 1, PAST)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        raw = export_onnx(loaded, tmp / "raw", opset=18).path
        fused_model = ir.load(raw)
        report = optimize(fused_model, spec, ("portable", "onnxruntime"))
        fused = tmp / "fused" / "model.onnx"
        fused.parent.mkdir()
        ir.save(fused_model, fused, external_data="model.onnx.data")
        (tmp / "ortopt").mkdir()
        ortopt = ort_optimizer_model(raw, tmp / "ortopt" / "model.onnx", spec)
        variants = {"unfused export": raw, "gptkiln fused": fused, "ORT transformer optimizer": ortopt}
        for name, path in variants.items():
            session = ort_session(path, args.threads)
            rows[name] = {"prefill": timed(lambda: session.run(None, prefill), args.repeats),
                          "decode": timed(lambda: session.run(None, decode), 3 * args.repeats),
                          "ops": {op: n for op, n in op_histogram(path).items()
                                  if op in ("Softmax", "MultiHeadAttention", "Attention", "SkipLayerNormalization",
                                            "FastGelu", "LayerNormalization", "Gelu", "BiasGelu")},
                          "size_mb": round(sum(p.stat().st_size for p in path.parent.iterdir()) / 1e6, 1)}
        runner = TorchRunner(loaded.model, spec)
        pf = [prefill[k] for k in ("input_ids", "attention_mask", "position_ids")]
        dc = [decode[k] for k in ("input_ids", "attention_mask", "position_ids")]
        rows["PyTorch eager (sdpa)"] = {
            "prefill": timed(lambda: runner.step(*pf, [prefill[n] for n in io_spec.past_names(spec.num_layers)]), args.repeats),
            "decode": timed(lambda: runner.step(*dc, [decode[n] for n in io_spec.past_names(spec.num_layers)]), 3 * args.repeats),
            "ops": {}, "size_mb": None}
    result = {"model": args.model, "threads": args.threads, "prompt": PROMPT, "past": PAST,
              "fusion": report.to_dict(), "rows": rows}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "fusion_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    base, fused_row, ortopt_row = rows["unfused export"], rows["gptkiln fused"], rows["ORT transformer optimizer"]
    print(f"model {args.model}, {args.threads} threads, prefill batch 1 x {PROMPT}, decode batch 1 at past {PAST}")
    cells = []
    for name, row in rows.items():
        p, d = row["prefill"], row["decode"]
        cells.append([name, f"{p['median_ms']:.1f} ({p['p10_ms']:.1f}-{p['p90_ms']:.1f})",
                      f"{d['median_ms']:.2f} ({d['p10_ms']:.2f}-{d['p90_ms']:.2f})",
                      f"{base['decode']['median_ms'] / d['median_ms']:.2f}x",
                      f"{ortopt_row['decode']['median_ms'] / d['median_ms']:.2f}x",
                      ", ".join(f"{k} {v}" for k, v in sorted(row["ops"].items()))])
    print(markdown_table(["variant", "prefill ms (p10-p90)", "decode ms/token (p10-p90)", "decode vs unfused",
                          "decode vs ORT optimizer", "fused ops"], cells))
    print(f"\nfused vs unfused: prefill {base['prefill']['median_ms'] / fused_row['prefill']['median_ms']:.2f}x, "
          f"decode {base['decode']['median_ms'] / fused_row['decode']['median_ms']:.2f}x")


if __name__ == "__main__":
    main()
