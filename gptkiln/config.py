"""Frozen configuration: what to build and what must hold for the build to count as good."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path


class Precision(str, enum.Enum):
    FP32 = "fp32"


@dataclass(frozen=True)
class Tolerances:
    """The parity gate. Defaults are the fp32 bars of docs/DESIGN.md.

    ``logits_rel`` bounds max |ours - torch| divided by max |torch| over every compared
    logit (so the bar does not depend on the model's logit scale).
    """

    logits_rel: float = 1e-4
    min_top1_agreement: float = 0.99
    greedy_tokens: int = 32
    padded_rel: float = 1e-4


@dataclass(frozen=True)
class ParitySettings:
    """What parity runs: prompts are drawn from the model's tokenizer, so they are real text."""

    decode_steps: int = 16
    greedy_tokens: int = 32
    padded_batch: int = 4


@dataclass(frozen=True)
class BuildConfig:
    model: str
    output: Path
    targets: tuple[str, ...] = ("onnxruntime",)
    precision: Precision = Precision.FP32
    opset: int = 18
    force: bool = False
    tolerances: Tolerances = field(default_factory=Tolerances)
    parity: ParitySettings = field(default_factory=ParitySettings)
