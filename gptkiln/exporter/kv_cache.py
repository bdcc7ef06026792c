"""The KV-cache wrapper: flat past/present tensors in, the IO contract out.

The wrapper builds the 4D attention mask itself, from the 2D padding mask, with a handful
of plain tensor ops, and hands it to the model. transformers returns a 4D mask as it is,
so its own mask machinery (vmap-based mask functions, data-dependent early exits, per-layer
cache-length queries) never enters the traced graph: that machinery is what made
torch.export crawl on deep models with dynamic shapes (see docs/DESIGN.md, "Export").
"""

from __future__ import annotations

import torch
from torch import nn

from gptkiln.models.spec import DecoderSpec


def attention_bias(attention_mask: torch.Tensor, seq_len: int, dtype: torch.dtype,
                   window: int | None = None) -> torch.Tensor:
    """Additive mask [batch, 1, seq, past+seq]: 0 where a query may attend a key, dtype-min elsewhere.

    Query i sits at absolute position past+i; it sees key j when j <= past+i (causal), the
    key is not padding, and (with a sliding window) past+i - j < window.
    """
    total = attention_mask.shape[-1]
    key_pos = torch.arange(total, device=attention_mask.device)
    query_pos = torch.arange(seq_len, device=attention_mask.device) + (total - seq_len)
    allowed = key_pos[None, :] <= query_pos[:, None]  # [seq, total]
    if window is not None:
        allowed = allowed & (query_pos[:, None] - key_pos[None, :] < window)
    allowed = allowed[None, None] & attention_mask[:, None, None, :].bool()  # [batch, 1, seq, total]
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


class KVCacheDecoder(nn.Module):
    """forward(input_ids, attention_mask, position_ids, *past) -> (logits, *present)."""

    def __init__(self, model: nn.Module, spec: DecoderSpec):
        super().__init__()
        self.model = model
        self.spec = spec

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache()  # no config: every layer keeps its full past (the contract)
        for layer in range(self.spec.num_layers):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        out = self.model(input_ids=input_ids, attention_mask=self.masks(attention_mask, input_ids.shape[1], past[0].dtype),
                         position_ids=position_ids, cache=cache, use_cache=True)
        present = []
        for layer in out.cache.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)

    def masks(self, attention_mask, seq_len: int, dtype):
        """The additive mask every layer gets, or one per layer kind (alternating local/global layers)."""
        spec = self.spec
        full = attention_bias(attention_mask, seq_len, dtype)
        if spec.sliding_window is None:
            return full
        windowed = attention_bias(attention_mask, seq_len, dtype, spec.sliding_window)
        if spec.per_layer_masks:
            return {"full_attention": full, "sliding_attention": windowed}
        return windowed  # every layer attends through the window (Mistral, Phi-3)
