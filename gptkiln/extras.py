"""Which half of gptkiln this machine has: `pip install gptkiln` runs outputs and bundles (numpy, tokenizers,
a runtime); exporting, verifying against PyTorch, build files and benchmarks need `gptkiln[export]`."""

from __future__ import annotations

import importlib.util

from gptkiln.errors import TargetUnavailableError

EXPORT_MODULES = ("torch", "transformers", "safetensors", "onnx", "onnxscript", "onnx_ir", "yaml", "ml_dtypes")


def require_export_stack(command: str) -> None:
    """Refuse, before any work, a command that needs the export extra on a machine without it."""
    missing = [name for name in EXPORT_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise TargetUnavailableError(f"{command} needs gptkiln's export stack; not installed here: {', '.join(missing)}",
                                     "pip install 'gptkiln[export]' (running an output or a bundle needs only "
                                     "gptkiln and the target's runtime)")
