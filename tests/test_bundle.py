"""Bundles: packed reproducibly; `gptkiln run` refuses anything it cannot trust before loading it,
then generates with only the target's runtime."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import textwrap

import pytest

from gptkiln.cli import main

PROMPT = "def fibonacci(n):"


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def bundle(reference_build, tmp_path_factory):
    _, output = reference_build
    path = tmp_path_factory.mktemp("bundle") / "reference.kiln.tar"
    assert main(["pack", str(output), "-o", str(path)]) == 0
    return path


def read_members(path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def write_bundle(path, members: dict[str, bytes], extra: list[tarfile.TarInfo] = ()):
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info)
    return path


def edit_manifest(members, change) -> dict[str, bytes]:
    manifest = json.loads(members["bundle.json"])
    change(manifest)
    return {**members, "bundle.json": json.dumps(manifest).encode()}


def test_pack_is_reproducible_and_self_describing(bundle, reference_build, tmp_path):
    _, output = reference_build
    again = tmp_path / "again.kiln.tar"
    assert main(["pack", str(output), "-o", str(again)]) == 0
    assert again.read_bytes() == bundle.read_bytes()
    manifest = json.loads(read_members(bundle)["bundle.json"])
    assert set(manifest["files"]) == set(read_members(bundle)) - {"bundle.json"}
    target = manifest["targets"]["onnxruntime"]
    assert target["requires"]["runtime"] == "onnxruntime" and target["requires"]["device"] == "cpu"
    assert target["gate"]["passed"] and manifest["io_contract"]["inputs"][0]["name"] == "input_ids"


def test_run_matches_generate_from_the_output(bundle, reference_build, capsys):
    _, output = reference_build
    code, out, err = run_cli(capsys, "run", bundle, "--prompt", PROMPT, "--json")
    assert code == 0, err
    code, expected, _ = run_cli(capsys, "generate", output, "--prompt", PROMPT, "--json")
    assert json.loads(out)["completions"] == json.loads(expected)["completions"]
    assert json.loads(out)["completions"][0].strip()


def test_run_needs_no_torch_transformers_or_onnx(bundle):
    script = textwrap.dedent(f"""
        import sys
        for name in ("torch", "transformers", "onnx", "onnx_ir", "onnxscript"):
            sys.modules[name] = None  # any import of them fails
        from gptkiln.cli import main
        sys.exit(main(["run", {str(bundle)!r}, "--prompt", {PROMPT!r}, "--max-new-tokens", "8"]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert PROMPT in proc.stdout


def test_a_changed_file_is_refused(bundle, tmp_path, capsys):
    members = read_members(bundle)
    data = bytearray(members["onnxruntime/model.onnx.data"])
    data[1000] ^= 0xFF
    tampered = write_bundle(tmp_path / "t.kiln.tar", {**members, "onnxruntime/model.onnx.data": bytes(data)})
    code, _, err = run_cli(capsys, "run", tampered, "--prompt", PROMPT)
    assert code == 13 and "onnxruntime/model.onnx.data" in err and "sha256" in err


def test_unlisted_and_missing_files_are_refused(bundle, tmp_path, capsys):
    members = read_members(bundle)
    extra = write_bundle(tmp_path / "e.kiln.tar", {**members, "onnxruntime/extra.py": b"print('hi')"})
    code, _, err = run_cli(capsys, "run", extra, "--prompt", PROMPT)
    assert code == 13 and "not listed: onnxruntime/extra.py" in err
    missing = write_bundle(tmp_path / "m.kiln.tar", {k: v for k, v in members.items() if k != "tokenizer.json"})
    code, _, err = run_cli(capsys, "run", missing, "--prompt", PROMPT)
    assert code == 13 and "missing: tokenizer.json" in err


@pytest.mark.parametrize("name", ["../evil.txt", "/etc/evil.txt", "onnxruntime/../../evil.txt"])
def test_paths_that_leave_the_bundle_are_refused(bundle, tmp_path, capsys, name):
    members = read_members(bundle)
    evil = write_bundle(tmp_path / "p.kiln.tar", {**members, name: b"x"})
    code, _, err = run_cli(capsys, "run", evil, "--prompt", PROMPT)
    assert code == 13 and "leaves the bundle" in err
    assert not (tmp_path.parent / "evil.txt").exists()


def test_links_are_refused(bundle, tmp_path, capsys):
    link = tarfile.TarInfo("onnxruntime/weights")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    evil = write_bundle(tmp_path / "l.kiln.tar", read_members(bundle), [link])
    code, _, err = run_cli(capsys, "run", evil, "--prompt", PROMPT)
    assert code == 13 and "a link" in err


def test_external_data_that_leaves_the_bundle_is_refused(bundle, tmp_path, capsys):
    """An ONNX file whose weights point outside the bundle, even with matching hashes in bundle.json."""
    import hashlib

    import onnx

    members = read_members(bundle)
    model = onnx.load_from_string(members["onnxruntime/model.onnx"])
    tensor = next(t for t in model.graph.initializer if t.external_data)
    next(e for e in tensor.external_data if e.key == "location").value = "../../../etc/passwd"
    data = model.SerializeToString()

    def rehash(manifest):
        manifest["files"]["onnxruntime/model.onnx"] = hashlib.sha256(data).hexdigest()

    evil = write_bundle(tmp_path / "x.kiln.tar", edit_manifest({**members, "onnxruntime/model.onnx": data}, rehash))
    code, _, err = run_cli(capsys, "run", evil, "--prompt", PROMPT)
    assert code == 13 and "../../../etc/passwd" in err and "outside the bundle" in err


def test_wrong_target_and_unfit_machine_are_refused(bundle, tmp_path, capsys):
    code, _, err = run_cli(capsys, "run", bundle, "--target", "openvino", "--prompt", PROMPT)
    assert code == 2 and "has no 'openvino' build" in err and "onnxruntime" in err

    def newer_runtime(manifest):
        manifest["targets"]["onnxruntime"]["requires"]["minimum_version"] = "99.0"

    members = read_members(bundle)
    future = write_bundle(tmp_path / "f.kiln.tar", edit_manifest(members, newer_runtime))
    code, _, err = run_cli(capsys, "run", future, "--prompt", PROMPT)
    assert code == 8 and "proven with onnxruntime 99.0" in err

    def for_a_gpu(manifest):
        entry = manifest["targets"].pop("onnxruntime")
        entry["requires"] = {"runtime": "tensorrt", "minimum_version": "10.14.1", "device": "cuda",
                             "engine": {"tensorrt": "10.14.1", "compute_capability": "9.0",
                                        "hardware_compatibility": "none", "version_compatible": False}}
        manifest["targets"]["tensorrt"] = entry

    gpu = write_bundle(tmp_path / "g.kiln.tar", edit_manifest(members, for_a_gpu))
    code, _, err = run_cli(capsys, "run", gpu, "--prompt", PROMPT)
    assert code == 8 and "tensorrt" in err and "TensorRT 10.14.1 or newer" in err


def test_not_a_bundle(tmp_path, capsys):
    (tmp_path / "x.kiln.tar").write_bytes(b"not a tar")
    code, _, err = run_cli(capsys, "run", tmp_path / "x.kiln.tar", "--prompt", PROMPT)
    assert code == 13 and "not a readable tar archive" in err


def test_external_locations_match_onnx(reference_build):
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    from gptkiln.onnx_external import external_locations

    _, output = reference_build
    path = output / "onnxruntime" / "model.onnx"
    model = onnx.load(path, load_external_data=False)
    expected = [e.value for t in _get_all_tensors(model) if uses_external_data(t)
                for e in t.external_data if e.key == "location"]
    assert expected and external_locations(path.read_bytes()) == expected
