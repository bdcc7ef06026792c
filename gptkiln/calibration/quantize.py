"""From the fp32 graph to a quantized graph that meets its accuracy budget.

1. statistics from the calibration set (cached), SmoothQuant folded in for W8A8;
2. every linear layer quantized; the result scored (perplexity, top-1) against fp32 PyTorch;
3. over budget: the mixed-precision fallback measures each group's sensitivity (the score
   with that group alone left in fp32), then keeps the most sensitive groups in fp32, one
   more at a time, until the budget holds or half the groups are kept.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir

from gptkiln.calibration.data import CalibrationSet
from gptkiln.calibration.layers import linear_layers
from gptkiln.calibration.perplexity import AccuracyReport, accuracy_failures
from gptkiln.calibration.qdq import activation_threshold, quantize_dynamic, quantize_w8a8
from gptkiln.calibration.smoothquant import Smoothed, smooth
from gptkiln.calibration.statistics import collect
from gptkiln.calibration.weight_only import MIN_OPSET, Int4Format, quantize_int4
from gptkiln.config import AccuracyBudget, ActivationCalibration, Int4Method, Precision, QuantSettings
from gptkiln.exporter.io_spec import DATA_FILE, MODEL_FILE
from gptkiln.models.spec import DecoderSpec

Evaluator = Callable[[Path], AccuracyReport]


@dataclass
class Trial:
    kept_fp32: list[str]
    accuracy: AccuracyReport

    def to_dict(self) -> dict:
        return {"kept_fp32": self.kept_fp32, "accuracy": self.accuracy.to_dict()}


@dataclass
class QuantizedGraph:  # one trial's graph
    path: Path
    quantized: int  # linear layers
    total: int
    not_quantizable: list[str]
    narrowed: dict[str, int]


@dataclass
class QuantResult:
    path: Path  # the quantized graph every target compiles
    precision: Precision
    method: dict
    layers_quantized: int
    layers_total: int
    kept_fp32: list[str]  # groups the fallback kept in fp32
    not_quantizable: list[str]  # layers the format cannot take (int4: input size not a multiple of 16)
    narrowed_blocks: dict[str, int]  # int4 layers given a smaller block than asked (their input size) -> that block
    smoothing: list[Smoothed] = field(default_factory=list)
    calibration: dict | None = None
    statistics_cached: bool = False
    trials: list[Trial] = field(default_factory=list)
    sensitivity: dict[str, float] = field(default_factory=dict)  # group -> perplexity increase with it alone in fp32

    @property
    def accuracy(self) -> AccuracyReport:
        return self.trials[-1].accuracy

    def to_dict(self) -> dict:
        return {"precision": self.precision.value, "method": self.method, "layers_quantized": self.layers_quantized,
                "layers_total": self.layers_total, "kept_fp32": self.kept_fp32,
                "not_quantizable": self.not_quantizable, "narrowed_blocks": self.narrowed_blocks,
                "smoothing": [s.to_dict() for s in self.smoothing],
                "calibration": self.calibration, "statistics_cached": self.statistics_cached,
                "accuracy": self.accuracy.to_dict(), "trials": [t.to_dict() for t in self.trials],
                "sensitivity": self.sensitivity}


def method_description(precision: Precision, settings: QuantSettings) -> dict:
    if precision is Precision.W8A8:
        return {"weights": "int8 symmetric per output channel", "activations": "int8 symmetric per tensor",
                "calibration": settings.activations.value,
                **({"percentile": settings.percentile} if settings.activations is ActivationCalibration.PERCENTILE else {}),
                "smoothquant_alpha": settings.smoothquant_alpha}
    if precision is Precision.INT8_DYNAMIC:
        return {"weights": "int8 symmetric per output channel", "activations": "uint8 per tensor, at run time"}
    return {"weights": f"int4 {'symmetric' if settings.int4_symmetric else 'asymmetric'} "
                       f"blocks of {settings.int4_block_size} input rows", "rounding": settings.int4_method.value}


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
             say: Callable[[str], None] = lambda _: None) -> QuantResult:
    base, smoothing, thresholds, hessians, cached = prepared, [], {}, None, False
    model = ir.load(prepared)
    layers = linear_layers(model)
    names = sorted({layer.activation.name for layer in layers})
    groups = list(dict.fromkeys(layer.group(spec) for layer in layers))  # smoothing keeps names, so groups hold
    if precision is Precision.W8A8:
        stats = collect(prepared, names, calibration, spec)
        cached = stats.cached
        if settings.smoothquant_alpha is not None:
            smoothing = smooth(model, layers, dict(stats.absmax), settings.smoothquant_alpha)
            base = work / "smoothed" / MODEL_FILE
            base.parent.mkdir(parents=True)
            ir.save(model, base, external_data=DATA_FILE)
        if base != prepared or settings.activations is not ActivationCalibration.MINMAX:
            stats = collect(base, names, calibration, spec, histograms=settings.activations is not ActivationCalibration.MINMAX)
            cached = cached and stats.cached
        thresholds = {n: activation_threshold(stats, n, settings.activations, settings.percentile) for n in names}
    elif precision is Precision.INT4 and settings.int4_method is Int4Method.GPTQ:
        stats = collect(prepared, names, calibration, spec, hessians=True)
        hessians, cached = stats.hessians, stats.cached
    say(f"    statistics: {'from the cache' if cached else 'collected'}" if calibration is not None else
        "    no calibration needed")

    trial_count = 0

    def build(kept: set[str]) -> QuantizedGraph:
        nonlocal trial_count
        trial_count += 1
        model = ir.load(base)
        every = linear_layers(model)
        chosen = [layer for layer in every if layer.group(spec) not in kept]
        not_quantizable: list[str] = []
        narrowed: dict[str, int] = {}
        if precision is Precision.W8A8:
            quantize_w8a8(model, chosen, thresholds)
        elif precision is Precision.INT8_DYNAMIC:
            quantize_dynamic(model, chosen)
        else:
            model.opset_imports[""] = max(model.opset_imports.get("", MIN_OPSET), MIN_OPSET)
            fmt = Int4Format(settings.int4_block_size, settings.int4_symmetric)
            not_quantizable, narrowed = quantize_int4(model, chosen, fmt, hessians)
        path = work / f"trial-{trial_count}" / MODEL_FILE
        path.parent.mkdir(parents=True)
        ir.save(model, path, external_data=DATA_FILE)
        return QuantizedGraph(path, len(chosen) - len(not_quantizable), len(every), not_quantizable, narrowed)

    def attempt(kept: list[str]) -> tuple[QuantizedGraph, Trial]:
        graph = build(set(kept))
        trial = Trial(list(kept), evaluate(graph.path))
        say(f"    {'all layers' if not kept else 'fp32: ' + ', '.join(kept)}: perplexity "
            f"{trial.accuracy.ppl:.3f} ({trial.accuracy.ppl_increase_pct:+.2f}%), top-1 {trial.accuracy.top1_agreement:.2%}")
        return graph, trial

    graph, trial = attempt([])
    trials, kept, sensitivity = [trial], [], {}
    if accuracy_failures(trial.accuracy, budget) and settings.fallback:
        say(f"    over budget: measuring the sensitivity of {len(groups)} layer groups")
        for group in groups:
            sensitivity[group] = attempt([group])
        ranked = sorted(groups, key=lambda g: sensitivity[g][1].accuracy.ppl)
        for count in range(1, len(groups) // 2 + 1):
            kept = ranked[:count]
            graph, trial = sensitivity[kept[0]] if count == 1 else attempt(kept)
            trials.append(trial)
            if not accuracy_failures(trial.accuracy, budget):
                break
    for directory in work.glob("trial-*"):
        if directory != graph.path.parent:
            shutil.rmtree(directory)
    return QuantResult(graph.path, precision, method_description(precision, settings), graph.quantized, graph.total,
                       kept, graph.not_quantizable, graph.narrowed, smoothing,
                       calibration.source if calibration else None, cached, trials,
                       {g: round(s[1].accuracy.ppl_increase_pct, 4) for g, s in sensitivity.items()})
