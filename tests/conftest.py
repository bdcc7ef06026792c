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
}


def save_tiny_model(model_type: str, directory: Path, seed: int = 0) -> Path:
    """A randomly initialised tiny model of the family, saved with the reference tokenizer."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    class_name, fields = TINY_CONFIGS[model_type]
    config = getattr(transformers, class_name)(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, **fields)
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
