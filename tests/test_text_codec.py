"""TextCodec (tokenizers alone) encodes and decodes exactly as the transformers tokenizer gptkiln builds with."""

from __future__ import annotations

from transformers import AutoTokenizer

from gptkiln.models.loading import REFERENCE_DIR
from gptkiln.runtime.text import TextCodec

TEXTS = ["def main():\n    return 0", "  Indented\ttabs and unicode: é ✓", "<|endoftext|>after the end", "x" * 300]


def test_same_ids_and_text_as_transformers(tmp_path):
    reference = AutoTokenizer.from_pretrained(REFERENCE_DIR)
    reference.save_pretrained(tmp_path)  # what a build writes beside the engines
    codec = TextCodec(tmp_path)
    for text in TEXTS:
        ids = reference(text)["input_ids"]
        assert codec.encode(text) == ids
        assert codec.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    assert codec.eos_token_id == reference.eos_token_id
