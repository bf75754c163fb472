"""Chat templates rendered as transformers renders them, so a prompt is the one the model was
trained on: jinja2's immutable sandbox with ``trim_blocks`` and ``lstrip_blocks``, loop
controls (``{% break %}``, ``{% continue %}``), ``{% generation %}`` blocks (transformers marks
the assistant's tokens with them; here they render their body), and the names templates call:
``tojson`` (JSON with non-ASCII kept, keys in their own order, ``indent`` / ``separators`` /
``sort_keys`` as asked; jinja's own escapes HTML characters and sorts keys),
``raise_exception`` and ``strftime_now``. Templates compile once each (cached)."""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    """What a template calls to refuse a conversation."""
    raise ValueError(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@functools.lru_cache(maxsize=16)
def compiled(template: str) -> Any:
    """The jinja2 template of ``template``'s text in the environment above."""
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlocks(Extension):
        tags = {"generation"}

        def parse(self, parser: Any) -> list[nodes.Node]:
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols, GenerationBlocks])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def render_template(template: str, **context: Any) -> str:
    return compiled(template).render(**context)
