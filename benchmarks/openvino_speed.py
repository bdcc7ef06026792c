"""OpenVINO CPU: gptkiln's IRs against optimum-intel's export of the same weights and PyTorch eager.

    python benchmarks/openvino_speed.py --model HF_DIR --gptkiln DIR --optimum DIR [--rounds 2]

--model: the Hugging Face directory both exports came from (PyTorch eager runs it);
--gptkiln: one subdirectory per variant, each a gptkiln OpenVINO engine (DIR/<name>/openvino/openvino_model.xml);
--optimum: one subdirectory per variant of `optimum-cli export openvino` output
  (DIR/<name>/openvino_model.xml); optimum-intel needs transformers < 5.6, so it runs in its
  own venv (benchmarks/RESULTS.md has the commands).

Every variant runs in a fresh child process (so peak RSS is its own), --rounds times,
interleaved (the machine is noisy; the table shows the median over rounds): prefill batch 1 x
128 tokens (median of --repeats), then decode --new-tokens greedy tokens on the KV cache at
batch 1 and 8 (median step time; tok/s = batch / step). All OpenVINO variants get the same compile
config: f32 inference and KV-cache precision (gptkiln's parity setting; optimum's IRs would
otherwise pick an f16/u8 cache from their rt_info or the plugin default), LATENCY hint, the
same thread count. Writes benchmarks/results/openvino_speed.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tables import markdown_table

HERE = Path(__file__).parent
PROMPT = 128


def measure(runner, vocab: int, new_tokens: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    result = {}
    for batch in (1, 8):
        ids = rng.integers(0, min(vocab, 4096), (batch, PROMPT))
        positions = np.broadcast_to(np.arange(PROMPT), ids.shape).copy()
        prefill, steps = [], []
        for _ in range(repeats):
            cache = runner.empty_cache(batch)
            started = time.perf_counter()
            logits, cache = runner.step(ids, np.ones_like(ids), positions, cache)
            prefill.append((time.perf_counter() - started) * 1e3)
        for step in range(new_tokens):
            token = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
            mask = np.ones((batch, PROMPT + step + 1), np.int64)
            started = time.perf_counter()
            logits, cache = runner.step(token, mask, np.full((batch, 1), PROMPT + step), cache)
            steps.append((time.perf_counter() - started) * 1e3)
        step_ms = statistics.median(steps[3:])
        result[f"b{batch}"] = {"prefill_ms": statistics.median(prefill), "decode_step_ms": step_ms,
                               "decode_tokens_per_s": batch * 1e3 / step_ms,
                               "decode_p10_p90_ms": [float(np.percentile(steps[3:], 10)), float(np.percentile(steps[3:], 90))]}
    return result


def child(kind: str, path: str, model_dir: str, threads: int, new_tokens: int, repeats: int) -> dict:
    from transformers import AutoConfig

    from gptkiln.models.spec import decoder_spec

    spec = decoder_spec(AutoConfig.from_pretrained(model_dir))
    if kind == "torch":
        import torch
        from transformers import AutoModelForCausalLM

        from gptkiln.runtime.torch_runner import TorchRunner

        torch.set_num_threads(threads)
        runner, size = TorchRunner(AutoModelForCausalLM.from_pretrained(model_dir).eval(), spec), None
    else:
        from gptkiln.config import RuntimeSettings
        from gptkiln.targets.openvino import compile_config, ir_runner

        xml = Path(path)
        runner = ir_runner(xml, spec, compile_config(RuntimeSettings(threads=threads)))
        size = xml.with_suffix(".bin").stat().st_size / 1e6
    numbers = measure(runner, spec.vocab_size, new_tokens, repeats)
    return {"ir_mb": size, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **numbers}


def variants(args) -> dict[str, tuple[str, str]]:
    found = {"pytorch eager fp32": ("torch", "")}
    for name in sorted(p.name for p in Path(args.gptkiln).iterdir()):
        found[f"gptkiln {name}"] = ("openvino", str(Path(args.gptkiln) / name / "openvino" / "openvino_model.xml"))
    for name in sorted(p.name for p in Path(args.optimum).iterdir()):
        found[f"optimum-intel {name}"] = ("openvino", str(Path(args.optimum) / name / "openvino_model.xml"))
    return found


def median_over_rounds(rounds: list[dict]) -> dict:
    """Per field, the median over rounds (nested dicts of numbers)."""
    first = rounds[0]
    if isinstance(first, dict):
        return {key: median_over_rounds([r[key] for r in rounds]) for key in first}
    if isinstance(first, list):
        return [statistics.median(values) for values in zip(*rounds)]
    return None if first is None else statistics.median(rounds)


def table(results: dict, eager: float) -> str:
    rows = [[name, f"{r['ir_mb']:.0f}" if r["ir_mb"] else "-", f"{r['peak_rss_mb']:.0f}", f"{r['b1']['prefill_ms']:.1f}",
             f"{r['b1']['decode_tokens_per_s']:.1f}", f"{r['b8']['decode_tokens_per_s']:.1f}",
             f"{r['b1']['decode_tokens_per_s'] / eager:.2f}x"] for name, r in results.items()]
    return markdown_table(["variant", "IR MB", "peak RSS MB", "prefill b1 ms", "decode b1 tok/s", "decode b8 tok/s",
                           "b1 vs eager"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--gptkiln", required=True)
    parser.add_argument("--optimum", required=True)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.model, args.threads, args.new_tokens, args.repeats)))
        return
    rounds: dict[str, list[dict]] = {}
    for round_index in range(args.rounds):
        for name, (kind, path) in variants(args).items():
            print(f"round {round_index + 1}: {name} ...", file=sys.stderr, flush=True)
            out = subprocess.run([sys.executable, __file__, "--model", args.model, "--gptkiln", args.gptkiln,
                                  "--optimum", args.optimum, "--threads", str(args.threads),
                                  "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
                                  "--child", kind, path], check=True, capture_output=True, text=True).stdout
            rounds.setdefault(name, []).append(json.loads(out.strip().splitlines()[-1]))
    results = {name: median_over_rounds(runs) for name, runs in rounds.items()}
    eager = results["pytorch eager fp32"]["b1"]["decode_tokens_per_s"]
    record = {"threads": args.threads, "new_tokens": args.new_tokens, "rounds": rounds, "results": results}
    (HERE / "results" / "openvino_speed.json").write_text(json.dumps(record, indent=2) + "\n")
    print(table(results, eager))


if __name__ == "__main__":
    main()
