"""int8 activations on a real checkpoint: SmoothQuant's α and folds, static against per-token scales, and
which layer roles carry what is left.

    python benchmarks/w8a8_smoothing.py MODEL --calibration DIR --eval-text FILE [--out results/w8a8_smoothing.json]
        [--only N ...]

One export, then per variant: smooth (gptkiln.calibration.smoothquant, every fold the graph has, or
none; α "auto": searched per activation), quantize every linear layer (W8A8: static per-tensor
activation scales, minmax or percentile 99.99; int8-dynamic: per-token scales at run time) except the
layer roles the variant keeps in fp32, and score perplexity and top-1 against fp32 PyTorch on ONNX Runtime CPU (the quantize stage's own
trial evaluation). Statistics come from the calibration cache when they were collected before.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import onnx_ir as ir

from gptkiln.calibration.layers import linear_layers
from gptkiln.calibration.qdq import activation_threshold, quantize_dynamic, quantize_w8a8
from gptkiln.calibration.quantize import prepare
from gptkiln.calibration.smoothquant import smooth
from gptkiln.calibration.statistics import collect
from gptkiln.config import AUTO_ALPHA, ActivationCalibration
from gptkiln.exporter.to_onnx import export_onnx
from gptkiln.targets.onnxruntime import OnnxRuntimeRunner, create_session

from checkpoint_study import in_roles, report, study_inputs

DYNAMIC, MINMAX, PERCENTILE = "int8-dynamic", ActivationCalibration.MINMAX, ActivationCalibration.PERCENTILE
# (form, SmoothQuant α or None, layer roles kept in fp32)
VARIANTS = [(DYNAMIC, None, ()), (DYNAMIC, 0.5, ()), (DYNAMIC, 0.6, ()), (DYNAMIC, 0.7, ()),
            (DYNAMIC, 0.6, ("lm_head",)), (DYNAMIC, 0.6, ("down_proj",)), (DYNAMIC, 0.6, ("lm_head", "down_proj")),
            (PERCENTILE, 0.5, ()), (MINMAX, 0.5, ()), (MINMAX, 0.9, ()),
            (MINMAX, AUTO_ALPHA, ()), (PERCENTILE, AUTO_ALPHA, ()), (MINMAX, AUTO_ALPHA, ("lm_head",)),
            (MINMAX, AUTO_ALPHA, ("down_proj",))]


def _only(parser) -> None:
    parser.add_argument("--only", type=int, action="append", help="run only these variants (0-based indices)")


def _searched(folds) -> str:
    alphas = sorted(f.alpha for f in folds)
    return f"auto (median {alphas[len(alphas) // 2]:g}, {alphas[0]:g} to {alphas[-1]:g})"


def main() -> None:
    args, loaded, evaluation, calibration = study_inputs(__doc__.splitlines()[0], "w8a8_smoothing.json", _only)
    spec = loaded.spec
    rows, records = [("activations", "SmoothQuant α", "fp32 roles", "folds", "perplexity", "increase", "top-1",
                      "seconds")], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepared = work / "prepared" / "model.onnx"
        prepare(export_onnx(loaded, work / "export", opset=23).path, prepared, spec)
        names = sorted({layer.activation.name for layer in linear_layers(ir.load(prepared))})
        stats = collect(prepared, names, calibration, spec, hessians=True)
        for index, (form, alpha, roles) in enumerate(VARIANTS):
            if args.only and index not in args.only:
                continue
            started = time.perf_counter()
            model = ir.load(prepared)
            folds = smooth(model, linear_layers(model), dict(stats.absmax), alpha, spec, stats.hessians,
                           calibration.windows.size) if alpha is not None else []
            base = work / f"smoothed-{index}" / "model.onnx"
            base.parent.mkdir()
            ir.save(model, base, external_data="model.onnx.data")
            model = ir.load(base)
            chosen = [layer for layer in linear_layers(model) if not in_roles(layer, spec, roles)]
            if form == DYNAMIC:
                quantize_dynamic(model, chosen)
            else:
                smoothed = collect(base, names, calibration, spec, histograms=form is not MINMAX)
                quantize_w8a8(model, chosen, {n: activation_threshold(smoothed, n, form, 99.99) for n in names})
            path = work / f"variant-{index}" / "model.onnx"
            path.parent.mkdir()
            ir.save(model, path, external_data="model.onnx.data")
            accuracy = evaluation.measure(OnnxRuntimeRunner(spec, create_session(path)))
            label = form if form == DYNAMIC else f"static, {form.value}"
            rows.append((label, "none" if alpha is None else f"{alpha:g}" if alpha != AUTO_ALPHA else _searched(folds), " + ".join(roles) or "-", len(folds),
                         f"{accuracy.ppl:.3f}", f"{accuracy.ppl_increase_pct:+.2f}%", f"{accuracy.top1_agreement:.1%}",
                         f"{time.perf_counter() - started:.0f}"))
            records.append({"activations": label, "alpha": alpha, "fp32_roles": list(roles), "folds": len(folds),
                            "alphas": [f.alpha for f in folds], "accuracy": accuracy.to_dict()})
            print(rows[-1], flush=True)
    report(args, loaded, rows, records)


if __name__ == "__main__":
    main()
