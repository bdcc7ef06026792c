"""Frozen configuration: what to build and what must hold for the build to count as good."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path


class Precision(str, enum.Enum):
    FP32 = "fp32"
    W8A8 = "w8a8"  # static: int8 weights (per channel) and activations (per tensor, calibrated)
    INT8_DYNAMIC = "int8-dynamic"  # int8 weights; activations quantized at run time
    INT8 = "int8"  # weight-only, block-wise; activations stay fp32
    INT4 = "int4"  # weight-only, block-wise; activations stay fp32
    FP16 = "fp16"  # every tensor half, normalization and softmax in fp32 (strongly typed runtimes)
    BF16 = "bf16"

    @property
    def quantized(self) -> bool:
        """Calibrated or rounded to integers: gated by measured accuracy."""
        return self in (Precision.W8A8, Precision.INT8_DYNAMIC, Precision.INT8, Precision.INT4)

    @property
    def weight_only(self) -> bool:
        """Integer weights, float activations (gptkiln.calibration.weight_only)."""
        return self in (Precision.INT8, Precision.INT4)

    @property
    def half(self) -> bool:
        return self in (Precision.FP16, Precision.BF16)

    @property
    def smoothed_when_calibrated(self) -> bool:
        """SmoothQuant folded in where calibration text is given (optional for these): the runtimes quantize their
        activations to int8 as they run, int8-dynamic's per token, weight-only int8's per block (ONNX Runtime's
        8-bit MatMulNBits) or per group of 32 (OpenVINO's CPU)."""
        return self in (Precision.INT8_DYNAMIC, Precision.INT8)


class ActivationCalibration(str, enum.Enum):
    MINMAX = "minmax"
    PERCENTILE = "percentile"
    ENTROPY = "entropy"  # KL divergence between the fp32 and the quantized histogram


class Int4Method(str, enum.Enum):
    RTN = "rtn"  # round to nearest, per block
    GPTQ = "gptq"  # Hessian-aware rounding from calibration activations
    AWQ_GPTQ = "awq-gptq"  # activation-aware channel scales searched on the same Hessians, then GPTQ

    @property
    def calibrated(self) -> bool:
        """Needs calibration activations (their Hessians)."""
        return self is not Int4Method.RTN


@dataclass(frozen=True)
class Tolerances:
    """The parity gate. Defaults are the fp32 bars of docs/DESIGN.md.

    ``logits_rel`` bounds max |ours - torch| divided by max |torch| over every compared
    logit (so the bar does not depend on the model's logit scale).
    """

    logits_rel: float | None = 1e-4  # None: not bounded (half precision)
    min_top1_agreement: float = 0.99
    greedy_tokens: int = 32
    padded_rel: float | None = 1e-4

    @classmethod
    def half(cls) -> "Tolerances":
        """fp16 / bf16 (docs/DESIGN.md): top-1 >= 99% and 16 greedy tokens; logits are not bounded."""
        return cls(logits_rel=None, min_top1_agreement=0.99, greedy_tokens=16, padded_rel=None)


@dataclass(frozen=True)
class AccuracyBudget:
    """The gate of a quantized build (docs/DESIGN.md, fidelity bars): perplexity on held-out text
    and top-1 agreement with fp32 PyTorch, both over the same evaluation tokens."""

    max_ppl_increase_pct: float
    min_top1_agreement: float
    # a batch row vs the same row with the batch's other rows changed: a row must not change another's tokens
    min_padded_top1_agreement: float = 0.99

    @classmethod
    def default(cls, precision: Precision) -> "AccuracyBudget":
        if precision is Precision.INT4:
            return cls(max_ppl_increase_pct=5.0, min_top1_agreement=0.0)  # DESIGN.md: perplexity only
        if precision is Precision.INT8:
            return cls(max_ppl_increase_pct=0.5, min_top1_agreement=0.0)  # DESIGN.md: weight-only int8
        return cls(max_ppl_increase_pct=1.5, min_top1_agreement=0.95)


@dataclass(frozen=True)
class CalibrationSettings:
    """Where calibration text comes from and how it is cut: `samples` windows of `seq_len` tokens;
    the last `decode_steps` tokens of each run one at a time against the KV cache."""

    path: Path | None = None
    jsonl_field: str = "text"
    samples: int = 64
    seq_len: int = 128
    decode_steps: int = 16
    seed: int = 0


AUTO_ALPHA = "auto"  # SmoothQuant's α searched per activation (calibration/smoothquant.py)
# int8-dynamic's α under "auto": its per-token scales are not what the search models. All layers int8 on SmolLM2
# (benchmarks/RESULTS.md): 0.5 +1.81%, 0.6 +1.63%, 0.7 +1.68%, none +5.18%; 0.5 is what its passing build used
DYNAMIC_ALPHA = 0.5
# W8A8 keeps an input channel in float (calibration/qdq.py's `floating`) when its max |x| is this many times the
# median channel's, at most this share of the channels. SmolLM2's largest: down_proj inputs 1772 and 352 times,
# q/k/v and gate/up inputs up to ~40; the reference model's 40x planted outliers show 31-53 times
FLOAT_RATIO, FLOAT_SHARE = 8.0, 1 / 64


@dataclass(frozen=True)
class QuantSettings:
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    # minmax: a Llama's massive activations (a few tokens, hundreds of times the rest) are attention sinks, and
    # percentile 99.99 clips them; SmolLM2 W8A8, every layer int8: +3.8% minmax, +5.7% percentile (benchmarks/RESULTS.md)
    activations: ActivationCalibration = ActivationCalibration.MINMAX
    percentile: float = 99.99
    # "auto": searched per activation (W8A8; int8-dynamic's per-token scales take DYNAMIC_ALPHA); None: no SmoothQuant
    smoothquant_alpha: float | str | None = AUTO_ALPHA
    float_channels: bool = True  # W8A8: an activation's outlier channels computed in float beside the int8 product
    # measured (benchmarks/RESULTS.md): SmolLM2 +21.98% GPTQ -> +10.41% AWQ + GPTQ (with the int4 range search);
    # the reference +0.14% -> +0.10%
    int4_method: Int4Method = Int4Method.AWQ_GPTQ
    int4_block_size: int = 128
    int4_symmetric: bool = False
    # the down projection and a tied lm_head (WeightFormat.for_layer); SmolLM2, every layer int4: +10.72% at 4.29 bits
    # per weight with blocks of 128/64 -> +7.01% at 4.45 (benchmarks/RESULTS.md, session 35)
    int4_fine_block_size: int = 32
    # calibrated int4: epochs of end-to-end tuning of the scales and norms (calibration.scale_tuning); 0: none.
    # SmolLM2, every layer int4, in PyTorch: +6.78% -> +4.84% after 2 epochs of 64 windows, +4.04% after 4
    int4_tune_epochs: int = 4
    int8_block_size: int = 32  # weight-only int8, symmetric, round to nearest (llama.cpp's Q8_0 layout)
    fallback: bool = True  # keep the most sensitive layer groups at a backup precision until the budget holds
    eval_text: Path | None = None  # default: the reference model's held-out text
    eval_tokens: int = 8192
    budget: AccuracyBudget | None = None  # None: AccuracyBudget.default(precision)

    def budget_for(self, precision: Precision) -> AccuracyBudget:
        return self.budget or AccuracyBudget.default(precision)


@dataclass(frozen=True)
class ParitySettings:
    """What parity runs: prompts are drawn from the model's tokenizer, so they are real text."""

    decode_steps: int = 16
    greedy_tokens: int = 32
    padded_batch: int = 4


@dataclass(frozen=True)
class RuntimeSettings:
    """How the target runtime runs the engine. Saved beside the engine (runtime_config.json) and
    used wherever it is loaded: parity, generate, a bare-runtime consumer."""

    threads: int = 0  # 0: the runtime's default (every core)
    performance_hint: str = "LATENCY"  # OpenVINO: LATENCY (one request, decode) or THROUGHPUT
    # OpenVINO's compute and KV-cache precision: f32 (the parity bars of fp32) or, as an explicit choice,
    # bf16 / f16 (faster on CPUs that have them natively; held to the half-precision bars)
    inference_precision: str = "f32"
    # OpenVINO's stateful KV-cache storage when it differs from the inference precision: f16 or u8 (held to the
    # half-precision bars); None: f16 for integer weights (OpenVinoTarget.for_precision), else the inference precision
    kv_cache_precision: str | None = None
    # OpenVINO's DYNAMIC_QUANTIZATION_GROUP_SIZE: the CPU quantizes the activations of layers with integer weights
    # to int8 per group at run time; 0 turns that off (float activations); None: the CPU default (32), and a
    # quantized engine that fails its gates with it is compiled again with 16, then 0 (OpenVinoTarget.fallback)
    dynamic_quantization_group: int | None = None


@dataclass(frozen=True)
class EngineSettings:
    """What an ahead-of-time engine (TensorRT) is built for: its optimization profiles and who may load it."""

    max_batch: int = 8
    opt_batch: int = 1
    max_seq: int | None = None  # prompt + generated tokens; None: the model's context
    opt_prompt: int = 128
    hardware_compatibility: str = "none"  # "none" (this GPU's compute capability), "ampere+", "same-cc"
    version_compatible: bool = False  # loadable by later TensorRT releases of the same major version


@dataclass(frozen=True)
class BuildConfig:
    model: str
    output: Path
    targets: tuple[str, ...] = ("onnxruntime",)
    precision: Precision = Precision.FP32
    quant: QuantSettings = field(default_factory=QuantSettings)
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
    engine: EngineSettings = field(default_factory=EngineSettings)
    opset: int = 23  # ONNX Attention: one op per layer that ORT and OpenVINO (SDPA + KV cache) run fused
    force: bool = False
    tolerances: Tolerances = field(default_factory=Tolerances)
    parity: ParitySettings = field(default_factory=ParitySettings)
    runtime_overrides: dict[str, RuntimeSettings] = field(default_factory=dict)  # target name -> its own settings
    cache: bool = True  # reuse stages from the stage cache (gptkiln.stage_cache)

    def runtime_for(self, target: str) -> RuntimeSettings:
        """A target's runtime settings: its own overrides, else the build's."""
        return self.runtime_overrides.get(target, self.runtime)
