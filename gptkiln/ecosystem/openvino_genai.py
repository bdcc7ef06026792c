"""The tokenizer as OpenVINO IRs: what openvino-genai's `LLMPipeline(dir, "CPU")` reads beside the
stateful openvino_model.xml (openvino_tokenizer.xml, openvino_detokenizer.xml; the chat template rides in
the tokenizer IR's rt_info). They are made by openvino-tokenizers from the model's transformers tokenizer.

The engine's compile config is written into the model IR's rt_info (`runtime_options`), where OpenVINO
reads it when a caller passes none. OpenVINO 2026.4's CPU plugin applies KV_CACHE_PRECISION and
DYNAMIC_QUANTIZATION_GROUP_SIZE from there, not INFERENCE_PRECISION_HINT: a pipeline on a CPU with native
bf16 computes in bf16 unless it passes INFERENCE_PRECISION_HINT="f32" (README).
"""

from __future__ import annotations

from pathlib import Path

TOKENIZER_IR, DETOKENIZER_IR = "openvino_tokenizer.xml", "openvino_detokenizer.xml"
RUNTIME_OPTIONS = "runtime_options"


def carry_runtime_options(model, config: dict) -> None:
    """Record the compile config the engine was proven with in the IR (threads are the host's, not the build's)."""
    for key, value in config.items():
        if key != "INFERENCE_NUM_THREADS":
            model.set_rt_info(str(value), [RUNTIME_OPTIONS, key])


def write_tokenizer_irs(out_dir: Path) -> str | None:
    """Write the tokenizer IRs from the model files in out_dir; return None, or why they were not written."""
    try:
        import openvino as ov
        from openvino_tokenizers import convert_tokenizer
        from transformers import AutoTokenizer
    except ImportError as exc:
        return f"openvino-genai's tokenizer IRs need openvino-tokenizers and transformers ({exc.name} is missing)"
    try:
        tokenizer, detokenizer = convert_tokenizer(AutoTokenizer.from_pretrained(out_dir), with_detokenizer=True)
    except Exception as exc:  # a tokenizer kind openvino-tokenizers does not convert
        return f"openvino-tokenizers cannot convert this tokenizer: {str(exc).splitlines()[0][:200]}"
    from gptkiln.targets.openvino import stable_names

    for model, name in ((tokenizer, TOKENIZER_IR), (detokenizer, DETOKENIZER_IR)):
        stable_names(model)  # the same bytes from every build
        ov.save_model(model, str(out_dir / name))
    return None
