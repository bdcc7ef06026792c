"""Files that let each runtime's own generation stack load a target's directory as it is.

A target's directory holds, beside its engine files, copies of the model files every output gets
(tokenizer, chat template, generation and model config: `save_model_files`), since onnxruntime-genai's
`Model(dir)`, openvino-genai's `LLMPipeline(dir)` and optimum's `from_pretrained(dir)` read them from
the engine's own directory; and what that stack needs on top (onnxruntime_genai.py, openvino_genai.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path



def save_model_files(model, tokenizer, directory: Path) -> None:
    """The tokenizer (with its chat template), the generation config (stop tokens, sampling defaults) and the
    model config: what generation from an output reads, gptkiln's and the ecosystem's runtimes alike."""
    tokenizer.save_pretrained(directory)
    model.config.save_pretrained(directory)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(directory)


def copy_model_files(model_files: Path, out_dir: Path) -> list[str]:
    """Copy every file save_model_files wrote into model_files to out_dir; return their names."""
    copied = sorted(path.name for path in model_files.iterdir() if path.is_file())
    for name in copied:
        shutil.copy(model_files / name, out_dir / name)
    return copied
