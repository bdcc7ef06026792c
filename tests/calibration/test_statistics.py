"""Activation statistics: the same numbers PyTorch sees (over prefill and decode), cached on disk."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch

from gptkiln.calibration.data import calibration_set, read_texts
from gptkiln.calibration.layers import linear_layers
from gptkiln.cache import cache_root
from gptkiln.calibration.statistics import collect
from gptkiln.config import CalibrationSettings

SETTINGS = CalibrationSettings(samples=6, seq_len=48, decode_steps=8)


@pytest.fixture(scope="module")
def calibration(calibration_text, prepared_reference):
    return calibration_set(read_texts(calibration_text), prepared_reference[1].tokenizer, SETTINGS, "stdlib")


def layer_inputs(loaded, windows) -> dict[str, np.ndarray]:
    """What each block's c_attn and mlp.c_proj read, from PyTorch forward hooks over whole windows."""
    seen, hooks = {}, []
    for index, block in enumerate(loaded.model.transformer.h):
        for name, module in ((f"h.{index}.attn.c_attn", block.attn.c_attn), (f"h.{index}.mlp.c_proj", block.mlp.c_proj)):
            hooks.append(module.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, args[0].numpy())))
    with torch.no_grad():
        loaded.model(torch.from_numpy(windows))
    for hook in hooks:
        hook.remove()
    return seen


def test_statistics_match_pytorch_over_prefill_and_decode(prepared_reference, calibration):
    path, loaded = prepared_reference
    layers = {layer.name: layer for layer in linear_layers(ir.load(path))}
    stats = collect(path, [layer.activation.name for layer in layers.values()], calibration, loaded.spec, hessians=True)
    torch_inputs = layer_inputs(loaded, calibration.windows)
    assert stats.rows == 6 * 48  # every token: 40 in the prefill, 8 as decode steps
    for short, x in torch_inputs.items():
        layer = next(layer for name, layer in layers.items() if short in name)
        rows = x.reshape(-1, x.shape[-1])
        np.testing.assert_allclose(stats.absmax[layer.activation.name], np.abs(rows).max(axis=0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(stats.hessians[layer.activation.name], rows.T.astype(np.float64) @ rows,
                                   rtol=1e-3, atol=1e-2)


def test_statistics_are_cached_by_content(prepared_reference, calibration, calibration_text):
    path, loaded = prepared_reference
    names = [layer.activation.name for layer in linear_layers(ir.load(path))][:3]
    first = collect(path, names, calibration, loaded.spec, histograms=True)
    again = collect(path, names, calibration, loaded.spec, histograms=True)
    assert not first.cached and again.cached
    for name in names:
        np.testing.assert_array_equal(first.histograms[name], again.histograms[name])
        assert first.histograms[name].sum() == first.rows * first.absmax[name].size
    reseeded = calibration_set(read_texts(calibration_text), loaded.tokenizer,
                               CalibrationSettings(samples=6, seq_len=48, decode_steps=8, seed=7), "stdlib")
    assert not collect(path, names, reseeded, loaded.spec, histograms=True).cached
    assert not list((cache_root() / "calibration").glob("*.partial"))  # written by rename, never half
