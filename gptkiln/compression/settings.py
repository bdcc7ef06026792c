"""What a compression run is asked to do (no torch here: the command line reads these defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from gptkiln.errors import UsageError


@dataclass(frozen=True)
class DistillSettings:
    steps: int = 0  # 0: no distillation
    learning_rate: float = 1e-4
    temperature: float = 2.0
    batch: int = 4  # calibration windows per step
    warmup: float = 0.1  # share of the steps the learning rate ramps up over
    seed: int = 0
    checkpoint_every: int = 50


# The default budget: +25% perplexity against the original on the held-out text. Pruning trades quality for
# size on purpose, so the gate's job is to refuse a broken model, not a smaller one. Measured
# (benchmarks/RESULTS.md, "Pruning and distillation"): MLP -25% distilled passes on SmolLM2 (+15.6%) and the
# reference model (+1.7%), as does a quarter of the reference model's blocks distilled (+7.8%); a quarter of
# SmolLM2's 30 blocks, even distilled 150 steps (+61%), and every undistilled depth cut do not.
DEFAULT_MAX_PPL_INCREASE = 25.0
SPARSITY_PATTERNS = ("2:4",)  # what NVIDIA's sparse tensor cores run (TensorRT's SPARSE_WEIGHTS)
SPARSITY_SCORES = ("wanda", "magnitude")  # compression/sparsity.py


@dataclass(frozen=True)
class CompressSettings:
    model: str
    output: Path
    calibration: Path
    prune_layers: int = 0  # whole blocks removed
    prune_mlp: float = 0.0  # share of every block's MLP channels removed
    prune_heads: int = 0  # whole KV groups removed from every block
    sparsity: str | None = None  # "2:4": semi-structured masks on every linear layer inside the blocks
    sparsity_score: str = "wanda"  # or "magnitude"
    calibration_samples: int = 64
    calibration_seq_len: int = 128
    calibration_seed: int = 0
    distill: DistillSettings = field(default_factory=DistillSettings)
    eval_text: Path | None = None
    eval_tokens: int = 8192
    max_ppl_increase: float = DEFAULT_MAX_PPL_INCREASE
    force: bool = False

    def check(self, num_layers: int | None = None) -> None:
        """Refuse a request that cannot work; `num_layers` None: before the model is loaded (a build file)."""
        if not (self.prune_layers or self.prune_mlp or self.prune_heads or self.sparsity):
            raise UsageError("nothing to remove",
                             "pass --prune-layers N, --prune-mlp RATIO, --prune-heads N or --sparsity 2:4")
        if self.sparsity not in (None, *SPARSITY_PATTERNS) or self.sparsity_score not in SPARSITY_SCORES:
            raise UsageError(f"--sparsity knows {', '.join(SPARSITY_PATTERNS)} and --sparsity-score "
                             f"{' or '.join(SPARSITY_SCORES)}, got {self.sparsity!r} / {self.sparsity_score!r}",
                             "e.g. --sparsity 2:4 --sparsity-score wanda")
        if self.prune_layers < 0:
            raise UsageError(f"--prune-layers must be >= 0, got {self.prune_layers}", "pass a block count")
        if num_layers is not None and self.prune_layers >= num_layers:
            raise UsageError(f"--prune-layers must be 0 to {num_layers - 1} for this {num_layers}-block model, "
                             f"got {self.prune_layers}", "pass a smaller count")
        if not 0 <= self.prune_mlp < 1:
            raise UsageError(f"--prune-mlp is the share of MLP channels removed, in [0, 1), got {self.prune_mlp}",
                             "e.g. --prune-mlp 0.25")
        if self.distill.steps < 0 or self.distill.learning_rate <= 0 or self.distill.temperature <= 0:
            raise UsageError("--distill-steps must be >= 0, --learning-rate and --temperature > 0", "fix the values")
        if self.max_ppl_increase <= 0:
            raise UsageError("--max-ppl-increase must be > 0", "give a percentage, e.g. 25")




DISTILL_OPTIONS = {"distill_steps": "steps", "learning_rate": "learning_rate", "temperature": "temperature",
                   "distill_batch": "batch", "seed": "seed"}  # option name -> DistillSettings field


def compress_settings(model: str, output: Path, calibration: Path, **options) -> CompressSettings:
    """CompressSettings from option values by `gptkiln compress`'s destination names (the command line's, the API's
    keyword arguments, a build file's `compress:` entry); None or absent: the default. `seed` seeds both the
    calibration windows and the distillation."""
    options = {name: value for name, value in options.items() if value is not None}
    unknown = set(options) - set(DISTILL_OPTIONS) - {f.name for f in fields(CompressSettings)}
    if unknown:
        raise UsageError(f"unknown compress option(s): {', '.join(sorted(unknown))}",
                         "use the names of `gptkiln compress --help` with _ for -")
    distill = DistillSettings(**{DISTILL_OPTIONS[name]: options.pop(name) for name in list(options)
                                 if name in DISTILL_OPTIONS and name != "seed"}, seed=options.get("seed", 0))
    if "seed" in options:
        options["calibration_seed"] = options.pop("seed")
    if options.get("eval_text") is not None:
        options["eval_text"] = Path(options["eval_text"])
    return CompressSettings(model=model, output=Path(output), calibration=Path(calibration), distill=distill, **options)
