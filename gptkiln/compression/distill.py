"""Knowledge distillation: the pruned student learns the unpruned teacher's next-token distributions on the
calibration windows (KL divergence at a temperature, scaled by T² as in Hinton et al.), with AdamW, a linear
warm-up and a cosine decay, a fixed number of steps and a seed.

Resumable: every `checkpoint_every` steps (and on Ctrl-C) the student, the optimizer and the schedule are
saved under the cache, keyed by everything the run depends on; the same command continues from there. The
batch of step k is drawn from (seed, k), so a resumed run trains on what an uninterrupted one would.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gptkiln.compression.settings import DistillSettings
from gptkiln.progress import QUIET, Progress

STATE_FILE = "distill-state.pt"


@dataclass
class DistillRecord:
    settings: dict
    losses: list[float]  # one per step
    seconds: float  # this run's training time (a resumed run: the part after resuming)
    resumed_at: int  # 0: from the start
    device: str

    def to_dict(self) -> dict:
        first, last = self.losses[:10], self.losses[-10:]
        return {"settings": self.settings, "steps": len(self.losses), "resumed_at": self.resumed_at,
                "loss_first": float(np.mean(first)) if first else None,
                "loss_last": float(np.mean(last)) if last else None,
                "seconds": round(self.seconds, 1), "device": self.device, "losses": [round(x, 5) for x in self.losses]}


def distill(teacher, student, windows: np.ndarray, settings: DistillSettings, state_dir: Path,
            progress: Progress = QUIET, masks: dict[str, torch.Tensor] | None = None) -> DistillRecord:
    """`masks`: parameter name -> kept weights (2:4 sparsity), held fixed: pruned weights are zeroed after
    every step."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher.to(device).eval()
    student.to(device).train()
    masked = [(parameter, masks[name].to(device)) for name, parameter in student.named_parameters()
              if name in (masks or {})]
    torch.manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(student.parameters(), lr=settings.learning_rate, weight_decay=0.0)
    warmup = max(1, int(settings.warmup * settings.steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (
        1.0 + math.cos(math.pi * min(1.0, step / settings.steps))))
    losses, start = [], 0
    state_path = state_dir / STATE_FILE
    if state_path.is_file():
        state = torch.load(state_path, map_location=device, weights_only=False)
        student.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        losses, start = state["losses"], state["step"]
        progress.say(f"    resuming the distillation at step {start} of {settings.steps}")

    def save(step: int) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        partial = state_path.with_suffix(".partial")
        torch.save({"student": student.state_dict(), "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(), "losses": losses, "step": step}, partial)
        partial.replace(state_path)  # whole or absent

    bar = progress.bar(settings.steps, "distill", "steps")
    bar.done = start
    started, step = time.perf_counter(), start
    try:
        for step in range(start, settings.steps):
            rows = np.random.default_rng([settings.seed, step]).choice(len(windows), min(settings.batch, len(windows)),
                                                                        replace=False)
            ids = torch.from_numpy(windows[np.sort(rows)]).to(device)
            with torch.no_grad():
                target = F.log_softmax(teacher(input_ids=ids).logits.float() / settings.temperature, dim=-1)
            logits = student(input_ids=ids).logits.float() / settings.temperature
            loss = F.kl_div(F.log_softmax(logits, dim=-1), target, log_target=True, reduction="none").sum(-1).mean()
            loss = loss * settings.temperature ** 2
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
            with torch.no_grad():
                for parameter, mask in masked:
                    parameter.mul_(mask)
            schedule.step()
            losses.append(loss.item())
            bar.step(f"loss {losses[-1]:.4f}")
            if (step + 1) % settings.checkpoint_every == 0 and step + 1 < settings.steps:
                save(step + 1)
    except KeyboardInterrupt:
        bar.close()
        save(len(losses))
        progress.say(f"    distillation saved at step {len(losses)} of {settings.steps}; the same command resumes it")
        raise
    bar.close()
    student.eval().to("cpu")
    teacher.to("cpu")
    return DistillRecord(asdict(settings), losses, time.perf_counter() - started, start, device)


def loss_curve(record: DistillRecord, path: Path) -> str | None:
    """Write the loss per step as a PNG; return why not where matplotlib is missing (None: written)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no matplotlib here (pip install matplotlib): no loss curve"
    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot(range(1, len(record.losses) + 1), record.losses, linewidth=1)
    axes.set_xlabel("step")
    axes.set_ylabel(f"KL(teacher || student) x T², T = {record.settings['temperature']}")
    axes.set_title("distillation loss")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100, metadata={"Software": None})  # no version string: the same bytes every run
    plt.close(figure)
    return None
