"""A loaded engine's memory: each built target in a fresh process, /proc/self/status after loading, after a batch-1
prompt and its new tokens, and after the same at batch 8; against issue 18's bound, 1.3 x (weights + the KV cache).

    python benchmarks/engine_memory.py OUT[:TARGET] ... [--prompt 128] [--new-tokens 64] [--prompt-pass-tokens N]
        [--json FILE]

OUT is a built output directory (`gptkiln export`); TARGET one of its targets (default: every one it built).
Resident memory is anonymous (the heap: packed weights, caches, buffers) plus file-backed (shared libraries and
mapped weight files, clean pages the kernel may drop); the process's own imports (Python, numpy, the runtime) are
measured first and reported beside the engine's. Memory does not depend on how busy the machine is, so the
engines run one after another. The cache counted is prompt + new tokens at batch 8 in the engine's cache precision
(ONNX Runtime allocates that much up front; OpenVINO grows its state as it goes). Prompts run as generation runs
them (Runner.prefill); --prompt-pass-tokens sets the pass size (0: every prompt in one pass, as before session 45).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")
CACHE_ELEMENT_BYTES = {"f32": 4, "f16": 2, "bf16": 2, "u8": 1}


def status_mb() -> dict:
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in FIELDS:
            values[key] = int(value.split()[0]) // 1024
    return values


def measure(output: Path, target: str, prompt: int, new_tokens: int, pass_tokens: int | None) -> dict:
    """In this process: the imports, then the engine loaded and generating."""
    import importlib

    import numpy as np

    from gptkiln.manifest import read_manifest
    from gptkiln.runtime.generate import GenerationConfig, generate
    from gptkiln.targets import get_target

    importlib.import_module(get_target(target).runtime_module)
    from gptkiln.runtime.session import open_output

    row = {"imports": status_mb()}
    runner = open_output(output, target).runner
    if pass_tokens is not None:
        runner.prompt_pass_tokens = pass_tokens or None
    row["load"] = status_mb()
    ids = np.random.default_rng(0).integers(100, 10_000, size=prompt).tolist()
    config = GenerationConfig(max_new_tokens=new_tokens)  # no end-of-text id: every row runs to the end
    for batch in (1, 8):
        generate(runner, [ids] * batch, config)
        row[f"b{batch}"] = status_mb()
    manifest = read_manifest(output)
    spec = manifest["spec"]
    settings = manifest["targets"][target]["settings"]
    # OpenVINO: the IR's KV_CACHE_PRECISION; ONNX Runtime: the activations' type (fp16 engines: fp16)
    precision = settings.get("config", {}).get("KV_CACHE_PRECISION") or ("f16" if manifest["precision"] == "fp16"
                                                                         else "f32")
    cache_bytes = CACHE_ELEMENT_BYTES[precision]
    positions = prompt + new_tokens
    cache = 2 * spec["num_layers"] * 8 * spec["num_kv_heads"] * positions * spec["head_dim"] * cache_bytes
    row.update(weights_mb=settings["engine_bytes"] / 1e6, cache_b8_mb=cache / 1e6)
    return row


def run(output: Path, target: str, prompt: int, new_tokens: int, pass_tokens: int | None) -> dict:
    passes = [] if pass_tokens is None else ["--prompt-pass-tokens", str(pass_tokens)]
    child = subprocess.run([sys.executable, __file__, "--child", f"{output}:{target}", "--prompt", str(prompt),
                            "--new-tokens", str(new_tokens), *passes], capture_output=True, text=True, check=True)
    row = json.loads(child.stdout.strip().splitlines()[-1])
    engine_peak = row["b8"]["VmHWM"] - row["imports"]["VmRSS"]
    bound = 1.3 * (row["weights_mb"] + row["cache_b8_mb"])
    return {"output": str(output), "target": target, **row, "engine_peak_mb": engine_peak,
            "bound_mb": round(bound, 1), "peak_over_weights_and_cache": round(engine_peak / (bound / 1.3), 2)}


def targets_of(spec: str) -> list[tuple[Path, str]]:
    from gptkiln.manifest import read_manifest

    path, _, target = spec.partition(":")
    if target:
        return [(Path(path), target)]
    built = read_manifest(Path(path))["targets"]
    return [(Path(path), name) for name, result in built.items() if result.get("compiled", True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outputs", nargs="+", help="OUT or OUT:TARGET")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-pass-tokens", type=int, help="tokens a prompt pass computes (0: one pass; default: "
                        "the runner's own)")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        output, _, target = args.outputs[0].rpartition(":")
        print(json.dumps(measure(Path(output), target, args.prompt, args.new_tokens, args.prompt_pass_tokens)))
        return
    rows = [run(output, target, args.prompt, args.new_tokens, args.prompt_pass_tokens) for spec in args.outputs
            for output, target in targets_of(spec)]
    print("| output | target | imports MB | after load: anon / file | peak after b8 (anon / file) | engine peak | "
          "weights + b8 cache | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['output']} | {r['target']} | {r['imports']['VmRSS']} | {r['load']['RssAnon']} / "
              f"{r['load']['RssFile']} | {r['b8']['VmHWM']} ({r['b8']['RssAnon']} / {r['b8']['RssFile']}) | "
              f"{r['engine_peak_mb']} | {r['weights_mb']:.1f} + {r['cache_b8_mb']:.1f} | "
              f"{r['peak_over_weights_and_cache']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
