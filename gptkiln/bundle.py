"""Bundles: one tar file per deployment that a device verifies before it loads anything.

    NAME.kiln.tar
      bundle.json        what is inside: sha256 of every file, IO contract, model, precision,
                         per target its requirements (runtime, device), settings and gate results
      tokenizer.json, tokenizer_config.json, chat_template.jinja, generation_config.json, config.json
      <target>/...       the engine files, as the build wrote them (with what the target's own
                         generation stack reads: gptkiln.ecosystem)

`pack` writes the tar reproducibly (sorted entries, fixed owner and mtime), so the same output
packs to the same bytes. `open_bundle` refuses, before loading: entries that are not plain files
or directories, paths that are absolute or leave the bundle, files missing from or not listed in
bundle.json, a file whose sha256 differs, an ONNX external-data location that leaves its target
directory, and a target this machine cannot run (runtime missing or too old, wrong GPU). Only
then is the target's runtime asked to load the engine; no torch and no transformers are used.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import tarfile
import tempfile
from pathlib import Path

from gptkiln.errors import ArtifactError, BundleError, TargetUnavailableError, UsageError
from gptkiln.manifest import BENCHMARK_FILE, read_manifest
from gptkiln.models.spec import DecoderSpec
from gptkiln.onnx_external import MalformedOnnx, external_locations

BUNDLE_MANIFEST = "bundle.json"
BUNDLE_FORMAT = "gptkiln-bundle/1"
SUFFIX = ".kiln.tar"


def pack(output: Path, destination: Path, targets: list[str] | None = None) -> dict:
    """Write the bundle of `output` (its verified files) for `targets` (default: every compiled one)."""
    from gptkiln.targets import get_target

    manifest = read_manifest(output)  # every file checked against the build's manifest
    compiled = [name for name, built in manifest["targets"].items() if built["compiled"]]
    chosen = targets or compiled
    for name in chosen:
        if name not in manifest["targets"]:
            raise UsageError(f"'{output}' has no '{name}' build", f"use one of: {', '.join(manifest['targets'])}")
        if name not in compiled:
            raise UsageError(f"'{output}' holds only the ONNX prepared for {name}, no engine to ship",
                             "build the engine on a machine with that runtime first, or pack another target")
    if not chosen:
        raise ArtifactError(f"'{output}' holds no compiled target", "export for a target this machine runs")
    files = {path: digest for path, digest in manifest["files"].items()
             if "/" not in path or path.split("/", 1)[0] in chosen}
    for name in chosen:
        check_external_data(output, name, files)
    body = {
        "format": BUNDLE_FORMAT,
        "created": manifest["created"],  # when the build was made: packing twice gives the same bytes
        "model": manifest["model"], "spec": manifest["spec"], "io_contract": manifest["io_contract"],
        "precision": manifest["precision"], "build_key": manifest.get("build", {}).get("key"),
        "versions": manifest["versions"], "gated_on": manifest.get("gated_on"),  # absent before it was recorded
        "targets": {name: _target_entry(get_target(name), manifest["targets"][name]) for name in chosen},
        "benchmark": _benchmark(output, manifest, chosen),
        "files": files,
    }
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(prefix=f".{destination.name}.", dir=destination.parent)
    try:
        with os.fdopen(handle, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            _add(tar, BUNDLE_MANIFEST, io.BytesIO(json.dumps(body, indent=2).encode() + b"\n"))
            for path in sorted(files):
                with open(output / path, "rb") as source:
                    _add(tar, path, source)
        os.chmod(partial, 0o644)  # mkstemp makes it private; a bundle is an ordinary file
        os.replace(partial, destination)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return body


def _benchmark(output: Path, manifest: dict, targets: list[str]) -> dict | None:
    """What `gptkiln bench` measured of this build on its machine (its rows for `targets` and PyTorch's);
    None when it has not been run, or was run on an earlier build."""
    path = output / BENCHMARK_FILE
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    if report.get("build_key") != manifest.get("build", {}).get("key"):
        return None
    rows = [{k: v for k, v in row.items() if k != "output"} for row in report["results"]
            if row["output"] is None or row["target"] in targets]  # the build machine's paths stay there
    return {"machine": report["machine"], "settings": report["settings"], "results": rows}


def _target_entry(target, built: dict) -> dict:
    from gptkiln.parity import worst_logits_rel

    parity = built["parity"]
    return {
        "requires": target.requirements(built["settings"]),
        "settings": {k: v for k, v in built["settings"].items() if k != "fusion"},
        "gate": {"passed": built["passed"], "accuracy": built["accuracy"],
                 "worst_logits_rel": worst_logits_rel(parity),
                 "min_top1_agreement": min(c["top1_agreement"] for c in parity["comparisons"]
                                           if c["top1_agreement"] is not None),
                 "greedy_matched": {g["name"]: f"{g['matched']}/{g['tokens']}" for g in parity["greedy"]}},
    }


def _add(tar: tarfile.TarFile, name: str, source) -> None:
    data = source.read()
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


class OpenedBundle:
    """A verified bundle, extracted into a private temporary directory (removed by close())."""

    def __init__(self, root: Path, manifest: dict, target: str, temporary: tempfile.TemporaryDirectory):
        self.root, self.manifest, self.target, self._temporary = root, manifest, target, temporary

    def session(self):
        from gptkiln.runtime.session import Session
        from gptkiln.runtime.text import TextCodec
        from gptkiln.targets import get_target

        spec = DecoderSpec.from_dict(self.manifest["spec"])
        return Session(self.target, get_target(self.target).load(self.root / self.target, spec), TextCodec(self.root))

    def close(self) -> None:
        self._temporary.cleanup()


def open_bundle(path: Path, target: str | None = None) -> OpenedBundle:
    """Verify the bundle and extract the files of one target; refuse with the reason on any doubt."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"bundle '{path}' does not exist", "give the path of a .kiln.tar written by gptkiln pack")
    try:
        tar = tarfile.open(path, mode="r:*")
    except (tarfile.TarError, OSError) as exc:
        raise BundleError(f"'{path}' is not a readable tar archive ({exc})", "pack the bundle again") from None
    with tar:
        members = _checked_members(tar, path)
        if BUNDLE_MANIFEST not in members:
            raise BundleError(f"'{path}' has no {BUNDLE_MANIFEST}: it is not a gptkiln bundle", "pack it with gptkiln pack")
        manifest = _read_bundle_manifest(tar, members[BUNDLE_MANIFEST], path)
        listed = manifest["files"]
        extra = sorted(set(members) - set(listed) - {BUNDLE_MANIFEST})
        missing = sorted(set(listed) - set(members))
        if extra or missing:
            raise BundleError(f"'{path}' does not match its {BUNDLE_MANIFEST}: "
                              + "; ".join(filter(None, [extra and f"not listed: {', '.join(extra)}",
                                                        missing and f"missing: {', '.join(missing)}"])),
                              "use the bundle as gptkiln pack wrote it, or pack it again")
        chosen = _choose_target(manifest, target, path)
        temporary = tempfile.TemporaryDirectory(prefix="gptkiln-bundle-")
        root = Path(temporary.name)
        try:
            for name in sorted(listed):
                if "/" not in name or name.split("/", 1)[0] == chosen:
                    _extract(tar, members[name], root / name, listed[name], path)
            check_external_data(root, chosen, listed)
        except BaseException:
            temporary.cleanup()
            raise
    return OpenedBundle(root, manifest, chosen, temporary)


def _checked_members(tar: tarfile.TarFile, path: Path) -> dict[str, tarfile.TarInfo]:
    members = {}
    for member in tar.getmembers():
        name = member.name
        normalized = posixpath.normpath(name)
        if name.startswith("/") or normalized.startswith("..") or "\\" in name or normalized != name.rstrip("/"):
            raise BundleError(f"'{path}' holds the path '{name}', which leaves the bundle (or is not normal)",
                              "do not run this bundle; pack it again from the build output")
        if member.isdir():
            continue
        if not member.isfile():
            kind = "link" if member.issym() or member.islnk() else "special file"
            raise BundleError(f"'{path}' holds '{name}', a {kind}; bundles hold only plain files",
                              "do not run this bundle; pack it again from the build output")
        if name in members:
            raise BundleError(f"'{path}' holds '{name}' twice", "do not run this bundle; pack it again")
        members[name] = member
    return members


def _read_bundle_manifest(tar: tarfile.TarFile, member: tarfile.TarInfo, path: Path) -> dict:
    try:
        manifest = json.loads(tar.extractfile(member).read())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: {BUNDLE_MANIFEST} is not valid JSON ({exc})", "pack the bundle again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path}: {BUNDLE_MANIFEST} has format {manifest.get('format') if isinstance(manifest, dict) else None!r}; "
                          f"this gptkiln reads {BUNDLE_FORMAT!r}", "pack it again with this version of gptkiln")
    return manifest


def _choose_target(manifest: dict, requested: str | None, path: Path) -> str:
    """The requested target, or the first this machine can run; refuse with every reason otherwise."""
    from gptkiln.targets import TARGETS, get_target

    available = manifest["targets"]
    if requested is not None and requested not in available:
        raise UsageError(f"bundle '{path}' has no '{requested}' build", f"use one of: {', '.join(available)}")
    reasons = {}
    for name in [requested] if requested else list(available):
        if name not in TARGETS:
            reasons[name] = [f"this gptkiln does not know the target '{name}'"]
            continue
        problems = get_target(name).host_problems(available[name]["requires"])
        if not problems:
            return name
        reasons[name] = problems
    raise TargetUnavailableError(f"this machine cannot run bundle '{path}': "
                                 + "; ".join(f"{name}: {', '.join(lines)}" for name, lines in reasons.items()),
                                 "install what is named, or run the bundle on the machine it was built for")


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo, destination: Path, expected: str, path: Path) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with tar.extractfile(member) as source, open(destination, "wb") as sink:
        for block in iter(lambda: source.read(1 << 20), b""):
            digest.update(block)
            sink.write(block)
    if digest.hexdigest() != expected:
        raise BundleError(f"'{member.name}' in '{path}' does not match its sha256 in {BUNDLE_MANIFEST} "
                          "(changed or damaged)", "do not run this bundle; pack it again from the build output")


def check_external_data(root: Path, target: str, files: dict[str, str]) -> None:
    """Every ONNX file of the target may point only at files of its own directory that the bundle holds."""
    for onnx_path in sorted((root / target).glob("*.onnx")):
        try:
            locations = external_locations(onnx_path.read_bytes())
        except MalformedOnnx as exc:
            raise BundleError(f"'{onnx_path.relative_to(root)}' is not a valid ONNX file ({exc})",
                              "pack the bundle again from the build output") from None
        for location in sorted(set(locations)):
            resolved = posixpath.normpath(posixpath.join(target, location))
            if location.startswith("/") or "\\" in location or ".." in location.split("/") \
                    or resolved not in files:
                raise BundleError(f"'{onnx_path.relative_to(root)}' points its weights at '{location}', which is "
                                  "outside the bundle's files", "do not run this bundle; it was not written by gptkiln")
