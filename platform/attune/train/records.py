"""Training records: JSONL lines in six formats, read and checked on the driver (no torch).

    records = read_records(["data/transformer_qa.jsonl"], "messages")

Every line becomes a chat (`messages`), a plain `text` record, a preference pair or a prompt
with its other fields (for rewards); a line that
is not valid is reported with its file and line number and nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROLES = {"system", "user", "assistant"}


class DataError(ValueError):
    """A data file or line that cannot be used; the message starts with `file:line`."""


@dataclass(frozen=True)
class Record:
    source: str  # "file:line", for error messages
    messages: list[dict] | None = None
    text: str | None = None
    # a preference pair (format 'preference'): `messages` is the conversation before the answers
    chosen: str | None = None
    rejected: str | None = None
    # a prompt to sample from (format 'prompts'): `messages` is the chat to answer, `fields` the
    # line's other fields, handed to the reward functions
    fields: dict | None = None


def read_records(files: list[str], fmt: str) -> list[Record]:
    """Parse and validate every line of every file; raise on the first bad one."""
    records = []
    for file in files:
        path = Path(file)
        if not path.is_file():
            raise DataError(f"{file}: no such data file")
        with path.open("rb") as f:
            for number, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{file}:{number}: not UTF-8 text ({e.reason} at byte "
                                    f"{e.start} of the line)") from None
                if line.strip():
                    records.append(_parse_line(line, fmt, f"{file}:{number}"))
    if not records:
        raise DataError(f"{', '.join(files)}: no examples")
    return records


def _parse_line(line: str, fmt: str, source: str) -> Record:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{source}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise DataError(f"{source}: expected a JSON object, got {type(row).__name__}")

    def field(name: str, required: bool = True) -> str:
        value = row.get(name)
        if value is None and not required:
            return ""
        if not isinstance(value, str) or (required and not value.strip()):
            raise DataError(f"{source}: format '{fmt}' needs a non-empty string '{name}'")
        return value

    if fmt == "messages":
        return Record(source, messages=_check_messages(row.get("messages"), source))
    if fmt == "prompt_completion":
        return Record(source, messages=[{"role": "user", "content": field("prompt")},
                                        {"role": "assistant", "content": field("completion")}])
    if fmt == "alpaca":
        extra = field("input", required=False)
        prompt = field("instruction") + (f"\n\n{extra}" if extra.strip() else "")
        return Record(source, messages=[{"role": "user", "content": prompt},
                                        {"role": "assistant", "content": field("output")}])
    if fmt == "text":
        return Record(source, text=field("text"))
    if fmt == "preference":
        if "messages" in row:
            prompt = _check_messages(row["messages"], source, need_answer=False)
        else:
            prompt = [{"role": "user", "content": field("prompt")}]
        return Record(source, messages=prompt, chosen=_answer(row, "chosen", source),
                      rejected=_answer(row, "rejected", source))
    if fmt == "prompts":
        if "messages" in row:
            chat = _check_messages(row["messages"], source, need_answer=False)
            others = {k: v for k, v in row.items() if k != "messages"}
        else:
            chat = [{"role": "user", "content": field("prompt")}]
            others = {k: v for k, v in row.items() if k != "prompt"}
        if chat[-1]["role"] == "assistant":
            raise DataError(f"{source}: format 'prompts' needs a chat that ends with the turn to "
                            "answer, not an assistant message")
        return Record(source, messages=chat, fields=others)
    raise DataError(f"{source}: unknown format '{fmt}'")


def _answer(row: dict, name: str, source: str) -> str:
    """A preference answer: a string, or TRL's conversational form, [{"role": "assistant", ...}]."""
    value = row.get(name)
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) \
            and value[0].get("role") == "assistant":
        value = value[0].get("content")
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{source}: format 'preference' needs '{name}': a non-empty string (or "
                        "one assistant message)")
    return value


def _check_messages(messages, source: str, need_answer: bool = True) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{source}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise DataError(f"{source}: messages[{i}] needs a role in {sorted(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise DataError(f"{source}: messages[{i}].content must be a string")
    if need_answer and not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{source}: no assistant message, so nothing to learn")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def files_hash(files: list[str]) -> str:
    digest = hashlib.sha256()
    for file in files:
        digest.update(Path(file).read_bytes())
    return digest.hexdigest()


def split_eval(records: list[Record], fraction: float, seed: int) -> tuple[list, list]:
    """Hold out a seeded random `fraction` of records; with 0, eval on the training records."""
    if fraction == 0:
        return records, records
    order = np.random.default_rng(seed).permutation(len(records))
    n_eval = max(1, int(len(records) * fraction))
    held = set(order[:n_eval].tolist())
    return ([r for i, r in enumerate(records) if i not in held],
            [r for i, r in enumerate(records) if i in held])
