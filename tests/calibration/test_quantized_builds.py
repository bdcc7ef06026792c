"""Quantized builds end to end on the trained reference model: each precision passes its
accuracy gate on every CPU target; naive W8A8 fails on planted outliers and SmoothQuant
passes; the mixed-precision fallback finds the layers that need fp32; bad input is refused."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import onnx
import pytest
from transformers import AutoTokenizer

from gptkiln.calibration.outliers import plant_outliers
from gptkiln.cli import main
from gptkiln.calibration.perplexity import AccuracyReport, accuracy_failures
from gptkiln.config import (AccuracyBudget, BuildConfig, CalibrationSettings, Int4Method, ParitySettings, Precision,
                            QuantSettings)
from gptkiln.errors import ParityError
from gptkiln.manifest import MANIFEST, read_manifest
from gptkiln.models.loading import REFERENCE_DIR, load_model
from gptkiln.pipeline import build, verify

FAST_CALIBRATION = CalibrationSettings(samples=32, seq_len=128, decode_steps=16)
OUTLIER_CHANNELS, OUTLIER_FACTOR = [5, 77, 140], 40.0  # 40x: what real LLMs show (10-100x)


def quant(calibration_text, **changes) -> QuantSettings:
    return replace(QuantSettings(calibration=replace(FAST_CALIBRATION, path=calibration_text)), **changes)


def planted_model(directory, blocks=None):
    loaded = load_model("reference")
    plant_outliers(loaded.model, OUTLIER_CHANNELS, OUTLIER_FACTOR, blocks)
    loaded.model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(REFERENCE_DIR).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def w8a8_build(tmp_path_factory, calibration_text):
    output = tmp_path_factory.mktemp("w8a8") / "out"
    config = BuildConfig(model="reference", output=output, targets=("onnxruntime", "openvino"),
                         precision=Precision.W8A8, quant=quant(calibration_text))
    return build(config), output


def test_w8a8_with_smoothquant_passes_on_every_cpu_target(w8a8_build):
    result, output = w8a8_build
    manifest = read_manifest(output)
    assert manifest["precision"] == "w8a8" and manifest["budget"]["max_ppl_increase_pct"] == 1.5
    quantization = manifest["quantization"]
    assert quantization["layers_quantized"] == quantization["layers_total"] == 17 and not quantization["kept"]
    assert len(quantization["smoothing"]) == 8 and quantization["calibration"]["samples"] == 32
    for name, target in manifest["targets"].items():
        accuracy = target["accuracy"]
        assert target["passed"] and accuracy["ppl_increase_pct"] <= 1.5 and accuracy["top1_agreement"] >= 0.95, name
        assert accuracy["tokens"] == 8192
    assert quantization["scored_on"] == "onnxruntime"  # named beside OpenVINO, whose gate has a fallback
    assert quantization["accuracy"] == manifest["targets"]["onnxruntime"]["accuracy"]
    graph = onnx.load(str(output / "onnxruntime" / "model.onnx"), load_external_data=False)
    ops = {node.op_type for node in graph.graph.node}
    assert {"QuantizeLinear", "GroupQueryAttention", "SkipLayerNormalization"} <= ops
    # every linear layer runs int8 x int8 (graph.int8_matmul), none as a per-step DequantizeLinear + MatMul
    assert sum(node.op_type == "MatMulIntegerToFloat" for node in graph.graph.node) == 17
    assert not ops & {"DequantizeLinear", "MatMul"}


def test_openvino_stores_the_lookup_tables_of_a_quantized_build_in_uint8(w8a8_build):
    """The embeddings only feed Gather (the lm_head reads its own int8 copy): the quantize stage stores them in
    uint8 blocks (graph.lookup_tables), and the IR keeps them so."""
    import math

    import openvino as ov

    _, output = w8a8_build
    tables = read_manifest(output)["quantization"]["lookup_tables"]
    assert tables == {"transformer.wpe.weight": 8, "transformer.wte.weight": 8}
    tables = [op for op in ov.Core().read_model(str(output / "openvino" / "openvino_model.xml")).get_ops()
              if op.get_type_name() == "Constant" and math.prod(op.get_output_shape(0)) in (4096 * 192, 512 * 192)]
    assert {op.get_output_element_type(0) for op in tables} <= {ov.Type.u8, ov.Type.i8}  # no f32 table is left
    assert any(op.get_output_element_type(0) == ov.Type.u8 for op in tables)


def test_onnxruntime_gathers_the_lookup_tables_of_a_quantized_build_from_uint8(w8a8_build):
    _, output = w8a8_build
    settings = read_manifest(output)["targets"]["onnxruntime"]["settings"]
    assert sorted(settings["quantized_lookup_tables"]) == ["transformer.wpe.weight.uint8", "transformer.wte.weight.uint8"]
    graph = onnx.load(str(output / "onnxruntime" / "model.onnx"), load_external_data=False)
    assert sum(node.op_type == "GatherBlockQuantized" for node in graph.graph.node) == 2
    assert not [node for node in graph.graph.node if node.op_type == "Gather" and node.input[0].endswith(".weight")]


def test_verify_reruns_the_accuracy_gate(w8a8_build):
    _, output = w8a8_build
    result = verify(output, None, ParitySettings())
    assert result.ok and all(t.accuracy.ppl_increase_pct <= 1.5 for t in result.targets)


def test_verify_reads_a_manifest_from_before_narrowed_blocks(w8a8_build, tmp_path, capsys):
    """Outputs built before `narrowed_blocks` was recorded still verify, summary line included."""
    _, output = w8a8_build
    old = tmp_path / "old"
    shutil.copytree(output, old)
    manifest = json.loads((old / MANIFEST).read_text())
    del manifest["quantization"]["narrowed_blocks"]
    (old / MANIFEST).write_text(json.dumps(manifest))
    assert main(["verify", str(old)]) == 0
    assert "linear layers quantized" in capsys.readouterr().out


@pytest.mark.parametrize("fix", ["smoothquant", "float_channels"])
def test_outliers_break_naive_w8a8_and_smoothquant_or_float_channels_fix_it(tmp_path, calibration_text, fix):
    model = planted_model(tmp_path / "planted")
    naive = BuildConfig(model=model, output=tmp_path / "naive", precision=Precision.W8A8,
                        quant=quant(calibration_text, smoothquant_alpha=None, float_channels=False, fallback=False))
    with pytest.raises(ParityError) as failed:
        build(naive)
    naive_ppl = failed.value.details["targets"]["onnxruntime"]["accuracy"]["ppl_increase_pct"]
    assert naive_ppl > 5.0 and "accuracy: perplexity" in failed.value.cause
    assert not (tmp_path / "naive").exists()
    only = {"smoothquant_alpha": None} if fix == "float_channels" else {"float_channels": False}
    fixed = build(replace(naive, output=tmp_path / fix, quant=quant(calibration_text, fallback=False, **only)))
    accuracy = fixed.targets[0].accuracy
    assert accuracy.ppl_increase_pct <= 1.5 and accuracy.top1_agreement >= 0.95
    if fix == "smoothquant":
        ratios = [(s["outlier_ratio_before"], s["outlier_ratio_after"]) for s in fixed.quantization["smoothing"]]
        assert all(before > 20 and after < 5 for before, after in ratios)
    else:  # the planted channels of every block's c_attn and c_fc input, and nothing else
        floating = fixed.quantization["float_channels"]
        assert len(floating) == 2 * 4 and all(channels == sorted(OUTLIER_CHANNELS) for channels in floating.values())


def test_fallback_keeps_the_roles_with_outliers_at_weight_only_int8(tmp_path, calibration_text):
    """Outliers planted at the inputs of block 2's c_attn and c_fc: the fallback keeps (one of) those roles with
    int8 weights and float activations."""
    model = planted_model(tmp_path / "planted", blocks=[2])
    config = BuildConfig(model=model, output=tmp_path / "out", precision=Precision.W8A8,
                         quant=quant(calibration_text, smoothquant_alpha=None, float_channels=False))
    result = build(config)
    kept = result.quantization["kept"]
    assert kept and set(kept) <= {"transformer.h.*.attn.c_attn.weight", "transformer.h.*.mlp.c_fc.weight"}
    assert result.quantization["kept_precision"] == "int8"
    assert result.quantization["layers_quantized"] == 17 - 4 * len(kept)  # a role: one layer in each of 4 blocks
    first, last = (AccuracyReport.from_dict(t["accuracy"]) for t in (result.quantization["trials"][0],
                                                                      result.quantization["trials"][-1]))
    budget = AccuracyBudget.default(Precision.W8A8)
    assert accuracy_failures(first, budget) and not accuracy_failures(last, budget)
    assert read_manifest(tmp_path / "out")["quantization"]["kept"] == kept


@pytest.mark.parametrize("precision", [Precision.INT4, Precision.INT8_DYNAMIC])
def test_weight_int4_and_dynamic_int8_pass(tmp_path, calibration_text, precision):
    result = build(BuildConfig(model="reference", output=tmp_path / "out", precision=precision,
                               quant=quant(calibration_text)))  # int4: GPTQ, the default
    target = result.targets[0]
    assert target.accuracy.ppl_increase_pct <= (5.0 if precision is Precision.INT4 else 1.5)
    others = [c.top1_agreement for c in target.parity.comparisons if c.name.startswith("other_rows")]
    assert len(others) == 4 and min(others) >= 0.99  # rows of a batch do not change each other's tokens
    graph = onnx.load(str(tmp_path / "out" / "onnxruntime" / "model.onnx"), load_external_data=False)
    if precision is Precision.INT4:
        assert next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 21
        assert "DequantizeLinear" not in {n.op_type for n in graph.graph.node}  # compiled: graph.matmul_nbits
        blocks = sorted(a.i for n in graph.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
                        if a.name == "block_size")
        # every layer passed within half the budget with the fine blocks (c_proj, reading 768, and the tied lm_head
        # in 32s), so it was tried once more without them and kept (quantize.SPARE): c_proj in 128s, the rest
        # (the lm_head too) 64s
        assert blocks == [64] * 13 + [128] * 4 and "no finer blocks" in result.quantization["method"]["weights"]
        assert result.quantization["method"]["rounding"] == "awq-gptq"  # the default
        tuning = result.quantization["tuning"]  # tuned by default, kept only where it scores better
        assert tuning["epochs"] == QuantSettings().int4_tune_epochs and tuning["scales_tuned"] == 17
        trials = result.quantization["trials"]  # each format's every-layer graph untuned and tuned, the kept last
        assert len(trials) == 4 and [t["tuned"] for t in trials[2:]] == ([False, True] if tuning["kept"] else [True, False])
        assert trials[1]["accuracy"]["ppl_increase_pct"] <= 2.5  # the fine blocks' kept trial, within half
        assert len(result.quantization["scaling"]) == 8  # ln_1 and ln_2 of 4 blocks: every fold GPT-2 has
        tables = [n for n in graph.graph.node if n.op_type == "GatherBlockQuantized"]  # wte, wpe: 4-bit in int4
        assert len(tables) == 2 and all(a.i == 4 for n in tables for a in n.attribute if a.name == "bits")
        (lm_head,) = [n for n in graph.graph.node  # the 17th: tied to wte's codes
                      if n.op_type == "MatMulNBits" and n.input[1] in {t.input[0] for t in tables}]
        assert [a.i for a in lm_head.attribute if a.name == "block_size"] == [64]  # a tied lm_head: its rows, 192
        assert result.quantization["lookup_tables"] == {"transformer.wte.weight": 4, "transformer.wpe.weight": 4}
        scales = {i.name: i.data_type for i in graph.graph.initializer if i.name.endswith((".scale", ".scale.rows"))}
        # MatMulNBits reads fp32 scales (16 linears' and the tied wte's); the untied wpe's stay fp16
        assert sorted(scales.values()) == [onnx.TensorProto.FLOAT] * 17 + [onnx.TensorProto.FLOAT16]
    else:
        assert sum(n.op_type == "MatMulInteger" for n in graph.graph.node) == 17
        assert len(result.quantization["smoothing"]) == 8  # given calibration text, int8-dynamic smooths too
    engine = sum(p.stat().st_size for p in (tmp_path / "out" / "onnxruntime").glob("model.onnx*"))
    parameters = result.export["parameters"]  # the fp32 model's weights, the tied table once
    assert target.settings["engine_bytes"] >= engine and parameters == 2_664_576
    assert target.settings["bits_per_weight"] == round(8 * target.settings["engine_bytes"] / parameters, 3)


def test_weight_only_int8_given_calibration_text_smooths_instead_of_finer_blocks(tmp_path, calibration_text):
    """Given calibration text, int8 folds SmoothQuant (α 0.5) into every site but the tied lm_head's, and every layer
    keeps blocks of 32, the MLP's c_proj too (without it c_proj, reading an input wider than the hidden size, takes 16:
    test_weight_only_int8_on_openvino_…): the runtimes' int8 activations meet no outliers. The table is stored once,
    the lm_head's codes."""
    output = tmp_path / "out"
    result = build(BuildConfig(model="reference", output=output, precision=Precision.INT8, quant=quant(calibration_text)))
    assert result.ok, result.targets[0].failures
    quantization = result.quantization
    smoothed = quantization["smoothing"]
    assert len(smoothed) == 8 and {s["alpha"] for s in smoothed} == {0.5}  # ln_1 and ln_2 of 4 blocks
    assert quantization["method"]["smoothquant_alpha"] == 0.5 and "at most" not in quantization["method"]["weights"]
    assert quantization["bits_per_weight"]["linear_layers"] == 8.5  # int8 + an fp16 scale per 32, every layer
    assert result.targets[0].accuracy.ppl_increase_pct <= 0.5
    graph = onnx.load(str(output / "onnxruntime" / "model.onnx"), load_external_data=False)
    tables = [n for n in graph.graph.node if n.op_type == "GatherBlockQuantized"]  # wte, wpe
    linears = [n for n in graph.graph.node if n.op_type == "MatMulNBits" and n.input[1] not in {t.input[0] for t in tables}]
    assert sorted(a.i for n in linears for a in n.attribute if a.name == "block_size") == [32] * 16
    (lm_head,) = [n for n in graph.graph.node if n.op_type == "MatMulNBits" and n not in linears]
    assert lm_head.input[1] in {n.input[0] for n in tables}  # one table: wte gathers the lm_head's int8 codes


def run_cli(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_refusals_before_any_work(tmp_path, capsys, calibration_text):
    out = str(tmp_path / "out")
    code, err = run_cli(capsys, "export", "reference", "-o", out, "--quantize", "w8a8")
    assert code == 2 and "needs calibration text" in err and "never calibrates on random tokens" in err
    code, err = run_cli(capsys, "export", "reference", "-o", out, "--quantize", "int4")  # GPTQ by default
    assert code == 2 and "int4 with AWQ-GPTQ needs calibration text" in err and "--int4-method rtn" in err
    code, err = run_cli(capsys, "export", "reference", "-o", out, "--quantize", "int8-dynamic", "--target", "openvino")
    assert code == 2 and "cannot run int8-dynamic" in err
    (tmp_path / "model.bin").write_bytes(bytes(range(256)) * 4)
    code, err = run_cli(capsys, "export", "reference", "-o", out, "--quantize", "w8a8",
                        "--calibration", str(tmp_path / "model.bin"))
    assert code == 11 and "binary file" in err
    code, err = run_cli(capsys, "export", "reference", "-o", out, "--quantize", "int4", "--int4-block-size", "48")
    assert code == 2 and "power of two" in err
    assert not (tmp_path / "out").exists()


def test_too_few_calibration_tokens_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "short.txt").write_text("def f(x):\n    return x + 1\n" * 20)
    code, err = run_cli(capsys, "export", "reference", "-o", str(tmp_path / "out"), "--quantize", "w8a8",
                        "--calibration", str(tmp_path / "short.txt"), "--json")
    assert code == 11 and "fewer than the 64 samples asked" in err
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_weight_only_int8_on_openvino_passes_with_the_cpus_int8_activations(tmp_path):
    """int8 weights in blocks of 32 (16 for the MLP's c_proj); OpenVINO quantizes their activations to int8 per 32
    at run time (the CPU's default), keeps an f16 KV cache, and the engine passes its gates so (no second try). The
    gate decodes through the cache, so the same engine measures differently with a u8 one (a prefill alone never
    reads the cache)."""
    import openvino as ov

    from gptkiln.calibration.perplexity import EvalText, Evaluation
    from gptkiln.models.spec import DecoderSpec
    from gptkiln.targets.openvino import IR_FILE, ir_runner

    output = tmp_path / "int8"
    result = build(BuildConfig(model="reference", output=output, targets=("openvino",), precision=Precision.INT8))
    assert result.ok, result.targets[0].failures
    manifest = read_manifest(output)
    quantization = manifest["quantization"]
    assert quantization["layers_quantized"] == quantization["layers_total"] == 17
    # int8 + an fp16 scale per 32 weights (8.5 bits), per 16 in the layers reading an input wider than the hidden size
    # (9 bits: the 4 MLP c_proj, 768 x 192, of 2,555,904 linear weights with the tied lm_head)
    wide, linear = 4 * 768 * 192, 4 * (192 * 576 + 192 * 192 + 2 * 192 * 768) + 4096 * 192
    assert quantization["bits_per_weight"]["linear_layers"] == round(8.5 + 0.5 * wide / linear, 3) == 8.615
    assert manifest["budget"]["max_ppl_increase_pct"] == 0.5
    openvino = manifest["targets"]["openvino"]
    config = openvino["settings"]["config"]
    assert config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] == 32 and config["KV_CACHE_PRECISION"] == "f16"
    assert "earlier_tries" not in openvino["settings"]
    evaluation = Evaluation.prepare(load_model("reference"), EvalText.read(None), 8192)
    spec, ir_path = DecoderSpec.from_dict(manifest["spec"]), output / "openvino" / IR_FILE
    measured = {cache: evaluation.measure(ir_runner(ir_path, spec, {**config, "KV_CACHE_PRECISION": cache})).ppl
                for cache in ("f16", "u8")}
    assert measured["f16"] == pytest.approx(openvino["accuracy"]["ppl"], rel=1e-5)
    assert abs(measured["u8"] / measured["f16"] - 1) > 1e-5
    assert abs(openvino["accuracy"]["ppl_increase_pct"]) <= 0.5
    assert quantization["scored_on"] == "openvino"  # the only target: the trials ran on its engine, as gated
    assert openvino["accuracy"] == quantization["accuracy"]
    ir = ov.Core().read_model(str(output / "openvino" / "openvino_model.xml"))
    int8 = [op for op in ir.get_ops() if op.get_type_name() == "Constant" and op.get_output_element_type(0) == ov.Type.i8]
    assert len(int8) >= 17
    half = [op for op in ir.get_ops() if op.get_type_name() == "Constant" and op.get_output_element_type(0) == ov.Type.f16]
    assert len(half) == openvino["settings"]["half_constants"] >= 17  # the scales (+ wpe's), as the ONNX graph has them


def test_openvino_falls_back_to_finer_then_float_activations_where_int8_ones_fail_the_gate(tmp_path):
    """Unless asked for a group and a cache, OpenVINO's engine is compiled with the CPU's run-time int8 activations per
    32 and an f16 KV cache first; where it fails its gates it is compiled again per 16, then with float ones
    (DYNAMIC_QUANTIZATION_GROUP_SIZE 0) and an f32 cache, and the manifest says what each earlier try measured. A
    budget no engine meets makes every try fail here. An explicit group is held to (the cache alone changes); an
    explicit group and cache: no second try."""
    from gptkiln.options import export_config

    def runtime(**values):
        return export_config({"model": "reference", "output": tmp_path / "x", "targets": ["openvino"],
                              **values}).runtime_for("openvino").dynamic_quantization_group

    assert runtime(quantize="int8") is None and runtime(quantize="int8", dynamic_quantization_group=32) == 32
    budget = replace(AccuracyBudget.default(Precision.INT8), max_ppl_increase_pct=1e-9)
    config = BuildConfig(model="reference", output=tmp_path / "out", targets=("openvino",), precision=Precision.INT8,
                         quant=replace(QuantSettings(), fallback=False, budget=budget))
    with pytest.raises(ParityError) as failed:
        build(config)
    settings = failed.value.details["targets"]["openvino"]["settings"]
    tries = [t["config"] for t in settings["earlier_tries"]] + [settings["config"]]
    assert [(c["DYNAMIC_QUANTIZATION_GROUP_SIZE"], c["KV_CACHE_PRECISION"]) for c in tries] == [
        (32, "f16"), (16, "f16"), (0, "f32")]
    assert all("accuracy: perplexity" in t["failures"][0] and t["accuracy"]["ppl_increase_pct"] > 1e-9
               for t in settings["earlier_tries"])
    group = replace(config, output=tmp_path / "group", runtime=replace(config.runtime, dynamic_quantization_group=32))
    with pytest.raises(ParityError) as failed:
        build(group)
    settings = failed.value.details["targets"]["openvino"]["settings"]
    tries = [t["config"] for t in settings["earlier_tries"]] + [settings["config"]]
    assert [(c["DYNAMIC_QUANTIZATION_GROUP_SIZE"], c["KV_CACHE_PRECISION"]) for c in tries] == [(32, "f16"), (32, "f32")]
    both = replace(group, output=tmp_path / "both", runtime=replace(group.runtime, kv_cache_precision="f16"))
    with pytest.raises(ParityError) as failed:
        build(both)
    assert "earlier_tries" not in failed.value.details["targets"]["openvino"]["settings"]


def test_int4_fallback_keeps_the_most_sensitive_roles_in_int8(tmp_path):
    """RTN int4 misses a tight budget; the fallback ranks the layer roles by how much int8 for each alone brings
    the model back (the probe: one batch, no full evaluation), keeps the fewest in int8 that meet the budget
    (searched 1, 2, 4, ...), and says what it costs in bits. Trials are scored on the compiled ONNX Runtime engine,
    so the kept trial's accuracy is the engine's gate's."""
    import onnx_ir as ir

    # all int4 (wte reads the tied lm_head's 4-bit codes, wpe its own 4 bits): +1.79%; the lm_head (and with it
    # wte) int8: +1.28%; and c_attn too: +0.96%
    budget = replace(AccuracyBudget.default(Precision.INT4), max_ppl_increase_pct=1.1)
    config = BuildConfig(model="reference", output=tmp_path / "out", precision=Precision.INT4,
                         quant=replace(QuantSettings(), int4_method=Int4Method.RTN, budget=budget))
    result = build(config)
    assert result.ok, result.targets[0].failures
    quantization = result.quantization
    kept, trials = quantization["kept"], quantization["trials"]
    assert quantization["kept_precision"] == "int8" and 1 <= len(kept) <= 2
    assert trials[0]["accuracy"]["ppl_increase_pct"] > 1.1 >= trials[-1]["accuracy"]["ppl_increase_pct"]
    assert trials[-1]["kept"] == kept and len(trials) <= 3  # all int4, 1, 2: the probes are not evaluations
    assert trials[-1]["accuracy"] == result.targets[0].accuracy.to_dict()  # the trial was the engine, to the bit
    sensitivity = quantization["sensitivity"]
    roles = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    tied_lm_head, tables = "transformer.wte.weight", "lookup tables"  # wte shares the lm_head's codes; wpe alone
    assert set(sensitivity) == {f"transformer.h.*.{name}.weight" for name in roles} | {tied_lm_head, tables}
    assert kept == sorted(sensitivity, key=sensitivity.get, reverse=True)[:len(kept)]
    assert 4.0 < quantization["bits_per_weight"]["linear_layers"] < 9.0
    graph = ir.load(tmp_path / "out" / "onnxruntime" / "model.onnx")
    int8 = {name.removesuffix(".blocks").removesuffix(".int8") for name in graph.graph.initializers
            if name.endswith((".int8", ".int8.blocks"))}  # .blocks: the tied lm_head's, lowered with the table
    int8_roles = {name if result.spec.block_of(name) is None else
                  name.replace(f".{result.spec.block_of(name)}.", ".*.", 1) for name in int8}
    assert int8_roles == set(kept) - {tables}  # exactly the kept roles' layers are int8; the rest int4
    assert quantization["lookup_tables"] == {"transformer.wpe.weight": 8 if tables in kept else 4,
                                             "transformer.wte.weight": 8 if tied_lm_head in kept else 4}


def test_int4_fallback_with_hessians_keeps_layers_in_int8(tmp_path, calibration_text):
    """With GPTQ's Hessians (the default awq-gptq) the fallback keeps layers, not roles: each role's probe divergence
    shared among its layers by the output error int8 removes from each, ranked per weight, each trial's set guessed
    from the estimates. Exactly the kept layers are int8 in the engine, each with its output error in the manifest,
    and the lookup tables are 8 bits where kept."""
    import onnx_ir as ir

    from gptkiln.calibration.quantize import MAX_ESTIMATED_TRIALS, TABLES

    # all int4: +1.15%; the tied lm_head (and with it wte) in int8: +0.55%; and wpe: +0.27% (untuned scales: tuning,
    # tested in test_scale_tuning, is kept only where it scores better, and here it would not)
    budget = replace(AccuracyBudget.default(Precision.INT4), max_ppl_increase_pct=0.5)
    config = BuildConfig(model="reference", output=tmp_path / "out", precision=Precision.INT4,
                         quant=quant(calibration_text, budget=budget, int4_tune_epochs=0))
    result = build(config)
    assert result.ok, result.targets[0].failures
    quantization = result.quantization
    kept, trials = quantization["kept"], quantization["trials"]
    assert set(kept) - {TABLES} and all("*" not in name for name in kept) and quantization["kept_precision"] == "int8"
    assert set(quantization["output_error"]) == set(kept) - {TABLES}
    assert min(quantization["output_error"].values()) > 0
    assert trials[0]["accuracy"]["ppl_increase_pct"] > 0.5 >= trials[-1]["accuracy"]["ppl_increase_pct"]
    assert trials[-1]["kept"] == kept and len(trials) <= 1 + MAX_ESTIMATED_TRIALS
    assert trials[-1]["accuracy"] == result.targets[0].accuracy.to_dict()
    graph = ir.load(tmp_path / "out" / "onnxruntime" / "model.onnx")
    int8 = {name.removesuffix(".blocks").removesuffix(".int8") for name in graph.graph.initializers
            if name.endswith((".int8", ".int8.blocks"))}
    assert int8 == set(kept) - {TABLES}
    assert quantization["lookup_tables"]["transformer.wpe.weight"] == (8 if TABLES in kept else 4)
