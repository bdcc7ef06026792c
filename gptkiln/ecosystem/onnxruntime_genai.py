"""genai_config.json: what onnxruntime-genai's `Model(dir)` reads to run the onnxruntime target's graph.

The graph already speaks onnxruntime-genai's IO names (input_ids, attention_mask, position_ids,
past_key_values.%d.key, present.%d.key, logits) and it feeds `num_logits_to_keep` itself (0: every
position). The in-place KV cache (gptkiln.graph.kv_buffer) is its `past_present_share_buffer`: one
[batch, kv_heads, max_length, head] buffer per layer, written in place. The model type is "decoder",
onnxruntime-genai's generic decoder-only LLM. Stop tokens, padding and the search defaults come from the
model's generation config.
"""

from __future__ import annotations

import json
from pathlib import Path

from gptkiln.exporter import io_spec
from gptkiln.models.spec import DecoderSpec
from gptkiln.runtime.text import TextCodec

CONFIG_FILE = "genai_config.json"
SEARCH_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0}


def write_genai_config(out_dir: Path, spec: DecoderSpec, settings: dict) -> dict:
    """Write genai_config.json into the target directory (which holds the model files); return it."""
    codec = TextCodec(out_dir)
    generation = codec.generation
    eos = list(codec.eos_token_ids) or [codec.pad_token_id]
    bos = generation.get("bos_token_id")
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": [],
                            **({"intra_op_num_threads": settings["intra_op_num_threads"]}
                               if settings.get("intra_op_num_threads") else {})},
        "filename": io_spec.MODEL_FILE,
        "head_size": spec.head_dim,
        "hidden_size": spec.hidden_size,
        "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                   "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
        "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value"},
        "num_attention_heads": spec.num_heads,
        "num_hidden_layers": spec.num_layers,
        "num_key_value_heads": spec.num_kv_heads,
    }
    search = {name: generation.get(name, default) for name, default in SEARCH_DEFAULTS.items()}
    config = {
        "model": {"bos_token_id": bos if bos is not None else eos[0], "context_length": spec.max_positions,
                  "decoder": decoder, "eos_token_id": eos if len(eos) > 1 else eos[0],
                  "pad_token_id": codec.pad_token_id, "type": "decoder", "vocab_size": spec.vocab_size},
        "search": {**search, "max_length": spec.max_positions, "min_length": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": settings.get("kv_cache") == "in-place"},
    }
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return config
