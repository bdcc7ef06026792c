"""The parity gate catches a wrong engine and says where; verify and generate work on an output."""

from __future__ import annotations

import json

import onnx_ir as ir
from gptkiln.cli import main
from gptkiln.config import ParitySettings, Tolerances
from gptkiln.manifest import host_cpu
from gptkiln.models.loading import load_model
from gptkiln.parity import gate, parity_prompts, run_parity
from gptkiln.runtime.torch_runner import TorchRunner
from gptkiln.targets import get_target


def test_reference_build_passes_with_margin(reference_build):
    result, _ = reference_build
    report = result.targets[0].parity
    assert not gate(report, Tolerances())
    assert max(c.rel for c in report.comparisons) < 1e-5  # 10x inside the fp32 bar


def test_gate_catches_a_slightly_wrong_engine(reference_build, tmp_path):
    """Scale the final LayerNorm weight by 1.001: the gate must fail on logits, not only greedy."""
    result, output = reference_build
    model = ir.load(output / "onnxruntime" / "model.onnx")
    name = next(n for n in model.graph.initializers if "ln_f.weight" in n)
    tensor = model.graph.initializers[name]
    tensor.const_value = ir.tensor(tensor.const_value.numpy() * 1.001, name=name)
    ir.save(model, tmp_path / "model.onnx", external_data="model.onnx.data")
    loaded = load_model("reference")
    runner = get_target("onnxruntime").load(tmp_path, loaded.spec)
    report = run_parity(runner, TorchRunner(loaded.model, loaded.spec), parity_prompts(loaded.tokenizer),
                        ParitySettings(decode_steps=4))
    failures = gate(report, Tolerances())
    assert any(f.startswith("batch1/logits") and "at step" in f for f in failures), failures
    # the KV cache is computed before ln_f, so it still matches: the report localises the error
    assert not any("present" in f for f in failures)


def test_verify_passes_on_a_fresh_output_and_refuses_a_tampered_one(reference_build, tmp_path, capsys):
    import shutil

    _, output = reference_build
    assert main(["verify", str(output), "--decode-steps", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    assert main(["verify", str(output), "--decode-steps", "4", "--logits-rel", "1e-12"]) == 9  # a stricter bar
    assert "batch1/logits" in capsys.readouterr().err
    copy = tmp_path / "copy"
    shutil.copytree(output, copy)
    with open(copy / "onnxruntime" / "model.onnx.data", "r+b") as handle:
        handle.seek(1000)
        handle.write(b"\x00\x01\x02\x03")
    assert main(["verify", str(copy)]) == 10
    assert "changed onnxruntime/model.onnx.data" in capsys.readouterr().err


def test_generate_cli_prints_completions(reference_build, capsys):
    _, output = reference_build
    assert main(["generate", str(output), "--prompt", "def main(", "--prompt", "import os",
                 "--max-new-tokens", "8", "--json"]) == 0
    completions = json.loads(capsys.readouterr().out)["completions"]
    assert len(completions) == 2 and all(isinstance(c, str) and c for c in completions)


def test_manifest_describes_the_build(reference_build):
    _, output = reference_build
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["model"]["kind"] == "preset" and len(manifest["model"]["sha256"]) == 64
    assert manifest["targets"]["onnxruntime"]["passed"] is True
    assert manifest["io_contract"]["inputs"][0]["name"] == "input_ids"
    assert manifest["versions"]["onnxruntime"] and manifest["versions"]["torch"]
    assert manifest["gated_on"] == host_cpu() and isinstance(manifest["gated_on"]["features"], list)  # Linux here
    assert set(manifest["files"]) >= {"onnxruntime/model.onnx", "onnxruntime/model.onnx.data", "tokenizer.json"}


def test_nan_in_an_engine_output_fails_the_gate():
    import numpy as np

    from gptkiln.parity import ParityReport, compare

    ref = [np.ones((1, 3, 8), np.float32)]
    ours = [ref[0].copy()]
    ours[0][0, 1, 2] = np.nan
    item = compare("batch1/present.0.key", ours, ref, with_top1=False)
    assert item.rel == float("inf") and item.worst_row == 0
    assert gate(ParityReport([item], []), Tolerances())
