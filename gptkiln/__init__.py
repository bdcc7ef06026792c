"""gptkiln: export GPT-style decoders to verified inference engines."""

__version__ = "0.1.0"
