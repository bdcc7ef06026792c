"""The PyTorch reference, behind the same Runner interface as every target."""

from __future__ import annotations

import torch

from gptkiln.exporter.kv_cache import KVCacheDecoder
from gptkiln.models.spec import DecoderSpec
from gptkiln.targets.base import Runner


class TorchRunner(Runner):
    """Runs the exact module that was exported (the KV-cache wrapper) in eager mode."""

    exact_cache = True

    def __init__(self, model, spec: DecoderSpec):
        super().__init__(spec)
        self.decoder = KVCacheDecoder(model, spec).eval()

    @torch.no_grad()
    def step(self, input_ids, attention_mask, position_ids, cache, last_only: bool = False):
        logits, *present = self.decoder(torch.from_numpy(input_ids), torch.from_numpy(attention_mask),
                                        torch.from_numpy(position_ids), *(torch.from_numpy(c) for c in cache))
        return logits.numpy(), [p.numpy() for p in present]
