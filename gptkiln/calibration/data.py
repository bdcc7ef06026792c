"""Calibration and evaluation text: files (plain text, JSONL, a directory) or any iterable of
strings, tokenized with the model's own tokenizer and cut into equal windows.

Every way a file can be unusable (missing, empty, binary, not UTF-8, bad JSONL, too short
for what was asked) is a CalibrationError that names the file and the fix: gptkiln never
falls back to random tokens.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptkiln.config import CalibrationSettings
from gptkiln.errors import CalibrationError

BINARY_PROBE = 8192  # bytes read to tell a binary file


@dataclass
class CalibrationSet:
    """`windows` [samples, seq_len] token ids; the last `decode_steps` of each are fed one at a time."""

    windows: np.ndarray
    decode_steps: int
    source: dict  # {"kind", "name", "tokens", "sha256"}: recorded in the manifest, part of the cache key

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.windows.tobytes() + str(self.decode_steps).encode()).hexdigest()

    def batches(self, batch_size: int) -> Iterable[np.ndarray]:
        for start in range(0, len(self.windows), batch_size):
            yield self.windows[start : start + batch_size]


def read_texts(path: Path, jsonl_field: str = "text") -> list[str]:
    """A text file, a JSONL file (one object per line, `jsonl_field` holding the text) or a
    directory of text files (read in name order, recursively; hidden files, empty files and Python's bytecode
    caches, __pycache__/, skipped)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CalibrationError(f"text data '{path}' does not exist", "give an existing text file, JSONL file or directory")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*")  # below `path` only: it may itself sit under ~/.pyenv
                       if p.is_file() and not any(_skipped(part) for part in p.relative_to(path).parts))
        if not files:
            raise CalibrationError(f"directory '{path}' holds no files", "put text files in it, or give a file")
        # an empty file in a tree of sources (a package's __init__.py) is no error; a tree of nothing is
        texts = [text for file in files if file.stat().st_size for text in read_texts(file, jsonl_field)]
        if not texts:
            raise CalibrationError(f"every file in directory '{path}' is empty", "put text in them, or give a file")
        return texts
    text = _read_utf8(path)
    if path.suffix == ".jsonl":
        return _jsonl_texts(path, text, jsonl_field)
    if not text.strip():
        raise CalibrationError(f"'{path}' is empty", "give a file with text in it")
    return [text]


def _skipped(part: str) -> bool:
    """A hidden file or directory, or the bytecode cache Python writes beside every imported source tree."""
    return part.startswith(".") or part == "__pycache__"


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    if b"\x00" in data[:BINARY_PROBE]:
        raise CalibrationError(f"'{path}' is a binary file (it contains NUL bytes)",
                               "give UTF-8 text: a .txt file, a .jsonl file or a directory of text files")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise CalibrationError(f"'{path}' is not UTF-8 text (invalid byte 0x{data[exc.start]:02x} on line {line})",
                               "convert it to UTF-8, e.g. iconv -f latin1 -t utf-8") from None


def _jsonl_texts(path: Path, text: str, jsonl_field: str) -> list[str]:
    texts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"'{path}' line {number} is not JSON: {exc.msg}",
                                   "fix the line; a .jsonl file holds one JSON object per line") from None
        value = record.get(jsonl_field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            raise CalibrationError(f"'{path}' line {number} has no string field '{jsonl_field}'",
                                   "name the field that holds the text (--calibration-field)")
        texts.append(value)
    if not any(t.strip() for t in texts):
        raise CalibrationError(f"'{path}' holds no text in field '{jsonl_field}'", "give a file with text in it")
    return texts


def token_stream(texts: Iterable[str], tokenizer) -> np.ndarray:
    """All texts tokenized and joined, an end-of-text token between documents where the tokenizer has one."""
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for text in texts:
        if not isinstance(text, str):
            raise CalibrationError(f"calibration texts must be strings, got {type(text).__name__}",
                                   "pass an iterable of str")
        if ids:
            ids.extend(separator)
        ids.extend(tokenizer(text, verbose=False)["input_ids"])
    return np.asarray(ids, dtype=np.int64)


def calibration_set(texts: Iterable[str], tokenizer, settings: CalibrationSettings, name: str) -> CalibrationSet:
    """`settings.samples` windows of `settings.seq_len` tokens, chosen by seed among the
    non-overlapping windows of the text (an iterable of strings is the API form)."""
    if settings.samples < 1 or settings.seq_len < 2 or not 0 <= settings.decode_steps < settings.seq_len:
        raise CalibrationError(
            f"calibration needs samples >= 1 and 0 <= decode_steps < seq_len, got samples={settings.samples}, "
            f"seq_len={settings.seq_len}, decode_steps={settings.decode_steps}", "fix the calibration settings")
    stream = token_stream(texts, tokenizer)
    available = len(stream) // settings.seq_len
    if available < settings.samples:
        raise CalibrationError(
            f"'{name}' has {len(stream)} tokens: {available} windows of {settings.seq_len}, "
            f"fewer than the {settings.samples} samples asked",
            f"give more text (>= {settings.samples * settings.seq_len} tokens) or lower --calibration-samples")
    chosen = np.sort(np.random.default_rng(settings.seed).permutation(available)[: settings.samples])
    windows = np.stack([stream[i * settings.seq_len : (i + 1) * settings.seq_len] for i in chosen])
    source = {"name": name, "tokens": int(len(stream)), "samples": settings.samples, "seq_len": settings.seq_len,
              "decode_steps": settings.decode_steps, "seed": settings.seed}
    result = CalibrationSet(windows, settings.decode_steps, source)
    result.source["sha256"] = result.sha256
    return result

