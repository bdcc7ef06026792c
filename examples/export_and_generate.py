"""Export a model, check what parity measured, and generate from the built engine.

    python examples/export_and_generate.py [MODEL] [OUT]      (default: reference out/example)
"""

from __future__ import annotations

import sys
from pathlib import Path

from gptkiln.config import BuildConfig
from gptkiln.pipeline import build
from gptkiln.runtime.generate import GenerationConfig
from gptkiln.runtime.session import open_output

model = sys.argv[1] if len(sys.argv) > 1 else "reference"
output = Path(sys.argv[2] if len(sys.argv) > 2 else "out/example")

result = build(BuildConfig(model=model, output=output, force=True))  # raises ParityError if not equal
for target in result.targets:
    worst = max(target.parity.comparisons, key=lambda c: c.rel)
    print(f"{target.name}: worst relative logit difference {worst.rel:.1e} ({worst.name})")

session = open_output(output)
for text in session.complete(["def read_config(path):", "class Parser:"], GenerationConfig(max_new_tokens=24)):
    print(repr(text))
