"""What the per-layer quantization studies share: a checkpoint, its fp32 PyTorch scores on the evaluation
text and its calibration windows, from the same command-line arguments."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gptkiln.calibration.data import calibration_set, read_texts
from gptkiln.calibration.perplexity import EvalText, Evaluation
from gptkiln.config import CalibrationSettings
from gptkiln.models.loading import load_model
from gptkiln.summary import text_table


def study_inputs(description: str, results_name: str, add_arguments=None):
    """(args, LoadedModel, Evaluation over the first 8192 tokens, CalibrationSet) for MODEL --calibration DIR
    --eval-text FILE [--out FILE] (default: results/<results_name>); `add_arguments(parser)` adds a script's own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("model")
    parser.add_argument("--calibration", type=Path, required=True)
    parser.add_argument("--eval-text", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / results_name)
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args()
    loaded = load_model(args.model)
    evaluation = Evaluation.prepare(loaded, EvalText.read(args.eval_text), 8192)
    settings = CalibrationSettings(path=args.calibration)
    calibration = calibration_set(read_texts(args.calibration), loaded.tokenizer, settings, str(args.calibration))
    return args, loaded, evaluation, calibration


def report(args, loaded, rows: list[tuple], variants) -> None:
    """The table on the terminal, the variants' records in --out."""
    print(text_table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": loaded.source, "variants": variants}, indent=1))


def in_roles(layer, spec, roles) -> bool:
    """The layer plays one of `roles` in every block ("v_proj", "down_proj", ...; "lm_head": the layer outside
    the blocks)."""
    return (("lm_head" in roles and spec.block_of(layer.name) is None)
            or any(f".{role}." in layer.name for role in roles if role != "lm_head"))
