"""Open a built output directory and generate text from it: tokenizer + one target's Runner."""

from __future__ import annotations

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

    def complete(self, prompts: list[str], config: GenerationConfig) -> list[str]:
        config = replace(config, eos_token_id=self.codec.eos_token_id, pad_token_id=self.codec.pad_token_id)
        ids = [self.codec.encode(prompt) for prompt in prompts]
        if any(not row for row in ids):
            raise UsageError("a prompt is empty after tokenization", "pass non-empty prompts")
        return [self.codec.decode(new) for new in generate(self.runner, ids, config)]


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
