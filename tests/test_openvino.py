"""OpenVINO target: stateful and stateless builds hold the fp32 gate; broken IR and a missing SDK are clear errors."""

from __future__ import annotations

import sys

import pytest

from gptkiln.config import BuildConfig, RuntimeSettings
from gptkiln.errors import ArtifactError, TargetUnavailableError
from gptkiln.pipeline import build
from gptkiln.targets import get_target

pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install 'gptkiln[openvino]')")


@pytest.fixture(scope="module")
def openvino_build(tmp_path_factory):
    output = tmp_path_factory.mktemp("ov") / "reference"
    config = BuildConfig(model="reference", output=output, targets=("openvino", "openvino-stateless"),
                         runtime=RuntimeSettings(threads=1))
    return build(config), output


def test_stateful_and_stateless_pass_fp32_parity(openvino_build):
    result, output = openvino_build
    assert result.ok, [t.failures for t in result.targets]
    for target in result.targets:
        cache = [c for c in target.parity.comparisons if "present" in c.name]
        assert len(cache) == 2 * result.spec.num_layers and max(c.rel for c in cache) < 1e-5
        assert not [n for n in target.settings["fusion"]["fusions"] if n["fusion_set"] == "onnxruntime"]  # no contrib ops
    assert {t.name: t.settings["stateful"] for t in result.targets} == {"openvino": True, "openvino-stateless": False}


def test_stateful_ir_keeps_the_cache_as_state(openvino_build):
    import openvino as ov

    result, output = openvino_build
    model = ov.Core().read_model(str(output / "openvino" / "openvino_model.xml"))
    names = {port.get_any_name() for port in model.inputs}
    assert names == {"input_ids", "attention_mask", "position_ids", "beam_idx"}
    assert len(model.get_sinks()) == 2 * result.spec.num_layers  # one Assign per cache tensor
    stateless = ov.Core().read_model(str(output / "openvino-stateless" / "openvino_model.xml"))
    assert "past_key_values.0.key" in {port.get_any_name() for port in stateless.inputs}


@pytest.mark.parametrize("target", ["openvino", "openvino-stateless"])
def test_last_only_is_the_last_row_of_every_position(openvino_build, target):
    """gptkiln's runner adds `num_logits_to_keep` when it loads an IR (the file keeps openvino-genai's inputs, see
    above): generation's prefill computes the last row of logits alone, and it is every position's last row."""
    import numpy as np

    from gptkiln.runtime.generate import left_pad

    result, output = openvino_build
    runner = get_target(target).load(output / target, result.spec)
    assert runner.keeps_logits
    batch = left_pad([list(range(3, 20)), list(range(7, 16))], 0)
    every, _ = runner.step(batch.input_ids, batch.attention_mask, batch.position_ids, runner.empty_cache(2))
    last, _ = runner.step(batch.input_ids, batch.attention_mask, batch.position_ids, runner.empty_cache(2),
                          last_only=True)
    assert every.shape[1] == 17 and last.shape[1] == 1
    np.testing.assert_allclose(last[:, 0], every[:, -1], rtol=0, atol=1e-5 * np.abs(every).max())


@pytest.mark.parametrize("target", ["openvino", "openvino-stateless"])
def test_a_prompt_in_passes_matches_one_pass(openvino_build, target, prefill_in_passes_matches_one_pass):
    """The state (or the contract's arrays) continues a prompt at any batch: passes along the positions."""
    result, output = openvino_build
    prefill_in_passes_matches_one_pass(get_target(target).load(output / target, result.spec), 1e-5)


def test_a_stale_cache_handle_is_refused(openvino_build):
    import numpy as np

    result, output = openvino_build
    runner = get_target("openvino").load(output / "openvino", result.spec)
    first = runner.empty_cache(1)
    ids = np.array([[5, 6, 7]], np.int64)
    runner.step(ids, np.ones((1, 3), np.int64), np.arange(3)[None], first)
    with pytest.raises(RuntimeError, match="continues only from the cache its last step returned"):
        runner.step(ids[:, :1], np.ones((1, 4), np.int64), np.array([[3]]), first)


def test_truncated_ir_is_an_artifact_error(openvino_build, tmp_path):
    import shutil

    result, output = openvino_build
    shutil.copytree(output / "openvino", tmp_path / "ir")
    weights = tmp_path / "ir" / "openvino_model.bin"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ArtifactError, match="OpenVINO cannot load"):
        get_target("openvino").load(tmp_path / "ir", result.spec)


def test_missing_openvino_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    with pytest.raises(TargetUnavailableError) as info:
        get_target("openvino").check_available()
    assert "gptkiln[openvino]" in info.value.fix


def test_bare_runtime_example_matches_gptkiln_generation(openvino_build):
    """examples/openvino_generate.py with torch, transformers and gptkiln made unimportable."""
    import subprocess
    from pathlib import Path

    from gptkiln.runtime.generate import GenerationConfig
    from gptkiln.runtime.session import open_output

    _, output = openvino_build
    example = Path(__file__).parents[1] / "examples" / "openvino_generate.py"
    blocked = "import sys, runpy; [sys.modules.__setitem__(m, None) for m in ('torch', 'transformers', 'gptkiln')]"
    code = f"{blocked}; sys.argv = ['x', {str(output)!r}, 'def main(', '12']; runpy.run_path({str(example)!r}, run_name='__main__')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    expected = open_output(output, "openvino").complete(["def main("], GenerationConfig(max_new_tokens=12))[0]
    assert proc.stdout.rstrip("\n") == "def main(" + expected


def test_engine_runs_with_its_saved_runtime_config_and_fused_attention(openvino_build):
    """--threads/--performance-hint travel with the engine; the opset-23 Attention becomes OpenVINO's
    SDPA with the KV cache inside it (the stateful fast path)."""
    result, output = openvino_build
    runner = get_target("openvino").load(output / "openvino", result.spec)  # no runtime settings passed
    compiled = runner.request.get_compiled_model()
    assert compiled.get_property("INFERENCE_NUM_THREADS") == 1
    assert "float32" in str(compiled.get_property("INFERENCE_PRECISION_HINT"))
    assert result.targets[0].settings["config"]["INFERENCE_NUM_THREADS"] == 1
    kinds = [op.get_rt_info()["layerType"].astype(str) for op in compiled.get_runtime_model().get_ops()]
    assert kinds.count("ScaledDotProductAttention") == result.spec.num_layers
    assert kinds.count("MemoryInput") == 2 * result.spec.num_layers  # the cache is state read by SDPA


def test_reduced_inference_precision_is_applied_and_held_to_the_half_bars(tmp_path, capsys):
    """bf16 / f16 are an explicit choice: recorded, warned about where the CPU lacks them, and gated by the
    half-precision bars (the other targets of the build keep the fp32 bars)."""
    import json

    import openvino as ov

    from gptkiln.cli import main
    from gptkiln.config import Tolerances

    capabilities = set(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    code = main(["export", "reference", "-o", str(tmp_path / "bf16"), "--target", "onnxruntime", "--target",
                 "openvino", "--inference-precision", "bf16", "--json"])
    payload = json.loads(capsys.readouterr().out)
    targets = (payload if code == 0 else payload["error"]["details"])["targets"]
    openvino = targets["openvino"]
    assert openvino["settings"]["config"]["INFERENCE_PRECISION_HINT"] == "bf16"
    assert openvino["settings"]["tolerances"] == vars(Tolerances.half())
    assert targets["onnxruntime"]["settings"]["tolerances"] == vars(Tolerances())
    # bf16 really runs where the CPU plugin runs it (a gate failure says it did; else the compiled engine says
    # which precision it computes in): its logits are off fp32 PyTorch by far more than the fp32 bar. An AVX2-only
    # CPU falls back to f32 and its logits stay within the fp32 bar.
    worst = max(c["rel"] for c in openvino["parity"]["comparisons"] if c["name"].endswith("logits"))
    runs_bf16 = code != 0 or ov.Core().compile_model(
        str(tmp_path / "bf16" / "openvino" / "openvino_model.xml"), "CPU",
        {"INFERENCE_PRECISION_HINT": "bf16"}).get_property("INFERENCE_PRECISION_HINT") == ov.Type.bf16
    assert (worst > 1e-3) == runs_bf16, (worst, runs_bf16)
    assert bool(openvino["settings"]["warnings"]) == ("BF16" not in capabilities)
    # the gate is the half one: a failure, where there is one, is top-1 or greedy, never the logits bound
    assert code in (0, 9) and all("max |diff|" not in failure for failure in openvino["failures"])


def test_a_reduced_kv_cache_is_applied_recorded_and_refused_where_it_cannot_apply(openvino_build, tmp_path, capsys):
    """--kv-cache-precision f16 keeps compute in f32 and stores the stateful cache in f16: decode logits move
    off the f32 cache's, the build records it and is held to the half bars, and bench's floor counts 2 bytes
    per cache element. openvino-stateless, whose cache is fp32 inputs and outputs, refuses it."""
    import json

    import numpy as np

    from gptkiln.bench.run import load_target
    from gptkiln.cli import main
    from gptkiln.config import Tolerances
    from gptkiln.targets.openvino import compile_config, ir_runner

    result, output = openvino_build
    ids = np.arange(1, 17, dtype=np.int64)[None]
    logits = {}
    for kv in ("f32", "f16"):
        config = compile_config(RuntimeSettings(threads=1, kv_cache_precision=kv))
        runner = ir_runner(output / "openvino" / "openvino_model.xml", result.spec, config)
        step, cache = runner.step(ids, np.ones_like(ids), np.arange(16, dtype=np.int64)[None], runner.empty_cache(1))
        steps = [step]
        for s in range(8):  # decode steps read the cache back
            step, cache = runner.step(ids[:, s : s + 1], np.ones((1, 17 + s), np.int64), np.array([[16 + s]]), cache)
            steps.append(step)
        logits[kv] = np.concatenate(steps, axis=1)
    assert 0 < np.abs(logits["f16"] - logits["f32"]).max() < 1e-2 * np.abs(logits["f32"]).max()

    out = tmp_path / "kv"
    code = main(["export", "reference", "-o", str(out), "--target", "openvino", "--kv-cache-precision", "f16",
                 "--threads", "1", "--json"])
    payload = json.loads(capsys.readouterr().out)
    assert code == 0, payload
    settings = payload["targets"]["openvino"]["settings"]
    assert settings["config"]["KV_CACHE_PRECISION"] == "f16" and settings["config"]["INFERENCE_PRECISION_HINT"] == "f32"
    assert settings["tolerances"] == vars(Tolerances.half())
    assert load_target("openvino", str(out / "openvino"), payload["spec"], 1)[1] == {"kv_element_bytes": 2}
    code = main(["export", "reference", "-o", str(tmp_path / "stateless"), "--target", "openvino-stateless",
                 "--kv-cache-precision", "u8"])
    assert code == 2 and "drop --kv-cache-precision" in capsys.readouterr().err
    assert not (tmp_path / "stateless").exists()

