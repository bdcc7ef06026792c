"""Weight-only int4, block-wise along the input dimension: a blocked DequantizeLinear (opset 21)
in front of each MatMul, so activations stay fp32.

Codes are found by round-to-nearest or by GPTQ (Frantar et al. 2022), which rounds one
input row at a time and spreads each row's rounding error over the rows not yet rounded,
weighted by the inverse Hessian sum(x xᵀ) of the calibration activations.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import ml_dtypes
import numpy as np
import onnx_ir as ir

from gptkiln.calibration.layers import LinearLayer, initializer

MIN_OPSET = 21  # blocked DequantizeLinear and int4 tensors
MIN_BLOCK = 16  # the smallest block a layer is narrowed to
GPTQ_DAMPING = 0.01  # of the mean Hessian diagonal
GPTQ_BLOCK = 128  # rows updated together (a multiple of the quantization block)


@dataclass(frozen=True)
class Int4Format:
    block_size: int
    symmetric: bool

    def for_rows(self, rows: int) -> Int4Format | None:
        """The format for a layer of `rows` input rows: the largest power-of-two block up to this
        one that divides them (NNCF's "adjust" group-size fallback), None below MIN_BLOCK."""
        block = self.block_size
        while rows % block and block > MIN_BLOCK:
            block //= 2
        return None if rows % block else replace(self, block_size=block)

    @property
    def levels(self) -> tuple[int, int]:
        return (-8, 7) if self.symmetric else (0, 15)

    def params(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scale and zero point [N] for one block of weight rows [block, N]."""
        low, high = self.levels
        if self.symmetric:
            scale = np.abs(rows).max(axis=0) / high
            zero = np.zeros(rows.shape[1])
        else:
            top, bottom = np.maximum(rows.max(axis=0), 0), np.minimum(rows.min(axis=0), 0)
            scale = (top - bottom) / (high - low)
            zero = np.clip(np.round(-bottom / np.maximum(scale, 1e-12)), low, high)
        return np.maximum(scale, 1e-12), zero

    def codes(self, rows: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
        low, high = self.levels
        return np.clip(np.round(rows / scale) + zero, low, high)


def quantize_rtn(weight: np.ndarray, fmt: Int4Format):
    """(codes [K, N], scales [K/B, N], zero points [K/B, N]) by round to nearest."""
    blocks = weight.reshape(-1, fmt.block_size, weight.shape[1])
    params = [fmt.params(block) for block in blocks]
    scales, zeros = np.stack([p[0] for p in params]), np.stack([p[1] for p in params])
    codes = np.concatenate([fmt.codes(block, s, z) for block, s, z in zip(blocks, scales, zeros)])
    return codes, scales, zeros


def quantize_gptq(weight: np.ndarray, hessian: np.ndarray, fmt: Int4Format):
    """GPTQ with lazy block updates; returns the same triple as quantize_rtn."""
    w = weight.astype(np.float64).copy()
    h = hessian.astype(np.float64).copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    h[np.diag_indices_from(h)] += GPTQ_DAMPING * np.mean(np.diag(h))
    # upper Cholesky factor of H⁻¹: row i holds how row i's error spreads over rows > i
    upper = np.linalg.cholesky(np.linalg.inv(h)).T
    rows, columns = w.shape
    codes = np.zeros_like(w)
    scales = np.zeros((rows // fmt.block_size, columns))
    zeros = np.zeros_like(scales)
    step = max(GPTQ_BLOCK, fmt.block_size)  # block sizes are powers of two: whole blocks per step
    for start in range(0, rows, step):
        end = min(start + step, rows)
        block = w[start:end].copy()
        errors = np.zeros_like(block)
        for i in range(end - start):
            row = start + i
            if row % fmt.block_size == 0:
                group = row // fmt.block_size
                scales[group], zeros[group] = fmt.params(block[i : i + fmt.block_size])
            scale, zero = scales[row // fmt.block_size], zeros[row // fmt.block_size]
            codes[row] = fmt.codes(block[i], scale, zero)
            error = (block[i] - (codes[row] - zero) * scale) / upper[row, row]
            block[i:] -= np.outer(upper[row, row : end], error)
            errors[i] = error
        w[end:] -= upper[start:end, end:].T @ errors
    return codes, scales, zeros


def quantize_int4(model: ir.Model, layers: list[LinearLayer], requested: Int4Format,
                  hessians: dict[str, np.ndarray] | None = None) -> tuple[list[str], dict[str, int]]:
    """Replace each layer's weight by a blocked DequantizeLinear; GPTQ where a Hessian is given.
    Returns the layers left in fp32 (input size not a multiple of MIN_BLOCK) and the layers
    given a smaller block than requested, with that block."""
    skipped, narrowed = [], {}
    for layer in layers:
        weight = layer.weight()
        fmt = requested.for_rows(weight.shape[0])
        if fmt is None:
            skipped.append(layer.name)
            continue
        if fmt != requested:
            narrowed[layer.name] = fmt.block_size
        if hessians is not None:
            codes, scales, zeros = quantize_gptq(weight, hessians[layer.activation.name], fmt)
        else:
            codes, scales, zeros = quantize_rtn(weight, fmt)
        code_type = ml_dtypes.int4 if fmt.symmetric else ml_dtypes.uint4
        inputs = [initializer(model, f"{layer.name}.int4", codes.astype(code_type)),
                  initializer(model, f"{layer.name}.scale", scales.astype(np.float32))]
        if not fmt.symmetric:
            inputs.append(initializer(model, f"{layer.name}.zero_point", zeros.astype(code_type)))
        dequantize = ir.node("DequantizeLinear", inputs, attributes={"axis": 0, "block_size": fmt.block_size})
        model.graph.insert_before(layer.node, dequantize)
        layer.node.replace_input_with(1, dequantize.outputs[0])
    return skipped, narrowed
