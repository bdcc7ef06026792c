"""Open a built output directory and generate text from it: tokenizer + one target's Runner."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from gptkiln.errors import ArtifactError, UsageError
from gptkiln.manifest import read_manifest
from gptkiln.models.spec import DecoderSpec
from gptkiln.runtime.generate import GenerationConfig, generate
from gptkiln.runtime.text import TextCodec
from gptkiln.targets import Runner, get_target


@dataclass
class Session:
    target: str
    runner: Runner
    codec: TextCodec

    def complete(self, prompts: list[str], config: GenerationConfig, chat: bool = False,
                 stream: Callable[[str], None] | None = None) -> list[str]:
        """The completion of each prompt. chat: each prompt is a user message, put through the model's chat
        template. stream: called with each new piece of text of a single prompt as it is generated."""
        if stream and len(prompts) != 1:
            raise UsageError("streaming prints one completion as it is generated", "pass one prompt to stream it")
        config = replace(config, eos_token_ids=self.codec.eos_token_ids, pad_token_id=self.codec.pad_token_id)
        texts = [self.codec.chat_prompt(prompt) for prompt in prompts] if chat else prompts
        ids = [self.codec.encode(text, special_tokens=not chat) for text in texts]
        if any(not row for row in ids):
            raise UsageError("a prompt is empty after tokenization", "pass non-empty prompts")
        on_token = _TextStream(self.codec, stream) if stream else None
        return [self.codec.decode(new) for new in generate(self.runner, ids, config, on_token)]


class _TextStream:
    """Token ids in, new text out: decodes the whole completion so far and passes on what it adds (a token
    may end in the middle of a UTF-8 character, which the next one completes)."""

    def __init__(self, codec: TextCodec, write: Callable[[str], None]):
        self.codec, self.write = codec, write
        self.ids: list[int] = []
        self.written = ""

    def __call__(self, row: int, token: int) -> None:
        self.ids.append(token)
        text = self.codec.decode(self.ids)
        if text.endswith("\ufffd"):
            return  # an unfinished character
        self.write(text[len(self.written):])
        self.written = text


def open_output(output: Path, target: str | None = None) -> Session:
    manifest = read_manifest(output)
    built = [name for name, result in manifest["targets"].items() if result.get("compiled", True)]
    if not built:
        raise ArtifactError(f"'{output}' holds no compiled target (only ONNX prepared for another machine)",
                            "export again with a --target this machine runs, or run it where the engine was built")
    name = target or built[0]
    if name not in built:
        raise UsageError(f"'{output}' has no '{name}' build", f"use one of: {', '.join(built)}")
    spec = DecoderSpec.from_dict(manifest["spec"])
    return Session(name, get_target(name).load(output / name, spec), TextCodec(output))
