"""gptkiln compress: pruning by measured importance, distillation from the original, the gate, and a standard
checkpoint that transformers loads and gptkiln exports (the reference model and a tiny Llama, a few steps)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import gptkiln
from gptkiln.cli import main
from gptkiln.compression.distill import distill
from gptkiln.compression.settings import DistillSettings
from gptkiln.errors import ParityError
from gptkiln.targets.tensorrt.target import host_missing


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def depth_pruned(tmp_path_factory, calibration_text):
    """The reference model with its least influential block removed: pruned only, and distilled 20 steps."""
    root = tmp_path_factory.mktemp("compress")
    common = dict(calibration=calibration_text, prune_layers=1, calibration_samples=16, eval_tokens=4096,
                  max_ppl_increase=100)
    return (gptkiln.compress("reference", root / "pruned", **common),
            gptkiln.compress("reference", root / "distilled", distill_steps=20, **common))


def test_the_least_influential_block_goes_and_the_checkpoint_loads_in_transformers(depth_pruned):
    from transformers import AutoModelForCausalLM

    pruned, distilled = depth_pruned
    influence = pruned.record["importance"]["block_influence"]
    assert pruned.record["removed"]["blocks"] == [int(np.argmin(influence))]
    model = AutoModelForCausalLM.from_pretrained(distilled.output)
    assert model.config.num_hidden_layers == 3 and len(model.transformer.h) == 3
    assert distilled.record["parameters"]["compressed"] == sum(p.numel() for p in model.parameters())
    assert {"tokenizer.json", "generation_config.json", "compression.json", "distillation.png"} <= {
        p.name for p in distilled.output.iterdir()}


def test_distillation_recovers_what_pruning_lost(depth_pruned):
    pruned, distilled = depth_pruned
    run = distilled.record["distillation"]
    assert run["steps"] == 20 and run["loss_last"] < run["loss_first"]
    assert distilled.accuracy.ppl < pruned.accuracy.ppl
    assert distilled.accuracy.top1_agreement > pruned.accuracy.top1_agreement
    assert pruned.record["distillation"] is None


@pytest.fixture(scope="module")
def two_four(tmp_path_factory, calibration_text):
    """The reference model 2:4 sparse by each score; the wanda one distilled 10 steps with its masks held."""
    root = tmp_path_factory.mktemp("sparse")
    common = dict(calibration=calibration_text, sparsity="2:4", calibration_samples=16, eval_tokens=4096,
                  max_ppl_increase=100)
    return (gptkiln.compress("reference", root / "wanda", distill_steps=10, **common),
            gptkiln.compress("reference", root / "magnitude", sparsity_score="magnitude", **common))


def test_two_four_sparsity_holds_through_distillation_and_loads_in_transformers(two_four):
    from gptkiln.compression.sparsity import check_two_four, sparse_layers
    from gptkiln.models.loading import load_model

    wanda, magnitude = two_four
    record = wanda.record["removed"]["sparsity"]
    assert record["pattern"] == "2:4" and record["score"] == "wanda" and record["layers"] == 16
    assert record["zeroed"] == record["weights"] // 2 and "dense on ONNX Runtime" in record["runs"]
    assert wanda.record["distillation"]["steps"] == 10
    loaded = load_model(str(wanda.output))  # from the files: the distillation kept every mask
    assert check_two_four(loaded.model, loaded.spec) == 16
    layers = sparse_layers(loaded.model, loaded.spec)
    assert sum(int((m.weight == 0).sum()) for m in layers.values()) == record["zeroed"]
    # Wanda weighs each weight by its input's norm: a different choice than magnitude, and no worse one here
    assert wanda.record["gate"]["ppl"] <= magnitude.record["gate"]["ppl"]


@pytest.mark.skipif(not host_missing(), reason="this machine has TensorRT and a GPU: tests/gpu/ builds the sparse engine")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_builds_a_two_four_model_with_sparse_weights(two_four, tmp_path, capsys, precision):
    code = main(["export", str(two_four[0].output), "-o", str(tmp_path / "out"), "--target", "tensorrt",
                 "--quantize", precision, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    settings = json.loads(captured.out)["targets"]["tensorrt"]["settings"]
    readiness = settings["readiness"]
    assert settings["sparse_weights"] and readiness["ready"]
    assert (readiness["sparse_layers"], readiness["linear_layers"]) == (16, 16)
    assert "--sparsity=enable" in (tmp_path / "out" / "tensorrt" / "build_engine.sh").read_text()
    fp32_warning = [w for w in readiness["warnings"] if "sparse tensor cores run fp16" in w]
    assert bool(fp32_warning) == (precision == "fp32")


def test_over_budget_nothing_is_written(calibration_text, tmp_path, capsys):
    code, _, err = run_cli(capsys, "compress", "reference", "-o", tmp_path / "out", "--calibration", calibration_text,
                           "--prune-layers", "2", "--calibration-samples", "16", "--eval-tokens", "4096",
                           "--max-ppl-increase", "1")
    assert code == 9 and "compression gate failed" in err and "limit +1%" in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_a_width_pruned_checkpoint_exports_and_passes_the_fp32_gate(calibration_text, tmp_path, capsys):
    compressed = gptkiln.compress("reference", tmp_path / "narrow", calibration=calibration_text, prune_mlp=0.25,
                                  calibration_samples=16, eval_tokens=4096, max_ppl_increase=100)
    assert compressed.record["removed"]["mlp_channels"] == {"per_block": 192, "of": 768}
    config = json.loads((tmp_path / "narrow" / "config.json").read_text())
    assert config["n_inner"] == 576
    result = gptkiln.export(str(tmp_path / "narrow"), tmp_path / "out", targets=["onnxruntime"])
    assert result.ok


def test_whole_gqa_groups_go_and_the_model_still_exports(tiny_model_dir, calibration_text, tmp_path):
    compressed = gptkiln.compress(str(tiny_model_dir("llama")), tmp_path / "small", calibration=calibration_text,
                                  prune_heads=1, prune_mlp=0.5, calibration_samples=16, eval_tokens=4096,
                                  max_ppl_increase=1000)
    config = json.loads((tmp_path / "small" / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (2, 1, 16)
    assert config["intermediate_size"] == 64 and len(compressed.record["removed"]["kv_groups"]) == 2
    assert gptkiln.export(str(tmp_path / "small"), tmp_path / "out", targets=["onnxruntime"]).ok


def test_an_interrupted_distillation_resumes_where_it_stopped(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    teacher = GPT2LMHeadModel(config)
    windows = np.random.default_rng(0).integers(0, 64, size=(8, 16))
    settings = DistillSettings(steps=10, batch=2, checkpoint_every=3)
    whole = GPT2LMHeadModel(config)
    start = {k: v.clone() for k, v in whole.state_dict().items()}
    expected = distill(teacher, whole, windows, settings, tmp_path / "uninterrupted")

    student = GPT2LMHeadModel(config)
    student.load_state_dict(start)
    calls = {"n": 0}
    forward = student.forward

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return forward(*args, **kwargs)

    student.forward = interrupting
    with pytest.raises(KeyboardInterrupt):
        distill(teacher, student, windows, settings, tmp_path / "run")
    resumed = GPT2LMHeadModel(config)
    resumed.load_state_dict(start)
    record = distill(teacher, resumed, windows, settings, tmp_path / "run")
    assert record.resumed_at == 7 and np.allclose(record.losses, expected.losses)
    for name, value in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value)


def test_bad_requests_are_refused_before_any_work(calibration_text, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "compress", "reference", "-o", out, "--calibration", calibration_text)
    assert code == 2 and "nothing to remove" in err
    code, _, err = run_cli(capsys, "compress", "reference", "-o", out, "--calibration", calibration_text,
                           "--prune-heads", "1")
    assert code == 2 and "head pruning knows Llama-layout attention" in err and "--prune-layers" in err
    code, _, err = run_cli(capsys, "compress", "reference", "-o", out, "--calibration", calibration_text,
                           "--prune-layers", "4")
    assert code == 2 and "0 to 3" in err
    with pytest.raises(SystemExit) as exited:  # argparse's own refusal of an unknown pattern
        main(["compress", "reference", "-o", str(out), "--calibration", str(calibration_text), "--sparsity", "1:4"])
    assert exited.value.code == 2 and "invalid choice: '1:4'" in capsys.readouterr().err
    assert not out.exists()


def test_the_gate_error_carries_the_record(calibration_text, tmp_path):
    with pytest.raises(ParityError) as info:
        gptkiln.compress("reference", tmp_path / "out", calibration=calibration_text, prune_layers=3,
                         calibration_samples=16, eval_tokens=4096, max_ppl_increase=5)
    assert info.value.details["removed"]["blocks"] and info.value.details["gate"]["ppl_increase_pct"] > 5
