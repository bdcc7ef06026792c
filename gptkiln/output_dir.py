"""The output directory: refuse one we could lose data in, build beside it, publish by rename."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from gptkiln.errors import OutputError
from gptkiln.manifest import MANIFEST


def check_output(output: Path, force: bool, marker: str = MANIFEST) -> None:
    """Refuse an output we could lose data in: --force replaces only an earlier gptkiln output (a directory
    holding `marker`: manifest.json, or a compressed checkpoint's compression.json)."""
    if output.is_file():
        raise OutputError(f"output '{output}' is a file", "choose a directory path for -o")
    if not output.is_dir() or not any(output.iterdir()):
        return
    if not force:
        raise OutputError(f"output directory '{output}' exists and is not empty",
                          "choose another -o, or pass --force to replace an earlier gptkiln output")
    if output == Path.cwd() or output in Path.cwd().parents:
        raise OutputError(f"--force would replace '{output}', which holds the current directory",
                          "choose an output directory below the current one")
    if not (output / marker).is_file():
        raise OutputError(f"'{output}' is not a gptkiln output (no {marker}); --force replaces only those",
                          "choose another -o, or empty the directory yourself")


def make_work_dir(output: Path) -> Path:
    """The hidden sibling the build happens in (same file system, so publishing is a rename)."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
    except OSError as exc:
        raise OutputError(f"cannot write next to '{output}': {exc.strerror}",
                          "choose an -o location you can write to") from None
    work.chmod(0o755)  # mkdtemp makes it private; the published output is an ordinary directory
    return work


def publish(work: Path, output: Path, force: bool, marker: str = MANIFEST) -> None:
    """Rename the finished build into place. An old output (--force) is moved aside first and
    deleted only after the rename succeeded; if the rename fails it is moved back."""
    check_output(output, force, marker)  # the directory may have changed during the build
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        output.rename(old)
    try:
        work.rename(output)
    except OSError as exc:
        if old is not None:
            old.rename(output)
        raise OutputError(f"cannot move the finished build to '{output}': {exc.strerror}",
                          "check the permissions of the output location") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
