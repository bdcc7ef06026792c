"""Logits only where they are used: a `num_logits_to_keep` input that slices the hidden states before the LM head.

Generation reads one row of logits per step; parity and perplexity read every position. The LM head
of a 49,152-token vocabulary is a fifth of a 128-token prefill's work, for one needed row. So:

    logits = LMHead(hidden)                                  [batch, seq, vocab]
        ==>  logits = LMHead(Slice(hidden, -num_logits_to_keep, end, axis=1))

`num_logits_to_keep` is an int64 [1] graph input: 0 keeps every position (-0 is the start: the
contract's logits), 1 the last. The name and meaning are the ones onnxruntime-genai and optimum already
feed (0), so their runtimes load the graph as it is. It is required, not an input with a default: ONNX
Runtime's IO binding (which the in-place cache needs) cannot bind an initializer. The LM head is found by
walking back from the logits output through soft-capping (Gemma 2's Div, Tanh, Mul by constants) and casts.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from gptkiln.exporter.io_spec import LOGITS_TO_KEEP
from gptkiln.graph.initializers import initializer

LM_HEADS = ("MatMul", "MatMulNBits", "Gemm", "MatMulIntegerToFloat")


def keep_last_logits(model: ir.Model) -> str | None:
    """Add the input in place; return None when done, or why not (the graph unchanged)."""
    graph = model.graph
    logits = next((value for value in graph.outputs if value.name == "logits"), None)
    head = logits.producer() if logits is not None else None
    while head is not None and _elementwise(head):
        head = head.inputs[0].producer()
    if head is None or head.op_type not in LM_HEADS:
        return "the logits are not the output of a MatMul (the LM head)"
    reader = _quantized_input(head) or head  # a static-int8 head reads its input through a Q/DQ pair
    hidden = reader.inputs[0]
    if hidden is None or hidden.shape is None or len(hidden.shape) != 3:
        return "the LM head does not read [batch, sequence, hidden] states"
    if any(use.node is not reader for use in hidden.uses()):
        return "the final hidden states are read by more than the LM head"
    keep = ir.Value(name=LOGITS_TO_KEEP, shape=ir.Shape([1]), type=ir.TensorType(ir.DataType.INT64))
    graph.inputs.append(keep)
    start = ir.node("Neg", [keep], name="logits_start")
    end = initializer(model, "logits_end", np.array([np.iinfo(np.int64).max], np.int64))
    kept = ir.node("Slice", [hidden, start.outputs[0], end, initializer(model, "logits_axis", np.array([1], np.int64))],
                   name="logits_positions")
    for node, name, dtype in ((start, "logits_start", ir.DataType.INT64), (kept, "logits_positions", hidden.dtype)):
        node.outputs[0].name, node.outputs[0].dtype = name, dtype
    graph.insert_before(reader, [start, kept])
    reader.replace_input_with(0, kept.outputs[0])
    return None


def _quantized_input(head: ir.Node) -> ir.Node | None:
    """The QuantizeLinear in front of a static-int8 (W8A8) head, through its DequantizeLinear if it has one; else
    None. The slice goes in front of it (ONNX Runtime's QDQ propagation mistypes a Slice between Q and DQ)."""
    node, value = head, head.inputs[0]
    while value is not None and len(value.uses()) == 1 and value.producer() is not None:
        node = value.producer()
        if node.op_type == "QuantizeLinear":
            return node
        if node.op_type != "DequantizeLinear":
            return None
        value = node.inputs[0]
    return None


def _elementwise(node: ir.Node) -> bool:
    """A cast, or soft-capping: Tanh, or Mul/Div of the first input by a constant."""
    if node.op_type in ("Tanh", "Cast"):
        return True
    return node.op_type in ("Mul", "Div") and ir.convenience.get_const_tensor(node.inputs[1]) is not None
