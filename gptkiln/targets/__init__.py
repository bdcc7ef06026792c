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


__all__ = ["TARGETS", "Runner", "Target", "available_targets", "get_target"]
