"""gptkiln's Python API: what the command line does, as functions that return the results it prints.

    import gptkiln

    result = gptkiln.export("reference", "out/reference", targets=["onnxruntime"], quantize="int8")
    result.ok, result.to_dict()                      # the `--json` of `gptkiln export`
    gptkiln.verify("out/reference")                  # files and parity again (raises on any failure)
    model = gptkiln.load("out/reference")            # one target's engine + tokenizer, no torch
    model.generate("def main(", max_new_tokens=16)   # also chat=True, stream=print, do_sample=True, ...
    with gptkiln.load("reference.kiln.tar") as model: ...   # a bundle: verified, then run
    gptkiln.build("kiln.yaml")                       # a build file's matrix, one record per build
    gptkiln.pack("out/reference", "reference.kiln.tar")

Options are the command line's, by their destination names (`--int4-block-size` is `int4_block_size`);
errors are the same GptkilnError subclasses, whose `exit_code` the command line exits with. Importing
gptkiln loads nothing heavy: torch and transformers are imported by export and verify only.
"""

from __future__ import annotations

from pathlib import Path

from gptkiln.runtime.generate import GenerationConfig


def export(model: str, output: str | Path, *, targets: list[str] | None = None, quantize: str = "fp32",
           calibration: str | Path | None = None, force: bool = False, progress: bool = False, **options):
    """Export `model` (a name `gptkiln export` takes) into `output`, compile and prove every target; return the
    BuildResult (raises ParityError, with the report, when a gate fails; nothing is written then)."""
    from gptkiln.options import export_config
    from gptkiln.pipeline import build as build_output
    from gptkiln.progress import Progress

    values = {"model": model, "output": Path(output), "targets": targets, "quantize": quantize,
              "calibration": Path(calibration) if calibration else None, "force": force, **options}
    return build_output(export_config(values), Progress(enabled=progress))


def verify(output: str | Path, *, logits_rel: float | None = None, decode_steps: int | None = None,
           progress: bool = False):
    """Check every file of `output` against its manifest and rerun each target's gates; return the BuildResult."""
    import argparse

    from gptkiln.config import ParitySettings
    from gptkiln.options import parity_options
    from gptkiln.pipeline import verify as verify_output
    from gptkiln.progress import Progress

    args = argparse.Namespace(logits_rel=logits_rel,
                              decode_steps=ParitySettings.decode_steps if decode_steps is None else decode_steps)
    tolerances, parity = parity_options(args)
    return verify_output(Path(output), tolerances, parity, Progress(enabled=progress))


class LoadedOutput:
    """A built output's (or a bundle's) engine for one target, with its tokenizer: text in, text out.
    A context manager: leaving it removes a bundle's extracted files."""

    def __init__(self, session, bundle=None):
        self.session, self._bundle = session, bundle
        self.target = session.target

    def close(self) -> None:
        if self._bundle is not None:
            self._bundle.close()

    def __enter__(self) -> "LoadedOutput":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, prompts: str | list[str], *, max_new_tokens: int = 32, chat: bool = False,
                 stream=None, **sampling) -> str | list[str]:
        """Complete one prompt (a str back) or a batch (a list back). chat: prompts are user messages put through
        the model's chat template. stream: called with each new piece of text (one prompt only). sampling:
        do_sample, temperature, top_k, top_p, seed (greedy by default)."""
        single = isinstance(prompts, str)
        config = GenerationConfig(max_new_tokens=max_new_tokens, **sampling)
        texts = self.session.complete([prompts] if single else list(prompts), config, chat=chat, stream=stream)
        return texts[0] if single else texts


def load(path: str | Path, target: str | None = None, bundle: bool | None = None) -> LoadedOutput:
    """Open a built output directory or a bundle file (`gptkiln pack`), its files checked against the manifest,
    for `target` (default: the first built; for a bundle, the first this machine runs). bundle: True refuses
    anything but a bundle (None: a file is one)."""
    path = Path(path)
    if bundle or (bundle is None and path.is_file()):
        from gptkiln.bundle import open_bundle

        opened = open_bundle(path, target)
        try:
            return LoadedOutput(opened.session(), opened)
        except BaseException:
            opened.close()
            raise
    from gptkiln.runtime.session import open_output

    return LoadedOutput(open_output(path, target))


def build(file: str | Path, *, jobs: int | None = None, cache: bool = True, dry_run: bool = False) -> list[dict]:
    """Run every build of a build file (kiln.yaml / kiln.toml); return one record per build, as `gptkiln build
    --json` prints them (each with `ok`, and `error` with its exit code where it failed; a build of a compressed
    model with `compression`, that compression's outcome). dry_run: the plan (compressions first)."""
    from dataclasses import replace

    from gptkiln.build_file import read_build_file
    from gptkiln.errors import UsageError
    from gptkiln.extras import require_export_stack
    from gptkiln.matrix import dry_run as plan, run_matrix

    require_export_stack("a build file")
    build_file = read_build_file(Path(file))
    if not cache:
        build_file.builds = [replace(b, config=replace(b.config, cache=False)) for b in build_file.builds]
    if dry_run:
        return plan(build_file.builds, build_file.compressions)
    jobs = jobs or build_file.jobs
    if jobs < 1:
        raise UsageError(f"jobs must be >= 1, got {jobs}", "pass a positive count")
    return run_matrix(build_file.builds, jobs, build_file.compressions)


def compress(model: str, output: str | Path, *, calibration: str | Path, prune_layers: int = 0, prune_mlp: float = 0.0,
             prune_heads: int = 0, sparsity: str | None = None, sparsity_score: str | None = None,
             distill_steps: int = 0, learning_rate: float | None = None,
             temperature: float | None = None, distill_batch: int | None = None, seed: int = 0,
             calibration_samples: int | None = None, calibration_seq_len: int | None = None,
             eval_text: str | Path | None = None, eval_tokens: int | None = None,
             max_ppl_increase: float | None = None, force: bool = False, progress: bool = False):
    """Prune `model` by importance measured on `calibration` (blocks, MLP channels, KV groups, and/or 2:4
    sparsity: `sparsity="2:4"`), distil it for `distill_steps`, gate it against the
    original and write a standard checkpoint into `output` (`gptkiln export` takes it); return the
    CompressResult (raises ParityError over the budget; nothing is written then). None: the default."""
    from gptkiln.compression.run import compress as compress_model
    from gptkiln.compression.settings import compress_settings
    from gptkiln.progress import Progress

    settings = compress_settings(model, Path(output), Path(calibration), prune_layers=prune_layers,
                                 prune_mlp=prune_mlp, prune_heads=prune_heads, sparsity=sparsity,
                                 sparsity_score=sparsity_score, distill_steps=distill_steps,
                                 learning_rate=learning_rate, temperature=temperature, distill_batch=distill_batch,
                                 seed=seed, calibration_samples=calibration_samples,
                                 calibration_seq_len=calibration_seq_len, eval_text=eval_text,
                                 eval_tokens=eval_tokens, max_ppl_increase=max_ppl_increase, force=force)
    return compress_model(settings, Progress(enabled=progress))


def pack(output: str | Path, bundle: str | Path, targets: list[str] | None = None) -> dict:
    """Write one verifiable bundle file of `output`; return its bundle.json."""
    from gptkiln.bundle import pack as pack_output

    return pack_output(Path(output), Path(bundle), targets)
