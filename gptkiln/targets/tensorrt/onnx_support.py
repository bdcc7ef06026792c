"""TensorRT's published ONNX operator support, as data: op -> the types of its main data input.

Transcribed from onnx/onnx-tensorrt docs/operators.md at commit fa5aa9f6 (TensorRT 10.15, opsets
9 to 24; Attention since 10.14, RMSNormalization and RotaryEmbedding since 10.15). An op that is
not here is not supported (TensorRT would look for a plugin of that name). Per-op restrictions
that matter for decoder graphs are checked in readiness.py.
"""

from __future__ import annotations

DOCUMENTED_VERSION = "10.15"
OPSET_RANGE = (9, 24)
MIN_VERSION = "10.0"  # ONNX parser with INT64, INT4 and strongly typed networks
# ops added to the parser after 10.0 (its Changelog): a graph that uses one needs that release
INT4_BLOCK_SIZES = (64, 128)  # blocked int4 DequantizeLinear (weights)
ADDED_IN = {"Attention": "10.14", "RMSNormalization": "10.15", "RotaryEmbedding": "10.15", "TensorScatter": "10.15"}

FLOATS = ("FLOAT", "FLOAT16", "BFLOAT16")
NUMBERS = FLOATS + ("INT32", "INT64")
ANY = NUMBERS + ("BOOL",)
BOOLS = ("BOOL",)
FP32_FP16 = ("FLOAT", "FLOAT16")

# ONNX element types the parser can represent at all (DOUBLE is cast down to FLOAT); quantized
# types (INT8, INT4, FLOAT8E4M3FN, FLOAT4E2M1) only through Q/DQ, UINT8 only as network IO
REPRESENTABLE = ("DOUBLE", "FLOAT", "FLOAT16", "BFLOAT16", "INT8", "UINT8", "INT32", "INT64", "BOOL",
                 "FLOAT8E4M3FN", "INT4", "FLOAT4E2M1")

SUPPORTED_OPS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "AveragePool", "BatchNormalization", "Ceil",
        "Celu", "Clip", "Conv", "ConvTranspose", "Cos", "Cosh", "CumSum", "Dropout", "Einsum", "Elu", "Erf",
        "Exp", "Floor", "GRU", "Gemm", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool",
        "GroupNormalization", "HardSigmoid", "HardSwish", "Hardmax", "ImageScaler", "InstanceNormalization",
        "IsInf", "LRN", "LSTM", "LayerNormalization", "LeakyRelu", "Log", "LogSoftmax", "LpNormalization",
        "LpPool", "MatMul", "MaxPool", "MeanVarianceNormalization", "PRelu", "ParametricSoftplus",
        "QuantizeLinear", "RMSNormalization", "RNN", "RandomNormal", "RandomNormalLike", "RandomUniform",
        "RandomUniformLike", "Reciprocal", "Resize", "RotaryEmbedding", "Round", "ScaledTanh", "Scan",
        "Selu", "Sigmoid", "Sin", "Sinh", "Softmax", "Softplus", "Softsign", "Sqrt", "Tan", "Tanh",
        "ThresholdedRelu", "Upsample"), FLOATS),
    **dict.fromkeys(("Abs", "Add", "ArgMax", "ArgMin", "DepthToSpace", "Div", "Equal", "Greater", "GreaterOrEqual",
        "IsNaN", "Less", "LessOrEqual", "Max", "Min", "Mod", "Mul", "Neg", "Pad", "Pow", "Range",
        "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
        "ReduceProd", "ReduceSum", "ReduceSumSquare", "Relu", "Scatter", "ScatterElements", "ScatterND",
        "Shrink", "Sign", "SpaceToDepth", "Sub", "Sum", "TopK"), NUMBERS),
    **dict.fromkeys(("Concat", "Expand", "EyeLike", "Flatten", "Gather", "GatherElements", "GatherND", "Identity", "If",
        "Loop", "OneHot", "Reshape", "ReverseSequence", "Shape", "Size", "Slice", "Split", "Squeeze",
        "Tile", "Transpose", "Trilu", "Unsqueeze", "Where"), ANY),
    **dict.fromkeys(("BlackmanWindow", "DeformConv", "GridSample", "HammingWindow", "HannWindow", "Mish",
        "NonMaxSuppression", "NonZero", "RoiAlign"), FP32_FP16),
    **dict.fromkeys(("And", "Not", "Or", "Xor"), BOOLS),
    **dict.fromkeys(("Cast", "CastLike"), ('FLOAT', 'FLOAT16', 'BFLOAT16', 'INT32', 'INT64', 'UINT8', 'BOOL')),
    **dict.fromkeys(("Constant", "ConstantOfShape"), ('FLOAT', 'FLOAT16', 'BFLOAT16', 'FLOAT8E4M3FN', 'FLOAT4E2M1', 'INT4', 'INT32', 'INT64', 'BOOL')),
    **dict.fromkeys(("Attention",), ('FLOAT', 'FLOAT16', 'BFLOAT16', 'INT8', 'FLOAT8E4M3FN')),
    **dict.fromkeys(("DequantizeLinear",), ('INT8', 'FLOAT8E4M3FN', 'FLOAT4E2M1', 'INT4')),
    **dict.fromkeys(("Gelu",), ('FLOAT', 'FLOAT16', 'BFLOAT16', 'INT8', 'INT32', 'INT64')),
    **dict.fromkeys(("Mean",), ('FLOAT', 'FLOAT16', 'BFLOAT16', 'FLOAT8E4M3FN', 'INT32', 'INT64')),
    **dict.fromkeys(("STFT",), ('FLOAT',)),
    **dict.fromkeys(("TensorScatter",), ('FLOAT', 'FLOAT16', 'BFLOAT16', 'INT32')),
}
