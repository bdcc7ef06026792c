"""The stage cache: an entry exists only once complete; damaged entries are rebuilt."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from gptkiln.stage_cache import StageCache, stage_key


def produce_files(directory):
    (directory / "a.bin").write_bytes(b"x" * 1000)
    (directory / "sub").mkdir()
    (directory / "sub" / "b.txt").write_text("b")
    return {"made": True}


def test_build_then_hit(tmp_path):
    cache = StageCache(tmp_path)
    first = cache.get_or_build("export", "k1", produce_files, tmp_path / "scratch")
    second = cache.get_or_build("export", "k1", lambda d: pytest.fail("must not rebuild"), tmp_path / "scratch")
    assert (first.hit, second.hit) == (False, True)
    assert second.record == {"made": True} and (second.path / "sub" / "b.txt").read_text() == "b"


def test_a_killed_build_leaves_no_entry_that_looks_complete(tmp_path):
    """SIGKILL in the middle of a stage (files half written): no entry; the next build redoes the stage."""
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from gptkiln.stage_cache import StageCache
        def produce(directory):
            (directory / "a.bin").write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGKILL)
        StageCache(Path({str(tmp_path)!r})).get_or_build("export", "k1", produce, Path("unused"))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -9
    assert not (tmp_path / "export" / "k1").exists()
    assert list((tmp_path / "export").glob(".k1.*")), "the killed build's temporary directory is what remains"
    cache = StageCache(tmp_path)
    assert not cache.status("export", "k1")
    rebuilt = cache.get_or_build("export", "k1", produce_files, tmp_path / "scratch")
    assert rebuilt.hit is False and not list((tmp_path / "export").glob(".k1.*"))


def test_an_interrupted_stage_is_removed(tmp_path):
    def interrupted(directory):
        (directory / "a.bin").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        StageCache(tmp_path).get_or_build("export", "k1", interrupted, tmp_path / "scratch")
    assert [p.name for p in (tmp_path / "export").iterdir()] == ["k1.lock"]


def test_a_damaged_entry_is_rebuilt(tmp_path):
    cache = StageCache(tmp_path)
    entry = cache.get_or_build("export", "k1", produce_files, tmp_path / "scratch")
    (entry.path / "a.bin").write_bytes(b"y" * 1000)
    again = cache.get_or_build("export", "k1", produce_files, tmp_path / "scratch")
    assert again.hit is False and (again.path / "a.bin").read_bytes() == b"x" * 1000


def test_keys_are_canonical():
    assert stage_key("a", {"x": 1, "y": 2}) == stage_key("a", {"y": 2, "x": 1})
    assert stage_key("a", {"x": 1}) != stage_key("a", {"x": 2})


def test_another_cpu_rebuilds_what_was_gated_on_this_one(monkeypatch, tmp_path):
    """Trials and gates run on the host's kernels (int8 activations round differently with and without VNNI):
    a cache shared with a host of other CPU features reuses its export, not its quantized graph or its engines."""
    from gptkiln import build_plan
    from gptkiln.config import BuildConfig, Precision
    from gptkiln.targets import get_target

    config = BuildConfig(model="reference", output=tmp_path / "out", precision=Precision.INT8)
    texts = {"calibration": None, "eval_text": ["def f():\n    return 1\n"]}
    here = build_plan.plan_build(config, [get_target("onnxruntime")], texts)
    monkeypatch.setattr(build_plan, "host_cpu", lambda: {"machine": "x86_64", "model": "other",
                                                          "features": ["avx", "avx2", "avx512f", "avx512_vnni"]})
    there = build_plan.plan_build(config, [get_target("onnxruntime")], texts)
    assert here.export == there.export
    assert here.quantize != there.quantize and here.targets != there.targets and here.key != there.key


def test_the_quantized_graph_is_keyed_by_the_engine_its_trials_are_scored_on(tmp_path):
    """Trials are scored on ONNX Runtime's engine where the build names it (no safer setting to fall back to), else
    on the first requested engine that compiles in seconds (OpenVINO, as it is set up), else on ONNX Runtime: the
    quantized graph is keyed by that engine and its settings."""
    from gptkiln import build_plan
    from gptkiln.config import BuildConfig, Precision, RuntimeSettings
    from gptkiln.targets import get_target, trial_target

    config = BuildConfig(model="reference", output=tmp_path / "out", precision=Precision.INT8)
    texts = {"calibration": None, "eval_text": ["def f():\n    return 1\n"]}

    def key(*targets):
        return build_plan.plan_build(config, list(targets), texts).quantize

    onnxruntime, openvino, tensorrt = get_target("onnxruntime"), get_target("openvino"), get_target("tensorrt")
    float_activations = get_target("openvino", RuntimeSettings(dynamic_quantization_group=0))
    assert trial_target([openvino, onnxruntime]) is onnxruntime and trial_target([tensorrt, openvino]) is openvino
    assert trial_target([openvino, float_activations]) is float_activations  # explicit: no fallback
    assert trial_target([tensorrt]).name == "onnxruntime"
    assert key(onnxruntime) == key(tensorrt) == key(openvino, onnxruntime)
    assert len({key(onnxruntime), key(openvino), key(float_activations)}) == 3
