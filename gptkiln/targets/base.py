"""A target compiles the exported graph into engine files; its Runner speaks the IO contract.

Runners take and return numpy arrays. The KV cache is whatever the runner returned from
its previous step (a list of `present` arrays for contract-speaking runners); callers
only pass it back, so a target may keep its cache internally.
"""

from __future__ import annotations

import importlib
import json
import re
from abc import ABC, abstractmethod
from dataclasses import asdict
from pathlib import Path

import numpy as np

from gptkiln.config import BuildConfig, EngineSettings, Precision, RuntimeSettings, Tolerances
from gptkiln.errors import UsageError
from gptkiln.models.spec import DecoderSpec


RUNTIME_CONFIG = "runtime_config.json"  # beside the engine files
# the most tokens (rows x positions) a runner that splits prompts computes in one pass: attention's scores grow
# with a pass's length times the context (SmolLM2 int4 on ONNX Runtime, a 4096-token prompt: 725 MB peak in one
# pass, 449 MB in passes of 512, and 1.17x as fast; benchmarks/RESULTS.md, session 45). llama.cpp's default
# micro-batch is 512 tokens too.
PROMPT_PASS_TOKENS = 512


class Runner(ABC):
    # the fp32 PyTorch model's cache holds exactly what its prefill computed: decoding through it gives a prefill's
    # logits, so an evaluation scores it in one step (calibration.perplexity)
    exact_cache = False
    # prefill() splits a prompt into passes of at most this many tokens (None: the whole prompt in one pass)
    prompt_pass_tokens: int | None = None

    def __init__(self, spec: DecoderSpec):
        self.spec = spec

    def empty_cache(self, batch: int, capacity: int = 0) -> list[np.ndarray]:
        """A cache of no positions for `batch` rows. `capacity`: the most positions the caller will fill (0: not
        known); a runner whose cache is a buffer it grows allocates that much at once."""
        shape = (batch, self.spec.num_kv_heads, 0, self.spec.head_dim)
        return [np.zeros(shape, dtype=np.float32) for _ in range(2 * self.spec.num_layers)]

    def cache_arrays(self, cache) -> list[np.ndarray]:
        """The cache as the contract's `present` arrays (runners that keep it internally read it back)."""
        return cache

    @abstractmethod
    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
             cache: list[np.ndarray], last_only: bool = False) -> tuple[np.ndarray, list[np.ndarray]]:
        """One forward pass: logits [batch, seq, vocab] and the cache for the next step. last_only: the caller
        reads the last position's logits alone (generation), so a runner may return [batch, 1, vocab]."""

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                cache) -> tuple[np.ndarray, object]:
        """A prompt's steps for generation: the last position's logits [batch, 1, vocab] and the cache after the
        prompt, which runs in passes of at most `prompt_pass_tokens` tokens along its positions. attention_mask
        covers the cache's positions and the prompt's, as for step()."""
        batch, length = input_ids.shape
        past = attention_mask.shape[1] - length
        width = length if self.prompt_pass_tokens is None else max(1, self.prompt_pass_tokens // batch)
        for start in range(0, length, width):
            end = min(length, start + width)
            logits, cache = self.step(input_ids[:, start:end], attention_mask[:, :past + end],
                                      position_ids[:, start:end], cache, last_only=True)
        return logits[:, -1:], cache


class Target(ABC):
    name: str
    description: str
    fusion_sets: tuple[str, ...]  # which gptkiln.graph fusion sets this runtime can run
    precisions: tuple[Precision, ...] = (Precision.FP32,)  # the graphs it can compile and run
    runtime_module: str  # the Python module of its runtime, e.g. "onnxruntime"
    scores_trials = False  # its engine compiles in seconds here: a quantized build's trials can be scored on it

    def __init__(self, runtime: RuntimeSettings | None = None, engine: EngineSettings | None = None):
        self.runtime = runtime or RuntimeSettings()
        self.engine = engine or EngineSettings()  # ahead-of-time engines (TensorRT) only

    def for_precision(self, precision: Precision) -> Target:
        """This target with the runtime defaults that depend on the build's precision settled (before it is keyed)."""
        return self

    def check_build(self, config: BuildConfig) -> None:
        """Refuse, before any work is done, a build this target cannot do here."""
        self.check_available()
        self.check_precision(config.precision)

    def tolerances(self, build: Tolerances) -> Tolerances:
        """The parity bars this target's engine is held to (a reduced-precision runtime setting loosens them)."""
        return build

    def fallback(self) -> tuple[Target, str] | None:
        """Where a quantized engine fails its gates with a runtime setting gptkiln chose (not one asked for): this
        target with the safer setting and what changed, to compile and gate once more; None: no other setting."""
        return None

    def build_settings(self) -> dict:
        """The settings compile() and load() read: part of this target's stage-cache key."""
        return {"runtime": asdict(self.runtime)}

    def runtime_version(self) -> str | None:
        """The installed runtime's version (part of the cache key; a bundle's requirement); None: absent."""
        try:
            return importlib.import_module(self.runtime_module).__version__
        except ImportError:
            return None

    def requirements(self, settings: dict) -> dict:
        """What a machine needs to load this build (recorded in a bundle; checked before `gptkiln run` loads it):
        the runtime at the release it was proven with or newer (major.minor), on a CPU."""
        built = str(settings.get(self.runtime_module, ""))
        return {"runtime": self.runtime_module, "minimum_version": ".".join(built.split("-")[0].split(".")[:2]),
                "device": "cpu"}

    def host_problems(self, requirements: dict) -> list[str]:
        """Why this machine cannot load a build with these requirements (empty: it can)."""
        installed, minimum = self.runtime_version(), requirements["minimum_version"]
        if installed is None:
            return [f"{self.runtime_module} is not installed (pip install {self.runtime_module})"]
        if version_tuple(installed) < version_tuple(minimum):
            return [f"it was proven with {self.runtime_module} {minimum}; this machine has {installed} "
                    f"(pip install -U '{self.runtime_module}>={minimum}')"]
        return []

    def check_precision(self, precision: Precision) -> None:
        if precision not in self.precisions:
            raise UsageError(f"target '{self.name}' cannot run {precision.value} builds",
                             f"use --quantize {' or '.join(p.value for p in self.precisions)} for it, "
                             f"or build {precision.value} for another target")

    def save_runtime_config(self, out_dir: Path, config: dict) -> None:
        (out_dir / RUNTIME_CONFIG).write_text(json.dumps(config, indent=2) + "\n")

    @staticmethod
    def read_runtime_config(out_dir: Path, default: dict) -> dict:
        """The config the engine was built and proven with (older outputs have none: the default)."""
        path = out_dir / RUNTIME_CONFIG
        return json.loads(path.read_text()) if path.is_file() else default

    @abstractmethod
    def check_available(self) -> None:
        """Raise TargetUnavailableError (with the install command) when the runtime is missing."""

    @abstractmethod
    def compile(self, onnx_path: Path, out_dir: Path, spec: DecoderSpec) -> dict:
        """Write the engine files into out_dir; return the settings to record in the manifest
        (with a "fusion" entry: the FusionReport of the graph this target runs)."""

    def compile_and_load(self, onnx_path: Path, out_dir: Path, spec: DecoderSpec) -> tuple[dict, Runner | None]:
        """compile(), and the engine loaded as load() loads it (None where it was not compiled here). A target
        whose compile loads the engine to check it hands over that one instead of loading it twice."""
        settings = self.compile(onnx_path, out_dir, spec)
        return settings, (self.load(out_dir, spec) if settings.get("compiled", True) else None)

    def write_ecosystem_files(self, out_dir: Path, spec: DecoderSpec, settings: dict, model_files: Path) -> dict:
        """Write, beside a compiled engine, what this runtime's own generation stack needs to load out_dir as it
        is (gptkiln.ecosystem); return the record for the manifest ({}: nothing for this target)."""
        return {}

    @abstractmethod
    def load(self, out_dir: Path, spec: DecoderSpec, threads: int | None = None) -> Runner:
        """Load the engine files written by compile() (CPU runtimes: with `threads`; None: as built)."""


def version_tuple(version: str) -> tuple[int, ...]:
    """'2026.4.1-22982-e213a14' -> (2026, 4, 1)."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("-")[0].split("+")[0])[:3])
