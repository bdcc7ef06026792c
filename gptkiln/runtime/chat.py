"""A model's chat template (Jinja) rendered without transformers, the way transformers renders it.

The template comes with the checkpoint and is run in Jinja's immutable sandbox (no attribute access to
Python internals, no mutation), with transformers' settings (trim_blocks, lstrip_blocks) and the names
templates use: `messages`, `add_generation_prompt`, the special tokens, `raise_exception`, `tojson`,
`strftime_now`.
"""

from __future__ import annotations

import json
from datetime import datetime

from gptkiln.errors import UsageError


def render(template: str, messages: list[dict], special_tokens: dict, add_generation_prompt: bool = True) -> str:
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise UsageError("--chat needs jinja2 to render the model's chat template", "pip install jinja2") from None

    def raise_exception(message):
        raise TemplateError(message)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent, ensure_ascii=False)
    environment.globals.update(raise_exception=raise_exception,
                               strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return environment.from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            **{name: token for name, token in special_tokens.items() if token})
    except TemplateError as exc:
        raise UsageError(f"the model's chat template failed on this conversation: {exc}",
                         "the template came with the checkpoint: fix it there, or pass the text as --prompt") from None
