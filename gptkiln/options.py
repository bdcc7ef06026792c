"""The option vocabulary of an export: one definition for the command line, build files and the Python API.

`add_export_arguments` declares every option of `gptkiln export` (argparse); `export_config(values)` turns a
dict of option values by destination name (the command line's, a build file's `options`, the API's keyword
arguments) into a checked BuildConfig, with the same defaults and the same errors everywhere.
`add_compress_arguments` does the same for `gptkiln compress` (its values become CompressSettings in
compression/settings.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gptkiln.compression.settings import (DEFAULT_MAX_PPL_INCREASE, SPARSITY_PATTERNS, SPARSITY_SCORES,
                                          CompressSettings, DistillSettings)
from gptkiln.config import (AUTO_ALPHA, DYNAMIC_ALPHA, FLOAT_RATIO, AccuracyBudget, ActivationCalibration, BuildConfig,
                            CalibrationSettings, EngineSettings, Int4Method, ParitySettings, Precision, QuantSettings,
                            RuntimeSettings, Tolerances)
from gptkiln.errors import TargetUnavailableError, UsageError


def add_export_arguments(export: argparse.ArgumentParser) -> None:
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
                        help="OpenVINO's stateful KV cache storage (default: f16 for quantized builds, whose gate "
                             "decodes through it, else the inference precision; f16/u8 read fewer bytes per step and "
                             "are held to the half-precision bars)")
    export.add_argument("--dynamic-quantization-group", type=int,
                        help="OpenVINO: quantize the activations of integer-weight layers to int8 per group of N at "
                             "run time, 0: float activations (default: the CPU's 32, then 16, then 0 where an "
                             "engine fails its gates)")
    _add_quantization_options(export)
    _add_engine_options(export)
    export.add_argument("--decode-steps", type=int, default=ParitySettings.decode_steps,
                        help="decode steps compared after the prefill")
    export.add_argument("--logits-rel", type=float, default=None,
                        help=f"max |logit diff| allowed, relative to max |logit| (export default "
                             f"{Tolerances.logits_rel:g}; verify default: what the build was held to)")


def export_options() -> dict[str, argparse.Action]:
    """The options of `gptkiln export` by destination name (a build file's `options` use the same)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_export_arguments(parser)
    return {action.dest: action for action in parser._actions if action.option_strings}


def add_compress_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `gptkiln compress` (a build file's `compress:` entries use the same, without -o/--force)."""
    defaults, distill = CompressSettings(model="", output=Path(), calibration=Path()), DistillSettings()
    parser.add_argument("model", help="anything `gptkiln export` takes")
    parser.add_argument("-o", "--output", required=True, type=Path, help="directory for the compressed checkpoint")
    parser.add_argument("--calibration", required=True, type=Path,
                        help="text the importance is measured and the distillation trained on (file, .jsonl, directory)")
    parser.add_argument("--prune-layers", type=int, default=0, help="whole blocks to remove (the least influential)")
    parser.add_argument("--prune-mlp", type=float, default=0.0, help="share of every block's MLP channels to remove")
    parser.add_argument("--prune-heads", type=int, default=0,
                        help="whole KV groups (a KV head and its query heads) to remove from every block")
    parser.add_argument("--sparsity", choices=SPARSITY_PATTERNS,
                        help="semi-structured sparsity of every linear layer in the blocks (TensorRT runs 2:4 on "
                             "sparse tensor cores; CPU targets run it dense)")
    parser.add_argument("--sparsity-score", choices=SPARSITY_SCORES, default=defaults.sparsity_score,
                        help="which 2 of 4 weights stay: wanda (|weight| x input norm) or magnitude (default %(default)s)")
    parser.add_argument("--distill-steps", type=int, default=distill.steps, help="default %(default)s: no distillation")
    parser.add_argument("--learning-rate", type=float, default=distill.learning_rate, help="default %(default)s")
    parser.add_argument("--temperature", type=float, default=distill.temperature, help="default %(default)s")
    parser.add_argument("--distill-batch", type=int, default=distill.batch, help="windows per step (default %(default)s)")
    parser.add_argument("--seed", type=int, default=distill.seed, help="default %(default)s")
    parser.add_argument("--calibration-samples", type=int, default=defaults.calibration_samples,
                        help="windows of calibration text (default %(default)s)")
    parser.add_argument("--calibration-seq-len", type=int, default=defaults.calibration_seq_len, help="default %(default)s")
    parser.add_argument("--eval-text", type=Path, help="held-out text of the gate (default: the reference model's)")
    parser.add_argument("--eval-tokens", type=int, default=defaults.eval_tokens, help="default %(default)s")
    parser.add_argument("--max-ppl-increase", type=float, default=DEFAULT_MAX_PPL_INCREASE,
                        help="the gate: perplexity increase allowed against the original, percent (default %(default)s)")
    parser.add_argument("--force", action="store_true", help="replace an earlier compressed checkpoint")


def compress_options() -> dict[str, argparse.Action]:
    """The options of `gptkiln compress` by destination name."""
    parser = argparse.ArgumentParser(add_help=False)
    add_compress_arguments(parser)
    return {action.dest: action for action in parser._actions if action.option_strings}


def _add_quantization_options(parser: argparse.ArgumentParser) -> None:
    defaults = QuantSettings()
    group = parser.add_argument_group("quantization (accuracy-gated; see the README)")
    group.add_argument("--quantize", choices=[p.value for p in Precision], default=Precision.FP32.value,
                       help="precision of the build (default fp32; fp16/bf16 keep normalization and softmax in fp32)")
    group.add_argument("--calibration", type=Path,
                       help="calibration text: a text file, a .jsonl file or a directory (needed by w8a8 and "
                            "calibrated int4; int8 and int8-dynamic use it for SmoothQuant)")
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
    group.add_argument("--smoothquant-alpha", type=smoothquant_alpha_value, default=defaults.smoothquant_alpha,
                       help="SmoothQuant migration strength in [0, 1], or auto: searched per activation for W8A8, "
                            f"{DYNAMIC_ALPHA} for int8-dynamic and int8 (default %(default)s)")
    group.add_argument("--no-smoothquant", action="store_true",
                       help="W8A8, and int8-dynamic and int8 given --calibration, without SmoothQuant")
    group.add_argument("--no-float-channels", action="store_true",
                       help="W8A8 with every activation channel in int8 (default: the few outlier channels of an "
                            f"activation, max |x| >= {FLOAT_RATIO:g}x the median channel's, are multiplied in float)")
    group.add_argument("--int4-method", choices=[m.value for m in Int4Method], default=defaults.int4_method.value,
                       help="int4 rounding (gptq and awq-gptq need --calibration; default %(default)s)")
    group.add_argument("--int4-block-size", type=int, default=defaults.int4_block_size,
                       help="input rows per int4 scale; a layer whose input size is not a multiple gets the largest "
                            "power of two that divides it (default %(default)s)")
    group.add_argument("--int4-symmetric", action="store_true", help="int4 without zero points")
    group.add_argument("--int4-fine-block-size", type=int, default=defaults.int4_fine_block_size,
                       help="input rows per int4 scale, at most, where rounding costs most: a layer reading an input "
                            "wider than the hidden size (the MLP's down projection) and a tied lm_head "
                            "(default %(default)s; --int4-block-size's value turns it off)")
    group.add_argument("--int4-tune-epochs", type=int, default=defaults.int4_tune_epochs,
                       help="epochs over the calibration windows that train the int4 scales and norms end to end "
                            "against the fp32 model (gptq and awq-gptq; 0 turns it off; default %(default)s)")
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


def smoothquant_alpha_value(text: str) -> float | str:
    """--smoothquant-alpha: "auto" or a number in [0, 1]."""
    if text == AUTO_ALPHA:
        return AUTO_ALPHA
    try:
        alpha = float(text)
    except ValueError:
        alpha = None
    if alpha is None or not 0 <= alpha <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or '{AUTO_ALPHA}', got {text!r}")
    return alpha


def _quant_settings(args) -> QuantSettings:
    precision = Precision(args.quantize)
    if args.calibration_samples < 1 or args.calibration_seq_len < 32 or args.eval_tokens < 128:
        raise UsageError("--calibration-samples must be >= 1, --calibration-seq-len >= 32, --eval-tokens >= 128",
                         "fix the option values")
    for option, size in (("--int4-block-size", args.int4_block_size), ("--int4-fine-block-size", args.int4_fine_block_size),
                         ("--int8-block-size", args.int8_block_size)):
        if size < 16 or size & (size - 1):
            raise UsageError(f"{option} must be a power of two >= 16, got {size}", "use 32, 64 or 128")
    if args.int4_tune_epochs < 0:
        raise UsageError(f"--int4-tune-epochs must be >= 0, got {args.int4_tune_epochs}", "give 0 to turn tuning off")
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
                         float_channels=not args.no_float_channels,
                         int4_method=Int4Method(args.int4_method), int4_block_size=args.int4_block_size,
                         int4_symmetric=args.int4_symmetric, int4_fine_block_size=args.int4_fine_block_size,
                         int4_tune_epochs=args.int4_tune_epochs,
                         int8_block_size=args.int8_block_size,
                         fallback=not args.no_fallback,
                         eval_text=args.eval_text, eval_tokens=args.eval_tokens, budget=budget)


def parity_options(args) -> tuple[Tolerances | None, ParitySettings]:
    """(None, ...) when --logits-rel was not given: the caller picks its default."""
    if args.decode_steps < 1 or (args.logits_rel is not None and args.logits_rel <= 0):
        raise UsageError("--decode-steps must be >= 1 and --logits-rel > 0", "fix the option values")
    tolerances = None if args.logits_rel is None else Tolerances(logits_rel=args.logits_rel, padded_rel=args.logits_rel)
    return tolerances, ParitySettings(decode_steps=args.decode_steps)


def export_config(values: dict) -> BuildConfig:
    """The BuildConfig of `gptkiln export` option values (the command line's, or a build file's over the defaults)."""
    from gptkiln.targets import TARGETS, available_targets, get_target

    options = export_options()
    unknown = sorted(set(values) - set(options) - {"model"})
    if unknown:
        raise UsageError(f"unknown export option(s): {', '.join(unknown)}",
                         "use the names of `gptkiln export --help` with _ for -, e.g. int4_block_size")
    for name, value in values.items():
        choices = options[name].choices if name in options else None
        if choices and value is not None and value not in choices:
            raise UsageError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}", "fix the value")
    args = argparse.Namespace(**{**{dest: a.default for dest, a in options.items()}, **values})
    if args.threads < 0:
        raise UsageError(f"--threads must be >= 0, got {args.threads}", "pass a thread count, or 0 for every core")
    if args.opset < 18:
        raise UsageError(f"--opset {args.opset} is too old", "use --opset 18 or newer")
    tolerances, parity = parity_options(args)
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
    return group  # None: the CPU default, then finer and float ones where it fails (OpenVinoTarget.fallback)
