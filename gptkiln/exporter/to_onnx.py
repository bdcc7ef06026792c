"""Trace the KV-cache wrapper to one ONNX decoder graph (torch.onnx.export, dynamo=True)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gptkiln.errors import ExportError
from gptkiln.exporter import attention_op, io_spec
from gptkiln.exporter.io_spec import MODEL_FILE
from gptkiln.exporter.kv_cache import KVCacheDecoder
from gptkiln.exporter.names import restore_parameter_names
from gptkiln.models.loading import LoadedModel

# Example sizes >= 2 so torch.export does not specialise batch, sequence or past to 0/1.
EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST = 2, 3, 5


@dataclass
class ExportResult:
    path: Path
    seconds: float
    node_count: int
    op_counts: dict


def example_inputs(loaded: LoadedModel) -> tuple:
    spec = loaded.spec
    generator = torch.Generator().manual_seed(0)
    total = EXAMPLE_PAST + EXAMPLE_SEQ
    input_ids = torch.randint(0, spec.vocab_size, (EXAMPLE_BATCH, EXAMPLE_SEQ), generator=generator)
    attention_mask = torch.ones(EXAMPLE_BATCH, total, dtype=torch.int64)
    position_ids = torch.arange(EXAMPLE_PAST, total).expand(EXAMPLE_BATCH, -1).contiguous()
    kv_shape = (EXAMPLE_BATCH, spec.num_kv_heads, EXAMPLE_PAST, spec.head_dim)
    past = tuple(torch.randn(kv_shape, generator=generator) for _ in range(2 * spec.num_layers))
    return input_ids, attention_mask, position_ids, past


def dynamic_shapes(spec) -> tuple:
    """No position may pass the model's max_positions: some families slice buffers of that size."""
    Dim = torch.export.Dim
    batch = Dim(io_spec.BATCH)
    seq = Dim(io_spec.SEQUENCE, max=spec.max_positions)
    past = Dim(io_spec.PAST, max=spec.max_positions - 1)
    kv = {0: batch, 2: past}
    # The mask length equals past + seq; torch.export infers that relation itself (AUTO).
    return ({0: batch, 1: seq}, {0: batch, 1: Dim.AUTO}, {0: batch, 1: seq}, tuple(kv for _ in range(2 * spec.num_layers)))


def export_onnx(loaded: LoadedModel, out_dir: Path, opset: int) -> ExportResult:
    spec = loaded.spec
    wrapper = KVCacheDecoder(loaded.model, spec).eval()
    input_ids, attention_mask, position_ids, past = example_inputs(loaded)
    started = time.perf_counter()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # torch resets it on import; set it here
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                wrapper, (input_ids, attention_mask, position_ids, *past),
                dynamic_shapes=dynamic_shapes(spec),
                input_names=[t.name for t in io_spec.inputs(spec)],
                output_names=[t.name for t in io_spec.outputs(spec)],
                opset_version=opset, dynamo=True, optimize=True, verbose=False,
                custom_translation_table=attention_op.translation_table(opset),
            )
    except Exception as exc:  # torch.export raises many types; all mean the same to the user
        raise ExportError(
            f"export: torch.onnx.export failed for {spec.model_type}: {type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0][:300]}",
            "run with GPTKILN_DEBUG=1 for the full trace and report it with the model config",
        ) from exc
    seconds = time.perf_counter() - started
    graph = program.model.graph
    _apply_contract_shapes(program.model, spec)
    control_flow = [node.op_type for node in graph if node.op_type in ("If", "Loop", "Scan")]
    if control_flow:
        raise ExportError(f"export: the graph has control-flow nodes {sorted(set(control_flow))}",
                          "report this: the decoder graph must be straight-line for every target")
    restore_parameter_names(program.model, wrapper)
    program.model.metadata_props.update({"gptkiln.model_type": spec.model_type})
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / MODEL_FILE
    program.save(path, external_data=True)
    op_counts: dict[str, int] = {}
    for node in graph:
        op_counts[node.op_type] = op_counts.get(node.op_type, 0) + 1
    return ExportResult(path, seconds, len(graph), dict(sorted(op_counts.items())))


def _apply_contract_shapes(model, spec) -> None:
    """Give the graph's inputs and outputs the contract's dimension names."""
    import onnx_ir as ir

    expected = {t.name: t for t in io_spec.inputs(spec) + io_spec.outputs(spec)}
    for value in [*model.graph.inputs, *model.graph.outputs]:
        value.shape = ir.Shape([d if isinstance(d, int) else ir.SymbolicDim(d) for d in expected[value.name].shape])
