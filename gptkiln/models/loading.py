"""Load a causal LM and its tokenizer: a preset, a local directory or a Hugging Face id."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from gptkiln.errors import ModelNotFoundError, NotAModelError, UnsupportedModelError
from gptkiln.manifest import sha256_file
from gptkiln.models.spec import DecoderSpec, decoder_spec

REFERENCE_DIR = Path(__file__).parent / "reference"
# Bare "gpt2" is the hub id of OpenAI's weights; the random-weight preset is "preset:gpt2".
PRESETS = ("reference", "preset:reference", "preset:gpt2")
GPT2_PRESET_SEED = 0
WEIGHT_SUFFIXES = (".safetensors", ".bin")
# what else of a model directory the build depends on (hashed with config.json and the weights)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json", "generation_config.json")


@dataclass
class LoadedModel:
    model: object  # transformers PreTrainedModel, eval mode, fp32
    tokenizer: object  # transformers tokenizer; pad token set, left padding
    spec: DecoderSpec
    source: dict  # {"kind", "name", "sha256"}: written into the manifest


def load_model(name: str) -> LoadedModel:
    if name in ("reference", "preset:reference"):
        return _load_directory(REFERENCE_DIR, model_source(name))
    if name == "preset:gpt2":
        return _gpt2_preset()
    source = model_source(name)
    if source["kind"] == "local":
        return _load_directory(Path(source["name"]), source)
    return _load_hub(name, source)


def model_source(name: str) -> dict:
    """{"kind", "name", "sha256"} of a model, from its files and config alone (no weights are loaded):
    what the manifest records and what the stage cache keys on."""
    if name in ("reference", "preset:reference"):
        return {"kind": "preset", "name": "reference", "sha256": _directory_digest(REFERENCE_DIR)}
    if name == "preset:gpt2":
        return {"kind": "preset", "name": "preset:gpt2",
                "sha256": hashlib.sha256(_gpt2_preset_config().to_json_string().encode()
                                         + f"seed={GPT2_PRESET_SEED}".encode()).hexdigest()}
    if name.startswith("preset:"):
        raise ModelNotFoundError(f"unknown preset '{name}'", f"use one of: {', '.join(PRESETS)}")
    path = Path(name).expanduser()
    if path.exists():
        return {"kind": "local", "name": str(path.resolve()), "sha256": _directory_digest(path)}
    if _looks_like_path(name):
        raise ModelNotFoundError(
            f"model path '{name}' does not exist",
            "check the path, or give a Hugging Face id such as 'openai-community/gpt2'",
        )
    return {"kind": "hub", "name": name, "sha256": getattr(_hub_config(name), "_commit_hash", None) or "unknown"}


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1


def _model_files(path: Path) -> list[Path]:
    """config.json, the weights and the tokenizer files of a model directory (checked to exist)."""
    if not path.is_dir():
        raise NotAModelError(f"'{path}' is a file, not a model directory",
                             "give the directory that holds config.json and the weights")
    if not (path / "config.json").is_file():
        raise NotAModelError(
            f"'{path}' is not a model directory: it has no config.json",
            "give a directory written by save_pretrained() (config.json, weights, tokenizer files)",
        )
    weights = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if not weights:
        raise NotAModelError(f"'{path}' has a config.json but no weights (*.safetensors / *.bin)",
                             "copy the weight files into the directory, or re-save the model")
    tokenizer = sorted(p for p in path.iterdir() if p.name in TOKENIZER_FILES)
    return [path / "config.json", *weights, *tokenizer]


def _directory_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for file in _model_files(path):
        digest.update(file.name.encode())
        digest.update(sha256_file(file).encode())
    return digest.hexdigest()


def _load_directory(path: Path, source: dict) -> LoadedModel:
    _model_files(path)
    config = _read_config(str(path))
    spec = decoder_spec(config)
    model = _from_pretrained(str(path), config)
    tokenizer = _load_tokenizer(str(path))
    return LoadedModel(model, tokenizer, spec, source)


def _hub_config(model_id: str):
    try:
        return _read_config(model_id)
    except OSError as exc:
        raise ModelNotFoundError(
            f"could not fetch '{model_id}' from the Hugging Face Hub: {str(exc).splitlines()[0]}",
            "check the id and the network, or download the model and pass its local directory",
        ) from None


def _load_hub(model_id: str, source: dict) -> LoadedModel:
    config = _hub_config(model_id)
    spec = decoder_spec(config)
    try:
        model = _from_pretrained(model_id, config)
    except OSError as exc:  # weights missing from the repo, download interrupted
        raise ModelNotFoundError(f"could not fetch the weights of '{model_id}': {str(exc).splitlines()[0]}",
                                 "check the network, or download the model and pass its local directory") from None
    return LoadedModel(model, _load_tokenizer(model_id), spec, source)


def _gpt2_preset_config():
    from transformers import GPT2Config

    reference_config = json.loads((REFERENCE_DIR / "config.json").read_text())
    return GPT2Config(bos_token_id=reference_config["bos_token_id"], eos_token_id=reference_config["eos_token_id"])


def _gpt2_preset() -> LoadedModel:
    """GPT-2 small's shape (124M) with seeded random weights and the reference tokenizer: for speed only."""
    import torch
    from transformers import GPT2LMHeadModel

    config = _gpt2_preset_config()
    torch.manual_seed(GPT2_PRESET_SEED)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # GPT-2's init zeroes every bias; real checkpoints have none at zero
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0.0, 0.02)
    return LoadedModel(model, _load_tokenizer(str(REFERENCE_DIR)), decoder_spec(config), model_source("preset:gpt2"))


def _read_config(name: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name)
    except ValueError as exc:  # unknown model_type, malformed config
        raise UnsupportedModelError(f"cannot read the model config of '{name}': {exc}",
                                    "check that config.json is a transformers config") from None


def _from_pretrained(name: str, config):
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(name, config=config, dtype=torch.float32)
    except (RuntimeError, ValueError) as exc:  # truncated or mismatched weight files
        raise NotAModelError(f"the weights in '{name}' cannot be loaded: {str(exc).splitlines()[0][:300]}",
                             "re-save the model with save_pretrained(), or download it again") from None
    return model.eval()


def _load_tokenizer(name: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise NotAModelError(f"no usable tokenizer in '{name}': {str(exc).splitlines()[0]}",
                             "save the tokenizer beside the model (tokenizer.save_pretrained(dir))") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer

