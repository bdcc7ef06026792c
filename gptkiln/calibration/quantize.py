"""From the fp32 graph to a quantized graph that meets its accuracy budget.

1. statistics from the calibration set (cached), SmoothQuant folded in for W8A8, and for int8-dynamic and
   weight-only int8 given calibration text (the runtimes' int8 activations need none, the smoothing does; a tied
   lm_head is left out of int8's, so the table stays stored once), AWQ's channel scales for int4 awq-gptq;
2. every linear layer quantized; the result scored (perplexity, top-1) against fp32 PyTorch;
   The lookup tables (embeddings) are stored in 8 bits, 4 in int4 builds (graph.lookup_tables), so every score
   below is the engines' own; a table a weight-only lm_head is tied to shares the lm_head's codes instead;
   calibrated int4 then has its scales and norms tuned against fp32 (calibration.scale_tuning), kept where the
   tuned graph scores better; where it passes within SPARE of the budget, it is made once more without the fine
   blocks and kept if it passes (every_layer);
3. over budget, the mixed-precision fallback keeps the most sensitive groups at a backup precision (weight-only
   int8, activations in float; fp32 for int8 itself; 8 bits for int4's tables) until the budget holds. A group is
   a layer role: the same linear layer in every transformer block (`model.layers.*.mlp.down_proj.weight`), or one
   outside the blocks (the lm_head); 8 for a Llama; plus, in int4 builds, the lookup tables. Each group's
   sensitivity is how much leaving it alone at the backup precision brings the model's next-token distributions
   back to fp32's (a Probe: one batch of windows, a fraction of an evaluation). Without GPTQ's Hessians the
   groups are kept whole, most sensitive first, their count searched 1, 2, 4, ... (at most half the groups) and
   then bisected, each count scored by a full evaluation. Where the Hessians are at hand (int4 gptq, awq-gptq),
   the units kept are layers: each role's sensitivity is shared among its layers by the output error int8 removes
   from each (Σ tr(ΔWᵀ H ΔW), no evaluation), every layer ranked by that estimate per weight, and each trial keeps
   the fewest weights whose estimates reach a goal placed where the perplexity, interpolated over the summed
   estimates, meets the budget (_search_by_estimate; at most half the weights). Measured on SmolLM2, rounding
   error sits in roles across the blocks, not in a few blocks, and the small attention projections give back
   more per weight than the MLP's.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from gptkiln.calibration.awq import Scaled, awq_scale
from gptkiln.calibration.data import CalibrationSet
from gptkiln.calibration.layers import linear_bits, linear_layers, untied, weight_bits
from gptkiln.calibration.perplexity import AccuracyReport, accuracy_failures
from gptkiln.calibration.qdq import activation_threshold, quantize_dynamic, quantize_w8a8
from gptkiln.calibration.scale_tuning import Tuned
from gptkiln.calibration.smoothquant import Smoothed, float_channels, smooth
from gptkiln.calibration.statistics import collect
from gptkiln.calibration.weight_only import MIN_OPSET, WeightFormat, dequantize, quantize_weights
from gptkiln.config import (AUTO_ALPHA, DYNAMIC_ALPHA, FLOAT_RATIO, FLOAT_SHARE, AccuracyBudget, ActivationCalibration,
                            Int4Method, Precision, QuantSettings)
from gptkiln.exporter.io_spec import DATA_FILE, MODEL_FILE
from gptkiln.graph.lookup_tables import quantize_lookup_tables
from gptkiln.models.spec import DecoderSpec
from gptkiln.progress import QUIET, Progress

# A weight-only build whose every-layer graph passes within this share of the perplexity budget is tried once more
# without the fine blocks (WeightFormat.fine_block_size), and kept if it passes: the fine blocks cost 0.16 bits per
# weight on SmolLM2 and took its every-layer error from +10.7% to +7.0% (so a graph at half the budget has room for
# the ~1.5x their absence costs); the reference model (+1.8%, 4.58 bits) passes without them at 4.42
SPARE = 0.5
Evaluator = Callable[[Path], AccuracyReport]
Divergence = Callable[[Path], float]  # a graph -> its Probe divergence from fp32
Tuner = Callable[[Path, set[str]], Tuned]  # a weight-only graph, the layers whose scales to tune -> what was tuned
TABLES = "lookup tables"  # the fallback's group of an int4 build's 4-bit embeddings
TABLE_BITS = 8  # the tables of every other quantized build, and int4's backup


@dataclass
class Trial:
    kept: list[str]  # groups at the backup precision
    accuracy: AccuracyReport
    tuned: bool = False  # the int4 scales tuned end to end (calibration.scale_tuning)

    def to_dict(self) -> dict:
        return {"kept": self.kept, "accuracy": self.accuracy.to_dict(), "tuned": self.tuned}


@dataclass
class QuantizedGraph:  # one trial's graph
    path: Path
    quantized: int  # linear layers
    total: int
    not_quantizable: list[str]
    narrowed: dict[str, int]
    bits_per_weight: dict[str, float | None]
    lookup_tables: dict[str, int]  # table -> bits
    tied_tables: set[str]  # those a tied lm_head shares: they take its precision, not the tables' group


@dataclass
class QuantResult:
    path: Path  # the quantized graph every target compiles
    precision: Precision
    method: dict
    layers_quantized: int
    layers_total: int
    kept: list[str]  # groups the fallback kept at kept_precision
    kept_precision: str  # "int8" (weight-only: the backup of int4, W8A8 and int8-dynamic builds) or "fp32" (int8's)
    not_quantizable: list[str]  # layers the format cannot take (int4: input size not a multiple of 16)
    narrowed_blocks: dict[str, int]  # int4 layers given a smaller block than asked (their input size) -> that block
    smoothing: list[Smoothed] = field(default_factory=list)
    scaling: list[Scaled] = field(default_factory=list)  # int4 awq-gptq: each activation's α and error
    calibration: dict | None = None
    statistics_cached: bool = False
    trials: list[Trial] = field(default_factory=list)
    # group -> the Probe divergence from fp32 (nats per token) that keeping it alone at kept_precision removes
    sensitivity: dict[str, float] = field(default_factory=dict)
    # stored bits (codes, scales, zero points; fp32 weights at 32) over the fp32 model's weights: "model" over every
    # weight tensor (embeddings included, a tied table once), "linear_layers" over the linear layers (weight-only)
    bits_per_weight: dict[str, float | None] = field(default_factory=dict)
    float_channels: dict[str, list[int]] = field(default_factory=dict)  # W8A8: activation -> channels kept in float
    lookup_tables: dict[str, int] = field(default_factory=dict)  # embeddings only Gather reads -> their bits
    # a layer-wise fallback's kept layers -> the output error int8 removes from each (_int8_gains)
    output_error: dict[str, float] = field(default_factory=dict)
    tuning: dict | None = None  # int4: the scales' end-to-end tuning (calibration.scale_tuning), or why it was skipped

    @property
    def accuracy(self) -> AccuracyReport:
        return self.trials[-1].accuracy

    def to_dict(self) -> dict:
        return {"precision": self.precision.value, "method": self.method, "layers_quantized": self.layers_quantized,
                "layers_total": self.layers_total, "kept": self.kept, "kept_precision": self.kept_precision,
                "not_quantizable": self.not_quantizable, "narrowed_blocks": self.narrowed_blocks,
                "smoothing": [s.to_dict() for s in self.smoothing], "scaling": [s.to_dict() for s in self.scaling],
                "calibration": self.calibration, "statistics_cached": self.statistics_cached,
                "accuracy": self.accuracy.to_dict(), "trials": [t.to_dict() for t in self.trials],
                "sensitivity": self.sensitivity, "bits_per_weight": self.bits_per_weight,
                "float_channels": self.float_channels, "lookup_tables": self.lookup_tables,
                "output_error": self.output_error, "tuning": self.tuning}


def method_description(precision: Precision, settings: QuantSettings, smoothed: bool) -> dict:
    if precision is Precision.W8A8:
        return {"weights": "int8 symmetric per output channel", "activations": "int8 symmetric per tensor",
                "float_channels": f"max |x| >= {FLOAT_RATIO:g} x the median channel's, at most 1/{1 / FLOAT_SHARE:g}"
                                  if settings.float_channels else None,
                "calibration": settings.activations.value,
                **({"percentile": settings.percentile} if settings.activations is ActivationCalibration.PERCENTILE else {}),
                "smoothquant_alpha": smoothquant_alpha(precision, settings)}
    if precision is Precision.INT8_DYNAMIC:
        return {"weights": "int8 symmetric per output channel", "activations": "int8 symmetric per token, at run time",
                "smoothquant_alpha": smoothquant_alpha(precision, settings) if smoothed else None}
    if precision is Precision.INT8:
        fine = "" if smoothed else f" (at most {WIDE_INPUT_INT8_BLOCK} where a layer's input is wider than the hidden size)"
        return {"weights": f"int8 symmetric blocks of {settings.int8_block_size} input rows{fine}", "rounding": "rtn",
                "smoothquant_alpha": smoothquant_alpha(precision, settings) if smoothed else None}
    tuned = settings.int4_method.calibrated and settings.int4_tune_epochs > 0
    return {"weights": _int4_weights(settings, f"at most {settings.int4_fine_block_size} where a layer's input is "
                                               "wider than the hidden size, and for a tied lm_head"),
            "rounding": settings.int4_method.value,
            "tuning": f"scales and norms trained end to end for {settings.int4_tune_epochs} epochs of the calibration "
                      "windows (KL divergence from fp32)" if tuned else None}


def _int4_weights(settings: QuantSettings, blocks_note: str) -> str:
    return (f"int4 {'symmetric' if settings.int4_symmetric else 'asymmetric'} blocks of {settings.int4_block_size} "
            f"input rows ({blocks_note})")


def _float_channels(layers, absmax: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """W8A8: each activation's channels kept in float (smoothquant.float_channels), where it has any and no layer
    reading it writes a graph output."""
    writes_output = {layer.activation.name for layer in layers if layer.node.outputs[0].is_graph_output()}
    chosen = {name: float_channels(absmax[name].astype(np.float64)) for name in {layer.activation.name for layer in layers}}
    return {name: channels for name, channels in sorted(chosen.items()) if len(channels) and name not in writes_output}


def smoothquant_alpha(precision: Precision, settings: QuantSettings) -> float | str | None:
    """The α a build uses: "auto" searches per activation for W8A8's static scales only."""
    if settings.smoothquant_alpha == AUTO_ALPHA and precision is not Precision.W8A8:
        return DYNAMIC_ALPHA
    return settings.smoothquant_alpha


# ONNX Runtime's 8-bit MatMulNBits (its fast path) quantizes the activations to int8 in the weight's blocks, and
# OpenVINO's CPU in groups of 32 (or a finer weight block). A layer reading an input wider than the hidden size (the
# MLP's down projection, whose input carries the massive activations) loses most there: SmolLM2 int8 on an AVX2
# host +0.35% -> +0.25% with these layers' blocks at 16 (+1.7 MB; every layer at 16: +0.07%, +10 MB). Blocks of 16
# cost OpenVINO 10-15% of its decode speed, so given calibration text SmoothQuant takes the outliers out of the
# activations instead and every layer keeps the block size: SmolLM2 +0.198% -> +0.037% / +0.022% (ONNX Runtime /
# OpenVINO), OpenVINO decode 1.09x (batch 1) and 1.12x (batch 8) (benchmarks/RESULTS.md, session 42)
WIDE_INPUT_INT8_BLOCK = 16  # the int8 fine block without SmoothQuant (WeightFormat.for_layer)


def weight_format(precision: Precision, settings: QuantSettings) -> WeightFormat:
    """The requested format; each layer's is `.for_layer` of it."""
    if precision is Precision.INT8:
        return WeightFormat(settings.int8_block_size, symmetric=True, bits=8, fine_block_size=WIDE_INPUT_INT8_BLOCK)
    return WeightFormat(settings.int4_block_size, settings.int4_symmetric, bits=4,
                        fine_block_size=settings.int4_fine_block_size)


def prepare(exported: Path, prepared: Path, spec: DecoderSpec) -> None:
    """The exported graph cleaned and with every linear layer a MatMul on a constant weight.
    The targets' own fusions run later, on the quantized graph, as they do on an fp32 one."""
    from gptkiln.graph import gemm_to_matmul
    from gptkiln.graph.cleanup import cleanup

    model = ir.load(exported)
    cleanup(model)
    gemm_to_matmul.FUSION.apply(model, spec)
    cleanup(model)
    prepared.parent.mkdir(parents=True, exist_ok=True)
    ir.save(model, prepared, external_data=DATA_FILE)


def quantize(prepared: Path, work: Path, precision: Precision, settings: QuantSettings, spec: DecoderSpec,
             calibration: CalibrationSet | None, evaluate: Evaluator, budget: AccuracyBudget,
             progress: Progress = QUIET, diverge: Divergence | None = None, tune: Tuner | None = None) -> QuantResult:
    """`diverge` ranks the fallback's groups; without it (the benchmarks' fixed builds) there is no fallback.
    `tune` trains a calibrated int4 build's scales before its first trial (settings.int4_tune_epochs)."""
    base, smoothing, scaling, thresholds, hessians, cached = prepared, [], [], {}, None, False
    model = ir.load(prepared)
    weights, _ = weight_bits(model)  # the fp32 model's: a scaled tied lm_head's own copy ("….T") is not one more
    layers = linear_layers(model)
    names = sorted({layer.activation.name for layer in layers})
    alpha, floating = smoothquant_alpha(precision, settings), {}
    if (precision is Precision.W8A8 or precision.smoothed_when_calibrated) and calibration is not None:
        search = alpha == AUTO_ALPHA
        stats = collect(prepared, names, calibration, spec, hessians=search, progress=progress)
        cached = stats.cached
        if precision is Precision.W8A8 and settings.float_channels:
            floating = _float_channels(layers, stats.absmax)
        if alpha is not None:
            smoothable = untied(layers) if precision is Precision.INT8 else layers  # as AWQ leaves it (int4)
            smoothing = smooth(model, smoothable, dict(stats.absmax), alpha, spec,
                               stats.hessians if search else None, calibration.windows.size, progress, floating)
            base = work / "smoothed" / MODEL_FILE
            base.parent.mkdir(parents=True)
            ir.save(model, base, external_data=DATA_FILE)
            _check_function_kept(prepared, base, calibration, spec)
    if precision is Precision.W8A8:
        if base != prepared or settings.activations is not ActivationCalibration.MINMAX:
            stats = collect(base, names, calibration, spec, progress=progress,
                            histograms=settings.activations is not ActivationCalibration.MINMAX)
            cached = cached and stats.cached
        thresholds = {n: activation_threshold(stats, n, settings.activations, settings.percentile) for n in names}
        for name, channels in floating.items():  # the int8 range of what is left
            thresholds[name] = min(thresholds[name], float(np.delete(stats.absmax[name], channels).max()))
    elif precision is Precision.INT4 and settings.int4_method.calibrated:
        stats = collect(prepared, names, calibration, spec, hessians=True, progress=progress)
        hessians, cached = dict(stats.hessians), stats.cached
        if settings.int4_method is Int4Method.AWQ_GPTQ:
            scaling = awq_scale(model, layers, hessians, weight_format(precision, settings), spec, progress)
            base = work / "scaled" / MODEL_FILE
            base.parent.mkdir(parents=True)
            ir.save(model, base, external_data=DATA_FILE)
            _check_function_kept(prepared, base, calibration, spec)
    progress.say(f"    statistics: {'from the cache' if cached else 'collected'}" if calibration is not None else
                 f"    no calibration text: {precision.value} without SmoothQuant" if precision.smoothed_when_calibrated else
                 "    no calibration needed")

    # the layers as every trial sees them: a tied lm_head smoothed or scaled reads its own copy ("….T")
    layers = linear_layers(ir.load(base)) if base != prepared else layers
    groups = list(dict.fromkeys(layer.role(spec) for layer in layers))
    trial_count = 0
    tuned_scales = False  # rounded holds the tuned scales (_tune)
    rounded = {}  # weight-only: each layer's codes per format, computed once over the trials
    fmt = weight_format(precision, settings) if precision.weight_only else None
    int8 = weight_format(Precision.INT8, settings)  # the backup, weight-only: activations stay float
    if precision is Precision.INT8 and smoothing:  # the outliers are smoothed away: no finer blocks (see above)
        fmt = int8 = int8.without_fine_blocks() or int8
    backup = "fp32" if precision is Precision.INT8 else "int8"
    table_bits = 4 if precision is Precision.INT4 else TABLE_BITS

    def build(kept: set[str]) -> QuantizedGraph:
        nonlocal trial_count
        trial_count += 1
        model = ir.load(base)
        every = linear_layers(model)
        in_kept = [layer for layer in every if layer.role(spec) in kept or layer.name in kept]
        rest = [layer for layer in every if layer not in in_kept]
        if precision is Precision.W8A8:
            quantize_w8a8(model, rest, thresholds, floating)
        elif precision is Precision.INT8_DYNAMIC:
            quantize_dynamic(model, rest)
        weight_only = (rest if precision.weight_only else []) + (in_kept if backup == "int8" else [])
        not_quantizable, narrowed, tied = [], {}, {}
        if weight_only:
            model.opset_imports[""] = max(model.opset_imports.get("", MIN_OPSET), MIN_OPSET)
            in_int8 = weight_only if precision is Precision.INT8 else in_kept  # every layer, or the backup's
            formats = {layer.name: (int8 if layer in in_int8 else fmt).for_layer(layer, spec.hidden_size)
                       for layer in weight_only}
            done = quantize_weights(model, weight_only, fmt or int8, hessians, formats,
                                    progress if trial_count == 1 else QUIET, rounded)
            not_quantizable, narrowed, tied = done.skipped, done.narrowed, done.tied_tables
        in_bits = TABLE_BITS if TABLES in kept else table_bits
        tables = tied | dict.fromkeys(quantize_lookup_tables(model, in_bits), in_bits)  # tied: the lm_head's bits
        path = work / f"trial-{trial_count}" / MODEL_FILE
        path.parent.mkdir(parents=True)
        ir.save(model, path, external_data=DATA_FILE)
        linear = [linear_bits(layer) for layer in every] if precision.weight_only else []
        bits = {"model": round(weight_bits(model)[1] / weights, 3),  # the tables in their bits too
                "linear_layers": round(sum(b for _, b in linear) / sum(n for n, _ in linear), 3) if linear else None}
        quantized = sum(1 for layer in rest if layer.name not in not_quantizable)
        return QuantizedGraph(path, quantized, len(every), not_quantizable, narrowed, bits, tables, set(tied))

    def attempt(kept: list[str]) -> tuple[QuantizedGraph, Trial]:
        graph = build(set(kept))
        trial = Trial(list(kept), evaluate(graph.path), tuned_scales)
        what = "all layers" if not kept else f"{backup}: " + (", ".join(kept) if len(kept) <= 6 else
                                                               f"{len(kept)} ({', '.join(kept[:4])}, ...)")
        what += ", scales tuned" if tuned_scales else ""
        progress.say(f"    {what}: perplexity {trial.accuracy.ppl:.3f} ({trial.accuracy.ppl_increase_pct:+.2f}%), "
            f"top-1 {trial.accuracy.top1_agreement:.2%}, {graph.bits_per_weight['model']:.2f} bits per weight")
        return graph, trial

    def passes(trial: Trial) -> bool:
        return not accuracy_failures(trial.accuracy, budget)

    def every_layer() -> tuple[QuantizedGraph, Trial, dict | None, list[Trial]]:
        """The every-layer graph in `fmt` from the untuned scales, tuned where that scores better: (its graph, its
        trial, the tuning record, the trials made, the kept one last). Every later trial takes the kept scales."""
        nonlocal base, rounded, tuned_scales
        base, rounded, tuned_scales = untuned_base, untuned_rounded, False
        graph, trial = attempt([])
        if tune is None or hessians is None or settings.int4_tune_epochs == 0:  # hessians: calibrated int4 only
            return graph, trial, None, [trial]
        tuned_base, tuned_rounded, record = _tune(graph.path, tune, base, rounded, work / f"tuned-{trial_count}",
                                                  progress)
        if tuned_base is None:
            return graph, trial, record, [trial]
        untuned = graph, trial
        base, rounded, tuned_scales = tuned_base, tuned_rounded, True
        graph, trial = attempt([])
        record["kept"] = (not passes(trial), trial.accuracy.ppl) < (not passes(untuned[1]), untuned[1].accuracy.ppl)
        if record["kept"]:
            return graph, trial, record, [untuned[1], trial]
        progress.say("    the tuned scales score worse: the rounded ones are kept")
        base, rounded, tuned_scales = untuned_base, untuned_rounded, False
        return *untuned, record, [trial, untuned[1]]

    untuned_base, untuned_rounded = base, rounded
    graph, trial, tuning, trials = every_layer()  # every trial made, the kept graph's last
    kept, sensitivity, output_error = [], {}, {}
    method = method_description(precision, settings, bool(smoothing))
    # int8's fine blocks are for the runtimes' int8 activations (none where smoothed, above)
    coarser = fmt.without_fine_blocks() if precision is Precision.INT4 else None
    if coarser is not None and passes(trial) and trial.accuracy.ppl_increase_pct <= SPARE * budget.max_ppl_increase_pct:
        progress.say(f"    within {SPARE:.0%} of the budget: every layer once more without the fine blocks")
        finer, fmt = fmt, coarser
        coarse_graph, coarse_trial, coarse_tuning, made = every_layer()
        if passes(coarse_trial):
            graph, trial, tuning, trials = coarse_graph, coarse_trial, coarse_tuning, trials + made
            method["weights"] = _int4_weights(settings, f"no finer blocks: every layer passed with them within "
                                                        f"{SPARE:.0%} of the budget")
        else:
            fmt, trials = finer, trials[:-1] + made + trials[-1:]
    if not passes(trial) and settings.fallback and diverge is not None and len(groups) >= 2:
        groups += [TABLES] if set(graph.lookup_tables) - graph.tied_tables and table_bits != TABLE_BITS else []
        progress.say(f"    over budget: ranking {len(groups)} layer groups by how much {backup} gives back")
        everything = diverge(graph.path)
        bar = progress.bar(len(groups), "sensitivity", "groups")
        for group in groups:
            probed = build({group})
            sensitivity[group] = round(everything - diverge(probed.path), 8)
            shutil.rmtree(probed.path.parent)
            bar.step()
        bar.close()
        ranked = sorted(groups, key=sensitivity.get, reverse=True)
        progress.say(f"    most sensitive: {', '.join(ranked[:3])}")
        if hessians is None:
            graph, trial, kept, tried = _search_count(ranked, len(groups) // 2, attempt, passes)
        else:  # the units are the layers, ranked together by the divergence each is estimated to remove per weight
            gains = _int8_gains(layers, hessians, rounded, fmt, int8, spec.hidden_size)
            tables = set(graph.lookup_tables) - graph.tied_tables if TABLES in groups else set()
            estimate, size = _layer_estimates(layers, spec, sensitivity, gains,
                                              sum(model.graph.initializers[name].const_value.size for name in tables))
            units = sorted(estimate, key=lambda unit: estimate[unit] / size[unit], reverse=True)
            limit = sum(size.values()) // 2
            progress.say(f"    {len(units)} layers ranked by the divergence each removes per weight; searching "
                         f"the fewest weights to keep in {backup} (at most half)")
            graph, trial, kept, tried = _search_by_estimate(units, estimate, size, limit, attempt, passes,
                                                            trial.accuracy.ppl_increase_pct,
                                                            budget.max_ppl_increase_pct)
            output_error = {name: float(f"{gains[name]:.6g}") for name in kept if name in gains}
        trials += [t for t in tried if t is not trial]
        trials.append(trial)  # the kept graph's trial last: it is the result
    for directory in work.glob("trial-*"):
        if directory != graph.path.parent:
            shutil.rmtree(directory)
    return QuantResult(graph.path, precision, method,
                       graph.quantized, graph.total, kept, backup, graph.not_quantizable, graph.narrowed, smoothing,
                       scaling, calibration.source if calibration else None, cached, trials, sensitivity,
                       graph.bits_per_weight, {name: channels.tolist() for name, channels in floating.items()},
                       graph.lookup_tables, output_error, tuning)


def _tune(untuned: Path, tune: Tuner, base: Path, rounded: dict, directory: Path,
          progress: Progress) -> tuple[Path | None, dict, dict]:
    """Tune the every-layer-int4 graph's scales and float parameters. Returns (a base graph with the tuned floats,
    in `directory`; `rounded` with the tuned scales; the record), or (None, `rounded`, the record) where tuning was
    skipped."""
    tuned = tune(untuned, {name for name, _ in rounded})
    if "skipped" in tuned.record:
        progress.say(f"    scale tuning skipped: {tuned.record['skipped']}")
        return None, rounded, tuned.record
    def scales_of(name: str, form: WeightFormat, scales: np.ndarray) -> np.ndarray:
        """The tuned scales for the format the tuned graph used: `rounded` may hold a layer in another format too
        (its fine blocks' codes beside those without them)."""
        new = tuned.scales.get(name)
        return new if new is not None and form.bits == 4 and new.shape == scales.shape else scales

    tuned_rounded = {(name, form): (codes, scales_of(name, form, scales), zeros)
                     for (name, form), (codes, scales, zeros) in rounded.items()}
    model = ir.load(base)
    for name, value in tuned.floats.items():
        model.graph.initializers[name].const_value = ir.tensor(value, name=name)
    tuned_base = directory / MODEL_FILE
    tuned_base.parent.mkdir(parents=True)
    ir.save(model, tuned_base, external_data=DATA_FILE)
    kl = tuned.record["kl_per_epoch"]
    progress.say(f"    scales tuned: KL from fp32 {kl[0]:.4f} (first epoch) -> {kl[-1]:.4f} nats per token (last) "
                 f"in {tuned.record['seconds']:.0f} s")
    return tuned_base, tuned_rounded, tuned.record


SMOOTHING_TOLERANCE = 1e-3  # of max |logit|: float rounding of the rescaled weights is ~1e-6


def _check_function_kept(prepared: Path, smoothed: Path, calibration: CalibrationSet, spec: DecoderSpec) -> None:
    """SmoothQuant must not change the fp32 function: its folds rely on the graph's structure, so compare
    the logits of one calibration window before and after."""
    from gptkiln.errors import ExportError
    from gptkiln.targets.onnxruntime import OnnxRuntimeRunner, create_session

    ids = calibration.windows[:1]
    positions = np.arange(ids.shape[1])[None]

    def logits(path: Path) -> np.ndarray:
        runner = OnnxRuntimeRunner(spec, create_session(path))
        return runner.step(ids, np.ones_like(ids), positions, runner.empty_cache(1))[0]

    before, after = logits(prepared), logits(smoothed)
    rel = float(np.abs(after - before).max() / max(np.abs(before).max(), 1e-12))
    if not rel <= SMOOTHING_TOLERANCE:
        raise ExportError(f"SmoothQuant changed the fp32 model's logits by {rel:.3g} of their scale "
                          f"(limit {SMOOTHING_TOLERANCE:g}): a fold does not fit this graph",
                          "build with --no-smoothquant, and report this with the model config")


def _int8_gains(layers: list, hessians: dict[str, np.ndarray], rounded: dict, fmt: WeightFormat,
                backup: WeightFormat, hidden_size: int) -> dict[str, float]:
    """Each layer's output error on the calibration set, Σ tr(ΔWᵀ H ΔW) with H = Σ x xᵀ, in `fmt` less in
    `backup`: what keeping that layer alone at the backup removes. Layers without both codes are left out."""
    gains = {}
    for layer in layers:
        weight, hessian = layer.weight(), hessians[layer.activation.name]
        errors = []
        for form in (fmt.for_layer(layer, hidden_size).for_rows(weight.shape[0]),
                     backup.for_layer(layer, hidden_size).for_rows(weight.shape[0])):
            if (layer.name, form) not in rounded:
                break
            delta = weight - dequantize(*rounded[(layer.name, form)])
            errors.append(float(np.sum((hessian @ delta) * delta)))
        if len(errors) == 2:
            gains[layer.name] = errors[0] - errors[1]
    return gains


def _layer_estimates(layers: list, spec: DecoderSpec, sensitivity: dict[str, float], gains: dict[str, float],
                     table_size: int) -> tuple[dict[str, float], dict[str, int]]:
    """The layer-wise fallback's units (each layer with an int8 gain, plus the lookup tables' group where it is one)
    -> the Probe divergence keeping it at the backup is estimated to remove, and its weights. A role's divergence
    is shared among its layers in proportion to their gains: a Probe compares roles (the model's output), a gain
    only a role's layers (each is an error in its own layer's output)."""
    estimate, size, by_role = {}, {}, {}
    for layer in layers:
        if layer.name in gains:
            by_role.setdefault(layer.role(spec), []).append(layer)
    for role, members in by_role.items():
        shares = np.array([max(gains[layer.name], 0.0) for layer in members])
        shares = shares / shares.sum() if shares.sum() > 0 else np.full(len(members), 1 / len(members))
        for layer, share in zip(members, shares):
            estimate[layer.name] = max(sensitivity[role], 0.0) * float(share)
            size[layer.name] = math.prod(layer.weight_shape)
    if table_size:
        estimate[TABLES], size[TABLES] = max(sensitivity[TABLES], 0.0), table_size
    return estimate, size


def _cover(ranked: list[str], estimate: dict[str, float], size: dict[str, int], goal: float) -> list[str]:
    """Few weights whose units' summed estimate reaches `goal`: the ranked units (most estimate per weight first) up
    to the one that reaches it, unless leaving a unit out and going on down the ranking reaches it in fewer weights
    (a large unit, the tied lm_head, just past what is needed); repeated while that helps. Every unit when even
    all of them fall short."""
    def prefix(left_out: set[str]) -> list[str]:
        chosen, reached = [], 0.0
        for unit in ranked:
            if reached >= goal:
                break
            if unit not in left_out:
                chosen.append(unit)
                reached += estimate[unit]
        return chosen if reached >= goal else list(ranked)

    def weights(units: list[str]) -> int:
        return sum(size[unit] for unit in units)

    left_out, best = set(), prefix(set())
    while True:
        options = [prefix(left_out | {unit}) for unit in best]
        better = min(options, key=weights, default=best)
        if weights(better) >= weights(best):
            return best
        left_out |= set(best) - set(better)
        best = better


def _fill(ranked: list[str], size: dict[str, int], limit: int) -> list[str]:
    """The most units, in ranked order, that fit in `limit` weights: a unit that does not fit is passed over."""
    chosen, used = [], 0
    for unit in ranked:
        if used + size[unit] <= limit:
            chosen.append(unit)
            used += size[unit]
    return chosen


MAX_ESTIMATED_TRIALS = 6


def _search_by_estimate(ranked: list[str], estimate: dict[str, float], size: dict[str, int], limit: int, attempt,
                        passes, start_pct: float, target_pct: float) -> tuple:
    """The units to keep for the budget to hold in the fewest weights (at most `limit`), none kept being known to fail
    at `start_pct`. The perplexity increase is taken as linear in the kept units' summed estimate (their reach);
    each trial keeps the `_cover` of the reach where that line meets the target. The first line runs from none
    kept to every unit kept at an increase of 0 (the estimates are what each removes: all of them leave none);
    while none passed, the next is the line through the last two that failed; then between the nearest failing
    and passing trials, halved when two guesses in a row fell on one side. The search ends when no set lies
    between the nearest failing and passing ones, or after MAX_ESTIMATED_TRIALS evaluations, the last of them
    trying `_fill(limit)` if none passed yet. Returns (graph, trial, kept, the trials made); when none passes,
    the last trial (not passing) and the units it kept."""
    def reach(units: list[str]) -> float:
        return sum(estimate[unit] for unit in units)

    widest = _fill(ranked, size, limit)
    failures, passing = [([], start_pct)], (list(ranked), 0.0)  # (units, increase); passing: none tried yet
    best, tried, made, outcomes = None, [], [], []  # tried: the units of each trial made
    while len(made) < MAX_ESTIMATED_TRIALS and failures[-1][0] != widest:
        (before, before_pct), (failed, failed_pct) = ([(None, None)] + failures)[-2:]
        if best is None and len(made) == MAX_ESTIMATED_TRIALS - 1:
            units = widest
        else:
            if best is not None and outcomes[-2:] in ([True, True], [False, False]):
                high, high_pct, low, low_pct, share = failed, failed_pct, passing[0], passing[1], 0.5
            else:
                if best is None and before is not None and before_pct > failed_pct:  # the last two failures' line
                    (high, high_pct), (low, low_pct) = (before, before_pct), (failed, failed_pct)
                else:
                    (high, high_pct), (low, low_pct) = (failed, failed_pct), passing
                share = (high_pct - target_pct) / (high_pct - low_pct) if high_pct > low_pct else 0.5
            units = _cover(ranked, estimate, size, reach(high) + share * (reach(low) - reach(high)))
            if sum(size[unit] for unit in units) > limit:
                units = widest
            if not reach(failed) < reach(units) < (reach(passing[0]) if best else math.inf) or units in tried:
                break  # no set between the nearest failing and passing ones
        graph, trial = attempt(units)
        tried.append(units)
        made.append(trial)
        outcomes.append(passes(trial))
        if outcomes[-1]:
            passing, best = (units, trial.accuracy.ppl_increase_pct), (graph, trial, units)
        else:
            failures.append((units, trial.accuracy.ppl_increase_pct))
            last = (graph, trial)
    if best is None:
        return *last, failures[-1][0], made
    return *best, made


def _search_count(ranked: list[str], limit: int, attempt, passes) -> tuple:
    """The fewest of the ranked groups to keep for the budget to hold: 1, 2, 4, ... up to `limit` (>= 1), then
    bisected between the last count that failed and the first that passed. Returns (graph, trial, kept,
    the trials made); when none passes, the largest count tried."""
    counts = [c for c in (2 ** i for i in range(limit.bit_length())) if c < limit] + [limit]
    tried, failed = [], 0
    for count in counts:
        graph, trial = attempt(ranked[:count])
        tried.append(trial)
        if passes(trial):
            break
        failed = count
    else:
        return graph, trial, ranked[:failed], tried
    passing, best = count, (graph, trial)
    while passing - failed > 1:
        middle = (passing + failed) // 2
        graph, trial = attempt(ranked[:middle])
        tried.append(trial)
        if passes(trial):
            passing, best = middle, (graph, trial)
        else:
            failed = middle
    return best[0], best[1], ranked[:passing], tried
