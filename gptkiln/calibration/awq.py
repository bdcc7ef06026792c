"""Activation-aware weight scaling (AWQ, Lin et al. 2024) in front of int4 rounding, searched on the Hessians.

At each fold site (an activation X and the linear layers that read it, `smoothquant.fold_sites`), input
channel j of the weights is multiplied by s_j = rms(X_j)^α and X divided by s_j in its producer, so the
fp32 function is unchanged and the channels that carry large activations get finer int4 steps. α is
chosen per site from a grid by the output error the site's layers would have with round-to-nearest
codes, Σ tr(ΔWᵀ H ΔW) with H = Σ x xᵀ the Hessians GPTQ collects (rms(X_j)² ∝ H_jj). α = 0 (no scaling)
is on the grid, so by that measure no site gets worse. The scaled activations' Hessians follow exactly,
H / (s sᵀ), and GPTQ then rounds the scaled weights. A tied lm_head is left unscaled, so that its codes are
the embedding's too (weight_only.quantize_weights): on SmolLM2 that is 16 MB of 124 at 4 bits.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx_ir as ir

from gptkiln.calibration.layers import LinearLayer, untied
from gptkiln.calibration.smoothquant import FoldSite, apply_scales, fold_sites
from gptkiln.calibration.weight_only import WeightFormat, dequantize, quantize_rtn
from gptkiln.models.spec import DecoderSpec
from gptkiln.progress import QUIET, Progress

ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))


@dataclass
class Scaled:
    activation: str
    layers: list[str]
    alpha: float
    error_before: float  # Σ tr(ΔWᵀ H ΔW) / Σ tr(Wᵀ H W) of the site's layers, round to nearest
    error_after: float

    def to_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in vars(self).items()}


def awq_scale(model: ir.Model, layers: list[LinearLayer], hessians: dict[str, np.ndarray], fmt: WeightFormat,
              spec: DecoderSpec, progress: Progress = QUIET) -> list[Scaled]:
    """Scale every fold site in place by its best α; `hessians` are updated to the scaled activations."""
    sites = fold_sites(untied(layers), hessians, spec)
    fmt = replace(fmt, range_search=False)  # the α that wins with full ranges; the search ~20x slower here
    bar = progress.bar(len(sites), "AWQ scales", "activations")
    report = []
    for site in sites:
        bar.step()
        hessian = hessians[site.activation].astype(np.float64)
        formats = [fmt.for_layer(layer, spec.hidden_size).for_rows(layer.weight().shape[0]) for layer in site.layers]
        if any(f is None for f in formats):
            continue
        weights = [layer.weight().astype(np.float64) for layer in site.layers]
        total = sum(float((w * (hessian @ w)).sum()) for w in weights)
        rms = np.sqrt(np.maximum(np.diag(hessian), 1e-12))
        errors = {alpha: _site_error(weights, formats, hessian, _factors(site, rms, alpha)) / total
                  for alpha in ALPHAS}
        alpha = min(errors, key=errors.get)
        if alpha > 0:
            scales = _factors(site, rms, alpha)
            apply_scales(model, site, scales)
            hessians[site.activation] = (hessian / np.outer(scales, scales)).astype(hessians[site.activation].dtype)
        report.append(Scaled(site.activation, [layer.name for layer in site.layers], alpha, errors[0.0], errors[alpha]))
    bar.close()
    return report


def _factors(site: FoldSite, rms: np.ndarray, alpha: float) -> np.ndarray:
    """s = rms^α, shared where GQA needs it, normalised to a geometric mean of max and min of 1 (as AWQ does)."""
    scales = site.shared(rms**alpha)
    return scales / np.sqrt(scales.max() * scales.min())


def _site_error(weights, formats, hessian, scales) -> float:
    error = 0.0
    for weight, fmt in zip(weights, formats):
        scaled = weight * scales[:, None]
        delta = dequantize(*quantize_rtn(scaled, fmt)) / scales[:, None] - weight
        error += float((delta * (hessian @ delta)).sum())
    return error
