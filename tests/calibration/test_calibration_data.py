"""Calibration text: every accepted form, and a clear CalibrationError for every unusable one."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gptkiln.calibration.data import calibration_set, read_texts
from gptkiln.config import CalibrationSettings
from gptkiln.errors import CalibrationError
from gptkiln.models.loading import load_model

SMALL = CalibrationSettings(samples=4, seq_len=32, decode_steps=8)


@pytest.fixture(scope="module")
def tokenizer():
    return load_model("reference").tokenizer


def test_text_jsonl_directory_and_iterable_give_the_same_windows(tmp_path, calibration_text, tokenizer):
    text = calibration_text.read_text()
    (tmp_path / "data.jsonl").write_text(json.dumps({"body": text}) + "\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text(text)
    forms = [read_texts(calibration_text), read_texts(tmp_path / "data.jsonl", "body"), read_texts(tmp_path / "docs"), [text]]
    windows = [calibration_set(texts, tokenizer, SMALL, "x").windows for texts in forms]
    assert windows[0].shape == (4, 32)
    for other in windows[1:]:
        np.testing.assert_array_equal(windows[0], other)


def test_windows_follow_the_seed(calibration_text, tokenizer):
    texts = read_texts(calibration_text)
    first = calibration_set(texts, tokenizer, SMALL, "x")
    again = calibration_set(texts, tokenizer, SMALL, "x")
    other = calibration_set(texts, tokenizer, CalibrationSettings(samples=4, seq_len=32, decode_steps=8, seed=1), "x")
    assert first.sha256 == again.sha256 != other.sha256
    assert first.source["decode_steps"] == 8 and first.source["tokens"] > 10_000


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"   \n\n", "is empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary file"),
    (b"caf\xe9 au lait\nline two\xff", "not UTF-8 text (invalid byte 0xe9 on line 1)"),
])
def test_unusable_text_files(tmp_path, content, message):
    path = tmp_path / "data.txt"
    path.write_bytes(content)
    with pytest.raises(CalibrationError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        read_texts(path)
    assert error.value.fix and error.value.exit_code == 11


def test_bad_jsonl(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(CalibrationError, match="line 2 is not JSON"):
        read_texts(path)
    path.write_text('{"text": "fine"}\n{"other": "x"}\n')
    with pytest.raises(CalibrationError, match="line 2 has no string field 'text'"):
        read_texts(path)


def test_missing_path_and_empty_directory(tmp_path):
    with pytest.raises(CalibrationError, match="does not exist"):
        read_texts(tmp_path / "nope.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match="holds no files"):
        read_texts(tmp_path / "empty")


def test_too_few_tokens_names_the_numbers(tokenizer):
    with pytest.raises(CalibrationError, match=r"fewer than the 4 samples asked") as error:
        calibration_set(["def f(x):\n    return x\n"], tokenizer, SMALL, "tiny.txt")
    assert "lower --calibration-samples" in error.value.fix


def test_a_directory_below_a_hidden_one_is_read_and_its_own_hidden_files_skipped(tmp_path):
    """e.g. the standard library's email/ of a pyenv Python (~/.pyenv/versions/.../email), with the bytecode
    Python wrote beside it once anything imported it."""
    data = tmp_path / ".pyenv" / "lib" / "email"
    (data / ".cache").mkdir(parents=True)
    (data / "__pycache__").mkdir()
    (data / "__pycache__" / "parser.cpython-311.pyc").write_bytes(b"\xa7\r\r\n\x00\x00\x00\x00")
    (data / "parser.py").write_text("def parse(): pass\n")
    (data / "__init__.py").write_text("")  # an empty file in a package is skipped, not an error
    (data / ".hidden.txt").write_text("skipped\n")
    (data / ".cache" / "x.txt").write_text("skipped too\n")
    assert read_texts(data) == ["def parse(): pass\n"]
