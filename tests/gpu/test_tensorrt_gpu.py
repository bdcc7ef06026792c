"""TensorRT on a GPU: build, parity and generation per precision; the timing cache; incompatible engines.

Skipped, with the reason, where TensorRT or an NVIDIA GPU is missing (every CI machine today).
Run them on a GPU machine with tests/gpu/run.sh.
"""

from __future__ import annotations

import json

import pytest

from gptkiln.cli import main
from gptkiln.errors import TargetUnavailableError
from gptkiln.manifest import read_manifest
from gptkiln.models.spec import DecoderSpec
from gptkiln.targets.base import RUNTIME_CONFIG
from gptkiln.targets.tensorrt import TensorRTTarget
from gptkiln.targets.tensorrt.target import host_missing

MISSING = host_missing("10.14")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(bool(MISSING), reason="needs " + "; ".join(MISSING))]

PRECISIONS = {
    "fp32": [],
    "fp16": [],
    "bf16": [],
    "w8a8": ["--calibration-samples", "32"],
    "int4": ["--int4-method", "rtn", "--int4-symmetric", "--int4-block-size", "64", "--int4-fine-block-size", "64"],
}


def export(tmp_path, capsys, precision, *options):
    out = tmp_path / precision
    code = main(["export", "reference", "-o", str(out), "--target", "tensorrt", "--quantize", precision,
                 *options, "--json"])
    captured = capsys.readouterr()
    return code, out, json.loads(captured.out), captured.err


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_build_parity_and_generation(tmp_path, capsys, calibration_text, precision):
    options = PRECISIONS[precision] + (["--calibration", str(calibration_text)] if precision == "w8a8" else [])
    code, out, payload, err = export(tmp_path, capsys, precision, *options)
    assert code == 0, err
    target = payload["targets"]["tensorrt"]
    assert target["compiled"] and target["passed"], target["failures"]
    settings = target["settings"]
    assert settings["requires"]["tensorrt"] == settings["tensorrt"]
    assert [p["name"] for p in settings["profiles"]] == ["prefill", "decode"]
    assert main(["generate", str(out), "--prompt", "def fibonacci(n):", "--max-new-tokens", "16"]) == 0
    assert main(["verify", str(out)]) == 0


def test_a_two_four_sparse_model_builds_with_sparse_weights(tmp_path, capsys, calibration_text):
    import gptkiln

    sparse = gptkiln.compress("reference", tmp_path / "sparse", calibration=calibration_text, sparsity="2:4",
                              calibration_samples=16, eval_tokens=4096, max_ppl_increase=100)
    out = tmp_path / "engine"
    code = main(["export", str(sparse.output), "-o", str(out), "--target", "tensorrt", "--quantize", "fp16", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    target = json.loads(captured.out)["targets"]["tensorrt"]
    assert target["compiled"] and target["passed"], target["failures"]
    assert target["settings"]["sparse_weights"] and target["settings"]["sparse_weights_flag"]


def test_timing_cache_makes_rebuilds_reuse_kernel_choices(tmp_path, capsys):
    first = export(tmp_path / "a", capsys, "fp16")
    second = export(tmp_path / "b", capsys, "fp16")
    assert first[0] == second[0] == 0
    assert second[2]["targets"]["tensorrt"]["settings"]["timing_cache_reused"]


def test_an_engine_for_another_gpu_is_refused(tmp_path, capsys):
    code, out, _, err = export(tmp_path, capsys, "fp32")
    assert code == 0, err
    config_path = out / "tensorrt" / RUNTIME_CONFIG
    config = json.loads(config_path.read_text())
    config["requires"]["compute_capability"] = "5.0"
    config_path.write_text(json.dumps(config))
    spec = DecoderSpec.from_dict(read_manifest(out, check_files=False)["spec"])
    with pytest.raises(TargetUnavailableError, match="needs a GPU of compute capability 5.0"):
        TensorRTTarget().load(out / "tensorrt", spec)
