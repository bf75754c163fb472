"""Chat messages -> one prompt string, through the tokenizer's chat template.

A tokenizer without a template gets ``DEFAULT_CHAT_TEMPLATE``: each message becomes
``<|role|>\\ncontent\\n`` and the prompt ends with ``<|assistant|>\\n`` (the model then writes
the assistant's turn). Templates render as transformers renders them (``bamba.chat_template``).
Message content may be a string or a list of OpenAI ``{"type": "text", "text": ...}`` parts,
which are joined; other part types (images, audio) are refused.
"""

from __future__ import annotations

from typing import Any

from bamba.chat_template import render_template
from bamba.sampling import ParameterError

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def message_text(content: str | list[dict[str, Any]] | None) -> str:
    """The text of one message's content (a string or a list of text parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    pieces = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ParameterError(f"messages: only text content parts are supported, "
                                 f"got {part.get('type')!r}", "messages")
        pieces.append(part["text"])
    return "".join(pieces)


def render_chat(tokenizer: Any, messages: list[dict[str, Any]],
                tools: list[dict[str, Any]] | None = None) -> str:
    """The prompt text for ``messages`` (dicts with "role" and "content"), and ``tools``
    (OpenAI's function definitions) for the templates that describe them to the model.

    The template usually writes the BOS token itself; when the tokenizer also adds one on
    encoding, the rendered leading BOS is dropped so the prompt does not start with two.
    Raises ParameterError when the template fails on these messages.
    """
    template = getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
    special = {k: v for k, v in getattr(tokenizer, "special", {}).items() if v is not None}
    turns = [{**m, "content": message_text(m.get("content"))} for m in messages]
    try:
        extra = {} if tools is None else {"tools": tools}
        text = render_template(template, messages=turns, add_generation_prompt=True, **special,
                               **extra)
    except Exception as exc:  # jinja raises many types (TemplateError, raise_exception(...))
        raise ParameterError(f"messages: the chat template failed on them: {exc}",
                             "messages") from None
    bos = special.get("bos_token")
    if bos and getattr(tokenizer, "add_bos_token", False) and text.startswith(bos):
        text = text[len(bos):]
    return text
