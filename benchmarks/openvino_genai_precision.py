"""What openvino-genai's LLMPipeline computes on a gptkiln OpenVINO output with its own default config, against
the f32 the build was proven with (INFERENCE_PRECISION_HINT="f32"): 32 greedy tokens for each of 8 prompts, the
prompt as it is (apply_chat_template=False), one prompt at a time and then as one left-padded batch.

    python benchmarks/openvino_genai_precision.py OUT/openvino

On a CPU with native bf16, the default compiles the engine in bf16 (the IR's rt_info cannot pin the inference
precision in OpenVINO 2026.4; README, "The ecosystem's own runtimes").
"""

from __future__ import annotations

import argparse

import openvino_genai

PROMPTS = ["def main(", "import numpy as np\nx =", "The capital of France is", "class Stack:\n    def push(self, item):",
           "for i in range(10):", "Once upon a time", "SELECT name FROM", "# Sort a list in Python\n"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="a gptkiln output's openvino/ directory")
    args = parser.parse_args()
    config = openvino_genai.GenerationConfig()
    config.max_new_tokens, config.do_sample, config.apply_chat_template = 32, False, False
    proven = openvino_genai.LLMPipeline(args.directory, "CPU", INFERENCE_PRECISION_HINT="f32")
    default = openvino_genai.LLMPipeline(args.directory, "CPU")
    same = 0
    for prompt in PROMPTS:
        a, b = proven.generate(prompt, config), default.generate(prompt, config)
        same += a == b
        print(f"{prompt!r:44} {'same' if a == b else 'differs'}")
    print(f"one prompt at a time: {same}/{len(PROMPTS)} continuations identical")
    a, b = proven.generate(PROMPTS, config).texts, default.generate(PROMPTS, config).texts
    print(f"as one left-padded batch: {sum(x == y for x, y in zip(a, b))}/{len(PROMPTS)} identical")


if __name__ == "__main__":
    main()
