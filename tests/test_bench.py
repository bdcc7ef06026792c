"""`gptkiln bench`: real engines of the reference model against PyTorch, each in its own process.

Timings are not asserted (that is what benchmarks/ is for); what the report says about them is:
its structure, the floor arithmetic, the bytes a decode step reads, and where the results go.
"""

from __future__ import annotations

import json
import sys

import pytest

from gptkiln.bench.traffic import kv_cache_bytes, onnx_weight_bytes, openvino_weight_bytes, torch_weight_bytes
from gptkiln.cli import main
from gptkiln.manifest import read_manifest

QUICK = ["--prompt-tokens", "32", "--new-tokens", "8", "--batch", "1", "--batch", "2", "--repeats", "2",
         "--threads", "1"]


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def two_target_output(tmp_path_factory):
    output = tmp_path_factory.mktemp("bench") / "reference"
    assert main(["export", "reference", "-o", str(output), "--target", "onnxruntime", "--target", "openvino"]) == 0
    return output


@pytest.fixture(scope="module")
def benched(two_target_output):
    code = main(["bench", str(two_target_output), *QUICK, "--json"])
    assert code == 0
    return json.loads((two_target_output / "benchmark.json").read_text())


def test_report_has_every_target_against_pytorch(benched, two_target_output):
    rows = {row["name"]: row for row in benched["results"]}
    assert list(rows) == ["pytorch eager", "onnxruntime", "openvino"]
    assert benched["machine"]["threads"] == 1 and benched["machine"]["bandwidth"]["gb_per_s"] > 0
    assert benched["build_key"] == read_manifest(two_target_output)["build"]["key"]
    for row in rows.values():
        assert row["peak_rss_mb"] > 0 and row["prefill_ms"]["min"] <= row["prefill_ms"]["median"] <= row["prefill_ms"]["max"]
        assert set(row["decode"]) == {"1", "2"} and row["rounds"] == 2
        for batch, decode in row["decode"].items():
            rate = decode["tokens_per_s"]
            assert rate["min"] <= rate["median"] <= rate["max"]
            assert decode["floor_pct"] == pytest.approx(100 * decode["floor_ms"] / decode["step_ms"])
            assert decode["vs_pytorch"] == pytest.approx(rate["median"] / rows["pytorch eager"]["decode"][batch]
                                                         ["tokens_per_s"]["median"])
    assert rows["pytorch eager"]["artifact_mb"] is None and rows["onnxruntime"]["artifact_mb"] > 10
    # the floor grows with the batch by exactly the extra rows' KV cache
    spec, bandwidth = read_manifest(two_target_output)["spec"], benched["machine"]["bandwidth"]["gb_per_s"]
    context = 32 + 8 // 2
    extra_row = 2 * spec["num_layers"] * spec["num_kv_heads"] * spec["head_dim"] * context * 4
    onnxruntime = rows["onnxruntime"]["decode"]
    assert (onnxruntime["2"]["floor_ms"] - onnxruntime["1"]["floor_ms"]) == pytest.approx(extra_row / bandwidth / 1e6)


def test_rounds_interleave_every_variant_in_a_rotated_order():
    from gptkiln.bench.run import _round_order

    orders = [_round_order(3, r) for r in range(4)]
    assert all(sorted(order) == [0, 1, 2] for order in orders)
    assert [order[0] for order in orders] == [0, 1, 2, 0]


def test_results_stay_beside_the_build_and_travel_in_its_bundle(benched, two_target_output, capsys):
    assert (two_target_output / "benchmark.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, _ = run_cli(capsys, "export", "reference", "-o", two_target_output, "--target", "onnxruntime",
                           "--target", "openvino", "--json")
    assert code == 0 and json.loads(out)["up_to_date"]  # the bench files are not part of the build
    bundle = two_target_output.parent / "reference.kiln.tar"
    code, out, _ = run_cli(capsys, "pack", two_target_output, "-o", bundle, "--target", "openvino", "--json")
    benchmark = json.loads(out)["manifest"]["benchmark"]
    assert code == 0 and [row["name"] for row in benchmark["results"]] == ["pytorch eager", "openvino"]
    assert "output" not in benchmark["results"][1]


def test_a_stale_benchmark_is_not_packed(benched, two_target_output, tmp_path, capsys):
    import shutil

    copy = shutil.copytree(two_target_output, tmp_path / "copy")
    report = json.loads((copy / "benchmark.json").read_text())
    (copy / "benchmark.json").write_text(json.dumps({**report, "build_key": "an earlier build"}))
    code, out, _ = run_cli(capsys, "pack", copy, "-o", tmp_path / "b.kiln.tar", "--json")
    assert code == 0 and json.loads(out)["manifest"]["benchmark"] is None


def test_bytes_per_decode_step_agree_across_pytorch_onnx_and_openvino(two_target_output):
    from gptkiln.models.loading import load_model

    loaded = load_model("reference")
    expected = torch_weight_bytes(loaded.model)
    # the tied token embedding is read by the lm_head; the position embedding only one row at a time
    wpe = loaded.model.transformer.wpe.weight
    assert expected == sum(p.numel() * 4 for p in loaded.model.parameters()) - wpe.numel() * 4
    # the graphs add only shape constants and their own masks
    assert onnx_weight_bytes(two_target_output / "onnxruntime" / "model.onnx") == pytest.approx(expected, rel=0.01)
    assert openvino_weight_bytes(two_target_output / "openvino" / "openvino_model.xml") == pytest.approx(expected, rel=0.01)
    assert kv_cache_bytes(loaded.spec, batch=2, length=10) == 2 * 4 * 2 * 6 * 10 * 32 * 4


def test_bench_refuses_bad_input(two_target_output, tmp_path, capsys):
    code, _, err = run_cli(capsys, "bench", two_target_output, "--new-tokens", "1000")
    assert code == 2 and "positions" in err
    code, _, err = run_cli(capsys, "bench", two_target_output, "--repeats", "0")
    assert code == 2 and "--repeats" in err
    with pytest.MonkeyPatch.context() as patch:  # no matplotlib: refused before anything is measured
        patch.setitem(sys.modules, "matplotlib", None)
        code, _, err = run_cli(capsys, "bench", two_target_output)
    assert code == 2 and "gptkiln[bench]" in err and "[1]" not in err
    code, _, err = run_cli(capsys, "bench", tmp_path / "missing")
    assert code == 3 and "Traceback" not in err
    for name in ("a", "b"):  # two different models under one root
        (tmp_path / "root" / name).mkdir(parents=True)
        manifest = json.loads((two_target_output / "manifest.json").read_text())
        manifest["model"]["sha256"] = name
        (tmp_path / "root" / name / "manifest.json").write_text(json.dumps({**manifest, "files": {}}))
    code, _, err = run_cli(capsys, "bench", tmp_path / "root")
    assert code == 2 and "one model at a time" in err


def test_bench_of_a_model_exports_it_first(tmp_path, capsys):
    output = tmp_path / "out"
    code, out, err = run_cli(capsys, "bench", "reference", "-o", output, *QUICK, "--no-chart", "--json")
    report = json.loads(out)["benchmark"]
    assert code == 0 and "export to ONNX" in err
    assert [row["name"] for row in report["results"]][0] == "pytorch eager" and len(report["results"]) >= 2
    assert (output / "benchmark.json").is_file() and not (output / "benchmark.png").exists()


def test_outputs_of_the_same_target_and_precision_are_told_apart(tmp_path):
    from gptkiln.bench.measure import Variant
    from gptkiln.bench.run import _distinct_labels, load_target

    def variant(name, output, precision="int4"):
        return Variant(name, precision, load_target, output=str(tmp_path / output) if output else None, target=name)

    labels = [v.name for v in _distinct_labels([variant("pytorch eager", None, "fp32"), variant("openvino", "g32"),
                                                variant("openvino", "g128"), variant("onnxruntime", "g32")], tmp_path)]
    assert labels == ["pytorch eager", "openvino (g32)", "openvino (g128)", "onnxruntime"]
