"""Progress bars: redrawn in place with the time left on a terminal, a plain line every tenth of the way otherwise,
nothing when progress is off."""

from __future__ import annotations

import re

from gptkiln.progress import Progress


def run_loop(progress: Progress, total: int = 20) -> None:
    bar = progress.bar(total, "GPTQ", "layers")
    for _ in range(total):
        bar.step()
    bar.close()


def test_plain_lines_every_tenth_of_the_way(capsys):
    progress = Progress(enabled=True)
    progress.terminal = False  # a log file or CI
    run_loop(progress)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 9 and lines[0].startswith("    GPTQ: 2/20 layers, 0:00 elapsed, about ")
    assert lines[-1].startswith("    GPTQ: 18/20 layers")


def test_terminal_bar_redraws_one_line_and_ends_it(capsys):
    progress = Progress(enabled=True)
    progress.terminal = True
    run_loop(progress)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n")  # one line, redrawn with \r, ended at close
    final = err.rstrip("\n").split("\r")[-1]
    assert re.match(r"    GPTQ \[#{24}\] 20/20 layers, \d+:\d\d elapsed, about 0:00 left", final)


def test_nothing_when_progress_is_off(capsys):
    run_loop(Progress(enabled=False))
    assert capsys.readouterr().err == ""


def test_a_long_stage_shows_its_time_left_from_the_last_run(capsys, monkeypatch, tmp_path):
    import time

    import gptkiln.progress as progress_module

    monkeypatch.setenv("GPTKILN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(progress_module, "TICK_SECONDS", 0.05)
    progress = Progress(enabled=True)
    progress.terminal = True
    with progress.stage("export to ONNX", timing="export:abc"):
        time.sleep(0.3)
    first = capsys.readouterr().err
    assert "export to ONNX: 0:00 elapsed" in first and "left" not in first  # no earlier run: elapsed only
    with progress.stage("export to ONNX", timing="export:abc"):
        time.sleep(0.3)
    assert "about 0:00 left (it took 0:00 last time)" in capsys.readouterr().err
    assert progress_module.read_timings()["export:abc"] > 0.2
