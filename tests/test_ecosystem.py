"""The ecosystem's own runtimes load a gptkiln output as it is and generate the tokens gptkiln generates:
onnxruntime-genai's Model/Generator on OUT/onnxruntime, openvino-genai's LLMPipeline on OUT/openvino.

Greedy token ids are compared for one prompt and a left-padded batch of two, for the reference model
(GPT-2), a tiny Llama (GQA, rotary) and a quantized form (weight-only int8). Real packages, nothing mocked.
"""

from __future__ import annotations

import json

import pytest

from gptkiln.config import BuildConfig, Precision
from gptkiln.pipeline import build
from gptkiln.runtime.generate import GenerationConfig, generate
from gptkiln.runtime.session import open_output

og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is in gptkiln[dev]")
ovg = pytest.importorskip("openvino_genai", reason="openvino-genai is in gptkiln[dev]")

PROMPTS = ["def main(", "import numpy as np\nx ="]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def builds(tmp_path_factory, tiny_model_dir):
    """name -> output directory, each built for onnxruntime and openvino."""
    made = {}
    for name, model, precision in (("reference", "reference", Precision.FP32),
                                   ("llama", str(tiny_model_dir("llama")), Precision.FP32),
                                   ("reference-int8", "reference", Precision.INT8)):
        output = tmp_path_factory.mktemp(name) / "out"
        build(BuildConfig(model=model, output=output, targets=("onnxruntime", "openvino"), precision=precision))
        made[name] = output
    return made


def gptkiln_tokens(output, target: str, prompts: list[str]) -> list[list[int]]:
    session = open_output(output, target)
    ids = [session.codec.encode(p) for p in prompts]
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, eos_token_ids=session.codec.eos_token_ids,
                              pad_token_id=session.codec.pad_token_id)
    return generate(session.runner, ids, config)


def genai_tokens(directory, prompts: list[str]) -> list[list[int]]:
    model = og.Model(str(directory))
    tokenizer = og.Tokenizer(model)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=64, batch_size=len(prompts))
    generator = og.Generator(model, params)
    generator.append_tokens(tokenizer.encode_batch(prompts))
    for _ in range(NEW_TOKENS):
        if generator.is_done():
            break
        generator.generate_next_token()
    return [list(generator.get_sequence(row)) for row in range(len(prompts))]


def plain_text_config(max_new_tokens: int = NEW_TOKENS):
    """Greedy, the prompt as it is: openvino-genai puts a string through the chat template where the model has one."""
    config = ovg.GenerationConfig()
    config.max_new_tokens, config.do_sample, config.apply_chat_template = max_new_tokens, False, False
    return config


def assert_same_new_tokens(ours: list[list[int]], theirs: list[list[int]], width: int) -> None:
    """theirs: whole sequences (left-padded prompt + new tokens, padded after a row's EOS)."""
    for row, new in enumerate(ours):
        assert theirs[row][width:width + len(new)] == new, f"row {row}"


@pytest.mark.parametrize("name", ["reference", "llama", "reference-int8"])
def test_onnxruntime_genai_generates_gptkiln_tokens(builds, name):
    output = builds[name]
    config = json.loads((output / "onnxruntime" / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] is True  # the in-place cache, one buffer per layer
    for prompts in (PROMPTS[:1], PROMPTS):
        ours = gptkiln_tokens(output, "onnxruntime", prompts)
        codec = open_output(output, "onnxruntime").codec
        width = max(len(codec.encode(p)) for p in prompts)
        assert_same_new_tokens(ours, genai_tokens(output / "onnxruntime", prompts), width)


@pytest.mark.parametrize("name", ["reference", "llama", "reference-int8"])
def test_openvino_genai_pipeline_generates_gptkiln_tokens(builds, name):
    output = builds[name]
    pipeline = ovg.LLMPipeline(str(output / "openvino"), "CPU", INFERENCE_PRECISION_HINT="f32")
    session = open_output(output, "openvino")
    for prompts in (PROMPTS[:1], PROMPTS):
        ours = gptkiln_tokens(output, "openvino", prompts)
        theirs = pipeline.generate(prompts, plain_text_config()).texts
        assert theirs == [session.codec.decode(new) for new in ours]


def test_openvino_ir_carries_the_kv_cache_precision_it_was_proven_with(builds):
    """A caller that passes no config (as openvino-genai does) gets the build's f32 KV cache, not the CPU
    plugin's default u8; the IR records every pinned option."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(builds["reference"] / "openvino" / "openvino_model.xml"))
    assert model.get_rt_info(["runtime_options", "INFERENCE_PRECISION_HINT"]).astype(str) == "f32"
    assert core.compile_model(model, "CPU").get_property("KV_CACHE_PRECISION") == ov.Type.f32


def test_manifest_names_the_ecosystem_files(builds):
    manifest = json.loads((builds["reference"] / "manifest.json").read_text())
    onnxruntime = manifest["targets"]["onnxruntime"]["settings"]["ecosystem"]
    openvino = manifest["targets"]["openvino"]["settings"]["ecosystem"]
    assert onnxruntime["onnxruntime_genai"] == "genai_config.json"
    assert openvino["openvino_genai"] == "openvino_tokenizer.xml"
    for target in ("onnxruntime", "openvino"):
        assert {"tokenizer.json", "generation_config.json", "config.json"} <= set(manifest["targets"][target]
                                                                                 ["settings"]["ecosystem"]
                                                                                 ["model_files"])
        assert f"{target}/tokenizer.json" in manifest["files"]  # hashed, verified and packed like the engine


def test_the_ecosystem_runtimes_run_smollm2_as_gptkiln_does(smollm2_build):
    """The real checkpoint (GQA 9/3, tied embedding, a chat template): onnxruntime-genai's tokens for a left-padded
    batch, and openvino-genai's own chat (its template, its stop tokens) against `gptkiln generate --chat`."""
    import gptkiln

    _, output = smollm2_build
    for prompts in (PROMPTS[:1], PROMPTS):
        ours = gptkiln_tokens(output, "onnxruntime", prompts)
        codec = open_output(output, "onnxruntime").codec
        width = max(len(codec.encode(p)) for p in prompts)
        assert_same_new_tokens(ours, genai_tokens(output / "onnxruntime", prompts), width)
    pipeline = ovg.LLMPipeline(str(output / "openvino"), "CPU", INFERENCE_PRECISION_HINT="f32")
    config = plain_text_config(max_new_tokens=32)
    config.apply_chat_template = True
    message = "What is the capital of France?"
    ours = gptkiln.load(output, "openvino").generate(message, chat=True, max_new_tokens=32)
    assert pipeline.generate([message], config).texts == [ours] and "Paris" in ours
