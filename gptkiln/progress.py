"""What a long command tells a person while it works: one line per stage on stderr, and for loops with a known
length (calibration statistics, GPTQ per layer, evaluation windows, fallback trials) a progress bar with the
time left, redrawn in place on a terminal, a plain line every tenth of the way otherwise (logs, CI)."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import TYPE_CHECKING

from gptkiln.errors import ExportError, GptkilnError

if TYPE_CHECKING:
    from gptkiln.stage_cache import Entry

BAR_WIDTH = 24
REDRAW_SECONDS = 0.2  # at most five redraws a second


class Progress:
    """Stage lines on stderr; a failure names the stage and the stages that finished before it."""

    def __init__(self, enabled: bool = True, prefix: str = ""):
        self.enabled = enabled
        self.prefix = prefix  # e.g. the build's name in a matrix, where lines of builds interleave
        # bars redraw in place only on a terminal, and not where several builds share it
        self.terminal = enabled and not prefix and sys.stderr.isatty()
        self.finished: list[str] = []
        self.seconds: dict[str, float] = {}
        self.cached: list[str] = []  # stages taken from the stage cache

    def say(self, message: str) -> None:
        if self.enabled:
            print(f"{self.prefix}{message}", file=sys.stderr, flush=True)

    def bar(self, total: int, what: str, unit: str) -> "Bar":
        return Bar(self, total, what, unit)

    @contextlib.contextmanager
    def stage(self, name: str):
        self.say(f"[{len(self.finished) + 1}] {name} ...")
        started = time.perf_counter()
        try:
            yield
        except GptkilnError:
            raise
        except Exception as exc:
            after = f" after {', '.join(self.finished)}" if self.finished else ""
            raise ExportError(f"stage '{name}' failed{after}: {type(exc).__name__}: {exc}",
                              "rerun with GPTKILN_DEBUG=1 for the traceback and report it") from exc
        self.seconds[name] = round(time.perf_counter() - started, 2)
        self.finished.append(name)
        how = "cached" if name in self.cached else "done"
        self.say(f"    {name}: {how} in {self.seconds[name]:.1f}s")

    def cached_stage(self, name: str, entry: "Entry") -> "Entry":
        if entry.hit:
            self.cached.append(name)
        return entry


QUIET = Progress(enabled=False)


class Bar:
    """`step()` once per item of a loop of `total` items; `close()` after it (ends the terminal line)."""

    def __init__(self, progress: Progress, total: int, what: str, unit: str):
        self.progress, self.total, self.what, self.unit = progress, total, what, unit
        self.done, self.drawn, self.note = 0, 0.0, ""
        self.started = time.perf_counter()

    def step(self, note: str = "") -> None:
        """note: shown after the counts (a training loss)."""
        self.done += 1
        self.note = note
        if not self.progress.enabled:
            return
        if self.progress.terminal:
            if time.perf_counter() - self.drawn >= REDRAW_SECONDS or self.done == self.total:
                filled = BAR_WIDTH * self.done // max(self.total, 1)
                print(f"\r    {self.what} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {self.text()}\x1b[K",
                      end="", file=sys.stderr, flush=True)
                self.drawn = time.perf_counter()
        elif self.total >= 10 and self.done % (self.total // 10) == 0 and self.done < self.total:
            self.progress.say(f"    {self.what}: {self.text()}")

    def text(self) -> str:
        elapsed = time.perf_counter() - self.started
        left = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        note = f", {self.note}" if self.note else ""
        return f"{self.done}/{self.total} {self.unit}{note}, {_clock(elapsed)} elapsed, about {_clock(left)} left"

    def close(self) -> None:
        if self.progress.terminal and self.drawn:
            print(file=sys.stderr, flush=True)


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds + 0.5), 60)
    return f"{minutes}:{seconds:02d}"
