"""Where a family keeps what pruning removes, and the removal itself, in place on a transformers model.

- Blocks: any family (the DecoderSpec's block list); the config's layer count and per-layer lists follow,
  and every kept attention module gets its new `layer_idx` (transformers indexes the KV cache by it).
- MLP channels: the families whose MLP is named in MLP_LAYOUTS (input projections' output rows, the output
  projection's input columns); each block keeps the same number, so the config's intermediate size holds.
- Attention: whole GQA groups (a KV head and the query heads that read it) in Llama-layout attention
  (q/k/v/o_proj), so the KV layout stays valid; head_dim is written into the config explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gptkiln.errors import UsageError
from gptkiln.models.spec import DecoderSpec


@dataclass(frozen=True)
class MlpLayout:
    inputs: tuple[str, ...]  # module names inside the block whose outputs are the MLP channels
    output: str  # the module that reads the channels
    config_field: str  # the config's intermediate size


MLP_LAYOUTS = {
    **{family: MlpLayout(("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", "intermediate_size")
       for family in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")},
    "gpt2": MlpLayout(("mlp.c_fc",), "mlp.c_proj", "n_inner"),
}
GQA_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")  # q/k/v/o_proj, head_dim settable in the config


def blocks(model, spec: DecoderSpec) -> nn.ModuleList:
    return model.get_submodule(spec.blocks_path)


def remove_blocks(model, spec: DecoderSpec, removed: list[int]) -> None:
    kept = [block for i, block in enumerate(blocks(model, spec)) if i not in removed]
    parent, _, name = spec.blocks_path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, nn.ModuleList(kept))
    config = model.config
    for index, block in enumerate(kept):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = index
    config.num_hidden_layers = len(kept)
    if getattr(config, "layer_types", None):
        config.layer_types = [kind for i, kind in enumerate(config.layer_types) if i not in removed]


def mlp_layout(spec: DecoderSpec) -> MlpLayout:
    if spec.model_type not in MLP_LAYOUTS:
        raise UsageError(f"MLP pruning knows the MLPs of {', '.join(MLP_LAYOUTS)}, not '{spec.model_type}'",
                         "prune whole blocks (--prune-layers) instead, which works for every family")
    return MLP_LAYOUTS[spec.model_type]


def prune_mlp(model, spec: DecoderSpec, kept_channels: list[torch.Tensor]) -> None:
    """kept_channels[i]: the sorted channel indices block i keeps (the same count in every block)."""
    layout = mlp_layout(spec)
    for block, keep in zip(blocks(model, spec), kept_channels):
        for name in layout.inputs:
            _keep_outputs(block.get_submodule(name), keep)
        _keep_inputs(block.get_submodule(layout.output), keep)
    setattr(model.config, layout.config_field, len(kept_channels[0]))


def check_head_groups(spec: DecoderSpec, count: int) -> None:
    if spec.model_type not in GQA_FAMILIES:
        raise UsageError(f"head pruning knows Llama-layout attention ({', '.join(GQA_FAMILIES)}), not "
                         f"'{spec.model_type}'", "prune whole blocks (--prune-layers) or MLP channels instead")
    if not 0 < count < spec.num_kv_heads:
        raise UsageError(f"--prune-heads removes whole KV groups: 1 to {spec.num_kv_heads - 1} of this model's "
                         f"{spec.num_kv_heads}, got {count}", "pass a smaller count")


def prune_head_groups(model, spec: DecoderSpec, kept_groups: list[list[int]]) -> None:
    """kept_groups[i]: the KV groups block i keeps (the same count in every block)."""
    per_group = spec.num_heads // spec.num_kv_heads
    head = spec.head_dim
    for block, groups in zip(blocks(model, spec), kept_groups):
        attention = block.self_attn
        kv_rows = torch.cat([torch.arange(g * head, (g + 1) * head) for g in groups])
        q_rows = torch.cat([torch.arange(g * per_group * head, (g + 1) * per_group * head) for g in groups])
        _keep_outputs(attention.q_proj, q_rows)
        _keep_outputs(attention.k_proj, kv_rows)
        _keep_outputs(attention.v_proj, kv_rows)
        _keep_inputs(attention.o_proj, q_rows)
        for name in ("num_heads", "num_key_value_heads"):  # older attention classes keep their own counts
            if hasattr(attention, name):
                setattr(attention, name, len(groups) * (per_group if name == "num_heads" else 1))
        if hasattr(attention, "num_key_value_groups"):
            attention.num_key_value_groups = per_group
    config = model.config
    config.head_dim = head
    config.num_key_value_heads = len(kept_groups[0])
    config.num_attention_heads = len(kept_groups[0]) * per_group


def _keep_outputs(module: nn.Module, keep: torch.Tensor) -> None:
    """Keep these output features of a Linear (weight [out, in]) or a GPT-2 Conv1D (weight [in, out])."""
    conv = type(module).__name__ == "Conv1D"
    weight = module.weight.data[:, keep] if conv else module.weight.data[keep]
    module.weight = nn.Parameter(weight.contiguous())
    if getattr(module, "bias", None) is not None:
        module.bias = nn.Parameter(module.bias.data[keep].contiguous())
    if conv:
        module.nf = len(keep)
    else:
        module.out_features = len(keep)


def _keep_inputs(module: nn.Module, keep: torch.Tensor) -> None:
    conv = type(module).__name__ == "Conv1D"
    weight = module.weight.data[keep] if conv else module.weight.data[:, keep]
    module.weight = nn.Parameter(weight.contiguous())
    if conv:
        module.nx = len(keep)
    else:
        module.in_features = len(keep)
