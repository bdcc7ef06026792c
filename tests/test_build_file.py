"""`gptkiln build FILE`: the file is checked with line numbers; the matrix builds, caches and rebuilds only what changed."""

from __future__ import annotations

import json
import textwrap

import pytest

from gptkiln.cli import main


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write(path, text):
    path.write_text(textwrap.dedent(text).lstrip())
    return path


@pytest.mark.parametrize("text, where, words", [
    ("output: out\nmodels: [reference]\nprecision: [fp32]\n", ":3", "unknown key 'precision'"),
    ("output: out\nmodels: [reference]\njobs: two\n", ":3", "'jobs' must be an integer"),
    ("output: out\nmodels: [reference]\noptions:\n  calibration-samples: 8\n  int4-mehtod: rtn\n", ":5",
     "unknown option 'int4-mehtod'"),
    ("output: out\nmodels: [reference]\noptions:\n  int4-method: best\n", ":4", "use one of: rtn, gptq"),
    ("output: out\nmodels: [reference]\nprecisions:\n  - fp32\n  - int3\n", ":5", "'precisions.1' is 'int3'"),
    ("output: out\nmodels: [reference]\ntarget_options:\n  openvino: {threads: 2, hint: fast}\n", ":4",
     "'hint' is not a per-target setting"),
    ("output: out\nmodels: [reference]\noptions:\n  smoothquant-alpha: 2.0\n", ":4",
     "expected a number in [0, 1] or 'auto', got '2.0'"),
    ("output: out\nmodels: [reference]\noptions:\n  smoothquant-alpha: [0.5]\n", ":4", "must be a number or a word"),
    ("models: [reference]\n", "", "the key 'output' is missing"),
    ("output: out\nmodels: [small]\ncompress:\n  small:\n    model: reference\n    calibration: c.txt\n"
     "    output: elsewhere\n", ":7", "'output' is not a compress option here"),
    ("output: out\nmodels: [small]\ncompress:\n  small:\n    model: reference\n    prune-mlp: 0.25\n", ":4",
     "compress entry 'small' has no 'calibration'"),
    ("output: out\nmodels: [small]\ncompress:\n  small:\n    model: reference\n    calibration: c.txt\n"
     "    prune-mlp: lots\n", ":7", "'compress.small.prune-mlp' must be a number"),
    ("output: out\nmodels: [small]\ncompress:\n  small:\n    model: reference\n    calibration: c.txt\n", ":4",
     "nothing to remove"),
    ("output: out\nmodels: [reference]\ncompress:\n  small:\n    model: reference\n    calibration: c.txt\n"
     "    sparsity: '2:4'\n", ":4", "compress entry 'small' is not listed in models"),
    ("output: out\nmodels: [reference\n", "", "not valid YAML"),
])
def test_yaml_mistakes_name_the_key_and_line(tmp_path, capsys, text, where, words):
    path = write(tmp_path / "kiln.yaml", text)
    code, _, err = run_cli(capsys, "build", path, "--dry-run")
    assert code == 12, err
    assert words in err and f"kiln.yaml{where}" in err and "fix:" in err


def test_toml_mistakes_name_the_key_and_line(tmp_path, capsys):
    path = write(tmp_path / "kiln.toml", """
        output = "out"
        models = ["reference"]

        [options]
        opset = "23"
    """)
    code, _, err = run_cli(capsys, "build", path, "--dry-run")
    assert code == 12 and "kiln.toml:5" in err and "'options.opset' must be an integer" in err


def test_matrix_caches_and_rebuilds_only_the_changed_target(tmp_path, capsys, tiny_model_dir, monkeypatch):
    """Two models built in parallel; a rerun does nothing; a change to one target's settings rebuilds that target only."""
    monkeypatch.setenv("GPTKILN_CACHE_DIR", str(tmp_path / "cache"))
    gpt2, llama = tiny_model_dir("gpt2"), tiny_model_dir("llama")
    file = tmp_path / "kiln.yaml"
    text = f"""
        output: out
        models: [{gpt2}, {llama}]
        targets: [onnxruntime, openvino]
        jobs: 2
        target_options:
          openvino: {{threads: THREADS}}
    """
    write(file, text.replace("THREADS", "1"))
    code, out, err = run_cli(capsys, "build", file, "--json")
    first = json.loads(out)
    assert code == 0 and first["ok"], err
    assert [b["result"]["cached_stages"] for b in first["builds"]] == [[], []]
    outputs = [tmp_path / "out" / gpt2.name / "fp32", tmp_path / "out" / llama.name / "fp32"]
    assert all((o / "manifest.json").is_file() and (o / "openvino" / "openvino_model.xml").is_file() for o in outputs)
    assert json.loads((outputs[0] / "openvino" / "runtime_config.json").read_text())["INFERENCE_NUM_THREADS"] == 1

    code, out, _ = run_cli(capsys, "build", file, "--json")
    assert code == 0 and all(b["result"]["up_to_date"] for b in json.loads(out)["builds"])

    write(file, text.replace("THREADS", "2"))
    code, out, _ = run_cli(capsys, "build", file, "--dry-run", "--json")
    plan = json.loads(out)["plan"]
    assert plan[0]["stages"] == {"export": "cached", "target-onnxruntime": "cached", "target-openvino": "build"}
    code, out, _ = run_cli(capsys, "build", file, "--json", "--jobs", "1")
    rebuilt = json.loads(out)["builds"][0]["result"]
    assert code == 0 and not rebuilt["up_to_date"]
    assert rebuilt["cached_stages"] == ["export to ONNX", "onnxruntime: compile and prove"]
    assert json.loads((outputs[0] / "openvino" / "runtime_config.json").read_text())["INFERENCE_NUM_THREADS"] == 2


def test_a_failed_build_does_not_stop_the_others(tmp_path, capsys, tiny_model_dir):
    file = write(tmp_path / "kiln.yaml", f"""
        output: out
        models: [./no-such-model, {tiny_model_dir("gpt2")}]
        targets: [onnxruntime]
    """)
    code, out, err = run_cli(capsys, "build", file, "--json")
    builds = json.loads(out)["builds"]
    assert code == 3  # the first failed build's class: model not found
    assert builds[0]["error"]["type"] == "ModelNotFoundError" and builds[1]["ok"]
    assert "1 of 2 builds failed" not in out  # the table goes to stdout only without --json
    code, out, _ = run_cli(capsys, "build", file)
    assert code == 3 and "1 of 2 builds failed" in out and "PASS" in out


def test_a_compressed_model_is_built_after_its_compression_and_reused(tmp_path, capsys, tiny_model_dir,
                                                                      calibration_text, monkeypatch):
    """`compress:` makes a checkpoint the matrix exports; a rerun finds it up to date; a failed compression fails
    its model's builds, unbuilt, and no other."""
    monkeypatch.setenv("GPTKILN_CACHE_DIR", str(tmp_path / "cache"))
    llama = tiny_model_dir("llama")
    file = tmp_path / "kiln.yaml"
    text = f"""
        output: out
        models: [{llama}, narrow]
        targets: [onnxruntime]
        compress:
          narrow:
            model: reference
            calibration: {calibration_text}
            prune-mlp: 0.5
            distill-steps: 3
            calibration-samples: 8
            eval-tokens: 2048
            max-ppl-increase: BUDGET
    """
    write(file, text.replace("BUDGET", "1000"))
    code, out, _ = run_cli(capsys, "build", file, "--dry-run", "--json")
    plan = json.loads(out)["plan"]
    assert [p["name"] for p in plan] == ["compress narrow", f"{llama.name}/fp32", "narrow/fp32"]
    assert plan[0]["stages"] == {"compress": "build"} and plan[2]["stages"] == {"after compress narrow": "build"}
    code, out, err = run_cli(capsys, "build", file, "--json")
    builds = json.loads(out)["builds"]
    assert code == 0, err
    checkpoint = tmp_path / "out" / "narrow" / "checkpoint"
    assert builds[1]["compression"]["output"] == str(checkpoint) and not builds[1]["compression"]["up_to_date"]
    assert json.loads((checkpoint / "config.json").read_text())["n_inner"] == 384
    assert json.loads((tmp_path / "out" / "narrow" / "fp32" / "manifest.json").read_text())["model"]["name"] == \
        str(checkpoint)
    code, out, _ = run_cli(capsys, "build", file)
    assert code == 0 and "compress narrow" in out and "up to date" in out

    write(file, text.replace("BUDGET", "0.001"))  # the settings changed: compressed again, and refused
    code, out, _ = run_cli(capsys, "build", file, "--json")
    builds = json.loads(out)["builds"]
    assert code == 9 and builds[0]["ok"] and not builds[1]["ok"]
    assert builds[1]["error"]["cause"].startswith("compress narrow: compression gate failed")
    assert not builds[1]["compression"]["ok"]


def test_rebuild_from_scratch_is_byte_identical(tmp_path, monkeypatch):
    """Two cold builds (separate caches): the same files, byte for byte, and the same manifest but its timestamp."""
    from gptkiln.config import BuildConfig, Precision
    from gptkiln.pipeline import build

    manifests = []
    for run in ("a", "b"):
        monkeypatch.setenv("GPTKILN_CACHE_DIR", str(tmp_path / f"cache-{run}"))
        output = tmp_path / run
        build(BuildConfig(model="reference", output=output, targets=("onnxruntime", "openvino"),
                          precision=Precision.INT4, quant=_rtn()))
        manifest = json.loads((output / "manifest.json").read_text())
        manifest.pop("created")
        manifests.append(manifest)
    assert manifests[0] == manifests[1]  # "files" holds the sha256 of every file
    assert (tmp_path / "a" / "onnxruntime" / "model.onnx").read_bytes() == \
        (tmp_path / "b" / "onnxruntime" / "model.onnx").read_bytes()


def _rtn():
    from gptkiln.config import Int4Method, QuantSettings

    return QuantSettings(int4_method=Int4Method.RTN)


@pytest.mark.parametrize("value, alpha", [("auto", "auto"), ("0.7", 0.7), ("1", 1.0)])
def test_smoothquant_alpha_is_a_number_or_auto_in_a_build_file(tmp_path, value, alpha):
    from gptkiln.build_file import read_build_file

    path = write(tmp_path / "kiln.yaml", f"output: out\nmodels: [reference]\nprecisions: [w8a8]\n"
                                         f"options:\n  smoothquant-alpha: {value}\n")
    assert [build.config.quant.smoothquant_alpha for build in read_build_file(path).builds] == [alpha]
