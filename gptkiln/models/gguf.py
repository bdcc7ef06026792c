"""GGUF files (llama.cpp's format, how most small models are shared): read with transformers'
GGUF loader and dequantized to float32, so they export like any checkpoint.

The manifest records the file's sha256 and the quantization types its tensors were stored in
(a Q4_1 checkpoint's float weights sit on the Q4_1 grid; quantizing them again is not lossless).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from gptkiln.errors import NotAModelError, UnsupportedModelError, UsageError
from gptkiln.manifest import sha256_file

SUFFIX = ".gguf"
INSTALL = "pip install 'gptkiln[gguf]' (the gguf and accelerate packages)"


def is_gguf(path: Path) -> bool:
    return path.suffix.lower() == SUFFIX and path.is_file()


def _reader(path: Path):
    try:
        from gguf import GGUFReader
    except ImportError:
        raise UsageError(f"'{path.name}' is a GGUF file, and reading one needs the gguf package", INSTALL) from None
    try:
        return GGUFReader(str(path))
    except Exception as exc:  # a truncated or foreign file: gguf raises ValueError, struct/numpy errors
        raise NotAModelError(f"'{path}' is not a readable GGUF file: {type(exc).__name__}: {str(exc)[:200]}",
                             "download the file again, or give a model directory") from None


def gguf_source(path: Path) -> dict:
    """{"kind": "gguf", "name", "sha256", "gguf": {architecture, tensor types}} from the file's header."""
    reader = _reader(path)
    architecture = reader.fields.get("general.architecture")
    name = bytes(architecture.parts[architecture.data[0]]).decode() if architecture is not None else "?"
    types = Counter(tensor.tensor_type.name for tensor in reader.tensors)
    return {"kind": "gguf", "name": str(path.resolve()), "sha256": sha256_file(path),
            "gguf": {"architecture": name, "tensor_types": dict(sorted(types.items()))}}


def load_gguf(path: Path):
    """(model, tokenizer) from a GGUF file, the weights dequantized to float32 (after the config is checked)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from gptkiln.models.spec import check_decoder_only

    try:
        import accelerate  # noqa: F401  (transformers' GGUF loader needs it)
    except ImportError:
        raise UsageError(f"reading '{path.name}' needs the accelerate package", INSTALL) from None
    directory, name = str(path.parent), path.name
    try:
        check_decoder_only(AutoConfig.from_pretrained(directory, gguf_file=name, trust_remote_code=False))
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32,
                                                     trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name, trust_remote_code=False)
    except (ValueError, KeyError, NotImplementedError) as exc:  # an architecture or tensor type it cannot read
        raise UnsupportedModelError(f"transformers cannot load '{path.name}': {str(exc).splitlines()[0][:300]}",
                                    "convert the model to a transformers directory, or use a supported "
                                    "GGUF architecture") from None
    _forget_gguf_quantization(model)
    return model.eval(), tokenizer


def _forget_gguf_quantization(model) -> None:
    """The weights are plain float32 now; transformers still marks the model GGUF-quantized, which makes
    save_pretrained refuse it ("not serializable"). gptkiln compress saves such a model."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
