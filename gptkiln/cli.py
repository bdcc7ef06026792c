"""gptkiln command line: arguments -> config -> pipeline; errors -> one line and an exit code."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from gptkiln.config import BuildConfig, ParitySettings, Tolerances
from gptkiln.errors import GptkilnError, UsageError


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _quiet_libraries()
    try:
        payload, text = args.handler(args)
    except GptkilnError as error:
        if os.environ.get("GPTKILN_DEBUG"):
            raise
        if args.json:
            print(json.dumps({"ok": False, "error": {
                "type": type(error).__name__, "cause": error.cause, "fix": error.fix,
                "exit_code": error.exit_code, "details": error.details}}, indent=2))
        print(f"gptkiln: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("gptkiln: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(json.dumps({"ok": True, **payload}, indent=2) if args.json else text)
    return 0


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
    export.add_argument("model", help="'reference', 'preset:gpt2', a local model directory or a Hugging Face id")
    export.add_argument("-o", "--output", required=True, type=Path, help="output directory (must not exist)")
    export.add_argument("--target", action="append", dest="targets",
                        help="target to build (repeatable); default: every target available here")
    export.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    export.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 18)")
    export.set_defaults(handler=_export)

    verify = commands.add_parser("verify", help="check an output's files and rerun its parity gates")
    verify.add_argument("output", type=Path)
    verify.set_defaults(handler=_verify)

    generate = commands.add_parser("generate", help="generate text with a built engine")
    generate.add_argument("output", type=Path)
    generate.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    generate.add_argument("--target", help="which built target to run; default: the first in the manifest")
    generate.add_argument("--max-new-tokens", type=int, default=32)
    generate.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    generate.add_argument("--temperature", type=float, default=1.0)
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--seed", type=int, default=0)
    generate.set_defaults(handler=_generate)

    for sub in (export, verify, generate):
        sub.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    for sub in (export, verify):
        sub.add_argument("--decode-steps", type=int, default=ParitySettings.decode_steps,
                         help="decode steps compared after the prefill")
        sub.add_argument("--logits-rel", type=float, default=None,
                         help=f"max |logit diff| allowed, relative to max |logit| (export default "
                              f"{Tolerances.logits_rel:g}; verify default: what the build was held to)")
    return parser


def _tolerances(args) -> tuple[Tolerances | None, ParitySettings]:
    """(None, ...) when --logits-rel was not given: the caller picks its default."""
    if args.decode_steps < 1 or (args.logits_rel is not None and args.logits_rel <= 0):
        raise UsageError("--decode-steps must be >= 1 and --logits-rel > 0", "fix the option values")
    tolerances = None if args.logits_rel is None else Tolerances(logits_rel=args.logits_rel, padded_rel=args.logits_rel)
    return tolerances, ParitySettings(decode_steps=args.decode_steps)


def _export(args):
    from gptkiln.pipeline import Progress, build
    from gptkiln.targets import available_targets

    if args.opset < 18:
        raise UsageError(f"--opset {args.opset} is too old", "use --opset 18 or newer")
    tolerances, parity = _tolerances(args)
    config = BuildConfig(model=args.model, output=args.output, targets=tuple(args.targets or available_targets()),
                         opset=args.opset, force=args.force, tolerances=tolerances or Tolerances(), parity=parity)
    result = build(config, Progress(enabled=True))
    return result.to_dict(), _summary(result)


def _verify(args):
    from gptkiln.pipeline import Progress, verify

    tolerances, parity = _tolerances(args)
    result = verify(args.output, tolerances, parity, Progress(enabled=True))
    return result.to_dict(), _summary(result)


def _generate(args):
    from gptkiln.runtime.generate import GenerationConfig
    from gptkiln.runtime.session import open_output

    session = open_output(args.output, args.target)
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    texts = session.complete(args.prompt, config)
    lines = [f"{prompt}\u2502{text}" for prompt, text in zip(args.prompt, texts)]
    return {"target": session.target, "completions": texts}, "\n\n".join(lines)


def _summary(result) -> str:
    rows = [("target", "logits rel (b1)", "padded rel", "pad vs unpad", "top-1", "greedy", "result")]
    for target in result.targets:
        by_name = {c.name: c for c in target.parity.comparisons}
        unpadded = max((c.rel for c in target.parity.comparisons if c.name.startswith("padded_vs")), default=0.0)
        greedy = " ".join(f"{g.matched}/{g.tokens}" for g in target.parity.greedy)
        rows.append((target.name, f"{by_name['batch1/logits'].rel:.2e}", f"{by_name['padded/logits'].rel:.2e}",
                     f"{unpadded:.2e}", f"{by_name['batch1/logits'].top1_agreement:.1%}", greedy,
                     "PASS" if not target.failures else "FAIL"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    table = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    table.insert(1, "  ".join("-" * width for width in widths))
    stages = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in result.stage_seconds.items())
    fusions = [f"fusion  {t.name}: {_fusion_line(t.settings['fusion'])}" for t in result.targets]
    return (f"model   {result.model['name']} ({result.spec.model_type}, {result.spec.num_layers} layers)\n"
            f"output  {result.output}\nstages  {stages}\n" + "\n".join(fusions) + "\n\n" + "\n".join(table))


def _fusion_line(fusion: dict) -> str:
    counts = ", ".join(f"{c['name']} {c['actual']}" + (f"/{c['expected']}" if c["expected"] is not None else "")
                       for c in fusion["fusions"])
    return f"{counts}; nodes {fusion['nodes_before']} -> {fusion['nodes_after']}"


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
