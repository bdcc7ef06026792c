"""The measurements of one engine: prefill, time to first token, decode tokens/s, peak memory.

Each variant runs in its own process (a Worker), so the peak resident memory is its own. The
workers load once and are then measured in rounds, every variant once per round (this machine is
shared and noisy: a whole row moves 20% between runs minutes apart, so variants measured one after
another are not comparable). Each round warms up first; every figure is the median over the
rounds' samples, with the min and max beside it.
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import statistics
import subprocess
import sys
import tempfile
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
PREFILL_SAMPLES = 2  # per round


@dataclass(frozen=True)
class BenchSettings:
    threads: int
    prompt_tokens: int = 128
    new_tokens: int = 128
    batches: tuple[int, ...] = (1, 8)
    repeats: int = 3  # rounds: every variant is measured once per round
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
    spec: dict | None = None  # its model's DecoderSpec where it is not the run's (a pruned model): the cache's size


def available_cores() -> int:
    """The cores this process may run on (its affinity where the OS has one): the default thread count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def measure_round(runner: Runner, encode: Callable[[], list[int]], settings: BenchSettings) -> dict:
    """One round's samples, on the runner in this process: prefill and TTFT at batch 1 (ms) and the
    seconds of `new_tokens` decode steps at each batch size."""
    prompt = _prompt_ids(encode, settings.prompt_tokens)
    for _ in range(settings.warmup):
        for batch in settings.batches:
            _decode(runner, prompt, batch, WARMUP_DECODE_STEPS)
    prefill, ttft = [], []
    for _ in range(PREFILL_SAMPLES):  # prefill is short: a few more samples cost little
        inputs, cache = _inputs(prompt, 1), runner.empty_cache(1)
        started = time.perf_counter()
        runner.prefill(*inputs, cache)
        prefill.append((time.perf_counter() - started) * 1e3)
        started = time.perf_counter()
        logits, _ = runner.prefill(*_inputs(_prompt_ids(encode, settings.prompt_tokens), 1), runner.empty_cache(1))
        int(logits[0, -1].argmax())
        ttft.append((time.perf_counter() - started) * 1e3)
    decode = {str(batch): [_decode(runner, prompt, batch, settings.new_tokens)] for batch in settings.batches}
    return {"prefill_ms": prefill, "ttft_ms": ttft, "decode_s": decode}


def summarize(rounds: list[dict], settings: BenchSettings) -> dict:
    """The rounds' samples as medians with their spread; decode as tokens/s and ms per step."""
    def samples(key: str) -> list[float]:
        return [value for sample in rounds for value in sample[key]]

    decode = {}
    for batch in map(str, settings.batches):
        seconds = [value for sample in rounds for value in sample["decode_s"][batch]]
        decode[batch] = {"tokens_per_s": spread([int(batch) * settings.new_tokens / s for s in seconds]),
                         "step_ms": statistics.median(seconds) * 1e3 / settings.new_tokens}
    return {"prefill_ms": spread(samples("prefill_ms")), "ttft_ms": spread(samples("ttft_ms")), "decode": decode,
            "rounds": len(rounds)}


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
    logits, cache = runner.prefill(*_inputs(prompt, batch), runner.empty_cache(batch, len(prompt) + steps))
    mask = np.ones((batch, len(prompt) + steps), np.int64)
    started = time.perf_counter()
    for step in range(steps):
        tokens = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        position = np.full((batch, 1), len(prompt) + step, np.int64)
        logits, cache = runner.step(tokens, mask[:, :len(prompt) + step + 1], position, cache, last_only=True)
    return time.perf_counter() - started


class Worker:
    """A variant loaded in a fresh interpreter that imports only what its loader needs (so its peak memory is
    its own), measured one round at a time; its errors come back as the same gptkiln errors."""

    def __init__(self, variant: Variant, settings: BenchSettings, prompt_text: str, tokenizer_dir: Path):
        self.variant = variant
        self.log = tempfile.TemporaryFile()  # the child's stderr: a pipe nobody reads could fill and stall it
        self.process = subprocess.Popen([sys.executable, "-m", "gptkiln.bench.measure"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self.log)
        pickle.dump((variant, settings, prompt_text, str(tokenizer_dir)), self.process.stdin)
        self.process.stdin.flush()
        self.loaded = self._reply()  # {"load_s", "facts"}

    def round(self) -> dict:
        return self._ask("round")

    def finish(self) -> dict:
        """Stop the child; its load time, facts and peak memory."""
        try:
            return {**self.loaded, **self._ask("finish")}
        finally:
            self.close()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.log.close()

    def _ask(self, command: str) -> dict:
        self.process.stdin.write(f"{command}\n".encode())
        self.process.stdin.flush()
        return self._reply()

    def _reply(self) -> dict:
        line = self.process.stdout.readline().decode(errors="replace").strip()
        if not line:
            self.process.wait()
            self.log.seek(0)
            tail = " | ".join(self.log.read().decode(errors="replace").strip().splitlines()[-3:])
            self.log.close()
            raise errors.GptkilnError(f"measuring {self.variant.name} {self.variant.precision} failed "
                                      f"(exit {self.process.returncode}): {tail}", "report this with the command line")
        outcome = json.loads(line)
        if "error" in outcome:
            self.close()
            error = outcome["error"]
            raise getattr(errors, error["type"], errors.GptkilnError)(error["cause"], error["fix"])
        return outcome


def _serve(variant: Variant, settings: BenchSettings, prompt_text: str, tokenizer_dir: str) -> None:
    """The child of a Worker: load, then answer each command on stdin with one JSON line on stdout."""
    from gptkiln.runtime.text import TextCodec

    def reply(body: dict) -> None:
        print(json.dumps(body), flush=True)

    try:
        started = time.perf_counter()
        runner, facts = variant.load(settings.threads)
        reply({"load_s": time.perf_counter() - started, "facts": facts})
        encode = partial(TextCodec(Path(tokenizer_dir)).encode, prompt_text)
        for command in sys.stdin.buffer:
            if command.strip() == b"finish":
                reply({"peak_rss_mb": peak_rss_mb()})
                return
            reply(measure_round(runner, encode, settings))
    except errors.GptkilnError as error:
        reply({"error": error.to_dict()})


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux: VmHWM, which starts afresh at exec; ru_maxrss would
    carry the parent's peak over into a spawned child."""
    status = Path("/proc/self/status")
    if status.is_file():
        line = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


if __name__ == "__main__":  # a Worker's child: a pickled job, then one command per line, on stdin
    _serve(*pickle.load(sys.stdin.buffer))
