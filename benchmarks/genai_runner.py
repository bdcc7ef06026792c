"""onnxruntime-genai's own runtime behind gptkiln's Runner interface, for the benchmarks' anchor rows.

Its Generator is what an onnxruntime-genai user runs: the builder's graph (GroupQueryAttention
with a past/present buffer of max_length), IO binding and its own greedy search. A step here is
what it is for that user: the prompt goes in with append_tokens, every later step is one
generate_next_token (the token it picks is the argmax gptkiln's loop picks too). Equal-length,
unpadded prompts only (the bench's); max_length is the bench's prompt + new tokens, as a user sets it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from gptkiln.models.spec import DecoderSpec
from gptkiln.targets.base import Runner


class GenaiRunner(Runner):
    def __init__(self, spec: DecoderSpec, model, max_length: int):
        super().__init__(spec)
        self.model, self.max_length = model, max_length

    def empty_cache(self, batch: int, capacity: int = 0):
        return None  # the Generator is the cache: made by the prefill

    def step(self, input_ids, attention_mask, position_ids, cache, last_only: bool = False):
        import onnxruntime_genai as og

        if not attention_mask.all():
            raise ValueError("the onnxruntime-genai anchor takes unpadded prompts only")
        if cache is None:
            params = og.GeneratorParams(self.model)
            params.set_search_options(batch_size=input_ids.shape[0], max_length=self.max_length, do_sample=False)
            cache = og.Generator(self.model, params)
            cache.append_tokens(input_ids.astype(np.int32))
        else:
            cache.generate_next_token()
        return cache.get_logits(), cache


def load_genai(directory: str, spec: dict, max_length: int, threads: int):
    import onnxruntime_genai as og

    config = og.Config(directory)
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    return GenaiRunner(DecoderSpec.from_dict(spec), og.Model(config), max_length), {}


def genai_precisions(directory: Path) -> dict[str, Path]:
    """DIR/{fp32,int8,int4}: builder outputs (`python -m onnxruntime_genai.models.builder -p P -e cpu`)."""
    return {precision: directory / precision for precision in ("fp32", "int8", "int4")
            if (directory / precision / "genai_config.json").is_file()}
