"""Activation statistics of the tensors that feed quantizable MatMuls, collected by running the
fp32 graph over the calibration set — prefill and decode with a populated KV cache — and
cached on disk, keyed by the graph's bytes, the calibration tokens and what was collected.

Per tensor: per-channel max |x| (SmoothQuant, MinMax), a histogram of |x| (percentile and
entropy calibration; a second pass, since its range comes from the first) and sum(x xᵀ)
(GPTQ's Hessian).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gptkiln.cache import cache_root
from gptkiln.calibration.data import CalibrationSet
from gptkiln.exporter import io_spec
from gptkiln.manifest import sha256_file
from gptkiln.models.spec import DecoderSpec
from gptkiln.progress import QUIET, Bar, Progress

HIST_BINS = 2048
BATCH = 8
FORMAT = "gptkiln-stats/1"  # bump when what a cache entry holds changes


@dataclass
class ActivationStats:
    absmax: dict[str, np.ndarray] = field(default_factory=dict)  # [K] per channel
    histograms: dict[str, np.ndarray] = field(default_factory=dict)  # [HIST_BINS] of |x| over [0, absmax.max()]
    hessians: dict[str, np.ndarray] = field(default_factory=dict)  # [K, K] sum of x xᵀ, float64
    rows: int = 0  # activation rows (tokens) seen per tensor
    cached: bool = False

    def tensor_absmax(self, name: str) -> float:
        return float(self.absmax[name].max())


def graph_sha256(model_path: Path) -> str:
    """The graph file and its external data: the content the statistics depend on."""
    digest = hashlib.sha256()
    for path in sorted(model_path.parent.glob(model_path.name + "*")):
        digest.update(path.name.encode() + sha256_file(path).encode())
    return digest.hexdigest()


def collect(model_path: Path, names: list[str], calibration: CalibrationSet, spec: DecoderSpec, *,
            histograms: bool = False, hessians: bool = False, progress: Progress = QUIET) -> ActivationStats:
    """Statistics of `names` (graph tensors); read from the cache when this exact request ran before."""
    names = sorted(set(names))
    key = hashlib.sha256(json.dumps({
        "format": FORMAT, "graph": graph_sha256(model_path), "calibration": calibration.sha256,
        "names": names, "histograms": histograms, "hessians": hessians, "bins": HIST_BINS,
    }).encode()).hexdigest()
    path = cache_root() / "calibration" / f"{key}.npz"
    if path.is_file():
        stats = _load(path)
        stats.cached = True
        return stats
    stats = ActivationStats()
    batches = -(-len(calibration.windows) // BATCH)
    bar = progress.bar(batches * (2 if histograms else 1), "calibration statistics", "batches")
    with _probe_session(model_path, names) as run:
        for batch in _activations(run, calibration, spec, bar):
            for name, x in batch.items():
                x = x.reshape(-1, x.shape[-1])
                channel_max = np.abs(x).max(axis=0)
                stats.absmax[name] = np.maximum(stats.absmax.get(name, channel_max), channel_max)
                if hessians:
                    stats.hessians[name] = stats.hessians.get(name, 0.0) + (x.T @ x).astype(np.float64)
            stats.rows += len(x)
        if histograms:
            for batch in _activations(run, calibration, spec, bar):
                for name, x in batch.items():
                    top = max(stats.tensor_absmax(name), 1e-12)
                    bins = np.minimum((np.abs(x).ravel() * (HIST_BINS / top)).astype(np.int64), HIST_BINS - 1)
                    stats.histograms[name] = stats.histograms.get(name, 0) + np.bincount(bins, minlength=HIST_BINS)
    bar.close()
    _save(path, stats)
    return stats


@contextlib.contextmanager
def _probe_session(model_path: Path, names: list[str]):
    """Yield run(feeds) -> (present arrays, {name: probed tensor}): an ORT session over the graph
    with the probed tensors added as outputs. The probe graph is written beside the original so
    that its external-data location still resolves; it is removed afterwards."""
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(model_path), load_external_data=False)
    present = {o.name for o in proto.graph.output}
    proto.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                              for n in names if n not in present)
    handle, probe = tempfile.mkstemp(prefix=".probe.", suffix=".onnx", dir=model_path.parent)
    os.close(handle)
    try:
        onnx.save(proto, probe)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.log_severity_level = 3
        session = ort.InferenceSession(probe, options, providers=["CPUExecutionProvider"])
        present_names = [o.name for o in session.get_outputs() if o.name.startswith("present.")]

        def run(feeds: dict) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
            values = session.run(present_names + names, feeds)
            return values[: len(present_names)], dict(zip(names, values[len(present_names):]))

        yield run
    finally:
        Path(probe).unlink(missing_ok=True)


def _activations(run, calibration: CalibrationSet, spec: DecoderSpec, bar: Bar):
    """Yield {name: activation} for each forward pass: each batch's prefill, then its decode steps (a bar step per
    batch)."""
    past_names = io_spec.past_names(spec.num_layers)
    for windows in calibration.batches(BATCH):
        batch, length = windows.shape
        prefill = length - calibration.decode_steps
        cache = None
        for start, end in [(0, prefill)] + [(t, t + 1) for t in range(prefill, length)]:
            feeds = {"input_ids": windows[:, start:end],
                     "attention_mask": np.ones((batch, end), np.int64),
                     "position_ids": np.broadcast_to(np.arange(start, end), (batch, end - start)).copy()}
            if cache is None:
                shape = (batch, spec.num_kv_heads, 0, spec.head_dim)
                cache = [np.zeros(shape, np.float32) for _ in past_names]
            feeds.update(zip(past_names, cache))
            cache, probed = run(feeds)
            yield probed
        bar.step()




def _save(path: Path, stats: ActivationStats) -> None:
    """Write to a temporary file and rename: an interrupted run leaves no entry that looks complete."""
    arrays = {"rows": np.asarray(stats.rows)}
    for kind in ("absmax", "histograms", "hessians"):
        for index, (name, value) in enumerate(sorted(getattr(stats, kind).items())):
            arrays[f"{kind}/{index}"] = value
            arrays[f"{kind}/{index}/name"] = np.asarray(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(prefix=".", suffix=".npz.partial", dir=path.parent)
    with os.fdopen(handle, "wb") as out:
        np.savez(out, **arrays)
    os.replace(partial, path)


def _load(path: Path) -> ActivationStats:
    stats = ActivationStats()
    with np.load(path) as data:
        stats.rows = int(data["rows"])
        for key in data.files:
            kind, _, rest = key.partition("/")
            if rest and not rest.endswith("/name"):
                getattr(stats, kind)[str(data[f"{key}/name"])] = data[key]
    return stats
