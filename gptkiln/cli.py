"""gptkiln command line: arguments -> config -> pipeline; errors -> one line and an exit code."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

from gptkiln.config import (AccuracyBudget, ActivationCalibration, BuildConfig, CalibrationSettings, EngineSettings,
                            Int4Method, ParitySettings, Precision, QuantSettings, RuntimeSettings, Tolerances)
from gptkiln.errors import GptkilnError, TargetUnavailableError, UsageError


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _quiet_libraries()
    try:
        payload, text = args.handler(args)
    except GptkilnError as error:
        if os.environ.get("GPTKILN_DEBUG"):
            raise
        if args.json:
            print(json.dumps({"ok": False, "error": error.to_dict()}, indent=2))
        print(f"gptkiln: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("gptkiln: interrupted; nothing was written", file=sys.stderr)
        return 130
    code = payload.pop("exit_code", 0)  # a matrix reports its failed builds itself, with the others' results
    print(json.dumps({"ok": code == 0, **payload}, indent=2) if args.json else text)
    return code


def _quiet_libraries() -> None:
    """Our progress lines replace the libraries' progress bars and advice messages."""
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", module=r"torch\.onnx.*")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptkiln", description="Export GPT models to verified inference engines.")
    commands = parser.add_subparsers(dest="command", required=True)

    export = commands.add_parser("export", help="export MODEL, compile each target, prove parity with PyTorch")
    _add_export_arguments(export)
    export.set_defaults(handler=_export)

    build = commands.add_parser("build", help="build every model x precision of a build file (kiln.yaml / .toml)")
    build.add_argument("file", type=Path)
    build.add_argument("--dry-run", action="store_true", help="print the plan (what is built, what is cached)")
    build.add_argument("--jobs", type=int, help="builds run in parallel (default: the file's jobs, else 1)")
    build.add_argument("--no-cache", action="store_true", help="build every stage, ignoring the stage cache")
    build.set_defaults(handler=_build)

    verify = commands.add_parser("verify", help="check an output's files and rerun its parity gates")
    verify.add_argument("output", type=Path)
    verify.set_defaults(handler=_verify)

    generate = commands.add_parser("generate", help="generate text with a built engine")
    generate.add_argument("output", type=Path)
    generate.add_argument("--target", help="which built target to run; default: the first in the manifest")
    _add_generation_options(generate)
    generate.set_defaults(handler=_generate)

    pack = commands.add_parser("pack", help="pack a built output into one verifiable bundle file")
    pack.add_argument("output", type=Path)
    pack.add_argument("-o", "--bundle", required=True, type=Path, help="bundle file to write (NAME.kiln.tar)")
    pack.add_argument("--target", action="append", dest="targets", help="target to include (repeatable); "
                                                                       "default: every compiled target")
    pack.set_defaults(handler=_pack)

    run = commands.add_parser("run", help="verify a bundle, then generate with only the target's runtime")
    run.add_argument("bundle", type=Path)
    run.add_argument("--target", help="which target of the bundle to run; default: the first this machine runs")
    _add_generation_options(run)
    run.set_defaults(handler=_run)

    bench = commands.add_parser("bench", help="measure every built target and precision against PyTorch eager")
    _add_bench_arguments(bench)
    bench.set_defaults(handler=_bench)

    for sub in (export, build, verify, generate, pack, run, bench):
        sub.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    verify.add_argument("--decode-steps", type=int, default=ParitySettings.decode_steps,
                        help="decode steps compared after the prefill")
    verify.add_argument("--logits-rel", type=float, default=None,
                        help="max |logit diff| allowed, relative to max |logit| (default: what the build was held to)")
    return parser


def _add_export_arguments(export: argparse.ArgumentParser) -> None:
    export.add_argument("model", help="'reference', 'preset:gpt2', a local model directory or a Hugging Face id")
    export.add_argument("-o", "--output", required=True, type=Path, help="output directory (must not exist)")
    export.add_argument("--target", action="append", dest="targets",
                        help="target to build (repeatable); default: every target available here")
    export.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    export.add_argument("--no-cache", action="store_true", help="build every stage, ignoring the stage cache")
    export.add_argument("--opset", type=int, default=BuildConfig.opset,
                        help="ONNX opset (>= 18; default %(default)s; int4 raises it to 21)")
    export.add_argument("--threads", type=int, default=0,
                        help="threads the engine runs with, saved with it (default 0: every core)")
    export.add_argument("--performance-hint", choices=["latency", "throughput"], default="latency",
                        help="OpenVINO performance hint (default latency)")
    export.add_argument("--inference-precision", choices=["f32", "bf16", "f16"], default="f32",
                        help="OpenVINO compute and KV-cache precision (default f32: the fp32 parity bars; bf16/f16 "
                             "are faster on CPUs with native support and held to the half-precision bars)")
    export.add_argument("--kv-cache-precision", choices=["f32", "f16", "u8"],
                        help="OpenVINO's stateful KV cache storage (default: the inference precision; f16/u8 read "
                             "fewer bytes per step and are held to the half-precision bars)")
    export.add_argument("--dynamic-quantization-group", type=int,
                        help="OpenVINO: quantize the activations of integer-weight layers to int8 per group of N at "
                             "run time (0: off; default: off for --quantize int8, the CPU's 32 otherwise)")
    _add_quantization_options(export)
    _add_engine_options(export)
    export.add_argument("--decode-steps", type=int, default=ParitySettings.decode_steps,
                        help="decode steps compared after the prefill")
    export.add_argument("--logits-rel", type=float, default=None,
                        help=f"max |logit diff| allowed, relative to max |logit| (export default "
                             f"{Tolerances.logits_rel:g}; verify default: what the build was held to)")


def _add_bench_arguments(bench: argparse.ArgumentParser) -> None:
    from gptkiln.bench.measure import BenchSettings, available_cores

    bench.add_argument("source", help="an output directory (or a build file's output root, for every build below "
                                      "it), or a MODEL: exported first (fp32, every target here)")
    bench.add_argument("-o", "--output", type=Path, help="with a MODEL: export it here (default: a temporary "
                                                         "directory, removed afterwards)")
    bench.add_argument("--threads", type=int, default=available_cores(), help="threads for every runtime and the bandwidth "
                                                                     "measurement (default: the cores here, %(default)s)")
    bench.add_argument("--prompt-tokens", type=int, default=BenchSettings.prompt_tokens, help="default %(default)s")
    bench.add_argument("--new-tokens", type=int, default=BenchSettings.new_tokens, help="default %(default)s")
    bench.add_argument("--batch", type=int, action="append", dest="batches",
                       help=f"decode batch size (repeatable; default {' and '.join(map(str, BenchSettings.batches))})")
    bench.add_argument("--repeats", type=int, default=BenchSettings.repeats,
                       help="rounds: every variant is measured once per round, interleaved (default %(default)s)")
    bench.add_argument("--warmup", type=int, default=BenchSettings.warmup, help="default %(default)s")
    bench.add_argument("--chart", type=Path, help="the PNG chart (default: benchmark.png in the measured directory)")
    bench.add_argument("--no-chart", action="store_true", help="write no chart")


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)


def export_options() -> dict[str, argparse.Action]:
    """The options of `gptkiln export` by destination name (a build file's `options` use the same)."""
    parser = argparse.ArgumentParser(add_help=False)
    _add_export_arguments(parser)
    return {action.dest: action for action in parser._actions if action.option_strings}


def _add_quantization_options(parser: argparse.ArgumentParser) -> None:
    defaults = QuantSettings()
    group = parser.add_argument_group("quantization (accuracy-gated; see the README)")
    group.add_argument("--quantize", choices=[p.value for p in Precision], default=Precision.FP32.value,
                       help="precision of the build (default fp32; fp16/bf16 keep normalization and softmax in fp32)")
    group.add_argument("--calibration", type=Path, help="calibration text: a text file, a .jsonl file or a directory")
    group.add_argument("--calibration-field", default=defaults.calibration.jsonl_field,
                       help="JSONL field holding the text (default %(default)s)")
    group.add_argument("--calibration-samples", type=int, default=defaults.calibration.samples,
                       help="calibration windows (default %(default)s)")
    group.add_argument("--calibration-seq-len", type=int, default=defaults.calibration.seq_len,
                       help="tokens per window; its last 16 run as decode steps (default %(default)s)")
    group.add_argument("--calibration-seed", type=int, default=defaults.calibration.seed,
                       help="which windows are drawn (default %(default)s)")
    group.add_argument("--activations", choices=[m.value for m in ActivationCalibration], default=defaults.activations.value,
                       help="W8A8 activation range calibration (default %(default)s)")
    group.add_argument("--percentile", type=float, default=defaults.percentile, help="for --activations percentile")
    group.add_argument("--smoothquant-alpha", type=float, default=defaults.smoothquant_alpha,
                       help="SmoothQuant migration strength in [0, 1] (W8A8; default %(default)s)")
    group.add_argument("--no-smoothquant", action="store_true", help="W8A8 without SmoothQuant")
    group.add_argument("--int4-method", choices=[m.value for m in Int4Method], default=defaults.int4_method.value,
                       help="int4 rounding (gptq needs --calibration; default %(default)s)")
    group.add_argument("--int4-block-size", type=int, default=defaults.int4_block_size,
                       help="input rows per int4 scale; a layer whose input size is not a multiple gets the largest "
                            "power of two that divides it (default %(default)s)")
    group.add_argument("--int4-symmetric", action="store_true", help="int4 without zero points")
    group.add_argument("--int8-block-size", type=int, default=defaults.int8_block_size,
                       help="input rows per scale of weight-only int8 (symmetric; default %(default)s)")
    group.add_argument("--eval-text", type=Path, help="held-out text for the accuracy gate "
                                                      "(default: the reference model's held-out split)")
    group.add_argument("--eval-tokens", type=int, default=defaults.eval_tokens, help="default %(default)s")
    group.add_argument("--max-ppl-increase", type=float,
                       help="accuracy budget, percent (default 0.5 for int8, 1.5 for w8a8 and int8-dynamic, "
                            "5 for int4)")
    group.add_argument("--no-fallback", action="store_true",
                       help="fail instead of keeping the most sensitive layer groups at a backup precision "
                            "(int8 for int4, fp32 otherwise)")


def _add_engine_options(parser: argparse.ArgumentParser) -> None:
    defaults = EngineSettings()
    group = parser.add_argument_group("TensorRT engine (optimization profiles and compatibility)")
    group.add_argument("--trt-max-batch", type=int, default=defaults.max_batch, help="default %(default)s")
    group.add_argument("--trt-opt-batch", type=int, default=defaults.opt_batch, help="batch the kernels are tuned for "
                                                                                   "(default %(default)s)")
    group.add_argument("--trt-max-seq", type=int, help="prompt + generated tokens (default: the model's context)")
    group.add_argument("--trt-opt-prompt", type=int, default=defaults.opt_prompt,
                       help="prompt length the prefill kernels are tuned for (default %(default)s)")
    group.add_argument("--trt-hardware-compat", choices=["none", "same-cc", "ampere+"], default="none",
                       help="which GPUs may load the engine: the build GPU's compute capability (none, same-cc) "
                            "or any Ampere or newer (ampere+; slower kernels)")
    group.add_argument("--trt-version-compatible", action="store_true",
                       help="let later TensorRT 10.x releases load the engine")


def engine_settings(args) -> EngineSettings:  # checked by the TensorRT target before any work
    return EngineSettings(max_batch=args.trt_max_batch, opt_batch=args.trt_opt_batch, max_seq=args.trt_max_seq,
                          opt_prompt=args.trt_opt_prompt, hardware_compatibility=args.trt_hardware_compat,
                          version_compatible=args.trt_version_compatible)


def _quant_settings(args) -> QuantSettings:
    precision = Precision(args.quantize)
    if args.calibration_samples < 1 or args.calibration_seq_len < 32 or args.eval_tokens < 128:
        raise UsageError("--calibration-samples must be >= 1, --calibration-seq-len >= 32, --eval-tokens >= 128",
                         "fix the option values")
    if args.smoothquant_alpha is not None and not 0 <= args.smoothquant_alpha <= 1:
        raise UsageError(f"--smoothquant-alpha must be in [0, 1], got {args.smoothquant_alpha}", "fix the value")
    for option, size in (("--int4-block-size", args.int4_block_size), ("--int8-block-size", args.int8_block_size)):
        if size < 16 or size & (size - 1):
            raise UsageError(f"{option} must be a power of two >= 16, got {size}", "use 32, 64 or 128")
    if not 0 < args.percentile <= 100:
        raise UsageError(f"--percentile must be in (0, 100], got {args.percentile}", "fix the value")
    budget = None
    if args.max_ppl_increase is not None:
        if args.max_ppl_increase <= 0:
            raise UsageError("--max-ppl-increase must be > 0", "give a percentage, e.g. 1.5")
        budget = AccuracyBudget(**{**vars(AccuracyBudget.default(precision)), "max_ppl_increase_pct": args.max_ppl_increase})
    calibration = CalibrationSettings(path=args.calibration, jsonl_field=args.calibration_field,
                                      samples=args.calibration_samples, seq_len=args.calibration_seq_len,
                                      seed=args.calibration_seed)
    return QuantSettings(calibration=calibration, activations=ActivationCalibration(args.activations),
                         percentile=args.percentile,
                         smoothquant_alpha=None if args.no_smoothquant else args.smoothquant_alpha,
                         int4_method=Int4Method(args.int4_method), int4_block_size=args.int4_block_size,
                         int4_symmetric=args.int4_symmetric, int8_block_size=args.int8_block_size,
                         fallback=not args.no_fallback,
                         eval_text=args.eval_text, eval_tokens=args.eval_tokens, budget=budget)


def _tolerances(args) -> tuple[Tolerances | None, ParitySettings]:
    """(None, ...) when --logits-rel was not given: the caller picks its default."""
    if args.decode_steps < 1 or (args.logits_rel is not None and args.logits_rel <= 0):
        raise UsageError("--decode-steps must be >= 1 and --logits-rel > 0", "fix the option values")
    tolerances = None if args.logits_rel is None else Tolerances(logits_rel=args.logits_rel, padded_rel=args.logits_rel)
    return tolerances, ParitySettings(decode_steps=args.decode_steps)


def export_config(values: dict) -> BuildConfig:
    """The BuildConfig of `gptkiln export` option values (the command line's, or a build file's over the defaults)."""
    from gptkiln.targets import TARGETS, available_targets, get_target

    args = argparse.Namespace(**{**{dest: a.default for dest, a in export_options().items()}, **values})
    if args.threads < 0:
        raise UsageError(f"--threads must be >= 0, got {args.threads}", "pass a thread count, or 0 for every core")
    if args.opset < 18:
        raise UsageError(f"--opset {args.opset} is too old", "use --opset 18 or newer")
    tolerances, parity = _tolerances(args)
    precision = Precision(args.quantize)
    targets = args.targets or [t for t in available_targets() if precision in get_target(t).precisions]
    if not targets:
        able = [name for name, target in TARGETS.items() if precision in target.precisions]
        raise TargetUnavailableError(f"no target runtime installed here runs {precision.value} builds",
                                     f"name a target with --target ({', '.join(able)}), or install its runtime")
    return BuildConfig(model=args.model, output=Path(args.output), targets=tuple(targets), precision=precision,
                       quant=_quant_settings(args), opset=args.opset, force=args.force, cache=not args.no_cache,
                       runtime=RuntimeSettings(threads=args.threads, performance_hint=args.performance_hint.upper(),
                                               inference_precision=args.inference_precision,
                                               kv_cache_precision=args.kv_cache_precision,
                                               dynamic_quantization_group=_dynamic_quantization(args)),
                       engine=engine_settings(args), parity=parity,
                       tolerances=tolerances or (Tolerances.half() if precision.half else Tolerances()))


def _dynamic_quantization(args) -> int | None:
    group = args.dynamic_quantization_group
    if group is not None and group < 0:
        raise UsageError(f"--dynamic-quantization-group must be >= 0, got {group}", "pass 0 (off), 32, 64, ...")
    return group  # None: BuildConfig.runtime_for picks (off for int8)


def _export(args):
    from gptkiln.pipeline import Progress, build

    result = build(export_config(vars(args)), Progress(enabled=True))
    return result.to_dict(), _summary(result)


def _build(args):
    from gptkiln.build_file import read_build_file
    from gptkiln.matrix import dry_run, matrix_summary, plan_summary, run_matrix

    build_file = read_build_file(args.file)
    if args.no_cache:
        build_file.builds = [replace(b, config=replace(b.config, cache=False)) for b in build_file.builds]
    if args.dry_run:
        plan = dry_run(build_file.builds)
        return {"plan": plan}, plan_summary(plan)
    jobs = args.jobs or build_file.jobs
    if jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {jobs}", "pass a positive count")
    outcomes = run_matrix(build_file.builds, jobs)
    failed = [o for o in outcomes if not o["ok"]]
    return ({"builds": outcomes, "exit_code": failed[0]["error"]["exit_code"] if failed else 0},
            matrix_summary(outcomes))


def _verify(args):
    from gptkiln.pipeline import Progress, verify

    tolerances, parity = _tolerances(args)
    result = verify(args.output, tolerances, parity, Progress(enabled=True))
    return result.to_dict(), _summary(result)


def _generate(args):
    from gptkiln.runtime.session import open_output

    return _complete(open_output(args.output, args.target), args)


def _pack(args):
    from gptkiln.bundle import pack

    body = pack(args.output, args.bundle, args.targets)
    size = args.bundle.stat().st_size
    lines = [f"bundle  {args.bundle} ({size / 1e6:.1f} MB, {len(body['files'])} files + bundle.json)"]
    lines += [f"target  {name}: needs {t['requires']['runtime']} >= {t['requires']['minimum_version']} "
              f"on {t['requires']['device']}; gate {'PASS' if t['gate']['passed'] else 'FAIL'}"
              for name, t in body["targets"].items()]
    return {"bundle": str(args.bundle), "bytes": size, "manifest": body}, "\n".join(lines)


def _run(args):
    from gptkiln.bundle import open_bundle

    opened = open_bundle(args.bundle, args.target)
    try:
        return _complete(opened.session(), args)
    finally:
        opened.close()


def _bench(args):
    import tempfile

    from gptkiln.bench.measure import BenchSettings
    from gptkiln.bench.report import chart, pyplot, summary
    from gptkiln.bench.run import bench, is_output_root, save
    from gptkiln.manifest import BENCHMARK_CHART
    from gptkiln.pipeline import Progress, build

    settings = BenchSettings(threads=args.threads, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                             batches=tuple(sorted(set(args.batches or BenchSettings.batches))), repeats=args.repeats,
                             warmup=args.warmup)
    settings.validate()  # the options alone, before any work (the model's positions: once it is known)
    if not args.no_chart:
        pyplot()  # no hour of measurements lost to a missing matplotlib at the end
    progress = Progress(enabled=True)
    source = Path(args.source)
    with tempfile.TemporaryDirectory(prefix="gptkiln-bench-") as scratch:
        if not is_output_root(source):  # a model: export it first
            root = args.output or Path(scratch) / "build"
            build(export_config({"model": args.source, "output": root, "force": args.output is None}), progress)
        else:
            root = source
        report = bench(root, settings, progress)
        keep = args.output is not None or root == source
        written = save(report, root) if keep else []
        chart_path = args.chart or (root / BENCHMARK_CHART if keep else None)
        if chart_path and not args.no_chart:
            chart(report, chart_path)
            written.append(chart_path)
    lines = [summary(report)] + [f"wrote   {path}" for path in written]
    return {"benchmark": report, "written": [str(p) for p in written]}, "\n".join(lines)


def _complete(session, args):
    from gptkiln.runtime.generate import GenerationConfig

    config = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    texts = session.complete(args.prompt, config)
    lines = [f"{prompt}\u2502{text}" for prompt, text in zip(args.prompt, texts)]
    return {"target": session.target, "completions": texts}, "\n\n".join(lines)


def _summary(result) -> str:
    compiled = [t for t in result.targets if t.compiled]
    rows = _quantized_rows(result, compiled) if result.precision.quantized else _parity_rows(result, compiled)
    stages = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in result.stage_seconds.items())
    fusions = [f"fusion  {t.name}: {_fusion_line(t.settings['fusion'])}" for t in result.targets]
    quantized = [f"quant   {_quant_line(result.quantization)}"] if result.quantization else []
    prepared = [_prepared_lines(t) for t in result.targets if not t.compiled]
    return (f"model   {_model_line(result.model, result.spec)}\n"
            f"output  {result.output}\nstages  {stages}\n" + "\n".join(quantized + fusions) + "\n\n"
            + (text_table(rows) if compiled else "") + "".join(prepared))


def _model_line(model: dict, spec) -> str:
    line = f"{model['name']} ({spec.family}, {spec.num_layers} layers)"
    if "gguf" in model:
        types = ", ".join(f"{count} {kind}" for kind, count in model["gguf"]["tensor_types"].items())
        line += f"\n        from GGUF, dequantized to float32 (tensors stored as {types})"
    if not spec.tested:
        line += (f"\n        note: '{spec.model_type}' is not among the families gptkiln's suite tests; "
                 "the parity gate below is what proves this build")
    return line


def text_table(rows: list[tuple]) -> str:
    """Columns padded to their widest cell, a rule under the header row."""
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _prepared_lines(target) -> str:
    settings = target.settings
    readiness = settings["readiness"]
    return (f"\n\n{target.name}: prepared, NOT compiled (no engine, no parity run here)\n"
            f"  readiness: ready for TensorRT {readiness['minimum_tensorrt']}+ "
            f"({len(readiness['warnings'])} warning(s)); the ONNX is in {target.name}/\n"
            "  missing here: " + "; ".join(settings["missing"]) + "\n"
            "  to finish: run the same gptkiln export on a machine that has them (builds, then proves parity),\n"
            f"  or build the engine alone there with trtexec: sh {target.name}/{settings['trtexec_script']}")


def _quantized_rows(result, targets) -> list[tuple]:
    rows = [("target", "precision", "perplexity fp32 -> ours", "increase", "top-1 vs fp32", "pad vs unpad top-1",
             "result")]
    for target in targets:
        accuracy = target.accuracy
        padded = min(c.top1_agreement for c in target.parity.comparisons if c.name.startswith("padded_vs"))
        rows.append((target.name, result.precision.value, f"{accuracy.ppl_reference:.3f} -> {accuracy.ppl:.3f}",
                     f"{accuracy.ppl_increase_pct:+.2f}%", f"{accuracy.top1_agreement:.1%}", f"{padded:.1%}",
                     "PASS" if not target.failures else "FAIL"))
    return rows


def _quant_line(quantization: dict) -> str:
    kept = ", ".join(quantization.get("kept", quantization.get("kept_fp32", []))) or "none"  # kept_fp32: older
    kept_precision = quantization.get("kept_precision", "fp32")
    smoothed = len(quantization["smoothing"])
    method = quantization["method"]
    details = ", ".join(f"{k} {v}" for k, v in method.items())
    narrowed = Counter(quantization.get("narrowed_blocks", {}).values())  # absent from earlier builds' manifests
    bits = quantization.get("bits_per_weight") or {}
    bits_line = "".join(f"; {value:.2f} bits per weight ({where.replace('_', ' ')})" for where, value in bits.items()
                        if value is not None)
    return (f"{quantization['layers_quantized']}/{quantization['layers_total']} linear layers quantized "
            f"({details}); kept in {kept_precision}: {kept}" + (f"; SmoothQuant on {smoothed} activations" if smoothed else "")
            + "".join(f"; {n} layers in blocks of {block} (their input size)" for block, n in sorted(narrowed.items()))
            + bits_line)


def _parity_rows(result, targets) -> list[tuple]:
    rows = [("target", "precision", "logits rel (b1)", "padded rel", "pad vs unpad", "top-1", "greedy", "result")]
    for target in targets:
        by_name = {c.name: c for c in target.parity.comparisons}
        unpadded = max((c.rel for c in target.parity.comparisons if c.name.startswith("padded_vs")), default=0.0)
        greedy = " ".join(f"{g.matched}/{g.tokens}" for g in target.parity.greedy)
        rows.append((target.name, result.precision.value, f"{by_name['batch1/logits'].rel:.2e}",
                     f"{by_name['padded/logits'].rel:.2e}", f"{unpadded:.2e}", f"{by_name['batch1/logits'].top1_agreement:.1%}", greedy,
                     "PASS" if not target.failures else "FAIL"))
    return rows


def _fusion_line(fusion: dict) -> str:
    counts = ", ".join(f"{c['name']} {c['actual']}" + (f"/{c['expected']}" if c["expected"] is not None else "")
                       for c in fusion["fusions"])
    return f"{counts}; nodes {fusion['nodes_before']} -> {fusion['nodes_after']}"


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
