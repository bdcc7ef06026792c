"""Load a causal LM and its tokenizer: a preset, a local directory, a GGUF file or a Hugging Face id.

Everything a user can get wrong about the files is refused here, before any export: a directory
without a tokenizer (gptkiln proves a build with text prompts and ships the tokenizer with it, so
a tokenizer-less export is not supported), weights that are truncated or do not match the config.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from gptkiln.errors import ModelNotFoundError, NotAModelError, UnsupportedModelError
from gptkiln.manifest import sha256_file
from gptkiln.models import gguf
from gptkiln.models.spec import DecoderSpec, check_decoder_only, decoder_spec

REFERENCE_DIR = Path(__file__).parent / "reference"
# Bare "gpt2" is the hub id of OpenAI's weights; the random-weight preset is "preset:gpt2".
PRESETS = ("reference", "preset:reference", "preset:gpt2")
GPT2_PRESET_SEED = 0
WEIGHT_SUFFIXES = (".safetensors", ".bin")
# what else of a model directory the build depends on (hashed with config.json and the weights)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json", "chat_template.jinja", "vocab.txt")
SIDE_FILES = (*TOKENIZER_FILES, "generation_config.json")
# Any one of these is a tokenizer's vocabulary; without one, transformers 5 silently builds an empty one.
VOCABULARY_FILES = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"), ("vocab.txt",))


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
    if source["kind"] == "gguf":
        return _load_gguf(Path(source["name"]), source)
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
    if gguf.is_gguf(path):
        return gguf.gguf_source(path)
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
        raise NotAModelError(f"'{path}' is a file, not a model directory or a {gguf.SUFFIX} file",
                             "give the directory that holds config.json and the weights, or a GGUF file")
    if not (path / "config.json").is_file():
        raise NotAModelError(
            f"'{path}' is not a model directory: it has no config.json",
            "give a directory written by save_pretrained() (config.json, weights, tokenizer files)",
        )
    weights = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if not weights:
        raise NotAModelError(f"'{path}' has a config.json but no weights (*.safetensors / *.bin)",
                             "copy the weight files into the directory, or re-save the model")
    present = {p.name for p in path.iterdir()}
    if not any(all(name in present for name in files) for files in VOCABULARY_FILES):
        raise NotAModelError(
            f"'{path}' has no tokenizer (none of tokenizer.json, tokenizer.model, vocab.json + merges.txt, vocab.txt)",
            "save the tokenizer beside the model: AutoTokenizer.from_pretrained(ID).save_pretrained(DIR)")
    side = sorted(path / name for name in present if name in SIDE_FILES)
    return [path / "config.json", *weights, *side]


def _directory_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for file in _model_files(path):
        digest.update(file.name.encode())
        digest.update(sha256_file(file).encode())
    return digest.hexdigest()


def _load_directory(path: Path, source: dict) -> LoadedModel:
    _model_files(path)
    config = _read_config(str(path))
    check_decoder_only(config)  # refuse before the weights are read
    model = _from_pretrained(str(path), config)
    return LoadedModel(model, _load_tokenizer(str(path)), model_spec(model), source)


def _load_gguf(path: Path, source: dict) -> LoadedModel:
    model, tokenizer = gguf.load_gguf(path)
    _prepare_tokenizer(tokenizer)
    return LoadedModel(model, tokenizer, model_spec(model), source)


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
    check_decoder_only(config)
    try:
        model = _from_pretrained(model_id, config)
    except OSError as exc:  # weights missing from the repo, download interrupted
        raise ModelNotFoundError(f"could not fetch the weights of '{model_id}': {str(exc).splitlines()[0]}",
                                 "check the network, or download the model and pass its local directory") from None
    return LoadedModel(model, _load_tokenizer(model_id), model_spec(model), source)


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
    return LoadedModel(model, _load_tokenizer(str(REFERENCE_DIR)), model_spec(model), model_source("preset:gpt2"))


def model_spec(model) -> DecoderSpec:
    """The DecoderSpec of a loaded model: the config's facts, where its transformer blocks sit, and the
    cache layout as one real forward pass writes it (the config's head counts are checked, not trusted)."""
    import torch
    from torch import nn
    from transformers import DynamicCache

    spec = decoder_spec(model.config)
    blocks = [name for name, module in model.named_modules()
              if isinstance(module, nn.ModuleList) and len(module) == spec.num_layers]
    if not blocks:
        raise UnsupportedModelError(f"'{spec.model_type}': no list of {spec.num_layers} transformer blocks in the model",
                                    "gptkiln exports decoders built as a stack of blocks; report this model")
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 2, dtype=torch.int64), cache=cache, use_cache=True)
    shapes = {tuple(layer.keys.shape) for layer in cache.layers} | {tuple(layer.values.shape) for layer in cache.layers}
    if len(cache.layers) != spec.num_layers or len(shapes) != 1 or len(next(iter(shapes))) != 4:
        raise UnsupportedModelError(
            f"'{spec.model_type}' does not keep one [batch, kv_heads, seq, head_dim] key/value pair per layer "
            f"(its cache holds {len(cache.layers)} layers shaped {sorted(shapes)})",
            "gptkiln's KV-cache contract cannot carry this model's state; report it with the model config")
    _, kv_heads, _, head_dim = next(iter(shapes))
    return dataclasses.replace(spec, num_kv_heads=kv_heads, head_dim=head_dim, blocks_path=blocks[0],
                               **_graph_facts(model))


def _graph_facts(model) -> dict:
    """What the exported graph should hold, from the model's modules (not from a list of families)."""
    import inspect

    module_classes = [type(module) for module in model.modules()]
    modeling = inspect.getmodule(type(model))
    return {"rms_norms": sum(1 for cls in module_classes if cls.__name__.endswith("RMSNorm")),
            "rotary": hasattr(modeling, "rotate_half") and any(cls.__name__.endswith("RotaryEmbedding")
                                                               for cls in module_classes),
            "sdpa": model.config._attn_implementation == "sdpa"}


def _read_config(name: str):
    from transformers import AutoConfig

    try:  # trust_remote_code=False: never run a model's own code, and never prompt for it
        return AutoConfig.from_pretrained(name, trust_remote_code=False)
    except ValueError as exc:  # unknown model_type, malformed config, remote code
        if "trust_remote_code" in str(exc):
            raise UnsupportedModelError(
                f"'{name}' needs its own Python code (trust_remote_code): its architecture is not part of "
                "transformers, and gptkiln does not run code that comes with a model",
                "use a checkpoint of a family transformers implements (many remote-code models have one)") from None
        raise UnsupportedModelError(f"cannot read the model config of '{name}': {str(exc).splitlines()[0][:300]}",
                                    "check that config.json is a transformers config") from None


def _from_pretrained(name: str, config):
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    fix = "re-save the model with save_pretrained(), or download it again"
    try:
        # mismatched shapes load (at random) and are reported in `info`, so the error below can name them
        model, info = AutoModelForCausalLM.from_pretrained(name, config=config, dtype=torch.float32,
                                                           output_loading_info=True, ignore_mismatched_sizes=True,
                                                           trust_remote_code=False)
    except (OSError, RuntimeError, ValueError, SafetensorError) as exc:  # truncated or unreadable weight files
        if isinstance(exc, OSError) and not Path(name).is_dir():
            raise  # the hub: not found / no network (_load_hub says so)
        raise NotAModelError(f"the weights in '{name}' cannot be loaded: {type(exc).__name__}: "
                             f"{str(exc).strip().splitlines()[0][:300]}", fix) from None
    missing, mismatched = info.get("missing_keys") or [], info.get("mismatched_keys") or []
    if missing or mismatched:  # transformers would initialise these at random and only warn
        names = [*missing, *(key[0] if isinstance(key, tuple) else key for key in mismatched)]
        raise NotAModelError(f"the weights in '{name}' do not match its config.json: {len(missing)} missing, "
                             f"{len(mismatched)} of another shape (e.g. {', '.join(sorted(names)[:3])})", fix)
    return model.eval()


def _load_tokenizer(name: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise NotAModelError(f"no usable tokenizer in '{name}': {str(exc).splitlines()[0]}",
                             "save the tokenizer beside the model (tokenizer.save_pretrained(dir))") from None
    return _prepare_tokenizer(tokenizer)


def _prepare_tokenizer(tokenizer):
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer

