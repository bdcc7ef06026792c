"""Text <-> token ids from the saved tokenizer files, with the `tokenizers` library alone.

Generation from a built output or a bundle needs no transformers and no torch: tokenizer.json
holds the whole fast tokenizer (normalizer, pre-tokenizer, model, post-processor),
tokenizer_config.json names the end-of-text and padding tokens, generation_config.json the model's
own stop tokens (often a list: an instruct model ends its turn with a token that is not the
tokenizer's EOS) and sampling defaults, and chat_template.jinja (or tokenizer_config.json's
`chat_template`) how a conversation becomes a prompt.
"""

from __future__ import annotations

import json
from pathlib import Path

from gptkiln.errors import ArtifactError, UsageError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
CHAT_TEMPLATE = "chat_template.jinja"


def generation_config(directory: Path) -> dict:
    """The model's generation_config.json ({} where the model has none)."""
    path = directory / GENERATION_CONFIG
    return json.loads(path.read_text()) if path.is_file() else {}


def token_ids(value) -> list[int]:
    """A config's token id field, an int, a list of ints or null, as a list."""
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


class TextCodec:
    def __init__(self, directory: Path):
        from tokenizers import Tokenizer

        path = directory / TOKENIZER_FILE
        if not path.is_file():
            raise ArtifactError(f"'{directory}' has no {TOKENIZER_FILE}",
                                "export again: gptkiln saves the fast tokenizer beside the engines")
        self.tokenizer = Tokenizer.from_file(str(path))
        config_path = directory / TOKENIZER_CONFIG
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.generation = generation = generation_config(directory)
        eos = self._token_id(config.get("eos_token"))
        self.eos_token_ids = tuple(dict.fromkeys(token_ids(generation.get("eos_token_id")) + token_ids(eos)))
        pad = self._token_id(config.get("pad_token"))
        if pad is None:
            pad = generation.get("pad_token_id")
        self.pad_token_id = pad if pad is not None else (self.eos_token_ids[0] if self.eos_token_ids else 0)
        template = directory / CHAT_TEMPLATE
        self.chat_template = template.read_text() if template.is_file() else config.get("chat_template")
        self.special_tokens = {name: self._content(config.get(name)) for name in ("bos_token", "eos_token")}

    @staticmethod
    def _content(token) -> str | None:
        return token.get("content") if isinstance(token, dict) else token

    def _token_id(self, token) -> int | None:
        token = self._content(token)  # AddedToken form: {"content": "<|endoftext|>", ...}
        return self.tokenizer.token_to_id(token) if token else None

    def encode(self, text: str, special_tokens: bool = True) -> list[int]:
        """special_tokens: the tokenizer's post-processor adds its BOS/EOS where it has them (a chat
        prompt already holds them, written by the template)."""
        return self.tokenizer.encode(text, add_special_tokens=special_tokens).ids

    def chat_prompt(self, message: str) -> str:
        """One user message as the prompt of the model's chat template, ending where the assistant's turn starts."""
        if not self.chat_template:
            raise UsageError("this model has no chat template (no chat_template.jinja, no chat_template in "
                             "tokenizer_config.json)", "pass the text as --prompt instead of --chat")
        from gptkiln.runtime.chat import render

        return render(self.chat_template, [{"role": "user", "content": message}], self.special_tokens)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
