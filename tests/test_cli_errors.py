"""Bad input: a one-line cause and fix, a distinct exit code, and nothing half-written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gptkiln.cli import main
from gptkiln.errors import GptkilnError


def leftovers(parent, name):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_exit_codes_are_distinct():
    codes = [cls.exit_code for cls in GptkilnError.__subclasses__()]
    assert len(codes) == len(set(codes)) and 0 not in codes and 1 not in codes


def test_missing_path(tmp_path, capsys):
    code, _, err = run_cli(capsys, "export", str(tmp_path / "nope"), "-o", str(tmp_path / "out"))
    assert code == 3
    assert "does not exist" in err and "fix:" in err
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path, "out")


def test_directory_that_is_not_a_model(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    code, _, err = run_cli(capsys, "export", str(tmp_path / "notes"), "-o", str(tmp_path / "out"))
    assert code == 4
    assert "no config.json" in err
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path, "out")


def test_encoder_only_model(tmp_path, capsys):
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from gptkiln.models.loading import REFERENCE_DIR

    BertForMaskedLM(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                               intermediate_size=64, vocab_size=100)).save_pretrained(tmp_path / "bert")
    AutoTokenizer.from_pretrained(REFERENCE_DIR).save_pretrained(tmp_path / "bert")
    code, _, err = run_cli(capsys, "export", str(tmp_path / "bert"), "-o", str(tmp_path / "out"))
    assert code == 5
    assert "'bert' is an encoder (masked-LM) model; gptkiln exports decoder-only causal LMs" in err and "Llama" in err
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path, "out")


def copy_model(tiny_model_dir, tmp_path, name="model"):
    import shutil

    return shutil.copytree(tiny_model_dir("llama"), tmp_path / name)


def export_fails(capsys, tmp_path, model) -> tuple[int, str]:
    code, _, err = run_cli(capsys, "export", str(model), "-o", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path, "out")
    assert "Traceback" not in err and "fix:" in err
    return code, err


def test_a_directory_without_tokenizer_files_is_refused_before_export(tmp_path, capsys, tiny_model_dir):
    """generation_config.json and tokenizer_config.json are no tokenizer: transformers 5 would build an empty one."""
    model = copy_model(tiny_model_dir, tmp_path)
    for file in model.iterdir():
        if file.name not in ("config.json", "model.safetensors", "generation_config.json", "tokenizer_config.json"):
            file.unlink()
    code, err = export_fails(capsys, tmp_path, model)
    assert code == 4 and "has no tokenizer" in err and "[1] export" not in err


def test_truncated_weights_are_refused(tmp_path, capsys, tiny_model_dir):
    model = copy_model(tiny_model_dir, tmp_path)
    (model / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes()[:100_000])
    code, err = export_fails(capsys, tmp_path, model)
    assert code == 4 and "cannot be loaded" in err and "SafetensorError" in err


@pytest.mark.parametrize("change,says", [({"intermediate_size": 96}, "6 of another shape"),
                                         ({"num_hidden_layers": 3}, "9 missing")])
def test_weights_that_do_not_match_the_config_are_refused(tmp_path, capsys, tiny_model_dir, change, says):
    """transformers would fill the gaps with random weights and only warn."""
    model = copy_model(tiny_model_dir, tmp_path)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, **change}))
    code, err = export_fails(capsys, tmp_path, model)
    assert code == 4 and "do not match its config.json" in err and says in err and "mlp" in err


def test_a_model_that_needs_remote_code_is_refused_without_a_prompt(tmp_path, capsys, tiny_model_dir):
    model = copy_model(tiny_model_dir, tmp_path)
    (model / "config.json").write_text(json.dumps({"model_type": "mycustom", "architectures": ["MyModel"],
                                                   "auto_map": {"AutoConfig": "configuration_my.MyConfig"}}))
    code, err = export_fails(capsys, tmp_path, model)
    assert code == 5 and "trust_remote_code" in err and "does not run code that comes with a model" in err


def test_a_file_that_is_not_gguf_is_refused(tmp_path, capsys):
    (tmp_path / "model.gguf").write_bytes(b"not a gguf file" * 100)
    code, err = export_fails(capsys, tmp_path, tmp_path / "model.gguf")
    assert code == 4 and "not a readable GGUF file" in err


def test_existing_non_empty_output_without_force(tmp_path, capsys, tiny_model_dir):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, "export", str(tiny_model_dir("gpt2")), "-o", str(tmp_path / "out"))
    assert code == 6
    assert "--force" in err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    assert not leftovers(tmp_path, "out")


def test_force_replaces_an_earlier_gptkiln_output(tmp_path, capsys, tiny_model_dir):
    model = str(tiny_model_dir("gpt2"))
    assert run_cli(capsys, "export", model, "-o", str(tmp_path / "out"))[0] == 0
    (tmp_path / "out" / "stale.txt").write_text("from an older build")
    assert run_cli(capsys, "export", model, "-o", str(tmp_path / "out"), "--force")[0] == 0
    assert not (tmp_path / "out" / "stale.txt").exists() and (tmp_path / "out" / "manifest.json").is_file()
    assert not leftovers(tmp_path, "out")


def test_force_never_replaces_a_directory_gptkiln_did_not_write(tmp_path, capsys, tiny_model_dir):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    code, _, err = run_cli(capsys, "export", str(tiny_model_dir("gpt2")), "-o", str(tmp_path / "mine"), "--force")
    assert code == 6 and "is not a gptkiln output" in err
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "years of work"


def test_force_never_replaces_the_current_directory(tmp_path, capsys, monkeypatch, tiny_model_dir):
    (tmp_path / "manifest.json").write_text("{}")  # even one that looks like an output
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "export", str(tiny_model_dir("gpt2")), "-o", ".", "--force")
    assert code == 6 and "current directory" in err
    assert (tmp_path / "manifest.json").is_file()


def test_unknown_target(tmp_path, capsys, tiny_model_dir):
    code, _, err = run_cli(capsys, "export", str(tiny_model_dir("gpt2")), "-o", str(tmp_path / "out"),
                           "--target", "tpu")
    assert code == 2
    assert "unknown target 'tpu'" in err and "onnxruntime" in err
    assert not (tmp_path / "out").exists()


def test_json_errors_are_machine_readable(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "export", str(tmp_path / "nope"), "-o", str(tmp_path / "out"), "--json")
    error = json.loads(out)["error"]
    assert code == error["exit_code"] == 3 and error["type"] == "ModelNotFoundError" and error["fix"]


def test_failed_parity_gate_exits_9_names_the_output_and_writes_nothing(tmp_path, capsys, tiny_model_dir):
    # fp32 ORT differs from PyTorch by ~1e-7 of the logit scale; a 1e-12 bar cannot hold.
    code, out, err = run_cli(capsys, "export", str(tiny_model_dir("gpt2")), "-o", str(tmp_path / "out"),
                             "--logits-rel", "1e-12", "--json")
    assert code == 9
    assert "batch1/logits: max |diff|" in err and "at step" in err
    assert json.loads(out)["error"]["details"]["targets"]["onnxruntime"]["passed"] is False
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path, "out")


def test_console_script_reports_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "gptkiln", "export", str(tmp_path / "nope"), "-o",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-2].startswith("gptkiln: error: model path")
    assert proc.stderr.splitlines()[-1].startswith("  fix: ")


@pytest.mark.parametrize("bad", [["--decode-steps", "0"], ["--logits-rel", "0"]])
def test_bad_tolerance_options(tmp_path, capsys, bad):
    assert main(["verify", str(tmp_path), *bad]) == 2


@pytest.mark.parametrize("alpha", ["1.5", "best"])
def test_smoothquant_alpha_is_a_number_in_range_or_auto(tmp_path, capsys, alpha):
    with pytest.raises(SystemExit) as exited:  # argparse's refusal, before anything is loaded
        main(["export", "reference", "-o", str(tmp_path / "out"), "--quantize", "w8a8", "--smoothquant-alpha", alpha])
    assert exited.value.code == 2 and f"expected a number in [0, 1] or 'auto', got '{alpha}'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [["verify", "{tmp}/missing"], ["generate", "{tmp}/missing", "--prompt", "x"]])
def test_verify_and_generate_on_a_non_output(tmp_path, capsys, argv):
    code, _, err = run_cli(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert code == 10 and "manifest.json" in err


def test_unreachable_hub_id_is_model_not_found(tmp_path):
    """The real Hub loading path, offline: a clear cause, exit 3, no traceback."""
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-m", "gptkiln", "export", "someorg/some-gpt", "-o",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 3, proc.stderr
    assert "could not fetch 'someorg/some-gpt' from the Hugging Face Hub" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()
