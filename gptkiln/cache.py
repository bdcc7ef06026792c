"""Where gptkiln keeps what it can reuse between builds (calibration statistics, TensorRT timing caches)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    root = os.environ.get("GPTKILN_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gptkiln"
    return Path(root)
