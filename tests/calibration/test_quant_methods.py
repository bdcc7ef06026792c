"""The quantization methods on their own: SmoothQuant keeps the function, thresholds follow their
definitions, int4 codes dequantize in ONNX Runtime as in numpy, GPTQ beats round-to-nearest."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch

from gptkiln.calibration.data import calibration_set, read_texts
from gptkiln.calibration.layers import linear_bits, linear_layers, replace_weight, tied_table
from gptkiln.calibration.outliers import plant_outliers
from gptkiln.calibration.qdq import activation_threshold
from gptkiln.calibration.smoothquant import smooth
from gptkiln.calibration.statistics import HIST_BINS, ActivationStats, collect
from gptkiln.calibration.weight_only import WeightFormat, dequantize, quantize_gptq, quantize_rtn, quantize_weights
from gptkiln.config import ActivationCalibration, CalibrationSettings
from gptkiln.exporter.io_spec import DATA_FILE
from gptkiln.graph.lookup_tables import gather_block_quantized
from gptkiln.models.loading import load_model
from gptkiln.targets.onnxruntime import OnnxRuntimeRunner, create_session

SETTINGS = CalibrationSettings(samples=8, seq_len=64, decode_steps=8)


@pytest.fixture(scope="module")
def calibration(calibration_text, prepared_reference):
    return calibration_set(read_texts(calibration_text), prepared_reference[1].tokenizer, SETTINGS, "stdlib")


def logits(path, spec, ids):
    runner = OnnxRuntimeRunner(spec, create_session(path))
    positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()
    return runner.step(ids, np.ones_like(ids), positions, runner.empty_cache(len(ids)))[0]


def test_smoothquant_keeps_the_function_and_evens_out_channels(tmp_path, prepared_reference, calibration):
    path, loaded = prepared_reference
    model = ir.load(path)
    layers = linear_layers(model)
    stats = collect(path, [layer.activation.name for layer in layers], calibration, loaded.spec)
    absmax = dict(stats.absmax)
    report = smooth(model, layers, absmax, alpha=0.5)
    assert len(report) == 2 * loaded.spec.num_layers  # ln_1 -> c_attn and ln_2 -> c_fc in every block
    for layer in layers:  # alpha 0.5 balances each input channel: max |x_j| == max |w_j,:|
        if any(layer.activation.name == s.activation for s in report):
            np.testing.assert_allclose(absmax[layer.activation.name], np.abs(layer.weight()).max(axis=1), rtol=1e-4)
    smoothed = tmp_path / "model.onnx"
    ir.save(model, smoothed, external_data=DATA_FILE)
    ids = calibration.windows[:2]
    before, after = logits(path, loaded.spec, ids), logits(smoothed, loaded.spec, ids)
    assert np.abs(after - before).max() <= 1e-4 * np.abs(before).max()
    measured = collect(smoothed, [s.activation for s in report], calibration, loaded.spec)
    for s in report:  # the statistics smooth() predicts are the ones the smoothed graph shows
        assert measured.tensor_absmax(s.activation) == pytest.approx(s.absmax_after, rel=1e-3)


def test_planted_outliers_keep_the_function():
    loaded = load_model("reference")
    ids = torch.randint(0, loaded.spec.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = loaded.model(ids).logits
        plant_outliers(loaded.model, [5, 77, 140], 40.0)
        after = loaded.model(ids).logits
        ln = loaded.model.transformer.h[0].ln_1(loaded.model.transformer.wte(ids))
    assert (after - before).abs().max() <= 1e-5 * before.abs().max() * 10
    channel_max = ln.abs().amax(dim=(0, 1))
    assert channel_max[[5, 77, 140]].min() > 10 * channel_max.median()


def test_thresholds_follow_their_definitions():
    rng = np.random.default_rng(0)
    values = np.abs(rng.standard_normal(200_000))
    values[:20] = 40.0  # a few outliers set the max
    top = values.max()
    bins = np.minimum((values * HIST_BINS / top).astype(int), HIST_BINS - 1)
    stats = ActivationStats(absmax={"x": np.array([top])}, histograms={"x": np.bincount(bins, minlength=HIST_BINS)})
    assert activation_threshold(stats, "x", ActivationCalibration.MINMAX, 0) == top
    p999 = activation_threshold(stats, "x", ActivationCalibration.PERCENTILE, 99.9)
    assert p999 == pytest.approx(np.percentile(values, 99.9), abs=top / HIST_BINS * 2)
    entropy = activation_threshold(stats, "x", ActivationCalibration.ENTROPY, 0)
    assert 2.0 < entropy < top / 2  # clips the 20 outliers, keeps the body of the distribution


@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_blocks_dequantize_in_onnxruntime_as_in_numpy(tmp_path, prepared_reference, symmetric):
    path, loaded = prepared_reference
    model = ir.load(path)
    model.opset_imports[""] = 21
    fmt = WeightFormat(32, symmetric)
    layers = linear_layers(model)
    expected = {}
    for layer in layers:
        codes, scales, zeros = quantize_rtn(layer.weight(), fmt)
        expected[layer.name] = (codes - np.repeat(zeros, 32, axis=0)) * np.repeat(scales, 32, axis=0)
    done = quantize_weights(model, layers, fmt)
    assert (done.skipped, done.narrowed) == ([], {})
    int4 = tmp_path / "model.onnx"
    ir.save(model, int4, external_data=DATA_FILE)
    # the same graph with the numpy dequantized weights in fp32
    reference = ir.load(path)
    for layer in linear_layers(reference):
        if layer.transposed:  # the tied lm_head: the embedding gathers from its codes too
            table = layer.node.inputs[1].producer().inputs[0]
            table.const_value = ir.tensor(np.ascontiguousarray(expected[layer.name].T, np.float32), name=table.name)
        else:
            replace_weight(reference, layer, expected[layer.name].astype(np.float32))
    dequantized = tmp_path / "reference" / "model.onnx"
    dequantized.parent.mkdir()
    ir.save(reference, dequantized, external_data=DATA_FILE)
    ids = np.arange(1, 33, dtype=np.int64)[None]
    ours, want = logits(int4, loaded.spec, ids), logits(dequantized, loaded.spec, ids)
    # ORT runs int4 as MatMulNBits with int8 activations per block (its default accuracy level)
    assert np.abs(ours - want).max() <= 0.02 * np.abs(want).max()
    code_types = {v.const_value.dtype for v in model.graph.initializers.values() if v.name.endswith(".int4")}
    assert code_types == {ir.DataType.INT4 if symmetric else ir.DataType.UINT4}


def test_a_block_that_does_not_divide_a_layer_is_narrowed_for_that_layer(prepared_reference):
    fmt = WeightFormat(128, symmetric=False)
    assert fmt.for_rows(768).block_size == 128 and fmt.for_rows(192).block_size == 64
    assert fmt.for_rows(48).block_size == 16 and fmt.for_rows(200) is None
    path, _ = prepared_reference
    model = ir.load(path)
    model.opset_imports[""] = 21
    layers = linear_layers(model)
    rows = {layer.name: layer.weight().shape[0] for layer in layers}
    done = quantize_weights(model, layers, fmt)
    skipped, narrowed = done.skipped, done.narrowed
    assert skipped == [] and narrowed == {name: 64 for name, k in rows.items() if k == 192}
    assert sorted(set(rows.values())) == [192, 768] and len(narrowed) == 13  # qkv, attn out, mlp in; lm_head
    blocks = [n.attributes.get_int("block_size") for n in model.graph if n.op_type == "DequantizeLinear"]
    assert sorted(blocks) == sorted(128 if k == 768 else 64 for k in rows.values())


def test_finer_blocks_where_rounding_costs_most(prepared_reference):
    """The MLP's down projection (input 768, hidden size 192) takes the fine block; at 4 bits the tied lm_head too
    (its codes are wte's); nothing else, and no format without a fine block changes."""
    path, loaded = prepared_reference
    layers = linear_layers(ir.load(path))
    int4, int8 = WeightFormat(128, False, fine_block_size=32), WeightFormat(32, True, bits=8, fine_block_size=16)
    hidden = loaded.spec.hidden_size
    blocks = {bits: {layer.name: fmt.for_layer(layer, hidden).block_size for layer in layers}
              for bits, fmt in ((4, int4), (8, int8))}
    wide = {layer.name for layer in layers if layer.weight_shape[0] == 768}
    lm_head = {layer.name for layer in layers if tied_table(layer) is not None}
    assert len(wide) == 4 and len(lm_head) == 1 and hidden == 192
    assert blocks[4] == {name: 32 if name in wide | lm_head else 128 for name in blocks[4]}
    assert blocks[8] == {name: 16 if name in wide else 32 for name in blocks[8]}
    assert all(WeightFormat(128, False).for_layer(layer, hidden).block_size == 128 for layer in layers)


def test_gptq_has_lower_output_error_than_rtn(prepared_reference, calibration):
    path, loaded = prepared_reference
    layers = linear_layers(ir.load(path))
    stats = collect(path, [layer.activation.name for layer in layers], calibration, loaded.spec, hessians=True)
    fmt = WeightFormat(32, symmetric=False)
    wins = 0
    for layer in layers:
        weight, hessian = layer.weight().astype(np.float64), stats.hessians[layer.activation.name]

        def output_error(result):
            codes, scales, zeros = result
            delta = (codes - np.repeat(zeros, 32, axis=0)) * np.repeat(scales, 32, axis=0) - weight
            return float(np.einsum("kn,kj,jn->", delta, hessian, delta))  # sum over calibration rows of |x·ΔW|²

        wins += output_error(quantize_gptq(weight, hessian, fmt)) < output_error(quantize_rtn(weight, fmt))
    assert wins == len(layers)


def test_gptq_rounds_rows_in_act_order_with_static_groups():
    """The rows are taken by their Hessian diagonal, not their index, and each block's scale is fixed before any
    update: swapping rows inside a block (and the Hessian with them) swaps the codes and changes nothing else."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((64, 8))
    x = rng.standard_normal((256, 64)) * rng.uniform(0.2, 3.0, 64)  # channels of different scales: distinct diagonal
    hessian = x.T @ x
    fmt = WeightFormat(32, symmetric=False)
    swap = np.concatenate([rng.permutation(32), 32 + rng.permutation(32)])
    codes, scales, zeros = quantize_gptq(weight, hessian, fmt)
    swapped = quantize_gptq(weight[swap], hessian[np.ix_(swap, swap)], fmt)
    assert np.array_equal(swapped[0], codes[swap]) and np.allclose(swapped[1], scales) and np.allclose(swapped[2], zeros)


def test_weight_only_int8_is_blocked_dequantize_that_onnxruntime_runs_as_8_bit_matmulnbits(prepared_reference,
                                                                                            tmp_path):
    import onnxruntime as ort

    model = ir.load(prepared_reference[0])
    layers = linear_layers(model)
    model.opset_imports[""] = 21  # blocked DequantizeLinear (the quantize stage raises it the same way)
    fmt = WeightFormat(32, symmetric=True, bits=8)
    assert fmt.levels == (-127, 127)
    done = quantize_weights(model, layers, fmt)
    assert (done.skipped, done.narrowed) == ([], {})
    weights, bits = linear_bits(layers[0])
    assert bits / weights == 8.5  # int8 codes and an fp16 scale per 32
    codes = [v for n, v in model.graph.initializers.items() if n.endswith(".int8")]
    assert len(codes) == len(layers) and {v.dtype for v in codes} == {ir.DataType.INT8}
    ir.save(model, tmp_path / "int8.onnx", external_data="int8.onnx.data")
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(tmp_path / "int8.onnx"), options)
    optimized = ir.load(tmp_path / "optimized.onnx")
    nbits = [node for node in optimized.graph if node.op_type == "MatMulNBits"]
    # all but the tied lm_head, whose codes the embedding shares: the onnxruntime target lowers that one itself
    assert len(nbits) == len(layers) - 1 and {node.attributes.get_int("bits") for node in nbits} == {8}
    assert gather_block_quantized(model) == ["transformer.wte.weight.int8"]
    assert [node.attributes.get_int("bits") for node in model.graph if node.op_type == "MatMulNBits"] == [8]


def test_int8_gains_rank_a_role_by_the_output_error_int8_removes(prepared_reference, calibration):
    """The fallback narrows a kept role to its layers by Σ tr(ΔWᵀ H ΔW) of int4 less int8: positive for every layer,
    and largest for the layer whose weights int4 rounds worst (one scaled up 4x: the same Hessian, 16x the error)."""
    from gptkiln.calibration.quantize import _int8_gains

    path, loaded = prepared_reference

    def c_fc_layers():  # in a fresh copy of the graph, the third one scaled up
        model = ir.load(path)
        layers = [layer for layer in linear_layers(model) if layer.role(loaded.spec) == "transformer.h.*.mlp.c_fc.weight"]
        replace_weight(model, layers[2], layers[2].weight() * 4.0)
        return model, layers

    _, layers = c_fc_layers()
    hessians = dict(collect(path, [layer.activation.name for layer in layers], calibration, loaded.spec,
                            hessians=True).hessians)
    int4, int8, rounded = WeightFormat(64, symmetric=False), WeightFormat(32, True, bits=8), {}
    for fmt in (int4, int8):
        quantize_weights(*c_fc_layers(), fmt, hessians, done=rounded)  # GPTQ codes, kept by (layer, format)
    gains = _int8_gains(layers, hessians, rounded, int4, int8, loaded.spec.hidden_size)  # c_fc reads the hidden size: 32
    assert set(gains) == {layer.name for layer in layers} and min(gains.values()) > 0
    assert max(gains, key=gains.get) == layers[2].name
    layer = layers[0]
    errors = [float(np.einsum("kn,kj,jn->", delta, hessians[layer.activation.name], delta)) for delta in
              (layer.weight() - dequantize(*rounded[(layer.name, fmt)]) for fmt in (int4, int8))]
    assert gains[layer.name] == pytest.approx(errors[0] - errors[1], rel=1e-6)


def test_layer_estimates_share_each_roles_divergence_among_its_layers_by_their_int8_gains():
    """Each layer is a unit of the layer-wise fallback (q/k/v too: split precisions cost no decode speed, RESULTS
    session 37): a role's probe divergence is shared among its layers by their int8 gains; the lookup tables' group
    is one unit of its own."""
    from types import SimpleNamespace

    from gptkiln.calibration.quantize import TABLES, _layer_estimates

    def layer(block, name, activation, shape):
        return SimpleNamespace(name=f"model.layers.{block}.{name}.weight", weight_shape=shape,
                               activation=SimpleNamespace(name=f"{activation}.{block}"),
                               role=lambda spec: f"model.layers.*.{name}.weight")

    layers = [layer(block, name, activation, shape) for block in (0, 1) for name, activation, shape in (
        ("self_attn.q_proj", "attention_norm", (8, 8)), ("self_attn.k_proj", "attention_norm", (8, 2)),
        ("mlp.down_proj", "mlp_act", (16, 8)))]
    sensitivity = {"model.layers.*.self_attn.q_proj.weight": 0.4, "model.layers.*.self_attn.k_proj.weight": 0.2,
                   "model.layers.*.mlp.down_proj.weight": 0.3, TABLES: 0.1}
    gains = {f"model.layers.{b}.{name}.weight": gain for b, (q, k, d) in enumerate([(1.0, 1.0, 3.0), (3.0, 1.0, 1.0)])
             for name, gain in (("self_attn.q_proj", q), ("self_attn.k_proj", k), ("mlp.down_proj", d))}
    estimate, size = _layer_estimates(layers, None, sensitivity, gains, table_size=50)
    assert set(estimate) == set(gains) | {TABLES}
    assert estimate["model.layers.0.self_attn.q_proj.weight"] == pytest.approx(0.4 * 0.25)
    assert estimate["model.layers.0.self_attn.k_proj.weight"] == pytest.approx(0.2 * 0.5)
    assert estimate["model.layers.1.mlp.down_proj.weight"] == pytest.approx(0.3 * 0.25)
    assert size["model.layers.1.self_attn.k_proj.weight"] == 16 and size[TABLES] == 50
    assert sum(estimate.values()) == pytest.approx(sum(sensitivity.values()))


def test_cover_leaves_out_a_large_unit_where_smaller_ones_reach_the_goal_in_fewer_weights():
    from gptkiln.calibration.quantize import _cover, _fill

    ranked = ["a", "b", "lm_head", "c", "d"]  # most estimate per weight first
    estimate = {"a": 3.0, "b": 2.0, "lm_head": 20.0, "c": 0.5, "d": 0.4}
    size = {"a": 1, "b": 1, "lm_head": 40, "c": 1, "d": 1}
    assert _cover(ranked, estimate, size, 4.0) == ["a", "b"]
    assert _cover(ranked, estimate, size, 5.5) == ["a", "b", "c"]  # not the lm_head: 41 weights more
    assert _cover(ranked, estimate, size, 5.8) == ["a", "b", "c", "d"]
    assert _cover(ranked, estimate, size, 6.0) == ["lm_head"]  # only it reaches the goal, alone in fewest weights
    assert _cover(ranked, estimate, size, 99.0) == ranked  # out of reach: every unit
    assert _fill(ranked, size, 22) == ["a", "b", "c", "d"]


@pytest.mark.parametrize("jump", [0.0, 0.3])
@pytest.mark.parametrize("needed", [0.2, 1.0, 2.0, 4.0, 6.0, 6.9])
def test_layer_search_keeps_few_weights_guessed_from_the_estimates(needed, jump):
    """200 layers of three sizes and a tied lm_head 30x the largest, each estimated to remove a share of the
    divergence (ranked most per weight first), none kept at +7%. The true increase falls with the summed estimate of
    what is kept, by `needed` points (exactly where the budget, +5%, is met) in twice the estimate's scale, and drops
    by `jump` (noise) there. The search finds a passing set within 6 evaluations, at most 5% more weights than the
    fewest a prefix of the ranking needs (0 when the curve is smooth), and never more than half the weights."""
    from types import SimpleNamespace

    from gptkiln.calibration.quantize import MAX_ESTIMATED_TRIALS, _search_by_estimate

    rng = np.random.default_rng(0)
    size = {f"layer {i}": int(rng.choice([1, 3, 8])) for i in range(200)} | {"lm_head": 240}
    estimate = {name: weights * 0.985 ** i * rng.uniform(0.8, 1.2) for i, (name, weights) in enumerate(size.items())}
    estimate["lm_head"] = 0.02 * sum(estimate.values())
    ranked = sorted(size, key=lambda name: estimate[name] / size[name], reverse=True)
    total = sum(estimate.values())

    def increase(units):  # 7% with none kept, 5% once their estimate reaches `needed`'s share (doubled)
        fraction = sum(estimate[name] for name in units) / total
        threshold = needed / 7.0 / 2.0
        return 7.0 - 2.0 * fraction / threshold if fraction >= threshold else 5.0 + jump + (2.0 - jump) * (
            1 - fraction / threshold)

    tried = []

    def attempt(units):
        tried.append(list(units))
        return len(tried), SimpleNamespace(accuracy=SimpleNamespace(ppl_increase_pct=increase(units)))

    half = sum(size.values()) // 2
    graph, trial, chosen, trials = _search_by_estimate(ranked, estimate, size, half, attempt,
                                                       lambda t: t.accuracy.ppl_increase_pct <= 5.0, 7.0, 5.0)
    assert len(trials) == len(tried) <= MAX_ESTIMATED_TRIALS and tried[graph - 1] == chosen
    assert trial.accuracy.ppl_increase_pct <= 5.0 and all(sum(size[n] for n in units) <= half for units in tried)
    fewest = next(sum(size[n] for n in ranked[:count]) for count in range(len(ranked))
                  if increase(ranked[:count]) <= 5.0)
    assert sum(size[n] for n in chosen) <= fewest * (1.0 if jump == 0 else 1.05)


@pytest.mark.parametrize("needed,counts,kept", [(1, [1], 1), (3, [1, 2, 4, 3], 3), (4, [1, 2, 4, 3], 4),
                                                 (5, [1, 2, 4, 8, 6, 5], 5), (15, [1, 2, 4, 8, 15, 11, 13, 14], 15),
                                                 (99, [1, 2, 4, 8, 15], 15)])
def test_fallback_search_keeps_the_fewest_groups_that_pass(needed, counts, kept):
    """Doubling, then bisection; the result is the passing trial even when the bisection's last try failed."""
    from gptkiln.calibration.quantize import _search_count

    tried = []

    def attempt(groups):
        tried.append(len(groups))
        return f"graph-{len(groups)}", len(groups)

    graph, trial, chosen, trials = _search_count([f"block {i}" for i in range(31)], 15, attempt,
                                                 lambda count: count >= needed)
    assert tried == counts and trials == counts and len(chosen) == kept
    if needed <= 15:
        assert (graph, trial) == (f"graph-{kept}", kept)


def test_consistency_gate_catches_a_scale_shared_across_the_batch(tmp_path, prepared_reference):
    """ONNX Runtime's own dynamic quantization (DynamicQuantizeLinear: one activation scale per tensor, so one per
    batch) lets a row's tokens depend on the other rows; gptkiln's per-row form does not, to the last bit."""
    from onnxruntime.quantization import QuantType, quantize_dynamic as ort_quantize_dynamic

    from gptkiln.calibration.qdq import quantize_dynamic
    from gptkiln.config import ParitySettings
    from gptkiln.parity import consistency_gate, parity_prompts, run_parity
    from gptkiln.runtime.torch_runner import TorchRunner

    path, loaded = prepared_reference
    per_tensor = tmp_path / "per_tensor" / "model.onnx"
    per_tensor.parent.mkdir()
    ort_quantize_dynamic(path, per_tensor, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                         use_external_data_format=True)
    model = ir.load(path)
    quantize_dynamic(model, linear_layers(model))
    per_row = tmp_path / "per_row" / "model.onnx"
    per_row.parent.mkdir()
    ir.save(model, per_row, external_data=DATA_FILE)
    reference, prompts = TorchRunner(loaded.model, loaded.spec), parity_prompts(loaded.tokenizer)
    reports = {name: run_parity(OnnxRuntimeRunner(loaded.spec, create_session(graph)), reference, prompts,
                                ParitySettings(decode_steps=8))
               for name, graph in (("per tensor", per_tensor), ("per row", per_row))}
    assert any("other_rows" in f for f in consistency_gate(reports["per tensor"], 0.99))
    assert not consistency_gate(reports["per row"], 0.99)
    rows = [c for c in reports["per row"].comparisons if c.name.startswith("other_rows")]
    assert len(rows) == 4 and all(c.max_abs == 0 for c in rows)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])  # qwen2: q/k/v with biases
def test_smoothquant_reaches_o_proj_and_down_proj_of_a_grouped_query_model(model_type, tiny_model_dir, tmp_path):
    """Besides the norms in front of q/k/v and gate/up: down_proj through up_proj, and o_proj through v_proj
    (2 query heads share a value head here), with the function unchanged."""
    from gptkiln.calibration.quantize import prepare
    from gptkiln.exporter.to_onnx import export_onnx

    loaded = load_model(str(tiny_model_dir(model_type)))
    exported = export_onnx(loaded, tmp_path / "export", opset=23).path
    path = tmp_path / "prepared" / "model.onnx"
    prepare(exported, path, loaded.spec)
    calibration = calibration_set([" ".join(f"word{i % 97}" for i in range(4000))], loaded.tokenizer, SETTINGS, "t")
    model = ir.load(path)
    layers = linear_layers(model)
    absmax = dict(collect(path, [layer.activation.name for layer in layers], calibration, loaded.spec).absmax)
    report = smooth(model, layers, absmax, alpha=0.5, spec=loaded.spec)
    def role(name: str) -> str:
        return next((part for part in name.split(".") if part.endswith(("proj", "head"))), name)

    folded = {(role(s.layers[0]), role(s.folded_into)) for s in report}
    assert folded == {("q_proj", "RMSNormalization"), ("gate_proj", "RMSNormalization"),
                      ("o_proj", "v_proj"), ("down_proj", "up_proj"), ("lm_head", "RMSNormalization")}, folded
    assert len(report) == 4 * loaded.spec.num_layers + 1  # and the final norm in front of the lm_head
    assert loaded.spec.num_heads == 2 * loaded.spec.num_kv_heads
    smoothed = tmp_path / "smoothed.onnx"
    ir.save(model, smoothed, external_data="smoothed.onnx.data")
    ids = calibration.windows[:2]
    before, after = logits(path, loaded.spec, ids), logits(smoothed, loaded.spec, ids)
    assert np.abs(after - before).max() <= 1e-4 * np.abs(before).max()
    measured = collect(smoothed, [s.activation for s in report], calibration, loaded.spec)
    for s in report:
        assert measured.tensor_absmax(s.activation) == pytest.approx(s.absmax_after, rel=1e-3)


def test_a_smoothed_graph_that_computes_something_else_is_refused(tmp_path, prepared_reference, calibration):
    from gptkiln.calibration.quantize import _check_function_kept
    from gptkiln.errors import ExportError

    path, loaded = prepared_reference
    model = ir.load(path)
    layers = linear_layers(model)
    absmax = dict(collect(path, [layer.activation.name for layer in layers], calibration, loaded.spec).absmax)
    smooth(model, layers, absmax, alpha=0.5)
    kept = tmp_path / "kept" / "model.onnx"
    kept.parent.mkdir()
    ir.save(model, kept, external_data=DATA_FILE)
    _check_function_kept(path, kept, calibration, loaded.spec)
    replace_weight(model, layers[1], layers[1].weight() * 1.5)  # a fold applied to one side only
    wrong = tmp_path / "wrong" / "model.onnx"
    wrong.parent.mkdir()
    ir.save(model, wrong, external_data=DATA_FILE)
    with pytest.raises(ExportError, match="SmoothQuant changed the fp32 model's logits"):
        _check_function_kept(path, wrong, calibration, loaded.spec)


def test_int4_range_search_rounds_each_column_no_worse_than_the_full_range():
    from gptkiln.calibration.weight_only import WeightFormat

    rng = np.random.default_rng(0)
    rows = rng.standard_normal((128, 64))
    rows[3, ::4] = 9.0  # an outlier weight in every fourth column
    for symmetric in (False, True):
        fmt = WeightFormat(128, symmetric, bits=4)
        full, searched = fmt._params(rows, 1.0), fmt.params(rows)
        assert np.all(fmt._error(rows, *searched) <= fmt._error(rows, *full))
        assert np.any(searched[0] < full[0])  # some ranges shrank
    int8 = WeightFormat(32, True, bits=8)
    np.testing.assert_array_equal(int8.params(rows[:32])[0], int8._params(rows[:32], 1.0)[0])  # int8 keeps its range


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, tiny_model_dir):
    """A tiny Llama as quantization sees it: (prepared graph, LoadedModel, CalibrationSet)."""
    from gptkiln.calibration.quantize import prepare
    from gptkiln.exporter.to_onnx import export_onnx

    loaded = load_model(str(tiny_model_dir("llama")))
    work = tmp_path_factory.mktemp("tiny_llama")
    path = work / "prepared" / "model.onnx"
    prepare(export_onnx(loaded, work / "export", opset=23).path, path, loaded.spec)
    calibration = calibration_set([" ".join(f"word{i % 89}" for i in range(4000))], loaded.tokenizer, SETTINGS, "t")
    return path, loaded, calibration


def test_awq_keeps_the_function_lowers_each_sites_error_and_updates_its_hessians(tmp_path, tiny_llama):
    from gptkiln.calibration.awq import awq_scale

    path, loaded, calibration = tiny_llama
    model = ir.load(path)
    layers = linear_layers(model)
    names = [layer.activation.name for layer in layers]
    hessians = dict(collect(path, names, calibration, loaded.spec, hessians=True).hessians)
    report = awq_scale(model, layers, hessians, WeightFormat(16, symmetric=False, bits=4), loaded.spec)
    assert len(report) == 4 * loaded.spec.num_layers + 1 and any(s.alpha > 0 for s in report)
    assert all(s.error_after <= s.error_before for s in report)
    scaled = tmp_path / "scaled" / "model.onnx"
    scaled.parent.mkdir()
    ir.save(model, scaled, external_data=DATA_FILE)
    ids = calibration.windows[:2]
    before, after = logits(path, loaded.spec, ids), logits(scaled, loaded.spec, ids)
    assert np.abs(after - before).max() <= 1e-4 * np.abs(before).max()
    measured = collect(scaled, names, calibration, loaded.spec, hessians=True).hessians
    for s in report:  # H / (s sᵀ) is the scaled activation's Hessian
        np.testing.assert_allclose(hessians[s.activation], measured[s.activation],
                                   rtol=1e-3, atol=1e-6 * np.abs(measured[s.activation]).max())


@pytest.mark.parametrize("floating", [0, 2])
def test_smoothquant_alpha_search_predicts_the_int8_output_error_it_minimises(tiny_llama, floating):
    """α = "auto": at every fold site and α of the grid, the error predicted from the Hessians is the error that
    int8 weights and static minmax int8 activations give the site's layers on the calibration activations; with
    `floating` channels kept exact (the largest), the int8 range and weights are what is left."""
    from gptkiln.calibration.qdq import INT8_MAX, weight_int8
    from gptkiln.calibration.smoothquant import ALPHAS, _errors_by_alpha, _scales, fold_sites
    from gptkiln.calibration.statistics import _activations, _probe_session
    from gptkiln.progress import QUIET

    path, loaded, calibration = tiny_llama
    model = ir.load(path)
    layers = linear_layers(model)
    names = sorted({layer.activation.name for layer in layers})
    stats = collect(path, names, calibration, loaded.spec, hessians=True)
    with _probe_session(path, names) as run:
        batches = list(_activations(run, calibration, loaded.spec, QUIET.bar(1, "", "")))
    sites = fold_sites(layers, stats.absmax, loaded.spec)
    assert {site.fold.name for site in sites} >= {"RMSNormalization"} and any(s.fold.layer for s in sites)
    for site in sites:
        x = np.concatenate([batch[site.activation].reshape(-1, batch[site.activation].shape[-1]) for batch in batches])
        assert len(x) == calibration.windows.size
        x_max = np.abs(x).max(axis=0).astype(np.float64)
        w_max = np.max([np.abs(layer.weight()).max(axis=1) for layer in site.layers], axis=0)
        exact_channels = np.argsort(-x_max)[:floating]
        in_int8 = np.ones(len(x_max), bool)
        in_int8[exact_channels] = False
        predicted = _errors_by_alpha(site, x_max, w_max, stats.hessians[site.activation], len(x), exact_channels)
        measured = {}
        for alpha in ALPHAS:
            scales = _scales(site, x_max, w_max, alpha)
            smoothed = x / scales * in_int8
            step = np.abs(smoothed).max() / INT8_MAX
            x_int8 = np.clip(np.round(smoothed / step), -INT8_MAX, INT8_MAX) * step
            error = total = 0.0
            for layer in site.layers:
                codes, steps = weight_int8(layer.weight() * scales[:, None] * in_int8[:, None])
                exact = x @ layer.weight()
                kept = x[:, ~in_int8] @ layer.weight()[~in_int8]
                error += float(((x_int8 @ (codes * steps) + kept - exact) ** 2).sum())
                total += float((exact ** 2).sum())
            measured[alpha] = error / total
        for alpha in ALPHAS:
            assert predicted[alpha] == pytest.approx(measured[alpha], rel=0.2), (site.activation, alpha)
        chosen = min(predicted, key=predicted.get)
        assert measured[chosen] <= 1.2 * min(measured.values())


def test_w8a8_keeps_outlier_channels_in_float_beside_the_int8_product(tmp_path, prepared_reference, calibration):
    """Channels planted 300x the rest: float_channels finds exactly them, and keeping them out of int8
    (Gather @ rows in float + the int8 product of the others) cuts the logits' error of unsmoothed W8A8."""
    from gptkiln.calibration.qdq import quantize_w8a8
    from gptkiln.calibration.quantize import _float_channels, prepare
    from gptkiln.exporter.to_onnx import export_onnx

    loaded = load_model("reference")
    plant_outliers(loaded.model, [7, 100], 300.0)
    prepared = tmp_path / "prepared" / "model.onnx"
    prepare(export_onnx(loaded, tmp_path / "export", opset=23).path, prepared, loaded.spec)
    layers = linear_layers(ir.load(prepared))
    names = sorted({layer.activation.name for layer in layers})
    stats = collect(prepared, names, calibration, loaded.spec)
    floating = _float_channels(layers, stats.absmax)
    planted = {layer.activation.name for layer in layers if layer.name.endswith(("c_attn.weight", "c_fc.weight"))}
    assert set(floating) == planted and all(c.tolist() == [7, 100] for c in floating.values())
    ids = calibration.windows[:2]
    reference = logits(prepared, loaded.spec, ids)
    errors = {}
    for label, kept in (("int8", {}), ("split", floating)):
        model = ir.load(prepared)
        thresholds = {n: float(np.delete(stats.absmax[n], kept.get(n, [])).max()) for n in names}
        quantize_w8a8(model, linear_layers(model), thresholds, kept)
        path = tmp_path / label / "model.onnx"
        path.parent.mkdir()
        ir.save(model, path, external_data=DATA_FILE)
        errors[label] = np.abs(logits(path, loaded.spec, ids) - reference).max() / np.abs(reference).max()
    assert errors["split"] < 0.2 * errors["int8"], errors
