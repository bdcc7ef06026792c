"""Greedy generation from a gptkiln OpenVINO build with only openvino, numpy and tokenizers installed.

    python examples/openvino_generate.py OUT "def main(" [max_new_tokens]

OUT is a `gptkiln export ... --target openvino` output: OUT/openvino/openvino_model.xml (+ .bin) with
the KV cache kept as state, and OUT/tokenizer.json. No torch, transformers or gptkiln here.
"""

import json
import sys
from pathlib import Path

import numpy as np
import openvino as ov
from tokenizers import Tokenizer

out = Path(sys.argv[1])
prompt = sys.argv[2]
max_new_tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 32

manifest = json.loads((out / "manifest.json").read_text())
config = manifest["targets"]["openvino"]["settings"]["config"]  # f32 precision, as parity was proven
request = ov.Core().compile_model(str(out / "openvino" / "openvino_model.xml"), "CPU", config).create_infer_request()
tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
eos = tokenizer.token_to_id("<|endoftext|>")

ids = np.array([tokenizer.encode(prompt).ids], dtype=np.int64)
mask = np.ones_like(ids)
request.reset_state()  # a new sequence: empty KV cache
new_tokens = []
for _ in range(max_new_tokens):
    start = mask.shape[1] - ids.shape[1]
    logits = request.infer({"input_ids": ids, "attention_mask": mask,
                            "position_ids": np.arange(start, mask.shape[1], dtype=np.int64)[None],
                            "beam_idx": np.zeros(1, dtype=np.int32)})["logits"]
    token = int(logits[0, -1].argmax())
    if token == eos:
        break
    new_tokens.append(token)
    ids = np.array([[token]], dtype=np.int64)
    mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)

print(prompt + tokenizer.decode(new_tokens))
