"""The accuracy of a quantized build: perplexity on held-out text and top-1 agreement with the
fp32 PyTorch model, over the same windows of tokens, through any Runner."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from gptkiln.calibration.data import read_texts, token_stream
from gptkiln.config import AccuracyBudget
from gptkiln.errors import CalibrationError
from gptkiln.models.loading import REFERENCE_DIR
from gptkiln.progress import QUIET, Progress
from gptkiln.targets.base import Runner

DEFAULT_EVAL_TEXT = REFERENCE_DIR / "heldout.txt"
WINDOW = 128  # tokens per evaluation window (each scored from an empty cache)
# a window's first PREFILL tokens are one step; the rest are decoded a token a step, each reading the tokens before
# it from the runner's KV cache as generation does, so the cache's storage (OpenVINO's f16 / u8) and the one-token
# kernels are measured too (a prefill alone never reads the cache)
PREFILL = WINDOW // 2
BATCH = 8


@dataclass
class Scores:
    nll: float  # mean negative log-likelihood of the next token
    top1: np.ndarray  # [windows, WINDOW - 1] argmax predictions

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.nll))


@dataclass
class AccuracyReport:
    text: str
    tokens: int
    ppl_reference: float
    ppl: float
    top1_agreement: float

    @property
    def ppl_increase_pct(self) -> float:
        return 100.0 * (self.ppl / self.ppl_reference - 1.0)

    def to_dict(self) -> dict:
        return {**asdict(self), "ppl_increase_pct": self.ppl_increase_pct}

    @classmethod
    def from_dict(cls, data: dict) -> "AccuracyReport":
        return cls(**{k: v for k, v in data.items() if k != "ppl_increase_pct"})


@dataclass
class EvalText:
    texts: list[str]
    name: str

    @classmethod
    def read(cls, path: Path | None) -> "EvalText":
        """The evaluation text at `path`, or the reference model's held-out split."""
        path = Path(path) if path is not None else DEFAULT_EVAL_TEXT
        return cls(read_texts(path), str(path))


def eval_windows(tokenizer, text: EvalText, max_tokens: int) -> np.ndarray:
    """[windows, WINDOW] token ids from the start of the evaluation text (deterministic)."""
    stream = token_stream(text.texts, tokenizer)[:max_tokens]
    count = len(stream) // WINDOW
    if count < 1:
        raise CalibrationError(f"evaluation text '{text.name}' has {len(stream)} tokens, fewer than one window of "
                               f"{WINDOW}", "give a longer --eval-text")
    return stream[: count * WINDOW].reshape(count, WINDOW)


def _logits(runner: Runner, ids: np.ndarray) -> np.ndarray:
    """[batch, WINDOW, vocab]: each window from an empty cache, its first PREFILL tokens in one step, then one
    token a step (the PyTorch reference: every token in one step, the same logits 4.5x faster on SmolLM2)."""
    batch, length = ids.shape
    bounds = [0, *range(length if runner.exact_cache else min(PREFILL, length), length + 1)]
    cache, parts = runner.empty_cache(batch, length), []
    for start, end in zip(bounds, bounds[1:]):
        positions = np.broadcast_to(np.arange(start, end), (batch, end - start)).copy()
        logits, cache = runner.step(ids[:, start:end], np.ones((batch, end), ids.dtype), positions, cache)
        parts.append(logits)
    return np.concatenate(parts, axis=1)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def token_scores(logits: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the negative log-likelihood of each target, float64; the argmax) from logits [..., vocab] and the next
    tokens [...]. Exponentials in float32, sums in float64: a float64 log-softmax of the whole vocabulary took
    40% of an evaluation, for the same numbers to ~1e-7."""
    logits = np.asarray(logits, np.float32)
    top = logits.max(-1, keepdims=True)
    shifted = np.subtract(logits, top)
    total = np.exp(shifted, out=shifted).sum(-1, dtype=np.float64)
    chosen = np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return np.log(total) + top[..., 0] - chosen, logits.argmax(-1)


def score(runner: Runner, windows: np.ndarray, progress: Progress = QUIET) -> Scores:
    nll_sum, count, top1 = 0.0, 0, []
    bar = progress.bar(-(-len(windows) // BATCH), "perplexity", "batches")
    for start in range(0, len(windows), BATCH):
        ids = windows[start : start + BATCH]
        nll, argmax = token_scores(_logits(runner, ids)[:, :-1], ids[:, 1:])
        nll_sum += float(nll.sum())
        count += nll.size
        top1.append(argmax)
        bar.step()
    bar.close()
    return Scores(nll_sum / count, np.concatenate(top1))


def compare(ours: Scores, reference: Scores, text: str) -> AccuracyReport:
    return AccuracyReport(text, int(reference.top1.size + len(reference.top1)), reference.perplexity,
                          ours.perplexity, float((ours.top1 == reference.top1).mean()))


@dataclass
class Evaluation:
    """The evaluation windows and the fp32 PyTorch scores on them, computed once per build."""

    windows: np.ndarray
    text: str
    reference: Scores

    @classmethod
    def prepare(cls, loaded, text: EvalText, eval_tokens: int, progress: Progress = QUIET) -> "Evaluation":
        from gptkiln.runtime.torch_runner import TorchRunner

        windows = eval_windows(loaded.tokenizer, text, eval_tokens)
        return cls(windows, text.name, score(TorchRunner(loaded.model, loaded.spec), windows, progress))

    def measure(self, runner: Runner, progress: Progress = QUIET) -> AccuracyReport:
        return compare(score(runner, self.windows, progress), self.reference, self.text)


@dataclass
class Probe:
    """A cheap score of how far a quantized graph moves the model, for ranking the fallback's layer groups: the
    mean KL divergence (nats per token) of its next-token distributions from the fp32 model's, over one batch of
    windows (a full evaluation scores many)."""

    windows: np.ndarray  # [BATCH, WINDOW]
    reference: np.ndarray  # [BATCH, WINDOW, vocab] fp32 log-probabilities, float32

    @classmethod
    def prepare(cls, loaded, windows: np.ndarray) -> "Probe":
        from gptkiln.runtime.torch_runner import TorchRunner

        windows = windows[:BATCH]
        return cls(windows, _log_softmax(_logits(TorchRunner(loaded.model, loaded.spec), windows)).astype(np.float32))

    def divergence(self, runner: Runner) -> float:
        ours = _log_softmax(_logits(runner, self.windows))
        return float((np.exp(self.reference) * (self.reference - ours)).sum(-1).mean())


def accuracy_failures(report: AccuracyReport, budget: AccuracyBudget) -> list[str]:
    failures = []
    if report.ppl_increase_pct > budget.max_ppl_increase_pct:
        failures.append(f"accuracy: perplexity {report.ppl:.3f} vs fp32 {report.ppl_reference:.3f} "
                        f"(+{report.ppl_increase_pct:.2f}%, limit +{budget.max_ppl_increase_pct:g}%) on {report.tokens} "
                        f"tokens of {report.text}")
    if report.top1_agreement < budget.min_top1_agreement:
        failures.append(f"accuracy: top-1 agreement with fp32 {report.top1_agreement:.2%} "
                        f"(limit {budget.min_top1_agreement:.0%})")
    return failures
