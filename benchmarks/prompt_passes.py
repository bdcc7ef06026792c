"""A prompt in one pass against Runner.prefill's passes: prefill time, interleaved rounds, per built target.

    python benchmarks/prompt_passes.py OUT[:TARGET] ... [--shapes 1x128,1x2048,8x128,8x512] [--rounds 5]
        [--threads 2] [--json FILE]

Each target runs in its own process; in every round each shape (batch x prompt tokens, random ids, no padding) is
prefilled once in one pass and once in passes of the runner's PROMPT_PASS_TOKENS, in alternating order. Medians
(min-max) in ms. Peak memory needs a fresh process per setting: benchmarks/engine_memory.py --prompt-pass-tokens.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from gptkiln.bench.measure import spread

from engine_memory import targets_of
from tables import markdown_table


def measure(output: Path, target: str, shapes: list[tuple[int, int]], rounds: int, threads: int) -> dict:
    import numpy as np

    from gptkiln.manifest import read_manifest
    from gptkiln.models.spec import DecoderSpec
    from gptkiln.targets import get_target

    spec = DecoderSpec.from_dict(read_manifest(output)["spec"])
    runner = get_target(target).load(output / target, spec, threads)
    passes = runner.prompt_pass_tokens
    rng = np.random.default_rng(0)

    def prefill(batch: int, length: int, pass_tokens: int | None) -> float:
        runner.prompt_pass_tokens = pass_tokens
        ids = rng.integers(100, spec.vocab_size - 1, (batch, length))
        cache = runner.empty_cache(batch, length + 1)
        started = time.perf_counter()
        runner.prefill(ids, np.ones_like(ids), np.tile(np.arange(length), (batch, 1)), cache)
        return (time.perf_counter() - started) * 1e3

    samples = {f"{b}x{n}": {"one pass": [], "passes": []} for b, n in shapes}
    for b, n in shapes:  # warm-up
        prefill(b, n, passes)
    for round_index in range(rounds):
        for b, n in shapes:
            order = [("one pass", None), ("passes", passes)][::1 if round_index % 2 else -1]
            for name, pass_tokens in order:
                samples[f"{b}x{n}"][name].append(prefill(b, n, pass_tokens))
    return {"pass_tokens": passes, "samples": samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outputs", nargs="+", help="OUT or OUT:TARGET")
    parser.add_argument("--shapes", default="1x128,1x2048,8x128,8x512", help="batch x prompt tokens, comma-separated")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the samples here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shapes = [tuple(int(x) for x in shape.split("x")) for shape in args.shapes.split(",")]
    if args.child:
        output, _, target = args.outputs[0].rpartition(":")
        print(json.dumps(measure(Path(output), target, shapes, args.rounds, args.threads)))
        return
    results, rows = {}, []
    for spec in args.outputs:
        for output, target in targets_of(spec):
            child = subprocess.run([sys.executable, __file__, "--child", f"{output}:{target}", "--shapes", args.shapes,
                                    "--rounds", str(args.rounds), "--threads", str(args.threads)],
                                   capture_output=True, text=True, check=True)
            result = results[f"{output}:{target}"] = json.loads(child.stdout.strip().splitlines()[-1])
            for shape, sample in result["samples"].items():
                one, passes = (spread(sample[k]) for k in ("one pass", "passes"))
                rows.append([f"{output.name}:{target}", shape, *(f"{s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f})"
                                                                  for s in (one, passes)),
                             f"{one['median'] / passes['median']:.2f}x"])
    print(markdown_table(["engine", "batch x prompt", "one pass ms", "passes ms", "speed-up"], rows))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
