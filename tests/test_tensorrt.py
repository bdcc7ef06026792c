"""TensorRT without TensorRT: the readiness check on our graphs and on planted problems, the profiles,
the engine-compatibility rules, and `export --target tensorrt` on a machine that cannot build engines.
(Engine build, parity and generation on a GPU: tests/gpu/.)"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx_ir as ir
import pytest

from gptkiln.cli import main
from gptkiln.config import EngineSettings
from gptkiln.errors import UsageError
from gptkiln.exporter.to_onnx import export_onnx
from gptkiln.graph import optimize
from gptkiln.graph.half import to_half
from gptkiln.manifest import read_manifest
from gptkiln.models.loading import load_model
from gptkiln.targets.tensorrt.compat import EngineRequirements, build_problems, compatibility_problems
from gptkiln.targets.tensorrt.profiles import DECODE, PREFILL, derive_profiles, select_profile
from gptkiln.targets.tensorrt.readiness import check
from gptkiln.targets.tensorrt.target import host_missing


@pytest.fixture(scope="module")
def reference():
    return load_model("reference")


@pytest.fixture(scope="module")
def export23(tmp_path_factory, reference):
    """The reference export at the default opset 23 (ONNX Attention, which TensorRT 10.14+ parses)."""
    return export_onnx(reference, tmp_path_factory.mktemp("export23"), opset=23).path


def readiness(model, spec, settings=EngineSettings()):
    return check(model, spec, derive_profiles(spec, settings))


def portable(path, spec):
    model = ir.load(path)
    optimize(model, spec, ("portable",))
    return model


@pytest.mark.parametrize("form", ["fp32-opset18", "fp32-opset23", "fp16", "bf16"])
def test_our_graphs_are_ready(form, reference_export, export23, reference):
    spec = reference.spec
    model = portable(reference_export[0] if form == "fp32-opset18" else export23, spec)
    if form in ("fp16", "bf16"):
        to_half(model, form)
    report = readiness(model, spec)
    assert report.ready, report.problems
    assert not report.warnings
    assert report.minimum_tensorrt == ("10.0" if form == "fp32-opset18" else "10.14")  # Attention: 10.14


def test_ort_fusions_are_refused_by_name(reference_export, reference):
    model = ir.load(reference_export[0])
    optimize(model, reference.spec, ("portable", "onnxruntime"))
    problems = readiness(model, reference.spec).problems
    assert any("contrib op com.microsoft.MultiHeadAttention" in p for p in problems)
    assert any("contrib op com.microsoft.SkipLayerNormalization" in p for p in problems)


def first(model, op_type):
    return next(node for node in model.graph if node.op_type == op_type)


def test_planted_problems_are_named(export23, reference):
    spec = reference.spec
    model = portable(export23, spec)
    attention = first(model, "Attention")
    cache = attention.inputs[1]
    attention.resize_inputs(5)
    attention.replace_input_with(4, cache)  # past_key fed to Attention
    attention.attributes["softcap"] = ir.AttrFloat32("softcap", 30.0)
    gelu = first(model, "Gelu")
    gelu.attributes["approximate"] = ir.AttrString("approximate", "erf")  # not an ONNX value
    condition = ir.Value(name="flag", type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([]))
    model.graph.inputs.append(condition)  # an input no profile covers
    branch = ir.Graph([], [], nodes=[], name="branch")
    model.graph.append(ir.node("If", [condition], {"then_branch": branch, "else_branch": branch}, num_outputs=0))
    problems = "\n".join(readiness(model, spec).problems)
    assert "Attention" in problems and "the past_key input is not supported" in problems
    assert "qk_matmul_output_mode and softcap are not supported" in problems
    assert "approximate='erf' is not supported" in problems
    assert "control flow (If)" in problems
    assert "graph input 'flag' is not part of the IO contract" in problems


def test_unnamed_dynamic_input_dim_is_refused(export23, reference):
    model = portable(export23, reference.spec)
    ids = model.graph.inputs[0]
    ids.shape = ir.Shape([ir.SymbolicDim(None), ir.SymbolicDim("sequence")])
    ids_problems = readiness(model, reference.spec).problems
    assert ids_problems == ["graph input 'input_ids' dim 0 is dynamic without a name: "
                            "no profile can tie it to batch, sequence or past"]


def blocked_dq(data: np.ndarray, block: int, zero_point: int | None):
    """A 2-D int4 weight behind a blocked DequantizeLinear, feeding a MatMul."""
    weight = ir.Value(name="w", const_value=ir.tensor(data, dtype=ir.DataType.INT4))
    weight.shape, weight.dtype = ir.Shape(data.shape), ir.DataType.INT4
    scale = ir.Value(name="s", const_value=ir.tensor(np.ones((data.shape[0] // block, data.shape[1]), np.float32)))
    inputs = [weight, scale]
    if zero_point is not None:
        zp = ir.Value(name="zp", const_value=ir.tensor(np.full(scale.const_value.shape, zero_point, np.uint8),
                                                       dtype=ir.DataType.UINT4))
        zp.dtype = ir.DataType.UINT4
        inputs.append(zp)
    return ir.node("DequantizeLinear", inputs, {"axis": 0, "block_size": block})


@pytest.mark.parametrize("block, zero_point, expected", [
    (64, None, []),
    (32, None, ["int4 block size 32: TensorRT supports 64 or 128 (build with --int4-block-size 64 or 128; a layer "
                "whose input size is not a multiple of 64 gets a smaller block)"]),
    (64, 8, ["zero point of type UINT4: TensorRT quantizes to signed types only",
             "nonzero zero point: TensorRT supports symmetric quantization only (build int4 with --int4-symmetric)"]),
])
def test_int4_rules(block, zero_point, expected):
    from gptkiln.targets.tensorrt.readiness import _node_problems

    node = blocked_dq(np.zeros((128, 16), np.int8), block, zero_point)
    assert _node_problems(node) == expected


def test_int8_dynamic_ops_are_not_in_tensorrt():
    from gptkiln.targets.tensorrt.readiness import _node_problems

    a = ir.Value(name="a", type=ir.TensorType(ir.DataType.UINT8))
    b = ir.Value(name="b", type=ir.TensorType(ir.DataType.INT8))
    assert _node_problems(ir.node("MatMulInteger", [a, b])) == ["op MatMulInteger is not in TensorRT's ONNX operator support"]
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.DOUBLE))
    assert _node_problems(ir.node("MatMul", [x, x])) == [
        "input type DOUBLE is not supported (supported: FLOAT, FLOAT16, BFLOAT16)"]


def test_profiles_follow_the_kv_contract(reference):
    spec = reference.spec  # context 512
    prefill, decode = derive_profiles(spec, EngineSettings(max_batch=4, opt_batch=2, opt_prompt=64))
    assert (prefill.name, decode.name) == (PREFILL, DECODE)
    for profile in (prefill, decode):
        shapes = profile.shapes(spec)
        for which in range(3):  # min, opt, max: the mask is past + sequence, capped by the context
            mask = shapes["attention_mask"][which][1]
            past = shapes["past_key_values.0.key"][which][2]
            sequence = shapes["input_ids"][which][1]
            assert mask == min(past + sequence, spec.max_positions)
            assert shapes["input_ids"][which] == shapes["position_ids"][which]
            assert shapes["past_key_values.0.key"][which][1::2] == (spec.num_kv_heads, spec.head_dim)
        assert shapes["input_ids"][2][0] == 4 and shapes["input_ids"][1][0] == 2
    assert prefill.sequence.opt == 64 and prefill.past.opt == 0 and prefill.past.min == 0
    assert decode.sequence == type(decode.sequence)(1, 1, 1) and decode.past.opt == 96 and decode.past.max == 511
    assert select_profile([prefill, decode], batch=1, sequence=24, past=0) == 0
    assert select_profile([prefill, decode], batch=4, sequence=1, past=100) == 1
    assert select_profile([prefill, decode], batch=1, sequence=8, past=16) == 0  # a prompt fed in chunks
    with pytest.raises(UsageError, match="batches up to 4 and up to 512 tokens"):
        select_profile([prefill, decode], batch=1, sequence=1, past=512)
    with pytest.raises(UsageError, match="outside 2..512"):
        derive_profiles(spec, EngineSettings(max_seq=4096))


REQUIRES = EngineRequirements(tensorrt="10.14.1.48", compute_capability="8.9", hardware_compatibility="none",
                              version_compatible=False)


@pytest.mark.parametrize("needs, host, expected", [
    (REQUIRES, ("10.14.1.48", "8.9"), []),
    (REQUIRES, ("10.14.1.50", "8.9"), []),  # the build number is not part of the version rule
    (REQUIRES, ("10.15.0.1", "8.9"), ["needs TensorRT 10.14.1.48 exactly; this host has 10.15.0.1"]),
    (REQUIRES, ("10.14.1.48", "9.0"), ["needs a GPU of compute capability 8.9; this GPU is 9.0"]),
    (replace(REQUIRES, version_compatible=True), ("10.15.0.1", "8.9"), []),
    (replace(REQUIRES, version_compatible=True), ("10.13.0.1", "8.9"), ["needs TensorRT 10.x at version 10.14.1.48 or later"]),
    (replace(REQUIRES, version_compatible=True), ("11.0.0.1", "8.9"), ["needs TensorRT 10.x"]),
    (replace(REQUIRES, hardware_compatibility="ampere+"), ("10.14.1.48", "9.0"), []),
    (replace(REQUIRES, hardware_compatibility="ampere+"), ("10.14.1.48", "7.5"), ["compute capability 8.0 or newer"]),
    (replace(REQUIRES, hardware_compatibility="same-cc"), ("10.14.1.48", "8.6"), ["compute capability 8.9; this GPU is 8.6"]),
])
def test_engine_compatibility(needs, host, expected):
    problems = compatibility_problems(needs, *host)
    assert len(problems) == len(expected)
    for problem, words in zip(problems, expected):
        assert words in problem


def test_build_needs_the_right_gpu():
    assert build_problems("bf16", "none", "7.5") == ["bf16 needs a GPU of compute capability 8.0 or newer; this GPU is 7.5"]
    assert "must be built on a GPU of compute capability 8.0" in build_problems("fp16", "ampere+", "7.5")[0]
    assert build_problems("fp16", "ampere+", "9.0") == []


@pytest.mark.skipif(not host_missing(), reason="this machine has TensorRT and a GPU: tests/gpu/ builds engines")
def test_export_without_tensorrt_prepares_the_checked_onnx(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["export", "reference", "-o", str(out), "--target", "tensorrt", "--quantize", "fp16", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    payload = json.loads(captured.out)
    target = payload["targets"]["tensorrt"]
    assert payload["ok"] and target["compiled"] is False and target["parity"] is None
    assert target["settings"]["readiness"]["ready"] and any("TensorRT 10.14 or newer" in m for m in target["settings"]["missing"])
    assert not any(count["short"] for count in target["settings"]["fusion"]["fusions"])  # Gelu fuses in fp16 too
    assert "prepared, not compiled here" in captured.err
    manifest = read_manifest(out)  # every file hashed, the manifest written last
    assert set(manifest["files"]) >= {"tensorrt/model.onnx", "tensorrt/model.onnx.data", "tensorrt/build_engine.sh"}
    assert manifest["half"]["fp32_islands"] == {"LayerNormalization": 9, "Attention": 4}
    graph = ir.load(out / "tensorrt" / "model.onnx")
    assert {v.name: v.dtype for v in graph.graph.inputs}["past_key_values.0.key"] == ir.DataType.FLOAT16
    assert graph.graph.outputs[0].dtype == ir.DataType.FLOAT  # logits stay fp32
    script = (out / "tensorrt" / "build_engine.sh").read_text()
    assert "--stronglyTyped" in script and "--profile=1" in script and "past_key_values.3.value:8x6x511x32" in script
    assert not target["settings"]["sparse_weights"] and "--sparsity" not in script  # dense weights: no sparse kernels
    assert main(["verify", str(out)]) == 0
    assert main(["generate", str(out), "--prompt", "def"]) == 10  # no engine to run here: a clear refusal
    assert "no compiled target" in capsys.readouterr().err


@pytest.mark.parametrize("precision, options", [
    ("int4", ["--int4-method", "rtn", "--int4-symmetric", "--int4-block-size", "64", "--int4-fine-block-size", "64"]),
    ("w8a8", ["--calibration-samples", "32"]),
])
def test_quantized_graphs_for_tensorrt_are_ready(tmp_path, capsys, calibration_text, precision, options):
    """The explicit Q/DQ graphs TensorRT compiles: symmetric, int4 in blocks of 64; gated on ORT CPU meanwhile."""
    out = tmp_path / "out"
    code = main(["export", "reference", "-o", str(out), "--target", "tensorrt", "--quantize", precision,
                 "--calibration", str(calibration_text), *options, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    built = json.loads(captured.out)
    target = built["targets"]["tensorrt"]
    assert target["settings"]["readiness"]["ready"] and not target["settings"]["readiness"]["warnings"]
    # the quantize stage's tables are gathered from float: TensorRT quantizes MatMul weights only. wpe's own
    # (asymmetric blocks); wte's are the tied lm_head's symmetric int4 codes, which the lm_head keeps
    tables = built["quantization"]["lookup_tables"]
    assert sorted(tables) == ["transformer.wpe.weight", "transformer.wte.weight"]
    assert sorted(target["settings"]["float_lookup_tables"]) == (
        ["transformer.wpe.weight.uint4", "transformer.wte.weight.int4"] if precision == "int4" else
        ["transformer.wpe.weight.uint8", "transformer.wte.weight.uint8"])
    graph = ir.load(out / "tensorrt" / "model.onnx")
    dequantize = [n for n in graph.graph if n.op_type == "DequantizeLinear"]
    assert dequantize and all(len(n.inputs) < 3 or not n.inputs[2].const_value.numpy().any() for n in dequantize)
    if precision == "int4":
        assert {n.attributes.get_int("block_size") for n in dequantize} == {64}


def test_tensorrt_refusals_before_any_work(tmp_path, capsys):
    out = str(tmp_path / "out")
    code = main(["export", "reference", "-o", out, "--target", "tensorrt", "--quantize", "int8-dynamic"])
    assert code == 2 and "cannot run int8-dynamic" in capsys.readouterr().err
    code = main(["export", "reference", "-o", out, "--target", "tensorrt", "--quantize", "int4", "--int4-method", "rtn"])
    assert code == 2 and "add --int4-symmetric --int4-fine-block-size 64\n" in capsys.readouterr().err
    code = main(["export", "reference", "-o", out, "--target", "tensorrt", "--quantize", "int4", "--int4-method", "rtn",
                 "--int4-block-size", "32"])
    assert code == 2 and "add --int4-symmetric --int4-block-size 128 (or 64) --int4-fine-block-size 64" in (
        capsys.readouterr().err)
    code = main(["export", "reference", "-o", out, "--quantize", "bf16"])  # no target installed here runs bf16
    assert code == 8 and "--target (tensorrt)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
