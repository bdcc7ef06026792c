"""gptkiln's OpenVINO engine against optimum-intel's IR of the same weights, in one process, rounds interleaved.

    python benchmarks/openvino_interleaved.py --gptkiln OUT [--optimum-intel DIR/openvino_model.xml]
                                              [--kv-cache f32 f16 u8] [--rounds 5]

`gptkiln bench` and compare_tools.py measure one variant after another, each in its own process, so
a slow spell of this shared machine lands on whole rows. Here every round runs each variant once,
so drift hits them alike. Variants: gptkiln's IR with each --kv-cache precision (default f32 and f16)
and otherwise gptkiln's default config (f32 compute, run-time int8 activations per 32 for integer weights);
optimum-intel's IR with the config its users get (its rt_info: an f16 KV cache for fp32, u8 for int8/int4) and
with gptkiln's config at each cache precision. Prefill of batch x 128 random tokens, then --steps decode
steps of forced random tokens (no argmax: the same inputs for every variant); median ms per step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from gptkiln.config import RuntimeSettings
from gptkiln.models.spec import DecoderSpec
from gptkiln.targets.openvino import IR_FILE, compile_config, ir_runner

PROMPT = 128


def step_ms(runner, ids: np.ndarray, steps: int) -> float:
    batch = ids.shape[0]
    _, cache = runner.step(ids[:, :PROMPT], np.ones((batch, PROMPT), np.int64),
                           np.tile(np.arange(PROMPT), (batch, 1)), runner.empty_cache(batch))
    started = time.perf_counter()
    for s in range(steps):
        position = PROMPT + s
        _, cache = runner.step(ids[:, position : position + 1], np.ones((batch, position + 1), np.int64),
                               np.full((batch, 1), position), cache)
    return (time.perf_counter() - started) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gptkiln", type=Path, required=True, help="a gptkiln output with the openvino target")
    parser.add_argument("--optimum-intel", type=Path, help="optimum-intel's openvino_model.xml")
    parser.add_argument("--kv-cache", nargs="+", default=["f32", "f16"], choices=["f32", "f16", "u8"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=64)
    args = parser.parse_args()
    spec = DecoderSpec.from_dict(json.loads((args.gptkiln / "manifest.json").read_text())["spec"])
    ours = str(args.gptkiln / "openvino" / IR_FILE)
    configs = {cache: compile_config(RuntimeSettings(threads=args.threads, kv_cache_precision=cache))
               for cache in args.kv_cache}
    variants = {f"gptkiln, {cache} KV cache": (ours, config) for cache, config in configs.items()}
    if args.optimum_intel:
        theirs = str(args.optimum_intel)
        variants["optimum-intel, its config"] = (theirs, {"PERFORMANCE_HINT": "LATENCY",
                                                          "INFERENCE_NUM_THREADS": args.threads})
        variants.update({f"optimum-intel, gptkiln's config, {cache} KV cache": (theirs, config)
                         for cache, config in configs.items()})
    runners = {name: ir_runner(Path(xml), spec, config) for name, (xml, config) in variants.items()}
    rng = np.random.default_rng(0)
    print("| batch | variant | ms per step, median | tok/s | rounds (ms) |\n| --- | --- | --- | --- | --- |")
    for batch in (1, 8):
        ids = rng.integers(0, spec.vocab_size, (batch, PROMPT + args.steps))
        times = {name: [] for name in runners}
        for _ in range(args.rounds):
            for name, runner in runners.items():
                times[name].append(step_ms(runner, ids, args.steps))
        for name, values in times.items():
            median = statistics.median(values)
            print(f"| {batch} | {name} | {median:.2f} | {batch * 1e3 / median:.1f} | {' '.join(f'{v:.1f}' for v in values)} |")


if __name__ == "__main__":
    main()
