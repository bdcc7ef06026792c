"""A content-addressed cache of build stages: stage name + key (a hash of everything the stage
reads) -> a directory of files and a small JSON record.

An entry is built in a hidden temporary directory and renamed into place only after its files
and `entry.json` (their sha256 and the stage's record) are written and synced, so a build that
is interrupted (Ctrl-C, a kill, a crash) never leaves an entry that looks complete. A lookup
re-hashes the files; an entry that does not match (edited, truncated) is dropped and rebuilt.
A lock per key keeps parallel builds from building the same stage twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from gptkiln.manifest import file_hashes

ENTRY = "entry.json"
FORMAT = "gptkiln-stage/1"


def stage_key(*parts) -> str:
    """sha256 of the parts as canonical JSON (sorted keys): equal inputs, equal key."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class Entry:
    path: Path  # the directory holding the stage's files
    record: dict  # what the stage returned (JSON)
    hit: bool  # True: reused from the cache; False: built now


class StageCache:
    """`root` None: caching off (every stage builds, into a throwaway directory the caller owns)."""

    def __init__(self, root: Path | None):
        self.root = root

    def get_or_build(self, stage: str, key: str, produce: Callable[[Path], dict], scratch: Path) -> Entry:
        """The entry for (stage, key), building it with produce(directory) -> record when absent.
        Without a cache root the stage builds into `scratch`."""
        if self.root is None:
            scratch.mkdir(parents=True)
            return Entry(scratch, produce(scratch), hit=False)
        directory = self.root / stage
        directory.mkdir(parents=True, exist_ok=True)
        final = directory / key
        with _locked(directory / f"{key}.lock"):
            entry = self._read(final)
            if entry is not None:
                return entry
            for stale in directory.glob(f".{key}.*"):  # left by a build that was killed; we hold the lock
                shutil.rmtree(stale, ignore_errors=True)
            work = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=directory))
            try:
                record = produce(work)
                _write_json(work / ENTRY, {"format": FORMAT, "stage": stage, "key": key, "record": record,
                                           "files": file_hashes(work, exclude=ENTRY)})
                os.rename(work, final)
            finally:
                if work.exists():
                    shutil.rmtree(work, ignore_errors=True)
            return Entry(final, record, hit=False)

    def status(self, stage: str, key: str) -> bool:
        """Whether a complete entry exists (not re-hashed: for plans)."""
        return self.root is not None and (self.root / stage / key / ENTRY).is_file()

    @staticmethod
    def _read(final: Path) -> Entry | None:
        try:
            saved = json.loads((final / ENTRY).read_text())
        except (OSError, json.JSONDecodeError):
            saved = None
        if saved is not None and saved.get("format") == FORMAT and file_hashes(final, exclude=ENTRY) == saved["files"]:
            return Entry(final, saved["record"], hit=True)
        if final.exists():  # damaged or from another format: rebuild it
            shutil.rmtree(final, ignore_errors=True)
        return None


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w") as handle:
        handle.write(json.dumps(data, indent=1) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    for file in path.parent.rglob("*"):  # the stage's files reach the disk before the rename publishes them
        if file.is_file() and file != path:
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
