"""The targets gptkiln compiles for. Heavy SDKs are imported inside each target's methods."""

from __future__ import annotations

from gptkiln.config import EngineSettings, RuntimeSettings
from gptkiln.errors import TargetUnavailableError, UsageError
from gptkiln.targets.base import Runner, Target
from gptkiln.targets.onnxruntime import OnnxRuntimeTarget
from gptkiln.targets.openvino import OpenVinoStatelessTarget, OpenVinoTarget
from gptkiln.targets.tensorrt import TensorRTTarget

TARGETS: dict[str, type[Target]] = {
    target.name: target for target in (OnnxRuntimeTarget, OpenVinoTarget, OpenVinoStatelessTarget, TensorRTTarget)
}


def get_target(name: str, runtime: RuntimeSettings | None = None, engine: EngineSettings | None = None) -> Target:
    if name not in TARGETS:
        raise UsageError(f"unknown target '{name}'", f"use one of: {', '.join(TARGETS)}")
    return TARGETS[name](runtime, engine)


def trial_target(targets: list[Target]) -> Target:
    """The engine a quantized build's trials are scored on, with the settings it is built with: of the requested
    targets whose engines compile in seconds here, the first with no safer setting to fall back to (ONNX Runtime;
    OpenVINO with an explicit activation setting), else the first (OpenVINO: its engine with int8 activations is
    scored, and its gate keeps finer then float ones as fallbacks), else ONNX Runtime (TensorRT alone). The fallback stops at
    the first trial that meets the budget, so the scoring engine passes its gate as scored; another engine measures
    the graph a little differently (SmolLM2 int4, six trials: ±0.15 points either way) and is gated on its own."""
    scoring = [target for target in targets if target.scores_trials]
    without_fallback = [target for target in scoring if target.fallback() is None]
    return (without_fallback or scoring or [OnnxRuntimeTarget()])[0]


def available_targets() -> list[str]:
    """Names of the targets whose runtime is installed here, in registry order."""
    names = []
    for name, target in TARGETS.items():
        try:
            target().check_available()
        except TargetUnavailableError:
            continue
        names.append(name)
    return names


__all__ = ["TARGETS", "Runner", "Target", "available_targets", "get_target", "trial_target"]
