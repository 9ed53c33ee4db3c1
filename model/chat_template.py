"""Chat templates rendered as transformers' `apply_chat_template` renders them: Jinja2's
immutable sandbox with trim_blocks/lstrip_blocks and loop controls, transformers' `tojson`,
`raise_exception` and `strftime_now`, the tokenizer's special tokens (bos_token, eos_token, ...)
as variables, and `add_generation_prompt`.

The template comes from `chat_template.jinja` (transformers >= 4.43 saves it there), else
tokenizer_config.json's `chat_template` (a string, or a list of named templates: "default"),
or an operator's file (`disagg serve --chat-template`)."""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from engine.errors import InvalidRequestError, ModelLoadError

ROLES = ("system", "user", "assistant", "tool", "developer")


def load_chat_template(folder: Path, tokenizer_config: dict) -> str | None:
    f = folder / "chat_template.jinja"
    if f.is_file():
        return f.read_text()
    t = tokenizer_config.get("chat_template")
    if isinstance(t, list):
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        t = named.get("default") or next(iter(named.values()), None)
    return t if isinstance(t, str) else None


def read_template_file(path: str) -> str:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ModelLoadError(f"cannot read the chat template {path}: {e}") from None
    compile_template(text)          # a syntax error shows at start, not on the first request
    return text


@lru_cache(maxsize=8)
def compile_template(source: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; transformers' does not.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ModelLoadError(f"the chat template does not compile: {e}") from None


def check_messages(messages) -> list[dict]:
    """OpenAI chat messages -> plain dicts; text content parts are joined (as vLLM does)."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages", "must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise InvalidRequestError(f"messages[{i}].role", f"must be one of {', '.join(ROLES)}")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for p in content:
                if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                    raise InvalidRequestError(f"messages[{i}].content", "only text content parts are supported")
                parts.append(p["text"])
            content = "".join(parts)
        elif content is not None and not isinstance(content, str):
            raise InvalidRequestError(f"messages[{i}].content", "must be a string or a list of text parts")
        out.append({**m, "content": content if content is not None else ""})
    return out


def render_chat(template: str | None, messages, special_tokens: dict, add_generation_prompt: bool = True,
                **extra) -> str:
    """The prompt text for a conversation (tokenize it with add_special_tokens=False)."""
    if template is None:
        raise InvalidRequestError(
            "messages", "this model has no chat template (none in its tokenizer files); use /v1/completions "
            "or start the server with --chat-template FILE")
    import jinja2
    extra = {"tools": None, "documents": None, **extra}     # transformers passes both, None by default
    try:
        return compile_template(template).render(
            messages=check_messages(messages), add_generation_prompt=add_generation_prompt,
            **special_tokens, **extra)
    except jinja2.exceptions.TemplateError as e:
        raise InvalidRequestError("messages", f"the chat template refused them: {e}") from None
