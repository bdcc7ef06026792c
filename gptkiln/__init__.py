"""gptkiln: export GPT-style decoders to verified inference engines.

The Python API (gptkiln.api): export, verify, load, build, pack, compress.
"""

from gptkiln.api import build, compress, export, load, pack, verify

__version__ = "0.1.0"
__all__ = ["build", "compress", "export", "load", "pack", "verify"]
