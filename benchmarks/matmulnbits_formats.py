"""ONNX Runtime's MatMulNBits at one token (decode, M = 1) or a prompt's rows (--rows 128) by weight format: bits,
block size, zero points; beside it an fp32 MatMul and an int8 GEMM on dynamically quantized activations.

    python benchmarks/matmulnbits_formats.py [--shapes N×K ...] [--rows 1] [--rounds 6] [--threads 2]

Each format is a graph of 8 MatMulNBits nodes with distinct random weights reading one input (so a node's
weights are not in cache from the node before), accuracy level 4 (int8 compute: ONNX Runtime's fast CPU path and
gptkiln's), run in interleaved rounds; the time is each node's kernel time from ORT's own profiler (no Python
overhead), median over the rounds after the first. Default shapes: SmolLM2's down_proj, packed gate/up, packed
q/k/v and o_proj. Prints the median, the 25th percentile and the bytes read per microsecond. The two other forms:
`fp32` (MatMul, fp32 weights) and `dyn-int8` (com.microsoft DynamicQuantizeMatMul: int8 weights per output
channel, the activations quantized to uint8 per tensor at run time; MLAS's int8 GEMM, the kernel W8A8 and
int8-dynamic engines run).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

COPIES = 8
FORMATS = [(4, 32, True), (4, 32, False), (4, 64, True), (4, 64, False), (4, 128, True), (8, 32, False), (8, 16, False),
           (32, 0, False), (8, 0, False)]  # block 0: the fp32 MatMul (32 bits) and dyn-int8 (8 bits) forms
SHAPES = ["576x1536", "3072x576", "960x576", "576x576"]  # N x K


def session(n: int, k: int, bits: int, block: int, zero_points: bool, rows: int, threads: int, prefix: str):
    rng = np.random.default_rng(0)
    nodes, initializers, outputs = [], [], []
    for i in range(COPIES):
        outputs.append(helper.make_tensor_value_info(f"Y{i}", TensorProto.FLOAT, [1, rows, n]))
        if block == 0 and bits == 32:
            initializers.append(numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), f"B{i}"))
            nodes.append(helper.make_node("MatMul", ["A", f"B{i}"], [f"Y{i}"], name=f"node{i}"))
            continue
        if block == 0:
            initializers += [numpy_helper.from_array(rng.integers(-127, 128, (k, n), dtype=np.int8), f"B{i}"),
                             numpy_helper.from_array((rng.random(n) * 0.01 + 0.001).astype(np.float32), f"S{i}")]
            nodes.append(helper.make_node("DynamicQuantizeMatMul", ["A", f"B{i}", f"S{i}"], [f"Y{i}"],
                                          domain="com.microsoft", name=f"node{i}"))
            continue
        blocks, blob = k // block, block * bits // 8
        initializers += [numpy_helper.from_array(rng.integers(0, 256, (n, blocks, blob), dtype=np.uint8), f"B{i}"),
                         numpy_helper.from_array((rng.random(n * blocks) * 0.01 + 0.001).astype(np.float32), f"S{i}")]
        inputs = ["A", f"B{i}", f"S{i}"]
        if zero_points:
            size = n * ((blocks + 1) // 2) if bits == 4 else n * blocks
            initializers.append(numpy_helper.from_array(rng.integers(0, 256, size, dtype=np.uint8), f"Z{i}"))
            inputs.append(f"Z{i}")
        nodes.append(helper.make_node("MatMulNBits", inputs, [f"Y{i}"], domain="com.microsoft", K=k, N=n, bits=bits,
                                      block_size=block, accuracy_level=4, name=f"node{i}"))
    graph = helper.make_graph(nodes, "formats", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, rows, k])],
                              outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = prefix
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=SHAPES, help="N x K, e.g. 576x1536")
    parser.add_argument("--rows", type=int, default=1, help="activation rows M (1: decode; 128: a prompt)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes]
    configs = [(n, k, *f) for n, k in shapes for f in FORMATS if f[1] == 0 or k % f[1] == 0]
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {c: session(*c, args.rows, args.threads, f"{tmp}/{'_'.join(map(str, c))}") for c in configs}
        inputs = {k: np.random.default_rng(1).standard_normal((1, args.rows, k)).astype(np.float32) for _, k in shapes}
        for _ in range(args.rounds):
            for (n, k, *_), s in sessions.items():
                for _ in range(40):
                    s.run(None, {"A": inputs[k]})
        print(f"M = {args.rows}\n{'N':>6} {'K':>5} bits block zero points  median us   p25 us   bytes/us")
        for c, s in sessions.items():
            events = json.loads(Path(s.end_profiling()).read_text())
            times = [e["dur"] for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
            times = times[len(times) // args.rounds:]  # the first round warms up
            n, k, bits, block, zero_points = c
            median = float(np.median(times))
            stored = n * k * bits / 8 + (n * k / block * (4 + (bits / 8 if zero_points else 0)) if block else 4 * n)
            form = {32: "fp32", 8: "dyn-int8"}[bits] if block == 0 else f"{bits:4d} {block:5d}"
            print(f"{n:6d} {k:5d} {form:>10} {'yes' if zero_points else 'no':>11} {median:10.1f} "
                  f"{np.percentile(times, 25):8.1f} {stored / median:10.0f}")


if __name__ == "__main__":
    main()
