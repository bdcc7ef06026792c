"""Who may load an engine: TensorRT engines are tied to the TensorRT version and the GPU they were built on.

The rules (TensorRT 10 developer guide, "Version compatibility" and "Hardware compatibility"):
- version: by default only the exact TensorRT version that built the engine loads it; an engine
  built with VERSION_COMPATIBLE loads on that version or a later one of the same major version.
- hardware: level "none" needs the build GPU's compute capability; "same-cc" the same; "ampere+"
  any GPU of compute capability 8.0 or newer (and must be built on one).
TensorRT itself only logs a mismatch and returns no engine, so gptkiln checks first and says
what the engine needs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

HARDWARE_LEVELS = ("none", "same-cc", "ampere+")
AMPERE = (8, 0)
MIN_BUILD_CAPABILITY = {"ampere+": AMPERE, "same-cc": (7, 5)}  # Ampere; Turing
MIN_PRECISION_CAPABILITY = {"bf16": AMPERE}


@dataclass(frozen=True)
class EngineRequirements:
    tensorrt: str  # the version that built it, e.g. "10.15.1.29"
    compute_capability: str  # of the build GPU, e.g. "9.0"
    hardware_compatibility: str  # one of HARDWARE_LEVELS
    version_compatible: bool

    def to_dict(self) -> dict:
        return asdict(self)


def parse_version(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".")[:3] if part.isdigit())


def parse_capability(capability: str) -> tuple[int, int]:
    major, minor = capability.split(".")
    return int(major), int(minor)


def compatibility_problems(needs: EngineRequirements, tensorrt: str, compute_capability: str) -> list[str]:
    """Why this host (TensorRT version, GPU compute capability) cannot load the engine; empty: it can."""
    problems = []
    built, have = parse_version(needs.tensorrt), parse_version(tensorrt)
    if needs.version_compatible:
        if have[0] != built[0] or have < built:
            problems.append(f"the engine needs TensorRT {built[0]}.x at version {needs.tensorrt} or later "
                            f"(version-compatible build); this host has {tensorrt}")
    elif have != built:
        problems.append(f"the engine needs TensorRT {needs.tensorrt} exactly; this host has {tensorrt} "
                        "(build with --trt-version-compatible for engines that later versions load)")
    gpu, built_gpu = parse_capability(compute_capability), parse_capability(needs.compute_capability)
    if needs.hardware_compatibility == "ampere+":
        if gpu < AMPERE:
            problems.append(f"the engine needs a GPU of compute capability 8.0 or newer (ampere+); "
                            f"this GPU is {compute_capability}")
    elif gpu != built_gpu:
        problems.append(f"the engine needs a GPU of compute capability {needs.compute_capability}; this GPU is "
                        f"{compute_capability} (build with --trt-hardware-compat ampere+ for engines that other "
                        "GPUs load)")
    return problems


def build_problems(precision: str, hardware_compatibility: str, compute_capability: str) -> list[str]:
    """Why this GPU cannot build the engine asked for."""
    gpu = parse_capability(compute_capability)
    problems = []
    needed = MIN_BUILD_CAPABILITY.get(hardware_compatibility)
    if needed and gpu < needed:
        problems.append(f"--trt-hardware-compat {hardware_compatibility} must be built on a GPU of compute capability "
                        f"{needed[0]}.{needed[1]} or newer; this GPU is {compute_capability}")
    needed = MIN_PRECISION_CAPABILITY.get(precision)
    if needed and gpu < needed:
        problems.append(f"{precision} needs a GPU of compute capability {needed[0]}.{needed[1]} or newer; "
                        f"this GPU is {compute_capability}")
    return problems
