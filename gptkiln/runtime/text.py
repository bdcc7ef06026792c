"""Text <-> token ids from the saved tokenizer files, with the `tokenizers` library alone.

Generation from a built output or a bundle needs no transformers and no torch: tokenizer.json
holds the whole fast tokenizer (normalizer, pre-tokenizer, model, post-processor), and
tokenizer_config.json names the end-of-text and padding tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

from gptkiln.errors import ArtifactError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"


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
        self.eos_token_id = self._token_id(config.get("eos_token"))
        pad = self._token_id(config.get("pad_token"))
        self.pad_token_id = pad if pad is not None else (self.eos_token_id or 0)

    def _token_id(self, token) -> int | None:
        if isinstance(token, dict):  # AddedToken form: {"content": "<|endoftext|>", ...}
            token = token.get("content")
        return self.tokenizer.token_to_id(token) if token else None

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
