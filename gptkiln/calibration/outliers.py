"""Plant activation outlier channels in a GPT-2 model without changing what it computes.

Real LLMs have a few activation channels 10-100x larger than the rest; that is what breaks
per-tensor int8 activations and what SmoothQuant fixes. The small reference model has no
such channels, so tests and benchmarks plant them: LayerNorm channel c is scaled up by
`factor` (weight and bias) and row c of the linear layer that reads it scaled down by the
same factor. The fp32 output is unchanged up to rounding.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def plant_outliers(model, channels: list[int], factor: float, blocks: list[int] | None = None) -> None:
    """In place, in the given blocks (default: all): ln_1 -> attn.c_attn and ln_2 -> mlp.c_fc
    (GPT-2's Conv1D weights are [in, out], so the input channel is a row)."""
    if model.config.model_type != "gpt2":
        raise ValueError(f"plant_outliers supports GPT-2 models, not {model.config.model_type}")
    chosen = range(len(model.transformer.h)) if blocks is None else blocks
    for block in (model.transformer.h[i] for i in chosen):
        for norm, linear in ((block.ln_1, block.attn.c_attn), (block.ln_2, block.mlp.c_fc)):
            norm.weight[channels] *= factor
            norm.bias[channels] *= factor
            linear.weight[channels, :] /= factor
