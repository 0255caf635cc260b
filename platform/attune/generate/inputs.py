"""Prompts to answer: each JSONL line a 'messages' chat or a 'prompt' string, checked on the driver.

    prompts, bad = read_prompts("prompts.jsonl", skip_bad_lines=False)   # bad: "file:line: why"

A line keeps every field it has; its `id` is its own 'id' field if it has one, else its line
number, and the output carries it, so a resumed run knows which lines are answered.
"""

from __future__ import annotations

import json
from pathlib import Path

from attune.train.records import DataError, _check_messages


def read_prompts(file: str, skip_bad_lines: bool) -> tuple[list[dict], list[str]]:
    """Rows {id, messages, line} (line: the input line's JSON text) and the bad lines' reports."""
    path = Path(file)
    if not path.is_file():
        raise DataError(f"{file}: no such data file")
    rows, bad, ids = [], [], set()
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = _parse(raw, f"{file}:{number}", number)
                if row["id"] in ids:
                    raise DataError(f"{file}:{number}: id {row['id']!r} repeats an earlier line's")
            except DataError as e:
                if not skip_bad_lines:
                    raise
                bad.append(str(e))
                continue
            ids.add(row["id"])
            rows.append(row)
    if not rows:
        raise DataError(f"{file}: no prompts")
    return rows, bad


def _parse(raw: bytes, source: str, number: int) -> dict:
    try:
        line = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{source}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{source}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(line, dict):
        raise DataError(f"{source}: expected a JSON object, got {type(line).__name__}")
    if "messages" in line:
        messages = _check_messages(line["messages"], source, need_answer=False)
        if messages[-1]["role"] == "assistant":  # answered already: ask for the next answer
            messages = messages[:-1]
        if not messages:
            raise DataError(f"{source}: 'messages' holds no turn before the answer")
    elif isinstance(line.get("prompt"), str) and line["prompt"].strip():
        messages = [{"role": "user", "content": line["prompt"]}]
    else:
        raise DataError(f"{source}: needs 'messages' (a chat) or 'prompt' (a non-empty string)")
    key = line.get("id", number)
    if not isinstance(key, (str, int)) or isinstance(key, bool):
        raise DataError(f"{source}: 'id' must be a string or an integer")
    return {"id": str(key), "messages": messages, "line": json.dumps(line),
            "source": source}


def last_user_turn(messages: list[dict]) -> str:
    """The prompt's text as rewards see it: its last user turn."""
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
