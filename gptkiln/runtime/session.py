"""Open a built output directory and generate text from it: tokenizer + one target's Runner."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gptkiln.errors import ArtifactError, UsageError
from gptkiln.manifest import read_manifest
from gptkiln.models.spec import DecoderSpec
from gptkiln.runtime.generate import GenerationConfig, generate
from gptkiln.targets import Runner, get_target


@dataclass
class Session:
    target: str
    runner: Runner
    tokenizer: object

    def complete(self, prompts: list[str], config: GenerationConfig) -> list[str]:
        tok = self.tokenizer
        config = GenerationConfig(**{**vars(config), "eos_token_id": tok.eos_token_id,
                                     "pad_token_id": tok.pad_token_id or 0})
        ids = [tok(prompt)["input_ids"] for prompt in prompts]
        if any(not row for row in ids):
            raise UsageError("a prompt is empty after tokenization", "pass non-empty prompts")
        return [tok.decode(new, skip_special_tokens=True) for new in generate(self.runner, ids, config)]


def open_output(output: Path, target: str | None = None) -> Session:
    from transformers import AutoTokenizer

    manifest = read_manifest(output)
    built = [name for name, result in manifest["targets"].items() if result.get("compiled", True)]
    if not built:
        raise ArtifactError(f"'{output}' holds no compiled target (only ONNX prepared for another machine)",
                            "export again with a --target this machine runs, or run it where the engine was built")
    name = target or built[0]
    if name not in built:
        raise UsageError(f"'{output}' has no '{name}' build", f"use one of: {', '.join(built)}")
    spec = DecoderSpec(**manifest["spec"])
    tokenizer = AutoTokenizer.from_pretrained(output)
    tokenizer.padding_side = "left"
    return Session(name, get_target(name).load(output / name, spec), tokenizer)
