"""A checkpoint's Jinja chat template, rendered the way `transformers.apply_chat_template` renders it.

    text = render_chat(tok.chat_template, [{"role": "system", "content": "..."},
                                          {"role": "user", "content": "..."}],
                       add_generation_prompt=True, special_tokens=tok.special_tokens)

Rendering: a sandboxed Jinja environment with `trim_blocks` and `lstrip_blocks`, loop controls, a
`tojson` filter that does not escape HTML, `raise_exception` and `strftime_now` globals, and the special
tokens (`bos_token`, `eos_token`, …) as variables. `continue_final_message=True` renders the last
(assistant) message open-ended, so generation continues it (a reasoning prefix such as `<think>`).
"""

from __future__ import annotations

import datetime
import functools
import json
from typing import Mapping, Sequence

from models.jsonfile import read_json_object

_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


class ChatTemplateError(ValueError):
    """A template that does not parse, raises, or drops the message to be continued."""


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    try:
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # pragma: no cover - jinja2 is a core dependency
        raise ImportError("chat templates need the `jinja2` package") from e

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not parse: {e.message} (line {e.lineno})") from None


def render_chat(template: str, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True,
                continue_final_message: bool = False, special_tokens: Mapping[str, str] | None = None,
                **variables) -> str:
    """The text of `messages` (dicts with `role` and `content`) under `template`.

    Args:
      add_generation_prompt: append the opening of an assistant turn (the template's own).
      continue_final_message: end the text right after the last message's content, so that the model
        continues that message (mutually exclusive with `add_generation_prompt`).
      special_tokens: `{"bos_token": "<s>", ...}` as the template sees them.
    """
    import jinja2

    if add_generation_prompt and continue_final_message:
        raise ChatTemplateError("add_generation_prompt and continue_final_message exclude each other: the "
                                "first opens a new assistant turn, the second continues the last message")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ChatTemplateError(f"message {i} is {m!r}: expected a dict with string 'role' and 'content'")
    chat = [dict(m) for m in messages]
    if continue_final_message:
        if not chat:
            raise ChatTemplateError("continue_final_message needs at least one message")
        final = chat[-1]["content"]
        chat[-1]["content"] = final + _CONTINUE_TAG
    try:
        text = _compile(template).render(messages=chat, add_generation_prompt=add_generation_prompt,
                                         tools=None, documents=None, **dict(special_tokens or {}), **variables)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"chat template failed: {e}") from None
    if continue_final_message:
        tag = _CONTINUE_TAG.strip()
        if final.strip() not in text or tag not in text:
            raise ChatTemplateError(f"the chat template drops the final message {final!r}, so it cannot be continued")
        at = text.rindex(tag)
        text = text[:at] if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()
    return text


def read_template(value: str) -> str:
    """A template given as a path to a `.jinja` file or a `tokenizer_config.json`, or as the text itself."""
    import os

    if os.path.isfile(value):
        if value.endswith(".json"):
            template = read_json_object(value, ChatTemplateError).get("chat_template")
            if not isinstance(template, str):
                raise ChatTemplateError(f"{value}: no string 'chat_template' in this JSON file")
            return template
        with open(value, "rb") as f:
            data = f.read()
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ChatTemplateError(f"chat_template file {value!r} is not UTF-8 text (byte {data[e.start]:#04x} "
                                    f"at offset {e.start} ({e.reason})): expected a Jinja template") from None
    if os.path.isdir(value):
        raise ChatTemplateError(f"chat_template {value!r} is a directory: expected a .jinja or "
                                f"tokenizer_config.json file, or a Jinja template")
    if "{%" in value or "{{" in value:
        return value
    raise ChatTemplateError(f"chat_template={value!r}: expected 'auto', 'none', a path to a .jinja/"
                            f"tokenizer_config.json file, or a Jinja template")
