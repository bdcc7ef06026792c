"""How much each part of the model matters, measured on calibration text in one pass of the unpruned model.

- Block influence (ShortGPT): 1 - cos(block input, block output), averaged over every token. A block that
  barely turns the hidden state is the cheapest to remove.
- MLP channels and GQA groups (Minitron): the L2 norm of their activations over the calibration tokens, at
  the input of the layer that reads them (down_proj / c_proj, o_proj).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from gptkiln.compression.structure import blocks, mlp_layout
from gptkiln.models.spec import DecoderSpec
from gptkiln.progress import QUIET, Progress

BATCH = 4


@dataclass
class Importance:
    block_influence: list[float]  # per block, higher = more important
    mlp_channels: list[torch.Tensor] = field(default_factory=list)  # per block: [intermediate] activation norms
    head_groups: list[torch.Tensor] = field(default_factory=list)  # per block: [kv_heads] activation norms


@torch.no_grad()
def measure(model, spec: DecoderSpec, windows: np.ndarray, mlp: bool, heads: bool,
            progress: Progress = QUIET) -> Importance:
    cosines = [[] for _ in range(spec.num_layers)]
    mlp_sq = [None] * spec.num_layers
    head_sq = [None] * spec.num_layers
    hooks = []

    def on_block(index):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            cosines[index].append(torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1).flatten())
        return hook

    def accumulate(store, index, group_size=None):
        def hook(module, args):
            x = args[0].float().reshape(-1, args[0].shape[-1])
            if group_size:
                x = x.reshape(len(x), -1, group_size)  # [tokens, groups, per-group features]
            squares = (x * x).sum(dim=0)
            squares = squares.sum(dim=-1) if group_size else squares
            store[index] = squares if store[index] is None else store[index] + squares
        return hook

    per_group = spec.num_heads // spec.num_kv_heads * spec.head_dim
    for index, block in enumerate(blocks(model, spec)):
        hooks.append(block.register_forward_hook(on_block(index), with_kwargs=True))
        if mlp:
            hooks.append(block.get_submodule(mlp_layout(spec).output).register_forward_pre_hook(
                accumulate(mlp_sq, index)))
        if heads:
            hooks.append(block.self_attn.o_proj.register_forward_pre_hook(accumulate(head_sq, index, per_group)))
    hooked_pass(model, windows, hooks, "importance", progress)
    influence = [float(1.0 - torch.cat(c).mean()) for c in cosines]
    return Importance(influence, [s.sqrt() for s in mlp_sq] if mlp else [], [s.sqrt() for s in head_sq] if heads else [])


@torch.no_grad()
def hooked_pass(model, windows: np.ndarray, hooks: list, label: str, progress: Progress = QUIET) -> None:
    """Run the model over the calibration windows (BATCH at a time, a progress bar), then remove the hooks that
    collect what the caller measures."""
    bar = progress.bar(-(-len(windows) // BATCH), label, "batches")
    try:
        for start in range(0, len(windows), BATCH):
            ids = torch.from_numpy(windows[start:start + BATCH])
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
            bar.step()
    finally:
        for hook in hooks:
            hook.remove()
        bar.close()


def least_important_blocks(importance: Importance, count: int) -> list[int]:
    """The `count` blocks of lowest influence, in model order."""
    order = np.argsort(importance.block_influence, kind="stable")
    return sorted(int(i) for i in order[:count])


def top_indices(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The `keep` highest-scoring indices, in their original order."""
    return torch.sort(torch.topk(scores, keep).indices).values
