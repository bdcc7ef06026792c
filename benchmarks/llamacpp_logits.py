"""llama.cpp's scores on evaluation windows, run in llama-cpp-python's own venv by anchor_accuracy.py.

    VENV/bin/python benchmarks/llamacpp_logits.py MODEL.gguf WINDOWS.npy OUT.npz [--threads 2]

Each [128] window of token ids is evaluated from an empty cache (no BOS added: the ids go in as they are)
with every position's logits kept; OUT.npz holds, per window and position 0..126, the float64 log-probability
of the next token (`target`) and the argmax (`top1`), computed as gptkiln.calibration.perplexity.score does.
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    import llama_cpp

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("windows")
    parser.add_argument("out")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    windows = np.load(args.windows)
    length = windows.shape[1]
    llm = llama_cpp.Llama(args.model, n_ctx=length, n_batch=length, logits_all=True, n_threads=args.threads,
                          n_threads_batch=args.threads, verbose=False)
    targets, top1 = [], []
    for ids in windows:
        llm.reset()  # n_tokens = 0: eval() then clears the KV cache from position 0
        llm.eval(ids.tolist())
        logits = np.asarray(llm.scores[:length], dtype=np.float64)[:-1]
        shifted = logits - logits.max(-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        targets.append(np.take_along_axis(log_probs, ids[1:, None], axis=-1)[:, 0])
        top1.append(log_probs.argmax(-1))
    np.savez(args.out, target=np.stack(targets), top1=np.stack(top1), version=llama_cpp.__version__)


if __name__ == "__main__":
    main()
