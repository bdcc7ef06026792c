"""The device side of the distribution: the built wheel installed in a fresh venv without the export extra
(`pip install 'gptkiln[onnxruntime]'`: numpy, tokenizers, jinja2, onnxruntime) runs a bundle, and the commands
that need the export stack say so with the install to run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv

import pytest

PROMPT = "def fibonacci(n):"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def edge_venv(tmp_path_factory):
    """A venv holding the gptkiln wheel with the onnxruntime extra only."""
    work = tmp_path_factory.mktemp("edge")
    subprocess.run([sys.executable, "-m", "pip", "wheel", ROOT, "--no-deps", "-q", "-w", str(work / "wheel")],
                   check=True, capture_output=True, timeout=600)
    wheel = next((work / "wheel").glob("gptkiln-*.whl"))
    venv.create(work / "venv", with_pip=True)
    python = work / "venv" / "bin" / "python"
    proc = subprocess.run([str(python), "-m", "pip", "install", "-q", f"{wheel}[onnxruntime]"],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        message = f"pip install of the wheel failed: {proc.stderr.strip()[-300:]}"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI reaches PyPI
        pytest.skip(message)
    return python


def gptkiln(python, *args: str):
    script = "import sys; from gptkiln.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([str(python), "-c", script, *args], capture_output=True, text=True, timeout=300,
                          cwd=python.parent)  # not the checkout: `import gptkiln` must find the installed wheel


def test_the_edge_install_has_no_export_stack(edge_venv):
    script = ("import importlib.util as u; print([m for m in ('torch', 'transformers', 'onnx', 'onnx_ir', 'onnxscript')"
              " if u.find_spec(m)])")
    found = subprocess.run([str(edge_venv), "-c", script], capture_output=True, text=True, cwd=edge_venv.parent)
    assert found.stdout.strip() == "[]"
    location = subprocess.run([str(edge_venv), "-c", "import gptkiln; print(gptkiln.__file__)"], capture_output=True,
                              text=True, cwd=edge_venv.parent).stdout
    assert "site-packages" in location


def test_the_edge_install_runs_a_bundle(edge_venv, reference_build, tmp_path):
    from gptkiln.cli import main

    _, output = reference_build
    bundle = tmp_path / "reference.kiln.tar"
    assert main(["pack", str(output), "-o", str(bundle), "--target", "onnxruntime"]) == 0
    ran = gptkiln(edge_venv, "run", str(bundle), "--prompt", PROMPT, "--max-new-tokens", "12", "--json")
    assert ran.returncode == 0, ran.stderr
    generated = gptkiln(edge_venv, "generate", str(output), "--target", "onnxruntime", "--prompt", PROMPT,
                        "--max-new-tokens", "12", "--json")
    assert json.loads(ran.stdout)["completions"] == json.loads(generated.stdout)["completions"]


def test_export_on_the_edge_install_names_the_extra(edge_venv, tmp_path):
    proc = gptkiln(edge_venv, "export", "reference", "-o", str(tmp_path / "out"))
    assert proc.returncode == 8 and "pip install 'gptkiln[export]'" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()
