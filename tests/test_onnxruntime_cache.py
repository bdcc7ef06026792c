"""ONNX Runtime's in-place KV cache and last-position logits (gptkiln.graph.kv_buffer, last_logits), on the
reference model's engine: the buffer runner against the same graph fed the contract's arrays."""

from __future__ import annotations

import numpy as np
import pytest

from gptkiln.runtime.generate import left_pad
from gptkiln.targets import get_target
from gptkiln.targets.onnxruntime import KV_BLOCK, InPlaceRunner, OnnxRuntimeRunner


@pytest.fixture(scope="module")
def runners(reference_build):
    result, output = reference_build
    buffered = get_target("onnxruntime").load(output / "onnxruntime", result.spec)
    return buffered, OnnxRuntimeRunner(result.spec, buffered.session)  # one session, the two cache forms


def test_the_reference_engine_takes_the_in_place_form(reference_build, runners):
    result, _ = reference_build
    settings = next(t for t in result.targets if t.name == "onnxruntime").settings
    assert settings["kv_cache"] == "in-place" and settings["last_logits"] is True
    assert settings["quantized_lookup_tables"] == []  # fp32 weights: the tables stay exact
    assert isinstance(runners[0], InPlaceRunner)


def test_buffer_and_contract_arrays_agree_across_capacity_growth(runners):
    """Left-padded rows, a 60-token prefill and 75 steps: the buffer grows past 64 and 128 positions."""
    buffered, arrays = runners
    rng = np.random.default_rng(0)
    batch = left_pad([rng.integers(0, 500, 60).tolist(), rng.integers(0, 500, 45).tolist()], 0)
    caches = [runner.empty_cache(2) for runner in runners]
    mask, positions, ids = batch.attention_mask, batch.position_ids, batch.input_ids
    for step in range(76):
        (ours, caches[0]), (theirs, caches[1]) = (runner.step(ids, mask, positions, cache)
                                                  for runner, cache in zip(runners, caches))
        valid = mask[:, -ids.shape[1]:].astype(bool)
        assert np.abs(ours - theirs)[valid].max() <= 1e-5 * np.abs(theirs).max(), step
        ids = theirs[:, -1].argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        positions = positions[:, -1:] + 1
    assert caches[0].capacity == 3 * KV_BLOCK and caches[0].length == 60 + 75
    for ours, theirs in zip(buffered.cache_arrays(caches[0]), arrays.cache_arrays(caches[1])):
        assert ours.shape == theirs.shape and np.abs(ours - theirs).max() <= 1e-5


def test_a_capacity_given_up_front_is_allocated_once_and_computes_the_same(runners):
    """generate(), the gates and bench pass the positions they will fill: the buffer is never copied to grow."""
    buffered, _ = runners
    rng = np.random.default_rng(1)
    batch = left_pad([rng.integers(0, 500, 60).tolist(), rng.integers(0, 500, 45).tolist()], 0)
    caches = [buffered.empty_cache(2), buffered.empty_cache(2, 60 + 75)]
    sized_arrays = caches[1].arrays
    assert caches[1].capacity == 3 * KV_BLOCK
    mask, positions, ids = batch.attention_mask, batch.position_ids, batch.input_ids
    for step in range(76):
        (grown, caches[0]), (sized, caches[1]) = (buffered.step(ids, mask, positions, cache) for cache in caches)
        valid = mask[:, -ids.shape[1]:].astype(bool)
        assert np.abs(sized - grown)[valid].max() <= 1e-6 * np.abs(grown).max(), step
        ids = grown[:, -1].argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        positions = positions[:, -1:] + 1
    assert caches[1].arrays is sized_arrays and caches[1].length == 60 + 75


def test_a_prompt_in_passes_matches_one_pass(runners, prefill_in_passes_matches_one_pass):
    """GroupQueryAttention continues a prompt one row at a time: a batch's passes go in groups of rows, each on
    views of the buffer's rows."""
    prefill_in_passes_matches_one_pass(runners[0], 1e-5)


def test_last_only_is_the_last_row_of_every_position(runners):
    buffered, arrays = runners
    batch = left_pad([list(range(3, 20)), list(range(7, 16))], 0)
    for runner in runners:
        every, _ = runner.step(batch.input_ids, batch.attention_mask, batch.position_ids, runner.empty_cache(2))
        last, _ = runner.step(batch.input_ids, batch.attention_mask, batch.position_ids, runner.empty_cache(2),
                              last_only=True)
        assert every.shape[1] == 17 and last.shape[1] == 1
        np.testing.assert_array_equal(last[:, 0], every[:, -1])


def test_a_contract_cache_continues_in_the_buffer_and_a_short_one_is_refused(runners):
    buffered, arrays = runners
    batch = left_pad([list(range(5, 25))], 0)
    _, contract = arrays.step(batch.input_ids, batch.attention_mask, batch.position_ids, arrays.empty_cache(1))
    token, mask, position = np.array([[9]]), np.ones((1, 21), np.int64), np.array([[20]])
    ours, cache = buffered.step(token, mask, position, contract)
    theirs, _ = arrays.step(token, mask, position, contract)
    assert cache.length == 21 and np.abs(ours - theirs).max() <= 1e-5 * np.abs(theirs).max()
    with pytest.raises(ValueError, match="cache of 21 positions"):
        buffered.step(token, np.ones((1, 30), np.int64), np.array([[29]]), cache)


def test_compile_hands_over_the_session_it_checked(reference_export, tmp_path, monkeypatch):
    """compile_and_load creates one session (compile's check) and runs it; compile then load creates two."""
    import gptkiln.targets.onnxruntime as onnxruntime_target

    path, spec = reference_export
    created = []
    real = onnxruntime_target.create_session
    monkeypatch.setattr(onnxruntime_target, "create_session", lambda *args: created.append(args) or real(*args))
    settings, runner = get_target("onnxruntime").compile_and_load(path, tmp_path / "engine", spec)
    assert len(created) == 1
    ids = np.array([[1, 2, 3]], np.int64)
    logits, _ = runner.step(ids, np.ones_like(ids), np.arange(3)[None], runner.empty_cache(1))
    loaded = get_target("onnxruntime").load(tmp_path / "engine", spec)
    assert len(created) == 2 and type(loaded) is type(runner)
    again, _ = loaded.step(ids, np.ones_like(ids), np.arange(3)[None], loaded.empty_cache(1))
    assert np.array_equal(logits, again)
