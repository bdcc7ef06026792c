"""The Python API (gptkiln.api) returns what the command line prints, refuses what it refuses, and the command
line is a layer over it: no module imports the CLI, and `import gptkiln` loads no torch."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import gptkiln
from gptkiln.cli import main
from gptkiln.errors import ArtifactError, UsageError

PACKAGE = Path(gptkiln.__file__).parent


@pytest.fixture(scope="module")
def api_output(tmp_path_factory):
    output = tmp_path_factory.mktemp("api") / "reference"
    return gptkiln.export("reference", output, targets=["onnxruntime"]), output


def test_export_returns_the_build_result_the_cli_prints(api_output, capsys):
    result, output = api_output
    assert result.ok and [t.name for t in result.targets] == ["onnxruntime"]
    assert main(["export", "reference", "-o", str(output), "--target", "onnxruntime", "--force", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["targets"] == result.to_dict()["targets"]


def test_load_generates_what_gptkiln_generate_prints(api_output, capsys):
    _, output = api_output
    model = gptkiln.load(output)
    text = model.generate("def main(", max_new_tokens=8)
    assert main(["generate", str(output), "--prompt", "def main(", "--max-new-tokens", "8", "--json"]) == 0
    assert [text] == json.loads(capsys.readouterr().out)["completions"]
    assert model.generate(["def main(", "x ="], max_new_tokens=8)[0] == text  # a batch: a list back
    pieces: list[str] = []
    assert model.generate("def main(", max_new_tokens=8, stream=pieces.append) == text == "".join(pieces)


def test_streamed_cli_output_is_the_completion(api_output, capsys):
    _, output = api_output
    expected = gptkiln.load(output).generate("def main(", max_new_tokens=8)
    assert main(["generate", str(output), "--prompt", "def main(", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == f"def main(\u2502{expected}\n"


def test_verify_and_pack_and_a_bundle_through_load(api_output, tmp_path):
    _, output = api_output
    assert gptkiln.verify(output).ok
    bundle = tmp_path / "reference.kiln.tar"
    assert "onnxruntime" in gptkiln.pack(output, bundle)["targets"]
    with gptkiln.load(bundle) as model:
        assert model.generate("def main(", max_new_tokens=8) == gptkiln.load(output).generate("def main(",
                                                                                          max_new_tokens=8)


def test_api_errors_are_the_cli_errors(api_output, tmp_path):
    _, output = api_output
    with pytest.raises(UsageError, match="unknown export option.*int4_blocksize"):
        gptkiln.export("reference", tmp_path / "x", int4_blocksize=64)
    with pytest.raises(UsageError, match="quantize must be one of"):
        gptkiln.export("reference", tmp_path / "x", quantize="int3")
    assert not (tmp_path / "x").exists()
    with pytest.raises(ArtifactError) as info:
        gptkiln.load(tmp_path)
    assert info.value.exit_code == 10


def test_no_module_imports_the_command_line():
    importers = []
    for path in PACKAGE.rglob("*.py"):
        if path.name in ("cli.py", "__main__.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module] if isinstance(node, ast.ImportFrom) else
                     [alias.name for alias in node.names] if isinstance(node, ast.Import) else [])
            if "gptkiln.cli" in names:
                importers.append(path.relative_to(PACKAGE).as_posix())
    assert importers == []


def test_importing_gptkiln_loads_no_export_stack():
    script = "import sys, gptkiln; print([m for m in ('torch', 'transformers', 'onnx', 'onnx_ir') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
