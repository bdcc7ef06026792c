"""manifest.json: what an output directory holds, where it came from, and how it was proven.

It is written last; its file list (sha256 of every file) is what `verify` checks first.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path

from gptkiln.errors import ArtifactError

MANIFEST = "manifest.json"
# written by `gptkiln bench` beside the manifest; not part of the build (a rebuild drops them)
BENCHMARK_FILE, BENCHMARK_CHART = "benchmark.json", "benchmark.png"
FORMAT = "gptkiln/1"
VERSIONED_PACKAGES = ("gptkiln", "torch", "transformers", "onnx", "onnxscript", "onnx-ir", "onnxruntime")


def tool_versions() -> dict:
    versions = {"python": platform.python_version()}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


# the CPU features the runtimes' kernels choose between (x86, then Arm): int8 activations and bf16 round
# differently on each, so an accuracy gate holds for the host it was measured on
KERNEL_FEATURES = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                   "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16",
                   "asimd", "asimddp", "i8mm", "bf16", "sve", "sve2")


def host_cpu() -> dict:
    """The build host's CPU: its model and the kernel-relevant features it has (Linux reads them; elsewhere
    the features are unknown, None)."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())  # the first processor's
    except OSError:
        pass
    flags = fields.get("flags", fields.get("Features"))
    model = fields.get("model name") or fields.get("Hardware") or platform.processor() or platform.machine()
    return {"machine": platform.machine(), "model": model,
            "features": None if flags is None else [f for f in KERNEL_FEATURES if f in flags.split()]}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_hashes(root: Path, exclude: str = MANIFEST) -> dict[str, str]:
    """sha256 of every file below root (by its relative POSIX path), but the top-level `exclude`."""
    return {p.relative_to(root).as_posix(): sha256_file(p)
            for p in sorted(root.rglob("*")) if p.is_file() and p.relative_to(root).as_posix() != exclude}


def write_manifest(root: Path, body: dict) -> dict:
    manifest = {"format": FORMAT, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                **body, "files": file_hashes(root)}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(root: Path, check_files: bool = True) -> dict:
    path = root / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"'{root}' has no {MANIFEST}: it is not a gptkiln output (or its build did not finish)",
                            "point at a directory written by `gptkiln export`, or export again")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc})", "export again") from None
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} has format {manifest.get('format')!r}, this gptkiln reads {FORMAT!r}",
                            "export again with this version of gptkiln")
    if check_files:
        verify_files(root, manifest["files"])
    return manifest


def verify_files(root: Path, expected: dict[str, str]) -> None:
    problems = []
    for name, digest in expected.items():
        path = root / name
        if not path.is_file():
            problems.append(f"missing {name}")
        elif sha256_file(path) != digest:
            problems.append(f"changed {name}")
    if problems:
        raise ArtifactError(f"'{root}' does not match its manifest: {', '.join(problems)}",
                            "restore the files or export again")
