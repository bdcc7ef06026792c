"""Greedy and sampled generation over any Runner, batched with left padding."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from gptkiln.errors import UsageError
from gptkiln.targets.base import Runner


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1.0: no nucleus filter
    seed: int = 0
    eos_token_ids: tuple[int, ...] = ()  # stop a row when it emits one of these
    pad_token_id: int = 0

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise UsageError(f"max new tokens must be >= 1, got {self.max_new_tokens}", "pass a positive count")
        if self.do_sample and self.temperature <= 0:
            raise UsageError(f"temperature must be > 0 when sampling, got {self.temperature}",
                             "pass a positive temperature, or use greedy decoding")
        if not 0 < self.top_p <= 1 or self.top_k < 0:
            raise UsageError(f"top_p must be in (0, 1] and top_k >= 0, got {self.top_p}, {self.top_k}",
                             "fix the sampling options")


@dataclass
class Batch:
    """A left-padded batch: the contract's prefill inputs."""

    input_ids: np.ndarray  # [batch, seq] int64
    attention_mask: np.ndarray  # [batch, seq] int64, 0 on padding
    position_ids: np.ndarray  # [batch, seq] int64, counting from each row's first real token


def left_pad(prompts: list[list[int]], pad_token_id: int, width: int | None = None) -> Batch:
    """The prompts left-padded to the longest one, or to `width` (at least that long)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UsageError("every prompt needs at least one token", "pass non-empty prompts")
    width = max([len(p) for p in prompts] + [width or 0])
    input_ids = np.full((len(prompts), width), pad_token_id, dtype=np.int64)
    attention_mask = np.zeros((len(prompts), width), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = prompt
        attention_mask[row, width - len(prompt):] = 1
    position_ids = np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0)
    return Batch(input_ids, attention_mask, position_ids)


def generate(runner: Runner, prompts: list[list[int]], config: GenerationConfig,
             on_token: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """Return the new tokens of each prompt (up to and including EOS); on_token(row, token) sees each one as it
    is chosen."""
    config.validate()
    longest = max((len(p) for p in prompts), default=0)
    if longest + config.max_new_tokens > runner.spec.max_positions:
        raise UsageError(f"a {longest}-token prompt plus {config.max_new_tokens} new tokens exceeds the model's "
                         f"{runner.spec.max_positions} positions",
                         "shorten the prompt or lower --max-new-tokens")
    batch = left_pad(prompts, config.pad_token_id)
    rng = np.random.default_rng(config.seed)
    cache = runner.empty_cache(len(prompts), batch.input_ids.shape[1] + config.max_new_tokens)
    logits, cache = runner.prefill(batch.input_ids, batch.attention_mask, batch.position_ids, cache)
    attention_mask = batch.attention_mask
    positions = batch.position_ids[:, -1:]
    finished = np.zeros(len(prompts), dtype=bool)
    new_tokens: list[list[int]] = [[] for _ in prompts]
    for step in range(config.max_new_tokens):
        tokens = choose_next(logits[:, -1, :], config, rng)
        tokens = np.where(finished, config.pad_token_id, tokens)
        for row, token in enumerate(tokens):
            if not finished[row]:
                new_tokens[row].append(int(token))
                if on_token:
                    on_token(row, int(token))
        finished |= np.isin(tokens, config.eos_token_ids)
        if finished.all() or step == config.max_new_tokens - 1:
            break
        attention_mask = np.concatenate([attention_mask, np.ones((len(prompts), 1), np.int64)], axis=1)
        positions = positions + 1
        logits, cache = runner.step(tokens[:, None].astype(np.int64), attention_mask, positions, cache, last_only=True)
    return new_tokens


def choose_next(logits: np.ndarray, config: GenerationConfig, rng: np.random.Generator) -> np.ndarray:
    """logits [batch, vocab] -> next token per row."""
    if not config.do_sample:
        return logits.argmax(axis=-1)
    scores = logits.astype(np.float64) / config.temperature
    if config.top_k:
        kth = np.sort(scores, axis=-1)[:, -min(config.top_k, scores.shape[-1])][:, None]
        scores = np.where(scores < kth, -np.inf, scores)
    probs = softmax(scores)
    if config.top_p < 1.0:
        order = np.argsort(-probs, axis=-1)
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        # keep the smallest set whose mass reaches top_p (the top token is always kept)
        drop_sorted = np.cumsum(sorted_probs, axis=-1) - sorted_probs >= config.top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        probs = np.where(drop, 0.0, probs)
        probs = probs / probs.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(probs.shape[-1], p=row) for row in probs])


def softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)
