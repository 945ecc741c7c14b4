"""A `dataset.template` checked on the real records before anything heavy runs, one record shown as it renders.

A template that cannot place a record's response used to surface only when the training data was built:
after the teacher had written every answer. Rendering costs microseconds a record, so `validate` (and every
entry point, through preflight) renders each record of each data file and shows the first one, split where
training splits it: the masked prompt and the response the loss is computed on.
"""

from __future__ import annotations

from easydistill.data.render import render_segments, render_template, response_layout

PREVIEW_CHARS = 160  # per part; the middle of a longer text is elided


def _short(text: str) -> str:
    if len(text) > PREVIEW_CHARS:
        half = PREVIEW_CHARS // 2
        text = f"{text[:half]} ... {text[-half:]}"
    return repr(text)


def check_template(records: list[dict], template_path, data_path) -> list[str]:
    """Render every record (raises UserError naming the first one that fails); return the preview lines.

    Records with a response are laid out exactly as training lays them out; prompt-only records (answers still
    to be written) are rendered around a placeholder response.
    """
    first = None
    for record in records:
        if record["messages"][-1]["role"] == "assistant":
            text, ((start, _end),) = render_segments(record, template_path=template_path)
            parts = (text[:start], text[start:])
        else:
            parts = response_layout(record, template_path)
        first = first or (record, parts)
    record, (prompt, response) = first
    response_line = (
        _short(response) if record["messages"][-1]["role"] == "assistant" else "written by the teacher"
    )
    lines = [
        f"{len(records)} records of {data_path} render; the first as training splits it:",
        f"  prompt (masked): {_short(prompt)}",
        f"  response:        {response_line}",
    ]
    prompt_only = {**record, "messages": [m for m in record["messages"] if m["role"] != "assistant"]}
    generation_prompt = render_template(prompt_only, template_path, with_output=False)
    if generation_prompt != prompt:
        lines.append(
            "  (its add_generation_prompt branch renders the prompt differently, as EasyDistill v1's own "
            "template does; generation uses the prompt above, the context training sees)"
        )
    return lines
