"""The measurements of one engine: prefill, time to first token, decode tokens/s, peak memory.

Each variant runs in a fresh process, so the peak resident memory is its own and no
variant warms the caches of the next. Warm-up runs first; every figure is the median
over repeats, with the min and max beside it.
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np

from gptkiln import errors
from gptkiln.errors import UsageError
from gptkiln.runtime.generate import left_pad
from gptkiln.targets.base import Runner

WARMUP_DECODE_STEPS = 8


@dataclass(frozen=True)
class BenchSettings:
    threads: int
    prompt_tokens: int = 128
    new_tokens: int = 128
    batches: tuple[int, ...] = (1, 8)
    repeats: int = 3
    warmup: int = 1

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self, max_positions: int | None = None) -> None:
        if min(self.threads, self.prompt_tokens, self.new_tokens, self.repeats, *self.batches) < 1 or self.warmup < 0:
            raise UsageError("--threads, --prompt-tokens, --new-tokens, --repeats and --batch must be >= 1, "
                             "--warmup >= 0", "fix the option values")
        if max_positions is not None and self.prompt_tokens + self.new_tokens > max_positions:
            raise UsageError(f"{self.prompt_tokens} prompt + {self.new_tokens} new tokens exceed the model's "
                             f"{max_positions} positions", "lower --prompt-tokens or --new-tokens")


@dataclass(frozen=True)
class Variant:
    """One engine to measure. `load(threads)` returns (runner, facts): facts may set `weight_bytes` and
    `kv_element_bytes` where only the loaded engine knows them. It is called in the child process, so it
    must be picklable (a module-level function or a functools.partial of one)."""

    name: str  # the row's label: a target, "pytorch eager", a tool's export
    precision: str
    load: Callable[[int], tuple[Runner, dict]]
    output: str | None = None  # the gptkiln output it came from (None: PyTorch, another tool's export)
    target: str | None = None  # the gptkiln target that built it
    artifact_bytes: int | None = None
    weight_bytes: int | None = None  # per decode step, from the files (None: the loader reports it)
    kv_element_bytes: int = 4  # the KV cache's element size at run time


def available_cores() -> int:
    """The cores this process may run on (its affinity where the OS has one): the default thread count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def measure(runner: Runner, encode: Callable[[], list[int]], settings: BenchSettings) -> dict:
    """Prefill and TTFT at batch 1 and decode at each batch size, on the runner in this process."""
    prompt = _prompt_ids(encode, settings.prompt_tokens)
    for _ in range(settings.warmup):
        for batch in settings.batches:
            _decode(runner, prompt, batch, WARMUP_DECODE_STEPS)
    prefill, ttft = [], []
    for _ in range(max(settings.repeats, 5)):  # prefill is short: a few more samples cost little
        inputs, cache = _inputs(prompt, 1), runner.empty_cache(1)
        started = time.perf_counter()
        runner.step(*inputs, cache)
        prefill.append((time.perf_counter() - started) * 1e3)
        started = time.perf_counter()
        logits, _ = runner.step(*_inputs(_prompt_ids(encode, settings.prompt_tokens), 1), runner.empty_cache(1))
        int(logits[0, -1].argmax())
        ttft.append((time.perf_counter() - started) * 1e3)
    decode = {}
    for batch in settings.batches:
        seconds = [_decode(runner, prompt, batch, settings.new_tokens) for _ in range(settings.repeats)]
        decode[str(batch)] = {"tokens_per_s": spread([batch * settings.new_tokens / s for s in seconds]),
                              "step_ms": statistics.median(seconds) * 1e3 / settings.new_tokens}
    return {"prefill_ms": spread(prefill), "ttft_ms": spread(ttft), "decode": decode}


def _prompt_ids(encode: Callable[[], list[int]], length: int) -> list[int]:
    ids = encode()
    if len(ids) < length:
        raise UsageError(f"the prompt text has {len(ids)} tokens, fewer than --prompt-tokens {length}",
                         "lower --prompt-tokens")
    return ids[:length]


def _inputs(prompt: list[int], batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The prefill inputs of `prompt` in every row (equal lengths: no padding)."""
    inputs = left_pad([prompt] * batch, pad_token_id=0)
    return inputs.input_ids, inputs.attention_mask, inputs.position_ids


def _decode(runner: Runner, prompt: list[int], batch: int, steps: int) -> float:
    """Seconds for `steps` greedy decode steps (argmax included) after a prefill of `prompt` in every row."""
    logits, cache = runner.step(*_inputs(prompt, batch), runner.empty_cache(batch))
    mask = np.ones((batch, len(prompt) + steps), np.int64)
    started = time.perf_counter()
    for step in range(steps):
        tokens = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        position = np.full((batch, 1), len(prompt) + step, np.int64)
        logits, cache = runner.step(tokens, mask[:, :len(prompt) + step + 1], position, cache)
    return time.perf_counter() - started


def run_in_child(variant: Variant, settings: BenchSettings, prompt_text: str, tokenizer_dir: Path) -> dict:
    """Measure `variant` in a fresh interpreter that imports only what its loader needs (so its peak memory
    is its own); its errors come back as the same gptkiln errors."""
    job = pickle.dumps((variant, settings, prompt_text, str(tokenizer_dir)))
    done = subprocess.run([sys.executable, "-m", "gptkiln.bench.measure"], input=job, capture_output=True)
    lines = done.stdout.decode(errors="replace").strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = " | ".join(done.stderr.decode(errors="replace").strip().splitlines()[-3:])
        raise errors.GptkilnError(f"measuring {variant.name} {variant.precision} failed "
                                  f"(exit {done.returncode}): {tail}", "report this with the command line")
    outcome = json.loads(lines[-1])
    if "error" in outcome:
        error = outcome["error"]
        raise getattr(errors, error["type"], errors.GptkilnError)(error["cause"], error["fix"])
    return outcome


def _child(variant: Variant, settings: BenchSettings, prompt_text: str, tokenizer_dir: str) -> dict:
    from gptkiln.runtime.text import TextCodec

    try:
        started = time.perf_counter()
        runner, facts = variant.load(settings.threads)
        load_seconds = time.perf_counter() - started
        codec = TextCodec(Path(tokenizer_dir))
        numbers = measure(runner, partial(codec.encode, prompt_text), settings)
    except errors.GptkilnError as error:
        return {"error": error.to_dict()}
    return {"load_s": load_seconds, "facts": facts, "peak_rss_mb": peak_rss_mb(), **numbers}


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux: VmHWM, which starts afresh at exec; ru_maxrss would
    carry the parent's peak over into a spawned child."""
    status = Path("/proc/self/status")
    if status.is_file():
        line = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


if __name__ == "__main__":  # the child of run_in_child: a pickled job on stdin, one JSON line on stdout
    print(json.dumps(_child(*pickle.load(sys.stdin.buffer))))
