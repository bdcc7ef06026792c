"""Quantized builds on ONNX Runtime CPU: size, prefill latency, decode speed, perplexity and top-1
agreement for fp32, int8-dynamic, W8A8 (with and without SmoothQuant) and int4 (RTN, GPTQ) —
one run, same weights, same calibration and evaluation text.

    python benchmarks/quantization.py [MODEL ...] [--repeats N] [--calibration PATH]

Each variant is quantized by gptkiln.calibration.quantize (no fallback: every linear layer
quantized), compiled by the onnxruntime target (its fusions; ORT_ENABLE_ALL at load, which
turns the QDQ / blocked-int4 forms into int8 / MatMulNBits kernels) and timed like
fusion_speed.py: prefill batch 1 x 128 tokens; decode batch 1, one token on a 128-token cache.
Accuracy: perplexity on the first 8192 tokens of the reference model's held-out text and
top-1 agreement with fp32 PyTorch, as the build gate measures them. Calibration: 64 windows
of 128 tokens of standard-library source (the tests' text) unless --calibration is given.
Writes benchmarks/results/quantization-<model>.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import onnxruntime as ort

from fusion_speed import feeds, ort_session, timed
from gptkiln.calibration.data import calibration_set, read_texts
from gptkiln.calibration.perplexity import EvalText, Evaluation
from gptkiln.calibration.quantize import prepare, quantize
from gptkiln.config import (AccuracyBudget, ActivationCalibration, CalibrationSettings, Int4Method, Precision,
                            QuantSettings)
from gptkiln.exporter.to_onnx import export_onnx
from gptkiln.models.loading import load_model
from gptkiln.targets.onnxruntime import OnnxRuntimeRunner, OnnxRuntimeTarget, create_session
from tables import markdown_table

HERE = Path(__file__).parent
STDLIB_FILES = ("argparse.py", "typing.py", "inspect.py", "dataclasses.py", "pathlib.py", "subprocess.py")

VARIANTS = {  # name: (precision, settings changes)
    "fp32": (Precision.FP32, {}),
    "int8-dynamic": (Precision.INT8_DYNAMIC, {}),
    "w8a8 (no SmoothQuant, no float channels)": (Precision.W8A8, {"smoothquant_alpha": None, "float_channels": False}),
    "w8a8 (SmoothQuant 0.5, percentile)": (Precision.W8A8, {"smoothquant_alpha": 0.5,
                                                            "activations": ActivationCalibration.PERCENTILE}),
    "w8a8 (defaults: α searched, minmax, float channels)": (Precision.W8A8, {}),
    "int4 rtn": (Precision.INT4, {"int4_method": Int4Method.RTN}),
    "int4 gptq": (Precision.INT4, {"int4_method": Int4Method.GPTQ}),
}


def stdlib_text(directory: Path) -> Path:
    stdlib = Path(os.__file__).parent
    path = directory / "stdlib.txt"
    path.write_text("\n\n".join((stdlib / name).read_text(encoding="utf-8") for name in STDLIB_FILES), encoding="utf-8")
    return path


def size_mb(directory: Path) -> float:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file()) / 1e6


def run(model_name: str, repeats: int, calibration_path: Path | None, threads: int) -> dict:
    loaded = load_model(model_name)
    spec = loaded.spec
    rows = {}
    with tempfile.TemporaryDirectory(dir=HERE) as tmp:
        tmp = Path(tmp)
        text = calibration_path or stdlib_text(tmp)
        settings = QuantSettings(calibration=CalibrationSettings(path=text), fallback=False)
        calibration = calibration_set(read_texts(text), loaded.tokenizer, settings.calibration, str(text))
        evaluation = Evaluation.prepare(loaded, EvalText.read(None), settings.eval_tokens)
        prepared = {}
        for opset in (18, 21):  # as recorded in RESULTS.md (int4's blocked DequantizeLinear needs 21)
            exported = export_onnx(loaded, tmp / f"export{opset}", opset).path
            prepared[opset] = tmp / f"prepared{opset}" / "model.onnx"
            prepare(exported, prepared[opset], spec)
        for name, (precision, changes) in VARIANTS.items():
            print(f"{model_name}: {name} ...", flush=True)
            source = prepared[21 if precision is Precision.INT4 else 18]
            work = tmp / "work" / name.replace(" ", "_")
            work.mkdir(parents=True)

            def evaluate(path: Path):
                return evaluation.measure(OnnxRuntimeRunner(spec, create_session(path)))

            if precision is Precision.FP32:
                graph, method, accuracy = source, {}, evaluate(source)
            else:
                result = quantize(source, work, precision, replace(settings, **changes), spec, calibration, evaluate,
                                  AccuracyBudget.default(precision))
                graph, method, accuracy = result.path, result.method, result.accuracy
            engine = tmp / "engines" / name.replace(" ", "_")
            OnnxRuntimeTarget().compile(graph, engine, spec)
            session = ort_session(engine / "model.onnx", threads)
            prefill = timed(lambda: session.run(None, feeds(spec, 128, 0)), max(3, repeats // 4))
            step = feeds(spec, 1, 128)
            decode = timed(lambda: session.run(None, step), repeats)
            budget = AccuracyBudget.default(precision) if precision.quantized else None
            rows[name] = {
                "precision": precision.value, "method": method, "size_mb": round(size_mb(engine), 1),
                "prefill_ms": prefill, "decode_ms": decode, "decode_tokens_per_s": 1e3 / decode["median_ms"],
                "ppl": accuracy.ppl, "ppl_reference": accuracy.ppl_reference,
                "ppl_increase_pct": accuracy.ppl_increase_pct, "top1_agreement": accuracy.top1_agreement,
                "within_budget": None if budget is None else (accuracy.ppl_increase_pct <= budget.max_ppl_increase_pct
                                                              and accuracy.top1_agreement >= budget.min_top1_agreement),
            }
            shutil.rmtree(work)
    fp32 = rows["fp32"]["decode_ms"]["median_ms"]
    for row in rows.values():
        row["decode_speedup_vs_fp32"] = fp32 / row["decode_ms"]["median_ms"]
    return {"model": model_name, "threads": threads, "repeats": repeats, "onnxruntime": ort.__version__,
            "calibration": calibration.source, "eval_text": evaluation.text, "eval_tokens": int(evaluation.windows.size),
            "variants": rows}


def table(result: dict) -> str:
    rows = [[name, f"{row['size_mb']:.1f}", f"{row['prefill_ms']['median_ms']:.1f}", f"{row['decode_tokens_per_s']:.1f}",
             f"{row['decode_speedup_vs_fp32']:.2f}x", f"{row['ppl']:.3f}", f"{row['ppl_increase_pct']:+.2f}%",
             f"{row['top1_agreement']:.1%}", {None: "-", True: "holds", False: "missed"}[row["within_budget"]]]
            for name, row in result["variants"].items()]
    headers = ["variant", "size MB", "prefill 128 ms", "decode tok/s", "vs fp32", "perplexity", "increase", "top-1",
               "budget"]
    return (f"**{result['model']}** (ONNX Runtime {result['onnxruntime']}, {result['threads']} threads)\n\n"
            + markdown_table(headers, rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=["reference", "preset:gpt2"])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--calibration", type=Path)
    args = parser.parse_args()
    for model in args.models:
        result = run(model, args.repeats, args.calibration, args.threads)
        out = HERE / "results" / f"quantization-{model.replace(':', '_')}.json"
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(table(result), flush=True)


if __name__ == "__main__":
    main()
