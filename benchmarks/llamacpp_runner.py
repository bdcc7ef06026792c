"""llama.cpp (through llama-cpp-python's C bindings) behind gptkiln's Runner interface, for the benchmarks' anchor rows.

What a llama.cpp user who batches runs (its `llama-batched` example, the server): one context with a sequence per
batch row, each step one `llama_decode` of a `llama_batch` holding every row's tokens (row r is sequence r), the
logits of the flagged positions read back. The context holds `rows` sequences of `max_length` positions each; the
default context settings otherwise (flash attention as llama.cpp picks it, f16 KV cache). The cache lives in the
context: `step` carries the next position instead. Equal-length, unpadded prompts only (the bench's).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gptkiln.models.spec import DecoderSpec
from gptkiln.targets.base import Runner


class LlamaCppRunner(Runner):
    def __init__(self, spec: DecoderSpec, path: str, max_length: int, rows: int, threads: int):
        import llama_cpp as ll
        from llama_cpp._logger import set_verbose

        super().__init__(spec)
        self.ll = ll
        set_verbose(False)  # llama.cpp's load and context logs
        ll.llama_backend_init()
        self.model = ll.llama_model_load_from_file(path.encode(), ll.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        params = ll.llama_context_default_params()
        params.n_ctx, params.n_seq_max = rows * max_length, rows
        params.n_batch = max(params.n_batch, rows * max_length)  # a whole batched prompt in one decode call
        params.n_threads = params.n_threads_batch = threads
        self.context = ll.llama_init_from_model(self.model, params)
        self.vocab = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(self.model))
        self.batch = ll.llama_batch_init(params.n_batch, 0, 1)
        self.kv_element_bytes = {ll.GGML_TYPE_F32: 4, ll.GGML_TYPE_F16: 2}[params.type_k]

    def empty_cache(self, batch: int, capacity: int = 0):
        return None  # the context is the cache: cleared by the prefill

    def step(self, input_ids, attention_mask, position_ids, cache, last_only: bool = False):
        if not attention_mask.all():
            raise ValueError("the llama.cpp anchor takes unpadded prompts only")
        ll, batch = self.ll, self.batch
        rows, length = input_ids.shape
        if cache is None:
            ll.llama_memory_clear(ll.llama_get_memory(self.context), True)
        start = cache or 0
        for i, (row, column) in enumerate(np.ndindex(rows, length)):
            batch.token[i], batch.pos[i] = int(input_ids[row, column]), start + column
            batch.n_seq_id[i], batch.seq_id[i][0] = 1, row
            batch.logits[i] = not last_only or column == length - 1
        batch.n_tokens = rows * length
        status = ll.llama_decode(self.context, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")
        outputs = rows if last_only else rows * length
        logits = np.ctypeslib.as_array(ll.llama_get_logits(self.context), shape=(outputs, self.vocab))
        return logits.reshape(rows, -1, self.vocab).copy(), start + length


def load_llamacpp(path: str, spec: dict, max_length: int, rows: int, threads: int):
    runner = LlamaCppRunner(DecoderSpec.from_dict(spec), path, max_length, rows, threads)
    return runner, {"kv_element_bytes": runner.kv_element_bytes}


GGUF_TYPES = ("F32", "Q8_0", "Q4_0", "Q4_K_M")  # the llama.cpp rows, as --gguf-dir names them
GGUF_PRECISION = {"F32": "fp32", "Q8_0": "int8 (Q8_0)", "Q4_0": "int4 (Q4_0)", "Q4_K_M": "int4 (Q4_K_M)"}


def gguf_files(directory: Path) -> dict[str, Path]:
    """DIR/*-{F32,Q8_0,Q4_0,Q4_K_M}.gguf (`convert_hf_to_gguf.py --outtype f32`, then `llama-quantize`)."""
    return {kind: found[0] for kind in GGUF_TYPES if (found := sorted(directory.glob(f"*-{kind}.gguf")))}


def gguf_tensor_bytes(path: Path) -> int:
    """The bytes of a GGUF file's tensors (what a decode step streams), without its tokenizer and metadata."""
    from gguf import GGUFReader

    return sum(int(tensor.n_bytes) for tensor in GGUFReader(str(path)).tensors)

