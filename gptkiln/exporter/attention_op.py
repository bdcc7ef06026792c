"""SDPA → ONNX `Attention` (opset 23) for every head layout, grouped or broadcast.

torch's own lowering takes grouped-query attention only when the model calls SDPA with
`enable_gqa=True`; a model that relies on SDPA broadcasting fewer key/value heads over the
query heads (Falcon's multi-query attention) fails to export. ONNX `Attention` takes
`q_num_heads % kv_num_heads == 0` itself, so both are the same op with K/V left unrepeated.
"""

from __future__ import annotations

import torch

MIN_OPSET = 23


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
                                 scale: float | None = None, enable_gqa: bool = False):
    # torch's own lowering, imported here: a private module, so a torch upgrade that moves it breaks only this
    from torch.onnx._internal.exporter._torchlib.ops.nn import aten_scaled_dot_product_attention_23

    grouped = enable_gqa or query.shape[1] != key.shape[1]
    return aten_scaled_dot_product_attention_23(query, key, value, attn_mask, dropout_p, is_causal, scale, grouped)


def translation_table(opset: int) -> dict:
    """The custom_translation_table for torch.onnx.export at this opset (empty below 23)."""
    if opset < MIN_OPSET:
        return {}
    return {torch.ops.aten.scaled_dot_product_attention.default: scaled_dot_product_attention}
