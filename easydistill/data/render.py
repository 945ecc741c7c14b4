"""Rendering records to text: v1 Jinja templates or the tokenizer's chat template, with response spans."""

from __future__ import annotations

import functools
import re
from pathlib import Path

from easydistill.errors import UserError

V1_TEMPLATE = Path(__file__).parent.parent / "templates" / "chatml_v1.jinja"


# ---------------------------------------------------------------- rendering


@functools.lru_cache(maxsize=8)
def _load_template(path: str):
    import jinja2

    p = Path(path)
    if not p.is_file():
        raise UserError(f"template file not found: {p}")
    # Default Environment on purpose: like v1, the template file's final newline is not rendered.
    env = jinja2.Environment()
    source = p.read_text(encoding="utf-8")
    try:
        template = env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"{p}:{e.lineno}: template syntax error: {e.message}") from None
    return template, bool(_READS_SYSTEM.search(source))


# message['system'], message["system"], message.system or message.get('system')
_READS_SYSTEM = re.compile(r"""message\s*(\[\s*['"]system['"]\s*\]|\.system\b|\.get\(\s*['"]system['"])""")


def _v1_message(record: dict, template_path: str) -> dict:
    messages = record["messages"]
    roles = [m["role"] for m in messages]
    body = roles[1:] if roles[:1] == ["system"] else roles
    if body not in (["user"], ["user", "assistant"]):
        raise UserError(
            f"{record['source']}: template {template_path} renders single-turn records only "
            f"([system], user, assistant); this record has roles {roles}. Remove dataset.template "
            "to use the tokenizer's chat template for multi-turn chats"
        )
    message = {"content": messages[roles.index("user")]["content"]}
    if body[-1] == "assistant":
        message["output"] = messages[-1]["content"]
    if roles[0] == "system":
        message["system"] = messages[0]["content"]
    return message


def render_template(record: dict, template_path, with_output: bool, output: str | None = None) -> str:
    """Render one record; `output` replaces the record's response (the placeholder that locates it)."""
    import jinja2

    template, uses_system = _load_template(str(template_path))
    message = _v1_message(record, str(template_path))
    if output is not None:
        message["output"] = output
    if "system" in message and not uses_system:
        raise UserError(
            f"{record['source']}: record has a system prompt but template {template_path} never reads "
            "message['system']; it would be silently dropped"
        )
    try:
        return template.render(message=message, add_generation_prompt=not with_output, add_output=with_output)
    except jinja2.TemplateError as e:
        raise UserError(f"{template_path}: cannot render {record['source']}: {e}") from None


# Stands for the response while a template is rendered, so that the response's place is found exactly.
PLACEHOLDER = "\x00EASYDISTILL_RESPONSE\x00"


def response_layout(record: dict, template_path) -> tuple[str, str]:
    """(text before the response, text after it) in the template's full rendering.

    EasyDistill v1's own templates render the generation prompt differently from the start of the full text
    (whitespace control, a newline after the role), so the response is located by rendering the full text
    around a placeholder instead of assuming that the generation prompt is a prefix.
    """
    laid_out = render_template(record, template_path, with_output=True, output=PLACEHOLDER)
    count = laid_out.count(PLACEHOLDER)
    if count != 1:
        what = "never renders" if count == 0 else f"renders {count} times"
        raise UserError(
            f"{record['source']}: template {template_path} {what} message['output'] when add_output is true, "
            "so the response cannot be located; render it exactly once in the add_output branch"
        )
    before, after = laid_out.split(PLACEHOLDER)
    return before, after


def _render_chat(tokenizer, messages: list[dict], source: str, generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "the tokenizer has no chat template; set dataset.template to a Jinja file "
            f"(e.g. {V1_TEMPLATE}) or use a tokenizer that ships one"
        )
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as e:  # jinja errors, raise_exception() in templates, role checks
        raise UserError(f"{source}: the tokenizer's chat template failed: {e}") from None
    return text


def _not_prefix(source: str, which: str) -> UserError:
    return UserError(
        f"{source}: {which} does not render the prompt as a prefix of the full text, so the response "
        "cannot be located; fix the template so prompt + response == full text"
    )


def render_prompt(record: dict, tokenizer=None, *, template_path=None) -> str:
    """The prompt text a model continues from, without any response.

    With a v1 template: the full rendering's text before the response, the context training uses (which
    v1's own templates render differently from their generation prompt)."""
    messages = list(record["messages"])
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    prompt_record = {**record, "messages": messages}
    if template_path is not None:
        return response_layout(prompt_record, template_path)[0]
    return _render_chat(tokenizer, messages, record["source"], generation_prompt=True)


def render_segments(record: dict, tokenizer=None, *, template_path=None) -> tuple[str, list[tuple[int, int]]]:
    """Full text and the character spans [start, end) of every response in it."""
    source = record["source"]
    if template_path is not None:
        before, after = response_layout(record, template_path)
        full = render_template(record, template_path, with_output=True)
        if not (full.startswith(before) and full.endswith(after) and len(full) >= len(before) + len(after)):
            raise UserError(
                f"{source}: template {template_path} renders the text around message['output'] differently "
                "depending on the response, so the response cannot be located"
            )
        return full, [(len(before), len(full))]
    messages = record["messages"]
    full = _render_chat(tokenizer, messages, source, generation_prompt=False)
    segments = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        # The span of turn i is what rendering turn i adds after the generation prompt.
        prompt = _render_chat(tokenizer, messages[:i], source, generation_prompt=True)
        upto = full if i == len(messages) - 1 else _render_chat(tokenizer, messages[: i + 1], source, False)
        if not (upto.startswith(prompt) and full.startswith(upto)):
            raise _not_prefix(source, "the tokenizer's chat template")
        segments.append((len(prompt), len(upto)))
    return full, segments
