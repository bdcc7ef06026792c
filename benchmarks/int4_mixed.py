"""Which layers carry int4's error on a real checkpoint: GPTQ int4 everywhere, then chosen layers in int8.

    python benchmarks/int4_mixed.py MODEL --calibration DIR --eval-text FILE [--out results/int4_mixed.json]

One export, one set of GPTQ Hessians, then per variant: quantize (int4 asymmetric, blocks of 128
narrowed to the input size; int8 symmetric blocks of 32 for the chosen layers), score perplexity and
top-1 against fp32 PyTorch on ONNX Runtime CPU (the quantize stage's own trial evaluation), and
count bits per weight. The variants are layer roles across every block (llama.cpp's Q4_K_M keeps
attn_v and ffn_down at higher precision) against the tied lm_head alone.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import onnx_ir as ir

from gptkiln.calibration.layers import linear_bits, linear_layers, weight_bits
from gptkiln.calibration.quantize import prepare
from gptkiln.calibration.statistics import collect
from gptkiln.calibration.weight_only import MIN_OPSET, WeightFormat, quantize_weights
from gptkiln.exporter.to_onnx import export_onnx
from gptkiln.targets.onnxruntime import OnnxRuntimeRunner, create_session

from checkpoint_study import in_roles, report, study_inputs

INT4, INT8 = WeightFormat(128, symmetric=False, bits=4), WeightFormat(32, symmetric=True, bits=8)
ROLES = {"all int4": (), "lm_head int8": ("lm_head",), "v_proj + down_proj int8": ("v_proj", "down_proj"),
         "lm_head + v_proj + down_proj int8": ("lm_head", "v_proj", "down_proj")}


def main() -> None:
    args, loaded, evaluation, calibration = study_inputs(__doc__.splitlines()[0], "int4_mixed.json")
    spec = loaded.spec
    rows, records = [("variant", "int8 layers", "perplexity", "increase", "top-1", "bits/weight linear", "model",
                      "seconds")], {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepared = work / "prepared" / "model.onnx"
        prepare(export_onnx(loaded, work / "export", opset=23).path, prepared, spec)
        layers = linear_layers(ir.load(prepared))
        hessians = collect(prepared, sorted({layer.activation.name for layer in layers}), calibration, spec,
                           hessians=True).hessians
        for name, roles in ROLES.items():
            started = time.perf_counter()
            model = ir.load(prepared)
            model.opset_imports[""] = max(model.opset_imports.get("", MIN_OPSET), MIN_OPSET)
            weights, _ = weight_bits(model)
            every = linear_layers(model)
            chosen = {layer.name: INT8 for layer in every if in_roles(layer, spec, roles)}
            quantize_weights(model, every, INT4, hessians, chosen)
            path = work / name.replace(" ", "_") / "model.onnx"
            path.parent.mkdir()
            ir.save(model, path, external_data="model.onnx.data")
            accuracy = evaluation.measure(OnnxRuntimeRunner(spec, create_session(path)))
            linear = [linear_bits(layer) for layer in every]
            bits = {"linear_layers": sum(b for _, b in linear) / sum(n for n, _ in linear),
                    "model": weight_bits(model)[1] / weights}
            seconds = time.perf_counter() - started
            rows.append((name, len(chosen), f"{accuracy.ppl:.3f}", f"{accuracy.ppl_increase_pct:+.2f}%",
                         f"{accuracy.top1_agreement:.1%}", f"{bits['linear_layers']:.2f}", f"{bits['model']:.2f}",
                         f"{seconds:.0f}"))
            records[name] = {"int8_layers": sorted(chosen), "accuracy": accuracy.to_dict(), "bits_per_weight": bits}
            print(rows[-1], flush=True)
    report(args, loaded, rows, records)


if __name__ == "__main__":
    main()
