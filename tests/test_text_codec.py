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
    assert codec.eos_token_ids == (reference.eos_token_id,)


def test_stop_tokens_come_from_the_generation_config_too(tmp_path):
    import json

    AutoTokenizer.from_pretrained(REFERENCE_DIR).save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 0], "pad_token_id": 3}))
    codec = TextCodec(tmp_path)
    assert codec.eos_token_ids == (7, 0)  # the tokenizer's EOS (0) once, after the model's list
    assert codec.pad_token_id == 0  # the tokenizer's pad token wins over the generation config's


SMOLLM2_TEMPLATE = (  # SmolLM2-135M-Instruct's chat template
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_chat_prompt_is_what_transformers_renders(tmp_path):
    reference = AutoTokenizer.from_pretrained(REFERENCE_DIR)
    reference.chat_template = SMOLLM2_TEMPLATE
    reference.save_pretrained(tmp_path)
    message = [{"role": "user", "content": "What is 2+2? Answer in {braces} & \"quotes\"."}]
    expected = reference.apply_chat_template(message, tokenize=False, add_generation_prompt=True)
    assert TextCodec(tmp_path).chat_prompt(message[0]["content"]) == expected


def test_chat_without_a_template_says_so(tmp_path):
    import pytest

    from gptkiln.errors import UsageError

    AutoTokenizer.from_pretrained(REFERENCE_DIR).save_pretrained(tmp_path)
    with pytest.raises(UsageError, match="no chat template") as info:
        TextCodec(tmp_path).chat_prompt("hello")
    assert "--prompt" in info.value.fix
