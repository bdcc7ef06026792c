"""OpenVINO int8/int4: gptkiln's quantized graphs against NNCF's weight compression of the same IR.

    python benchmarks/openvino_compression.py MODEL [--opset 23] [--calibration PATH]   (needs: pip install nncf)

For MODEL (reference or preset:gpt2), one run: gptkiln's fp32 IR, its W8A8 (SmoothQuant,
percentile) and int4 (GPTQ and RTN, g32) graphs compiled by the openvino target, and NNCF's
data-free `compress_weights` applied to that fp32 IR (INT8_ASYM; INT4_ASYM g32; INT4_ASYM g128
where the width allows). Accuracy as the build gate measures it (perplexity increase, top-1 vs
fp32 PyTorch; 8192 held-out tokens for the reference, 2048 for other models); speed with the
gptkiln runner (stateful, f32 config): prefill batch 1 x 128, then 20 decode steps, median of
the last 15, at batch 1 and 8. No fallback: every linear layer quantized. Calibration: the
standard-library text of benchmarks/quantization.py. Writes results/openvino_compression-<model>.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from gptkiln.calibration.data import calibration_set, read_texts
from gptkiln.calibration.perplexity import EvalText, Evaluation
from gptkiln.calibration.quantize import prepare, quantize
from gptkiln.config import AccuracyBudget, CalibrationSettings, Int4Method, Precision, QuantSettings
from gptkiln.exporter.to_onnx import export_onnx
from gptkiln.models.loading import load_model
from gptkiln.targets.onnxruntime import OnnxRuntimeRunner, create_session
from gptkiln.targets.openvino import IR_FILE, OpenVinoTarget
from quantization import stdlib_text
from tables import markdown_table

HERE = Path(__file__).parent


def timing(runner, spec, batch: int) -> tuple[float, float]:
    ids = np.random.default_rng(0).integers(0, min(spec.vocab_size, 4096), (batch, 128))
    positions = np.broadcast_to(np.arange(128), (batch, 128)).copy()
    started = time.perf_counter()
    logits, cache = runner.step(ids, np.ones_like(ids), positions, runner.empty_cache(batch))
    prefill = (time.perf_counter() - started) * 1e3
    steps = []
    for i in range(20):
        token = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        started = time.perf_counter()
        logits, cache = runner.step(token, np.ones((batch, 129 + i), np.int64), np.full((batch, 1), 128 + i), cache)
        steps.append((time.perf_counter() - started) * 1e3)
    return prefill, statistics.median(steps[5:])


def run(model_name: str, opset: int, calibration_path: Path | None) -> dict:
    import nncf
    import openvino as ov

    loaded = load_model(model_name)
    spec = loaded.spec
    target = OpenVinoTarget()
    irs: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(dir=HERE) as tmp:
        tmp = Path(tmp)
        text = calibration_path or stdlib_text(tmp)
        settings = QuantSettings(calibration=CalibrationSettings(path=text), fallback=False)
        calibration = calibration_set(read_texts(text), loaded.tokenizer, settings.calibration, str(text))
        evaluation = Evaluation.prepare(loaded, EvalText.read(None), 8192 if model_name == "reference" else 2048)
        prepared = {}
        for graph_opset in sorted({opset, max(opset, 21)}):  # int4's blocked DequantizeLinear needs 21
            prepared[graph_opset] = tmp / f"prepared{graph_opset}" / "model.onnx"
            prepare(export_onnx(loaded, tmp / f"export{graph_opset}", graph_opset).path, prepared[graph_opset], spec)

        def evaluate(path: Path):
            return evaluation.measure(OnnxRuntimeRunner(spec, create_session(path)))

        ours = {"fp32": (Precision.FP32, {}), "gptkiln w8a8": (Precision.W8A8, {}),
                "gptkiln int4 gptq": (Precision.INT4, {"int4_method": Int4Method.GPTQ}),
                "gptkiln int4 rtn": (Precision.INT4, {"int4_method": Int4Method.RTN})}
        for name, (precision, changes) in ours.items():
            source = prepared[max(opset, 21) if precision is Precision.INT4 else opset]
            graph = source
            if precision.quantized:
                work = tmp / "work" / name.replace(" ", "_")
                work.mkdir(parents=True)
                graph = quantize(source, work, precision, replace(settings, **changes), spec, calibration, evaluate,
                                 AccuracyBudget.default(precision)).path
            irs[name] = tmp / "ir" / name.replace(" ", "_")
            target.compile(graph, irs[name], spec)
        nncf_modes = {"nncf int8_asym": {"mode": nncf.CompressWeightsMode.INT8_ASYM},
                      "nncf int4_asym g32": {"mode": nncf.CompressWeightsMode.INT4_ASYM, "group_size": 32, "ratio": 1.0}}
        if spec.hidden_size % 128 == 0:
            nncf_modes["nncf int4_asym g128"] = {"mode": nncf.CompressWeightsMode.INT4_ASYM, "group_size": 128, "ratio": 1.0}
        for name, options in nncf_modes.items():
            model = nncf.compress_weights(ov.Core().read_model(str(irs["fp32"] / IR_FILE)), **options)
            irs[name] = tmp / "ir" / name.replace(" ", "_")
            shutil.copytree(irs["fp32"], irs[name])  # runtime_config.json and all
            ov.save_model(model, str(irs[name] / IR_FILE), compress_to_fp16=False)
        rows = {}
        for name, directory in irs.items():
            runner = target.load(directory, spec)
            accuracy = evaluation.measure(runner)
            prefill, step_b1 = timing(runner, spec, 1)
            _, step_b8 = timing(runner, spec, 8)
            rows[name] = {"ir_mb": sum(p.stat().st_size for p in directory.iterdir()) / 1e6,
                          "ppl_increase_pct": accuracy.ppl_increase_pct, "top1_agreement": accuracy.top1_agreement,
                          "prefill_ms": prefill, "decode_b1_tokens_per_s": 1e3 / step_b1,
                          "decode_b8_tokens_per_s": 8e3 / step_b8}
            print(name, rows[name], flush=True)
    return {"model": model_name, "opset": opset, "eval_tokens": int(evaluation.windows.size), "variants": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--opset", type=int, default=23)
    parser.add_argument("--calibration", type=Path)
    args = parser.parse_args()
    result = run(args.model, args.opset, args.calibration)
    name = f"openvino_compression-{args.model.replace(':', '_')}-opset{args.opset}.json"
    (HERE / "results" / name).write_text(json.dumps(result, indent=2) + "\n")
    print(markdown_table(["variant", "IR MB", "perplexity increase", "top-1", "prefill b1 ms", "decode b1 tok/s",
                          "decode b8 tok/s"],
                         [[n, f"{r['ir_mb']:.1f}", f"{r['ppl_increase_pct']:+.3f}%", f"{r['top1_agreement']:.2%}",
                           f"{r['prefill_ms']:.1f}", f"{r['decode_b1_tokens_per_s']:.1f}",
                           f"{r['decode_b8_tokens_per_s']:.1f}"] for n, r in result["variants"].items()]))


if __name__ == "__main__":
    main()
