"""`gptkiln bench`: every target and precision built under a directory, against PyTorch eager fp32, in one run.

The run: measure the memory bandwidth, load each variant in its own process (PyTorch eager
first), measure them all in interleaved rounds, then put every decode figure beside its floor: the bytes one step reads (weights
+ KV cache at the run's mean context length) over the measured bandwidth.
"""

from __future__ import annotations

import json
import os
import platform
from collections import Counter
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

from gptkiln.bench.bandwidth import read_bandwidth
from gptkiln.bench.measure import BenchSettings, Variant, Worker, available_cores, summarize
from gptkiln.bench.traffic import kv_cache_bytes, onnx_weight_bytes, openvino_weight_bytes, torch_weight_bytes
from gptkiln.config import Precision
from gptkiln.errors import ArtifactError, UsageError
from gptkiln.exporter.io_spec import MODEL_FILE
from gptkiln.manifest import BENCHMARK_FILE, MANIFEST, read_manifest, tool_versions
from gptkiln.models.loading import REFERENCE_DIR
from gptkiln.models.spec import DecoderSpec

PYTORCH = "pytorch eager"
PROMPT_SOURCE = REFERENCE_DIR / "heldout.txt"  # Python source: every tokenizer makes >= 128 tokens of its start


def is_output_root(path: Path) -> bool:
    """A gptkiln output, or a directory with outputs below it (as opposed to a model to export)."""
    return (path / MANIFEST).is_file() or (path.is_dir() and not (path / "config.json").is_file()
                                            and any(path.rglob(MANIFEST)))


def find_outputs(root: Path) -> list[Path]:
    """`root` itself when it is a gptkiln output, else every output below it (a build file's output root)."""
    if (root / MANIFEST).is_file():
        return [root]
    found = sorted(path.parent for path in root.rglob(MANIFEST)) if root.is_dir() else []
    if not found:
        raise ArtifactError(f"'{root}' holds no gptkiln output (no {MANIFEST} in it or below it)",
                            "pass a directory written by `gptkiln export` or `gptkiln build`, or a model to export")
    return found


def load_target(name: str, directory: str, spec: dict, threads: int):
    from gptkiln.targets import get_target
    from gptkiln.targets.openvino import StatefulRunner, kv_element_bytes

    runner = get_target(name).load(Path(directory), DecoderSpec.from_dict(spec), threads=threads)
    if isinstance(runner, StatefulRunner):  # its cache precision is a runtime setting
        return runner, {"kv_element_bytes": kv_element_bytes(runner.request.get_compiled_model())}
    return runner, {}


def load_pytorch(model: str, threads: int, compiled: bool = False):
    """The model as PyTorch runs it (fp32 eager, or torch.compile'd), behind the Runner interface."""
    import torch

    from gptkiln.models.loading import load_model
    from gptkiln.runtime.torch_runner import TorchRunner

    torch.set_num_threads(threads)
    loaded = load_model(model)
    runner = TorchRunner(loaded.model, loaded.spec)
    if compiled:
        runner.decoder = torch.compile(runner.decoder, dynamic=True)
    return runner, {"weight_bytes": torch_weight_bytes(loaded.model)}


def load_onnx_file(path: str, spec: dict, threads: int):
    """Another tool's ONNX that speaks the IO contract (optimum's does), run by ONNX Runtime."""
    from gptkiln.targets.onnxruntime import OnnxRuntimeRunner, create_session

    return OnnxRuntimeRunner(DecoderSpec.from_dict(spec), create_session(Path(path), threads)), {}


def load_openvino_ir(path: str, spec: dict, threads: int, gptkiln_precision: Precision | None):
    """Another tool's stateful IR (optimum-intel's has gptkiln's inputs and beam_idx), with the config that
    tool's users get (the IR's rt_info and the plugin's defaults; gptkiln_precision None) or with the one gptkiln's
    own engines of that precision get by default (OpenVinoTarget.for_precision)."""
    from gptkiln.config import RuntimeSettings
    from gptkiln.targets.openvino import OpenVinoTarget, compile_config, ir_runner, kv_element_bytes

    if gptkiln_precision is None:
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
    else:
        target = OpenVinoTarget(RuntimeSettings(threads=threads)).for_precision(gptkiln_precision)
        config = compile_config(target.runtime)
    runner = ir_runner(Path(path), DecoderSpec.from_dict(spec), config)  # last-position logits, as gptkiln's get
    return runner, {"kv_element_bytes": kv_element_bytes(runner.compiled)}


def engine_weight_bytes(directory: Path) -> int:
    """Weight bytes a decode step reads, from an engine directory's files (a TensorRT engine: its size)."""
    from gptkiln.targets.openvino import IR_FILE
    from gptkiln.targets.tensorrt.target import ENGINE_FILE

    if (directory / ENGINE_FILE).is_file():
        return (directory / ENGINE_FILE).stat().st_size
    if (directory / IR_FILE).is_file():
        return openvino_weight_bytes(directory / IR_FILE)
    return onnx_weight_bytes(directory / MODEL_FILE)


def engine_variant(label: str, target: str, precision: Precision, directory: Path, spec: dict,
                   output: Path | None = None) -> Variant:
    """A variant of the engine files gptkiln's `target` compiled into `directory`."""
    return Variant(name=label, precision=precision.value, output=str(output) if output else None, target=target,
                   load=partial(load_target, target, str(directory), spec),
                   artifact_bytes=sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()),
                   weight_bytes=engine_weight_bytes(directory), kv_element_bytes=2 if precision.half else 4, spec=spec)


def output_variants(output: Path, manifest: dict) -> list[Variant]:
    precision = Precision(manifest["precision"])
    return [engine_variant(name, name, precision, output / name, manifest["spec"], output)
            for name, built in manifest["targets"].items()
            if built.get("compiled", True)]  # a target prepared for another machine runs nothing here


def prompt_text(tokenizer_dir: Path, tokens: int) -> str:
    """A prompt of at least `tokens` tokens: the start of the reference model's held-out text (Python source)."""
    from gptkiln.runtime.text import TextCodec

    codec = TextCodec(tokenizer_dir)
    ids = codec.encode(PROMPT_SOURCE.read_text()[:tokens * 32])
    return codec.decode(ids[:tokens + 16])


def bench(root: Path, settings: BenchSettings, progress) -> dict:
    """Measure every compiled target under `root` against PyTorch eager fp32."""
    outputs = find_outputs(root)
    manifests = {output: read_manifest(output) for output in outputs}  # every file checked first
    models = {m["model"]["sha256"]: m["model"]["name"] for m in manifests.values()}
    if len(models) > 1:
        raise UsageError(f"'{root}' holds builds of {len(models)} models ({', '.join(sorted(models.values()))})",
                         "bench one model at a time: pass the directory of one model's builds")
    first = manifests[outputs[0]]
    variants = [pytorch_variant(first["model"]["name"])]
    for output, manifest in manifests.items():
        variants += output_variants(output, manifest)
    variants = _distinct_labels(variants, root)
    report = measure_all(variants, DecoderSpec.from_dict(first["spec"]), outputs[0], settings, progress)
    return {"model": first["model"], **report,
            "builds": {str(o): m.get("build", {}).get("key") for o, m in manifests.items()}}


def _distinct_labels(variants: list[Variant], root: Path) -> list[Variant]:
    """Two outputs with the same target and precision (e.g. other block sizes): label them by their directory."""
    seen = Counter((v.name, v.precision) for v in variants)
    return [replace(v, name=f"{v.name} ({Path(v.output).relative_to(root)})") if seen[v.name, v.precision] > 1 else v
            for v in variants]


def pytorch_variant(model: str, compiled: bool = False) -> Variant:
    return Variant("torch.compile" if compiled else PYTORCH, Precision.FP32.value,
                   partial(load_pytorch, model, compiled=compiled))


def measure_all(variants: list[Variant], spec: DecoderSpec, tokenizer_dir: Path, settings: BenchSettings,
                progress) -> dict:
    """The bandwidth, then every variant in its own process, measured in `settings.repeats` interleaved rounds;
    the first variant is the baseline (PyTorch eager)."""
    settings.validate(spec.max_positions)
    text = prompt_text(tokenizer_dir, settings.prompt_tokens)
    with progress.stage(f"measure memory bandwidth ({settings.threads} threads)"):
        bandwidth = read_bandwidth(settings.threads)
    workers: list[Worker] = []
    try:
        for variant in variants:
            with progress.stage(f"load {variant.name} {variant.precision}"):
                workers.append(Worker(variant, settings, text, tokenizer_dir))
        rounds: list[list[dict]] = [[] for _ in workers]
        for round_index in range(settings.repeats):
            with progress.stage(f"round {round_index + 1} of {settings.repeats}: {len(workers)} variants"):
                for index in _round_order(len(workers), round_index):
                    rounds[index].append(workers[index].round())
        rows = [_row(worker.variant, {**worker.finish(), **summarize(samples, settings)}, spec, settings, bandwidth)
                for worker, samples in zip(workers, rounds)]
    finally:
        for worker in workers:
            worker.close()
    _compare(rows)
    return {"spec": asdict(spec), "machine": machine(settings.threads, bandwidth), "settings": settings.to_dict(),
            "results": rows}


def _round_order(count: int, round_index: int) -> list[int]:
    """Every variant once, the order rotated by one each round: none is always measured first or right after
    the same neighbour."""
    return [(round_index + offset) % count for offset in range(count)]


def _row(variant: Variant, measured: dict, spec: DecoderSpec, settings: BenchSettings, bandwidth: dict) -> dict:
    facts = measured.pop("facts")
    weights = facts.get("weight_bytes", variant.weight_bytes)
    kv_element_bytes = facts.get("kv_element_bytes", variant.kv_element_bytes)
    context = settings.prompt_tokens + settings.new_tokens // 2  # the mean length of the cache over the decode
    spec = DecoderSpec.from_dict(variant.spec) if variant.spec else spec
    for batch, decode in measured["decode"].items():
        step_bytes = weights + kv_cache_bytes(spec, int(batch), context, kv_element_bytes)
        decode["floor_ms"] = step_bytes / (bandwidth["gb_per_s"] * 1e9) * 1e3
        decode["floor_pct"] = 100 * decode["floor_ms"] / decode["step_ms"]
    return {"name": variant.name, "target": variant.target, "precision": variant.precision, "output": variant.output,
            "artifact_mb": variant.artifact_bytes / 1e6 if variant.artifact_bytes else None,
            "weight_mb_per_step": weights / 1e6, "kv_element_bytes": kv_element_bytes, **measured}


def _compare(rows: list[dict]) -> None:
    """Each row's decode tokens/s as a multiple of the baseline's (the first row) at the same batch size."""
    eager = rows[0]["decode"]
    for row in rows:
        for batch, decode in row["decode"].items():
            decode["vs_pytorch"] = decode["tokens_per_s"]["median"] / eager[batch]["tokens_per_s"]["median"]


def machine(threads: int, bandwidth: dict) -> dict:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    from gptkiln.targets import get_target

    versions = {**tool_versions(), "openvino": get_target("openvino").runtime_version()}
    memory_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)
    return {"cpu": cpu, "cores": available_cores(), "threads": threads, "last_level_cache_mb": last_level_cache_mb(),
            "memory_gb": memory_gb, "bandwidth": bandwidth, "versions": versions}


def last_level_cache_mb() -> float | None:
    """The largest CPU cache (Linux sysfs; None elsewhere): weights smaller than it need not come from memory."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip()
        scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KM")) * scale / 1e6)
    return max(sizes, default=None)


def save(report: dict, root: Path) -> list[Path]:
    """benchmark.json in every output (its rows and PyTorch's: what `gptkiln pack` puts in a bundle), and the
    whole report at `root` when root is a build file's output root."""
    written = []
    for output, key in report["builds"].items():
        rows = [row for row in report["results"] if row["output"] in (output, None)]
        path = Path(output) / BENCHMARK_FILE
        _write_json(path, {**report, "results": rows, "builds": {output: key}, "build_key": key})
        written.append(path)
    if not (root / MANIFEST).is_file():
        _write_json(root / BENCHMARK_FILE, report)
        written.append(root / BENCHMARK_FILE)
    return written


def _write_json(path: Path, body: dict) -> None:
    partial_path = path.with_name(f".{path.name}.partial")
    partial_path.write_text(json.dumps(body, indent=2) + "\n")
    os.replace(partial_path, path)
