"""Optimization profiles derived from the KV-cache contract: one for prefill, one for decode.

TensorRT tunes kernels for each profile's `opt` shapes and accepts any shape between its
`min` and `max`. The contract ties the dimensions together: attention_mask is past + sequence
long, and no position may pass the model's context (or the engine's --trt-max-seq), so every
profile is built from three ranges (batch, sequence, past) and the mask range follows from them.

- prefill: a prompt of 1..max_seq tokens, optimized for `opt_prompt`; past 0..max_seq-1 so a
  prompt can also be fed in chunks, optimized for 0.
- decode: one token against a cache of 0..max_seq-1, optimized for `opt_prompt` + half of it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from gptkiln.config import EngineSettings
from gptkiln.errors import UsageError
from gptkiln.exporter import io_spec
from gptkiln.models.spec import DecoderSpec

PREFILL, DECODE = "prefill", "decode"


@dataclass(frozen=True)
class DimRange:
    min: int
    opt: int
    max: int

    def __post_init__(self):
        if not 0 <= self.min <= self.opt <= self.max:
            raise ValueError(f"need 0 <= min <= opt <= max, got {self}")

    def __contains__(self, size: int) -> bool:
        return self.min <= size <= self.max


@dataclass(frozen=True)
class Profile:
    name: str
    batch: DimRange
    sequence: DimRange
    past: DimRange
    max_total: int  # past + sequence never passes this (the model's context, or --trt-max-seq)

    @property
    def total(self) -> DimRange:
        """attention_mask's length: past + sequence, capped by the context."""
        return DimRange(self.past.min + self.sequence.min, min(self.past.opt + self.sequence.opt, self.max_total),
                        min(self.past.max + self.sequence.max, self.max_total))

    def covers(self, batch: int, sequence: int, past: int) -> bool:
        return batch in self.batch and sequence in self.sequence and past in self.past and past + sequence <= self.max_total

    def shapes(self, spec: DecoderSpec) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """input name -> (min, opt, max) shapes, as TensorRT's IOptimizationProfile.set_shape takes them."""
        def shape(dims):
            return tuple(tuple(getattr(d, which) if isinstance(d, DimRange) else d for d in dims)
                         for which in ("min", "opt", "max"))

        tokens = shape((self.batch, self.sequence))
        kv = shape((self.batch, spec.num_kv_heads, self.past, spec.head_dim))
        return {"input_ids": tokens, "attention_mask": shape((self.batch, self.total)), "position_ids": tokens,
                **{name: kv for name in io_spec.past_names(spec.num_layers)}}

    def to_dict(self) -> dict:
        return {"name": self.name, "batch": asdict(self.batch), "sequence": asdict(self.sequence),
                "past": asdict(self.past), "attention_mask": asdict(self.total), "max_total": self.max_total}

    @classmethod
    def from_dict(cls, data: dict) -> "Profile":
        return cls(data["name"], DimRange(**data["batch"]), DimRange(**data["sequence"]), DimRange(**data["past"]),
                   data["max_total"])


def check_settings(settings: EngineSettings) -> None:
    """What can be checked before the model is loaded (the context length needs its config)."""
    if not 1 <= settings.opt_batch <= settings.max_batch or settings.opt_prompt < 1:
        raise UsageError(f"need 1 <= --trt-opt-batch ({settings.opt_batch}) <= --trt-max-batch ({settings.max_batch}) "
                         f"and --trt-opt-prompt >= 1 ({settings.opt_prompt})", "fix the option values")


def derive_profiles(spec: DecoderSpec, settings: EngineSettings) -> list[Profile]:
    """[prefill, decode] for this model and settings; a setting the model cannot honour is a UsageError."""
    check_settings(settings)
    max_total = settings.max_seq or spec.max_positions
    if not 2 <= max_total <= spec.max_positions:
        raise UsageError(f"--trt-max-seq {max_total} is outside 2..{spec.max_positions} (the model's context)",
                         f"pass a length up to {spec.max_positions}")
    opt_prompt = min(settings.opt_prompt, max_total)
    batch = DimRange(1, settings.opt_batch, settings.max_batch)
    prefill = Profile(PREFILL, batch, DimRange(1, opt_prompt, max_total), DimRange(0, 0, max_total - 1), max_total)
    decode_past = min(opt_prompt + opt_prompt // 2, max_total - 1)
    decode = Profile(DECODE, batch, DimRange(1, 1, 1), DimRange(0, decode_past, max_total - 1), max_total)
    return [prefill, decode]


def select_profile(profiles: list[Profile], batch: int, sequence: int, past: int) -> int:
    """The profile a step runs with: decode for single tokens, prefill otherwise."""
    preferred = DECODE if sequence == 1 else PREFILL
    order = sorted(range(len(profiles)), key=lambda i: profiles[i].name != preferred)
    for index in order:
        if profiles[index].covers(batch, sequence, past):
            return index
    limits = profiles[0]
    raise UsageError(f"this TensorRT engine runs batches up to {limits.batch.max} and up to {limits.max_total} "
                     f"tokens of context; the step asks for batch {batch} with {past} + {sequence} tokens",
                     "build the engine again with a larger --trt-max-batch / --trt-max-seq")
