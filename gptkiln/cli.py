"""gptkiln command line: arguments -> the Python API (gptkiln.api) -> a summary or JSON; errors -> one line and an
exit code."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from gptkiln import api
from gptkiln.config import ParitySettings
from gptkiln.errors import GptkilnError
from gptkiln.options import add_compress_arguments, add_export_arguments, export_config
from gptkiln.summary import build_summary, compress_summary


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
    if args.json:
        print(json.dumps({"ok": code == 0, **payload}, indent=2))
    elif text is not None:  # None: the command printed its output as it went (streamed text)
        print(text)
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
    add_export_arguments(export)
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

    compress = commands.add_parser("compress", help="prune MODEL by measured importance, distil it, gate it, write "
                                                     "a checkpoint")
    add_compress_arguments(compress)
    compress.set_defaults(handler=_compress)

    bench = commands.add_parser("bench", help="measure every built target and precision against PyTorch eager")
    _add_bench_arguments(bench)
    bench.set_defaults(handler=_bench)

    for sub in (export, build, verify, generate, pack, run, compress, bench):
        sub.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    verify.add_argument("--decode-steps", type=int, default=ParitySettings.decode_steps,
                        help="decode steps compared after the prefill")
    verify.add_argument("--logits-rel", type=float, default=None,
                        help="max |logit diff| allowed, relative to max |logit| (default: what the build was held to)")
    return parser


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
    texts = parser.add_mutually_exclusive_group(required=True)
    texts.add_argument("--prompt", action="append", help="prompt text, continued as it is (repeat for a batch)")
    texts.add_argument("--chat", action="append",
                       help="a user message, put through the model's chat template (repeat for a batch)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)


def _export(args):
    values = {name: value for name, value in vars(args).items() if name not in ("handler", "command", "json")}
    result = api.export(**values, progress=True)
    return result.to_dict(), build_summary(result)


def _build(args):
    from gptkiln.matrix import matrix_summary, plan_summary

    outcomes = api.build(args.file, jobs=args.jobs, cache=not args.no_cache, dry_run=args.dry_run)
    if args.dry_run:
        return {"plan": outcomes}, plan_summary(outcomes)
    failed = [o for o in outcomes if not o["ok"]]
    return ({"builds": outcomes, "exit_code": failed[0]["error"]["exit_code"] if failed else 0},
            matrix_summary(outcomes))


def _verify(args):
    result = api.verify(args.output, logits_rel=args.logits_rel, decode_steps=args.decode_steps, progress=True)
    return result.to_dict(), build_summary(result)


def _generate(args):
    return _complete(api.load(args.output, args.target), args)


def _pack(args):
    body = api.pack(args.output, args.bundle, args.targets)
    size = args.bundle.stat().st_size
    lines = [f"bundle  {args.bundle} ({size / 1e6:.1f} MB, {len(body['files'])} files + bundle.json)"]
    lines += [f"target  {name}: needs {t['requires']['runtime']} >= {t['requires']['minimum_version']} "
              f"on {t['requires']['device']}; gate {'PASS' if t['gate']['passed'] else 'FAIL'}"
              for name, t in body["targets"].items()]
    return {"bundle": str(args.bundle), "bytes": size, "manifest": body}, "\n".join(lines)


def _run(args):
    with api.load(args.bundle, args.target, bundle=True) as loaded:
        return _complete(loaded, args)


def _compress(args):
    result = api.compress(args.model, args.output, calibration=args.calibration, prune_layers=args.prune_layers,
                          prune_mlp=args.prune_mlp, prune_heads=args.prune_heads, sparsity=args.sparsity,
                          sparsity_score=args.sparsity_score, distill_steps=args.distill_steps,
                          learning_rate=args.learning_rate, temperature=args.temperature, distill_batch=args.distill_batch,
                          seed=args.seed, calibration_samples=args.calibration_samples,
                          calibration_seq_len=args.calibration_seq_len, eval_text=args.eval_text,
                          eval_tokens=args.eval_tokens, max_ppl_increase=args.max_ppl_increase, force=args.force,
                          progress=True)
    return result.to_dict(), compress_summary(result)


def _bench(args):
    import tempfile

    from gptkiln.extras import require_export_stack

    require_export_stack("bench (PyTorch is its baseline)")
    from gptkiln.bench.measure import BenchSettings
    from gptkiln.bench.report import chart, pyplot, summary
    from gptkiln.bench.run import bench, is_output_root, save
    from gptkiln.manifest import BENCHMARK_CHART
    from gptkiln.pipeline import build
    from gptkiln.progress import Progress

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


def _complete(loaded: api.LoadedOutput, args):
    options = {"max_new_tokens": args.max_new_tokens, "do_sample": args.sample, "temperature": args.temperature,
               "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed, "chat": args.chat is not None}
    prompts = args.chat if options["chat"] else args.prompt
    payload = {"target": loaded.target}
    if len(prompts) == 1 and not args.json:  # one text: print it as it is generated
        def write(piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

        write("" if options["chat"] else f"{prompts[0]}\u2502")
        payload["completions"] = loaded.generate(prompts, stream=write, **options)
        write("\n")
        return payload, None
    payload["completions"] = loaded.generate(prompts, **options)
    lines = [f"{prompt}\u2502{text}" for prompt, text in zip(prompts, payload["completions"])]
    return payload, "\n\n".join(lines)


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
