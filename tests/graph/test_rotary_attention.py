"""The rotary embedding and the q/k/v Split taken into GroupQueryAttention (gptkiln.graph.rotary_attention): the
engine with them and the one without compute the same logits, left padding and a growing buffer included."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir
import pytest

from gptkiln.exporter.io_spec import DATA_FILE, MODEL_FILE
from gptkiln.exporter.to_onnx import export_onnx
from gptkiln.graph import optimize
from gptkiln.graph.kv_buffer import share_kv_buffers
from gptkiln.graph.packed_linears import pack_linears
from gptkiln.graph.rotary_attention import rotary_into_attention
from gptkiln.models.loading import load_model
from gptkiln.runtime.generate import left_pad
from gptkiln.targets import get_target
from gptkiln.targets.onnxruntime import KV_BLOCK, InPlaceRunner, create_session


def _engines(directory, tmp_path):
    """(spec, the graph with the rotary taken in, its runner, the runner of the graph without)."""
    loaded = load_model(str(directory))
    model = ir.load(export_onnx(loaded, tmp_path / "export", opset=23).path)
    optimize(model, loaded.spec, get_target("onnxruntime").fusion_sets)
    assert share_kv_buffers(model, loaded.spec) is None
    pack_linears(model)
    runners = []
    for name in ("before", "after"):
        if name == "after":
            assert rotary_into_attention(model, loaded.spec, -(-loaded.spec.max_positions // KV_BLOCK) * KV_BLOCK) is None
        path = tmp_path / name / MODEL_FILE
        path.parent.mkdir()
        ir.save(model, path, external_data=DATA_FILE)
        runners.append(InPlaceRunner(loaded.spec, create_session(path)))
    return loaded.spec, model, runners


@pytest.mark.parametrize("family, packed", [("llama", True), ("gemma3_text", False)])
def test_rotary_in_attention_computes_the_same_logits(tiny_model_dir, tmp_path, family, packed):
    """Llama: one packed q/k/v input; Gemma 3 (q/k norms, a rope base per layer type): q, k, v apart, two tables."""
    spec, model, (before, after) = _engines(tiny_model_dir(family), tmp_path)
    ops = Counter(node.op_type for node in model.graph)
    attentions = [node for node in model.graph if node.op_type == "GroupQueryAttention"]
    assert ops["RotaryEmbedding"] == 0 and len(attentions) == spec.num_layers
    assert all(node.attributes.get_int("do_rotary") == 1 for node in attentions)
    assert all((node.inputs[1] is None) == packed for node in attentions)
    tables = {node.inputs[7].name for node in attentions}
    assert len(tables) == (2 if family == "gemma3_text" else 1)

    for layout in ("left", "right"):
        _generate_alike(before, after, layout)


def _generate_alike(before, after, layout: str) -> None:
    """Two rows of 40 and 23 prompt tokens, padded on the left (gptkiln's runners) or on the right
    (onnxruntime-genai's: the new tokens follow the padding), and 30 steps: the buffer grows past KV_BLOCK."""
    rng = np.random.default_rng(0)
    batch = left_pad([rng.integers(0, 4000, 40).tolist(), rng.integers(0, 4000, 23).tolist()], 0)
    ids, mask, positions = batch.input_ids, batch.attention_mask, batch.position_ids
    if layout == "right":
        ids, mask = ids.copy(), mask.copy()
        ids[1], mask[1] = np.roll(ids[1], -17), np.roll(mask[1], -17)
        positions = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 0)
    caches = [before.empty_cache(2), after.empty_cache(2)]
    for step in range(30):
        (theirs, caches[0]), (ours, caches[1]) = (runner.step(ids, mask, positions, cache)
                                                  for runner, cache in zip((before, after), caches))
        valid = mask[:, -ids.shape[1]:].astype(bool)
        assert np.abs(ours - theirs)[valid].max() <= 1e-5 * np.abs(theirs).max(), (layout, step)
        last = theirs[np.arange(2), valid.shape[1] - 1 - np.argmax(valid[:, ::-1], axis=1)]  # each row's last token
        ids = last.argmax(-1)[:, None].astype(np.int64)
        positions = positions.max(axis=1, keepdims=True) + 1
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
    assert caches[1].capacity == 2 * KV_BLOCK


def test_a_model_without_rotary_keeps_its_graph(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir("gpt2")))
    model = ir.Model(ir.Graph([], [], nodes=[]), ir_version=10)
    assert rotary_into_attention(model, loaded.spec, 128) == "the model has no rotary embedding"
