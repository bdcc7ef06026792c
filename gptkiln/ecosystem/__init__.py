"""Files that let each runtime's own generation stack load a target's directory as it is.

A target's directory holds, beside its engine files, copies of the model files every output gets
(tokenizer, chat template, generation and model config: `MODEL_FILES`), since onnxruntime-genai's
`Model(dir)`, openvino-genai's `LLMPipeline(dir)` and optimum's `from_pretrained(dir)` read them from
the engine's own directory; and what that stack needs on top (onnxruntime_genai.py, openvino_genai.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

MODEL_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
               "generation_config.json", "config.json")


def copy_model_files(model_files: Path, out_dir: Path) -> list[str]:
    """Copy the model files that exist in model_files into out_dir; return their names."""
    copied = [name for name in MODEL_FILES if (model_files / name).is_file()]
    for name in copied:
        shutil.copy(model_files / name, out_dir / name)
    return copied
