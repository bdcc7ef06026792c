"""The IO contract every target speaks (docs/DESIGN.md): names, dtypes and symbolic shapes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gptkiln.models.spec import DecoderSpec

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"  # weights always go to external data: one layout for every size
# Symbolic dimension names written into the ONNX graph.
BATCH, SEQUENCE, PAST, TOTAL = "batch", "sequence", "past_sequence", "past_sequence+sequence"
# The ONNX Runtime engine's one input beyond the contract (gptkiln.graph.last_logits; OpenVINO's runner adds it at
# load): int64 [1], 0 = every position
LOGITS_TO_KEEP = "num_logits_to_keep"  # the name onnxruntime-genai and optimum feed (0)
KEEP_LAST, KEEP_EVERY = np.array([1], np.int64), np.array([0], np.int64)  # its two values


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # "int64" | "float32"
    shape: tuple  # ints and symbolic names

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


def past_names(num_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    return [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def inputs(spec: DecoderSpec) -> list[TensorSpec]:
    kv_shape = (BATCH, spec.num_kv_heads, PAST, spec.head_dim)
    return [
        TensorSpec("input_ids", "int64", (BATCH, SEQUENCE)),
        TensorSpec("attention_mask", "int64", (BATCH, TOTAL)),
        TensorSpec("position_ids", "int64", (BATCH, SEQUENCE)),
        *(TensorSpec(name, "float32", kv_shape) for name in past_names(spec.num_layers)),
    ]


def outputs(spec: DecoderSpec) -> list[TensorSpec]:
    kv_shape = (BATCH, spec.num_kv_heads, TOTAL, spec.head_dim)
    return [
        TensorSpec("logits", "float32", (BATCH, SEQUENCE, spec.vocab_size)),
        *(TensorSpec(name, "float32", kv_shape) for name in present_names(spec.num_layers)),
    ]


def contract(spec: DecoderSpec) -> dict:
    """The manifest's description of the IO contract."""
    return {"inputs": [t.to_dict() for t in inputs(spec)], "outputs": [t.to_dict() for t in outputs(spec)]}
