import numpy as np
import onnx_ir as ir

from gptkiln.graph import fast_gelu, gemm_to_matmul


def test_gelu_new_with_its_bias_becomes_fast_gelu(fresh_graph, reference_export):
    model, spec = fresh_graph(), reference_export[1]
    gemm_to_matmul.FUSION.apply(model, spec)  # exposes the bias Add
    assert fast_gelu.FUSION.apply(model, spec).actual == spec.num_layers
    gelus = [n for n in model.graph if n.op_type == "FastGelu"]
    assert len(gelus) == spec.num_layers and all(len(n.inputs) == 2 for n in gelus)  # bias folded in
    assert not [n for n in model.graph if n.op_type == "Tanh"]


def test_a_different_constant_is_not_gelu_and_the_report_names_it(fresh_graph, reference_export):
    model, spec = fresh_graph(), reference_export[1]
    pow_node = next(n for n in model.graph if n.op_type == "Pow")
    mul = next(iter(pow_node.outputs[0].uses())).node
    constant = next(v for v in mul.inputs if v.const_value is not None)
    constant.const_value = ir.tensor(np.array(0.05, dtype=np.float32))
    count = fast_gelu.FUSION.apply(model, spec)
    assert count.short and "0.044715" in count.reason
