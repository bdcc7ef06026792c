"""gptkiln against the tools users would otherwise pick, every one measured by `gptkiln bench`'s own code in one run.

    python benchmarks/compare_tools.py MODEL [--optimum DIR] [--optimum-intel DIR] [--genai DIR] [--gguf-dir DIR]
                                             [--concat-cache] [--openvino-plugin-defaults]
                                             [--gptkiln OUTPUT ...] [--threads 2] [--repeats 3]
                                             [--precision fp32|int8|int4 ...] [--int4-block-size N ...]
                                             [--int4-method rtn|gptq|awq-gptq] [--int4-symmetric]

MODEL: reference, preset:gpt2 (the GPT-2 small shape) or a model path (SmolLM2's GGUF file). In one
run, each in its own process, measured in interleaved rounds (gptkiln.bench.measure: prefill b1 x 128,
TTFT, decode b1 and b8 x 128 new tokens, peak RSS):
- PyTorch eager fp32 (the baseline) and torch.compile (inductor, dynamic shapes);
- gptkiln's engines, onnxruntime and openvino targets, fp32 / w8a8 / int8-dynamic (onnxruntime) /
  int8 (weight-only) / int4 (gptkiln's default method and block; one build per --int4-block-size, rounded by
  --int4-method, without zero points with --int4-symmetric: onnxruntime-genai's format is rtn, symmetric, 32). They are
  built here by the
  code `gptkiln export` runs (quantize + target.compile), without its accuracy gate: the random-weight
  preset fails it by design (benchmarks/RESULTS.md). fp32 on openvino runs twice: as built (f32 KV cache)
  and with --kv-cache-precision f16, the counterpart of optimum-intel's default config;
- --gptkiln OUTPUT (repeatable): gptkiln's rows are these `gptkiln export` outputs instead, each target as
  built and gated (a quantized build as its fallback kept it), in place of the ungated builds above;
- --concat-cache: each onnxruntime engine also in the form gptkiln built before its in-place KV cache
  (Concat of past and new, every logit row): the A/B of gptkiln.graph.kv_buffer and last_logits;
- --genai DIR: onnxruntime-genai builder outputs, DIR/{fp32,int8,int4} (`python -m
  onnxruntime_genai.models.builder -i HF_DIR -o DIR/P -p P -e cpu`), run by onnxruntime-genai's own
  Generator (benchmarks/genai_runner.py) with the same threads and max_length = prompt + new tokens;
- --openvino-plugin-defaults (with --gptkiln): each quantized gptkiln OpenVINO engine once more with the config the
  "optimum-intel, gptkiln's config" rows run with (f32 compute, an f16 KV cache, the CPU plugin's default run-time
  int8 activations, DYNAMIC_QUANTIZATION_GROUP_SIZE 32: what gptkiln's quantized builds keep unless an engine fails
  its gates with it): same IR, same config;
- --genai-loop (with --gptkiln): each gptkiln onnxruntime engine once more, run by onnxruntime-genai's Generator
  from the genai_config.json gptkiln writes beside it: the same graph under genai's C++ loop, which tells the
  graph's cost from the Python loop's;
- --gguf-dir DIR: llama.cpp's GGUF files of the same weights, DIR/*-{F32,Q8_0,Q4_0,Q4_K_M}.gguf (shared/anchors.md:
  convert_hf_to_gguf.py --outtype f32, then llama-quantize), run by llama-cpp-python's C bindings in this
  environment (benchmarks/llamacpp_runner.py: one context, one sequence per batch row, the default context
  settings: f16 KV cache, flash attention as llama.cpp picks it);
- --optimum DIR: optimum-onnx exports of the same weights, run by ONNX Runtime (same version, same
  threads): DIR/{plain,O2,O3}/model.onnx (fp32), DIR/int8-dynamic/model_quantized.onnx
  (`optimum-cli onnxruntime quantize --avx512`), DIR/int4/model.onnx and DIR/int4-O2/model.onnx (ONNX
  Runtime's MatMulNBitsQuantizer, g32, accuracy level 4, on the plain and the O2 export: it quantizes
  MatMul only, and the plain export keeps GPT-2's linears as Gemm);
- --optimum-intel DIR: `optimum-cli export openvino` IRs, DIR/{fp32,int8,int4}/openvino_model.xml, each
  twice: with the runtime config optimum-intel gives its users (its IR's rt_info: u8/f16 KV cache,
  the plugin's inference precision) and with the config gptkiln's engines of that precision get by default (f32
  compute; an f16 KV cache for int8 and int4, f32 for fp32).
benchmarks/RESULTS.md has the commands that make those directories (their own venvs: their pins
clash with gptkiln's). --precision keeps only the rows of those precisions (every tool's; int8 is
W8A8, dynamic int8 and weight-only int8). Writes results/compare_tools-<model>[-<precisions>].json
and a chart beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

from gptkiln.bench.measure import BenchSettings, Variant, available_cores
from gptkiln.bench.report import chart, summary, table
from gptkiln.bench.run import (engine_variant, load_onnx_file, load_openvino_ir, measure_all, output_variants,
                               pytorch_variant)
from gptkiln.bench.traffic import onnx_weight_bytes, openvino_weight_bytes
from gptkiln.calibration.data import calibration_set, read_texts
from gptkiln.calibration.perplexity import EvalText, Evaluation
from gptkiln.calibration.quantize import prepare, quantize
from gptkiln.config import AccuracyBudget, CalibrationSettings, Int4Method, Precision, QuantSettings, RuntimeSettings
from gptkiln.ecosystem.onnxruntime_genai import CONFIG_FILE as GENAI_CONFIG
from gptkiln.exporter.io_spec import DATA_FILE, MODEL_FILE
from gptkiln.exporter.to_onnx import export_onnx
from gptkiln.graph import optimize
from gptkiln.manifest import read_manifest
from gptkiln.models.loading import load_model
from gptkiln.progress import Progress
from gptkiln.targets import get_target
from gptkiln.targets.onnxruntime import OnnxRuntimeRunner, create_session
from gptkiln.targets.openvino import IR_FILE
from genai_runner import genai_precisions, load_genai
from llamacpp_runner import GGUF_PRECISION, gguf_files, gguf_tensor_bytes, load_llamacpp
from quantization import stdlib_text
from tables import markdown_table

HERE = Path(__file__).parent
# the measuring processes unpickle loaders from this directory's modules (genai_runner, llamacpp_runner)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
GPTKILN_BUILDS = {  # precision -> targets, as `gptkiln export --quantize P --target T` builds them
    Precision.FP32: ("onnxruntime", "openvino"), Precision.W8A8: ("onnxruntime", "openvino"),
    Precision.INT8_DYNAMIC: ("onnxruntime",), Precision.INT8: ("onnxruntime", "openvino"),
    Precision.INT4: ("onnxruntime", "openvino")}
OPTIMUM_ONNX = {"optimum plain": ("plain/model.onnx", "fp32"), "optimum O2": ("O2/model.onnx", "fp32"),
                "optimum O3": ("O3/model.onnx", "fp32"),
                "optimum + ORT quantize": ("int8-dynamic/model_quantized.onnx", "int8-dynamic"),
                "optimum + ORT MatMulNBits": ("int4/model.onnx", "int4"),
                "optimum O2 + ORT MatMulNBits": ("int4-O2/model.onnx", "int4")}
OPTIMUM_INTEL = {"fp32": "fp32", "int8": "int8 (weights)", "int4": "int4"}
FAMILIES = ("fp32", "int8", "int4")  # --precision: w8a8, int8-dynamic and int8 weights are all int8


def family(precision: str) -> str:
    return next(f for f in FAMILIES if precision.startswith(f) or (f == "int8" and precision == "w8a8"))


def gptkiln_variants(loaded, work: Path, progress: Progress, accuracy: dict, families: set[str],
                     int4_blocks: list[int], concat_cache: bool, int4: dict) -> list[Variant]:
    """`int4`: QuantSettings fields of the int4 builds (--int4-method, --int4-symmetric)."""
    spec = loaded.spec
    text = stdlib_text(work)
    base = QuantSettings(calibration=CalibrationSettings(path=text), fallback=False, **int4)
    calibration = calibration_set(read_texts(text), loaded.tokenizer, base.calibration, str(text))
    evaluation = Evaluation.prepare(loaded, EvalText.read(None), 8192 if loaded.source["name"] == "reference" else 2048)

    def evaluate(path: Path):  # the gate's measure, recorded beside the speed (not enforced here)
        return evaluation.measure(OnnxRuntimeRunner(spec, create_session(path)))

    # (precision, targets, its settings, a label suffix): one int4 build per block size, named by it when several
    builds = [(p, t, base, "") for p, t in GPTKILN_BUILDS.items() if p is not Precision.INT4]
    builds += [(Precision.INT4, GPTKILN_BUILDS[Precision.INT4], replace(base, int4_block_size=block),
                f" g{block}" if len(int4_blocks) > 1 else "") for block in int4_blocks]
    builds = [build for build in builds if family(build[0].value) in families]
    with progress.stage("gptkiln: export"):
        prepared = work / "prepared" / "model.onnx"  # opset 23: gptkiln's default (int4 needs >= 21)
        prepare(export_onnx(loaded, work / "export", 23).path, prepared, spec)
    variants = []
    for precision, targets, settings, suffix in builds:
        name = precision.value + suffix.replace(" ", "-")
        with progress.stage(f"gptkiln {name}: quantize, compile"):
            graph = prepared
            if precision.quantized:
                result = quantize(prepared, work / name / "quantized", precision, settings, spec,
                                  calibration, evaluate, AccuracyBudget.default(precision))
                graph, accuracy[name] = result.path, asdict(result.trials[-1].accuracy)
            for target in targets:
                directory = work / name / target
                get_target(target).for_precision(precision).compile(graph, directory, spec)
                variants.append(engine_variant(f"gptkiln {target}{suffix}", target, precision, directory, asdict(spec)))
                if target == "onnxruntime" and concat_cache:
                    directory = work / name / "onnxruntime-concat"
                    compile_concat_form(graph, directory, spec)
                    variants.append(engine_variant(f"gptkiln onnxruntime{suffix}, concat cache", target, precision,
                                                   directory, asdict(spec)))
            if precision is Precision.FP32:  # the counterpart of optimum-intel's default config (f16 cache)
                directory = work / name / "openvino-kv-f16"
                get_target("openvino", RuntimeSettings(kv_cache_precision="f16")).compile(graph, directory, spec)
                variants.append(engine_variant("gptkiln openvino, f16 KV cache", "openvino", precision, directory,
                                               asdict(spec)))
    return variants


def built_variants(outputs: list[Path], families: set[str], accuracy: dict, plugin_defaults: bool,
                   genai_length: int | None = None) -> list[Variant]:
    """Every target of gated `gptkiln export` outputs, labelled as the built rows are; their gate's accuracy (the
    first target's: each is scored on the same windows) goes to `accuracy` under the precision. Two outputs of one
    precision are told apart by their directory's name (the accuracy is the last one's). With `genai_length` (its
    max_length), each onnxruntime engine also runs under onnxruntime-genai's Generator."""
    variants = []
    manifests = {output: read_manifest(output) for output in outputs}
    precisions = [m["precision"] for m in manifests.values()]
    for output, manifest in manifests.items():
        if family(manifest["precision"]) not in families:
            continue
        suffix = f" ({output.name})" if precisions.count(manifest["precision"]) > 1 else ""
        built = [replace(v, name=f"gptkiln {v.name}{suffix}") for v in output_variants(output, manifest)]
        variants += built
        if plugin_defaults and manifest["precision"] != "fp32":
            variants += [replace(v, name=f"{v.name}, gptkiln's default config",
                                 load=partial(load_openvino_ir, str(output / v.target / IR_FILE), manifest["spec"],
                                              gptkiln_precision=Precision(manifest["precision"])))
                         for v in built if v.target == "openvino"]
        if genai_length and (output / "onnxruntime" / GENAI_CONFIG).is_file():
            variants += [replace(v, name=f"{v.name}, run by onnxruntime-genai",
                                 load=partial(load_genai, str(output / v.target), manifest["spec"], genai_length))
                         for v in built if v.target == "onnxruntime"]
        first = next(iter(manifest["targets"].values()))
        if manifest["precision"] != "fp32" and first.get("accuracy"):
            accuracy[manifest["precision"]] = first["accuracy"]
    return variants


def compile_concat_form(graph: Path, directory: Path, spec) -> None:
    """The onnxruntime engine as gptkiln compiled it before gptkiln.graph.kv_buffer and last_logits: the fusions
    only (the Concat cache, every logit row), loaded by the same target code (its runtime config says concat)."""
    import onnx_ir as ir

    target = get_target("onnxruntime")
    model = ir.load(graph)
    optimize(model, spec, target.fusion_sets)
    directory.mkdir(parents=True)
    ir.save(model, directory / MODEL_FILE, external_data=DATA_FILE)
    target.save_runtime_config(directory, {"intra_op_num_threads": target.runtime.threads, "kv_cache": "concat"})


def genai_variants(directory: Path, spec: dict, settings: BenchSettings, families: set[str]) -> list[Variant]:
    labels = {"fp32": "fp32", "int8": "int8 (weights)", "int4": "int4"}
    return [Variant("onnxruntime-genai", labels[precision],
                    partial(load_genai, str(path), spec, settings.prompt_tokens + settings.new_tokens),
                    artifact_bytes=sum(p.stat().st_size for p in path.glob("model.onnx*")),
                    weight_bytes=onnx_weight_bytes(path / "model.onnx"))
            for precision, path in genai_precisions(directory).items() if family(precision) in families]


def llamacpp_variants(directory: Path, spec: dict, settings: BenchSettings, families: set[str]) -> list[Variant]:
    max_length = settings.prompt_tokens + settings.new_tokens
    return [Variant("llama.cpp", GGUF_PRECISION[kind],
                    partial(load_llamacpp, str(path), spec, max_length, max(settings.batches)),
                    artifact_bytes=path.stat().st_size, weight_bytes=gguf_tensor_bytes(path))
            for kind, path in gguf_files(directory).items() if family(GGUF_PRECISION[kind]) in families]


def optimum_variants(directory: Path, spec: dict, families: set[str]) -> list[Variant]:
    variants = []
    for name, (relative, precision) in OPTIMUM_ONNX.items():
        path = directory / relative
        if path.is_file() and family(precision) in families:
            variants.append(Variant(name, precision, partial(load_onnx_file, str(path), spec),
                                    artifact_bytes=sum(p.stat().st_size for p in path.parent.glob("model*.onnx*")),
                                    weight_bytes=onnx_weight_bytes(path)))
    return variants


def optimum_intel_variants(directory: Path, spec: dict, families: set[str]) -> list[Variant]:
    variants = []
    for name, precision in OPTIMUM_INTEL.items():
        xml = directory / name / "openvino_model.xml"
        if not xml.is_file() or family(precision) not in families:
            continue
        size, weights = xml.stat().st_size + xml.with_suffix(".bin").stat().st_size, openvino_weight_bytes(xml)
        for gptkiln_precision, label in ((None, "optimum-intel"), (Precision(name), "optimum-intel, gptkiln's config")):
            variants.append(Variant(label, precision, partial(load_openvino_ir, str(xml), spec,
                                                              gptkiln_precision=gptkiln_precision),
                                    artifact_bytes=size, weight_bytes=weights))
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="preset:gpt2", help="reference or preset:gpt2")
    parser.add_argument("--optimum", type=Path, help="optimum-onnx exports (see the docstring)")
    parser.add_argument("--optimum-intel", type=Path, help="optimum-intel IRs (see the docstring)")
    parser.add_argument("--genai", type=Path, help="onnxruntime-genai builder outputs (see the docstring)")
    parser.add_argument("--openvino-plugin-defaults", action="store_true",
                        help="with --gptkiln: also each quantized OpenVINO engine in gptkiln's default config")
    parser.add_argument("--genai-loop", action="store_true",
                        help="with --gptkiln: also each onnxruntime engine run by onnxruntime-genai's Generator")
    parser.add_argument("--gguf-dir", type=Path, help="llama.cpp GGUF files (see the docstring)")
    parser.add_argument("--gptkiln", type=Path, action="append", help="a gated `gptkiln export` output (repeatable)")
    parser.add_argument("--concat-cache", action="store_true",
                        help="also the onnxruntime engines in their former Concat-cache form")
    parser.add_argument("--threads", type=int, default=available_cores())
    parser.add_argument("--new-tokens", type=int, default=BenchSettings.new_tokens)
    parser.add_argument("--repeats", type=int, default=BenchSettings.repeats)
    parser.add_argument("--no-torch-compile", action="store_true")
    parser.add_argument("--precision", action="append", choices=FAMILIES,
                        help="only these precisions' rows (repeatable; default: all)")
    parser.add_argument("--int4-block-size", action="append", type=int,
                        help="one gptkiln int4 build per block size (repeatable; default: gptkiln's default); the down "
                             "projection and a tied lm_head keep gptkiln's fine block (32) in each")
    parser.add_argument("--int4-method", choices=[m.value for m in Int4Method], default=QuantSettings.int4_method.value,
                        help="the int4 builds' rounding (default gptkiln's)")
    parser.add_argument("--int4-symmetric", action="store_true", help="the int4 builds without zero points")
    parser.add_argument("--markdown", type=Path, help="print the Markdown table of a results JSON and exit")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return
    settings = BenchSettings(threads=args.threads, new_tokens=args.new_tokens, repeats=args.repeats)
    progress = Progress(enabled=True)
    loaded = load_model(args.model)
    decoder, spec = loaded.spec, asdict(loaded.spec)
    with tempfile.TemporaryDirectory(dir=HERE) as tmp:
        work = Path(tmp)
        loaded.tokenizer.save_pretrained(work / "tokenizer")
        variants = [pytorch_variant(args.model)]
        if not args.no_torch_compile:
            variants.append(pytorch_variant(args.model, compiled=True))
        accuracy: dict = {}
        families = set(args.precision or FAMILIES)
        if args.gptkiln:
            variants += built_variants(args.gptkiln, families, accuracy, args.openvino_plugin_defaults,
                                       settings.prompt_tokens + settings.new_tokens if args.genai_loop else None)
        else:
            variants += gptkiln_variants(loaded, work, progress, accuracy, families,
                                         args.int4_block_size or [QuantSettings.int4_block_size], args.concat_cache,
                                         {"int4_method": Int4Method(args.int4_method),
                                          "int4_symmetric": args.int4_symmetric})
        if args.genai:
            variants += genai_variants(args.genai, spec, settings, families)
        if args.gguf_dir:
            variants += llamacpp_variants(args.gguf_dir, spec, settings, families)
        if args.optimum:
            variants += optimum_variants(args.optimum, spec, families)
        if args.optimum_intel:
            variants += optimum_intel_variants(args.optimum_intel, spec, families)
        del loaded
        report = measure_all(variants, decoder, work / "tokenizer", settings, progress)
    report["model"] = {"name": args.model}
    report["gptkiln_accuracy"] = accuracy  # perplexity / top-1 against fp32 PyTorch, per quantized precision
    label = Path(args.model).stem if Path(args.model).exists() else args.model.replace(":", "_")
    stem = f"compare_tools-{label}" + "".join(f"-{f}" for f in args.precision or [])
    stem += "".join(f"-g{b}" for b in args.int4_block_size or []) + ("-built" if args.gptkiln else "")
    stem += ("-symmetric" if args.int4_symmetric else "") + (
        f"-{args.int4_method}" if args.int4_method != QuantSettings.int4_method.value else "")
    (HERE / "results" / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    chart(report, HERE / "results" / f"{stem}.png")
    print(summary(report))
    print(markdown(report))


def markdown(report: dict) -> str:
    """The table of `gptkiln bench`, as Markdown (python compare_tools.py --markdown results/compare_tools-M.json)."""
    header, *rows = table(report)
    return markdown_table(list(header), [list(row) for row in rows])

if __name__ == "__main__":
    main()
