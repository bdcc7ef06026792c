"""What a long command tells a person while it works: one line per stage on stderr, and for loops with a known
length (calibration statistics, GPTQ per layer, evaluation windows, fallback trials) a progress bar with the
time left, redrawn in place on a terminal, a plain line every tenth of the way otherwise (logs, CI).

A stage that is one long library call (the ONNX export, a compile) shows, on a terminal, its elapsed time,
and the time left where this machine has done the same stage for the same model before (`timings.json`
in the cache records how long each stage took).
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from typing import TYPE_CHECKING

from gptkiln.cache import cache_root
from gptkiln.errors import ExportError, GptkilnError

if TYPE_CHECKING:
    from gptkiln.stage_cache import Entry

BAR_WIDTH = 24
REDRAW_SECONDS = 0.2  # at most five redraws a second
TICK_SECONDS = 1.0  # a long stage's elapsed time, redrawn once a second
TIMINGS = "timings.json"


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
        self.lock = threading.Lock()  # the terminal line is shared by the ticker, bars and messages
        self.line_open = False  # a ticker or bar line is on the terminal, not yet ended
        self.bar_active = False

    def say(self, message: str) -> None:
        if self.enabled:
            with self.lock:
                self._end_line()
                print(f"{self.prefix}{message}", file=sys.stderr, flush=True)

    def draw(self, text: str) -> None:
        """Redraw the terminal's current line (bars and the stage ticker)."""
        with self.lock:
            print(f"\r{text}\x1b[K", end="", file=sys.stderr, flush=True)
            self.line_open = True

    def _end_line(self) -> None:
        if self.line_open:
            print("\r\x1b[K", end="", file=sys.stderr, flush=True)
            self.line_open = False

    def bar(self, total: int, what: str, unit: str) -> "Bar":
        return Bar(self, total, what, unit)

    @contextlib.contextmanager
    def stage(self, name: str, timing: str | None = None):
        """timing: this stage's key in the machine's timings (e.g. the stage and the model's sha256): where it
        ran before, the ticker says how long is left."""
        self.say(f"[{len(self.finished) + 1}] {name} ...")
        started = time.perf_counter()
        ticker = _Ticker(self, name, read_timings().get(timing) if timing else None) if self.terminal else None
        try:
            yield
        except GptkilnError:
            raise
        except Exception as exc:
            after = f" after {', '.join(self.finished)}" if self.finished else ""
            raise ExportError(f"stage '{name}' failed{after}: {type(exc).__name__}: {exc}",
                              "rerun with GPTKILN_DEBUG=1 for the traceback and report it") from exc
        finally:
            if ticker:
                ticker.stop()
        self.seconds[name] = round(time.perf_counter() - started, 2)
        self.finished.append(name)
        how = "cached" if name in self.cached else "done"
        if timing and how == "done":
            record_timing(timing, self.seconds[name])
        self.say(f"    {name}: {how} in {self.seconds[name]:.1f}s")

    def cached_stage(self, name: str, entry: "Entry") -> "Entry":
        if entry.hit:
            self.cached.append(name)
        return entry


QUIET = Progress(enabled=False)


def read_timings() -> dict[str, float]:
    try:
        return json.loads((cache_root() / TIMINGS).read_text())
    except (OSError, ValueError):
        return {}


def record_timing(key: str, seconds: float) -> None:
    """Best effort: a cache that cannot be written costs the next run its estimate, nothing else."""
    timings = {**read_timings(), key: seconds}
    try:
        path = cache_root() / TIMINGS
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps(timings, indent=1, sort_keys=True))
        partial.replace(path)
    except OSError:
        pass


class _Ticker:
    """A long stage's elapsed time (and the time left, from an earlier run), redrawn on the terminal while no
    bar is drawing."""

    def __init__(self, progress: Progress, name: str, expected: float | None):
        self.progress, self.name, self.expected = progress, name, expected
        self.started = time.perf_counter()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.wait(TICK_SECONDS):
            if self.progress.bar_active:
                continue
            elapsed = time.perf_counter() - self.started
            left = ""
            if self.expected:
                left = (f", about {_clock(max(0.0, self.expected - elapsed))} left (it took "
                        f"{_clock(self.expected)} last time)")
            self.progress.draw(f"    {self.name}: {_clock(elapsed)} elapsed{left}")

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()
        with self.progress.lock:
            self.progress._end_line()


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
                self.progress.bar_active = True
                self.progress.draw(f"    {self.what} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {self.text()}")
                self.drawn = time.perf_counter()
        elif self.total >= 10 and self.done % (self.total // 10) == 0 and self.done < self.total:
            self.progress.say(f"    {self.what}: {self.text()}")

    def text(self) -> str:
        elapsed = time.perf_counter() - self.started
        left = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        note = f", {self.note}" if self.note else ""
        return f"{self.done}/{self.total} {self.unit}{note}, {_clock(elapsed)} elapsed, about {_clock(left)} left"

    def close(self) -> None:
        """The bar's last state stays on the terminal as a line of its own."""
        if self.progress.terminal and self.drawn:
            with self.progress.lock:
                print(file=sys.stderr, flush=True)
                self.progress.line_open = False
            self.progress.bar_active = False


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds + 0.5), 60)
    return f"{minutes}:{seconds:02d}"
