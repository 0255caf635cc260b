"""Training data: read JSONL in four formats, tokenize with the chat template, pack.

Every line becomes a chat (`messages`) or a plain `text` record; a line that is not valid is
reported with its file and line number and nothing is dropped silently. Tokenized samples carry
labels of -100 wherever no loss is taken: in a chat, everything but the assistant's words and
the end-of-turn token after them.
Packing puts several samples in one row with positions restarting per sample; transformers
reads those restarts and keeps each token's attention inside its own sample.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from attune.chat_templates import end_of_turn_id

IGNORE = -100
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


def tokenize(record: Record, tokenizer, max_seq_len: int) -> dict:
    """Token ids and labels; for chats, loss only on assistant turns. Truncates to max_seq_len."""
    if record.text is not None:
        ids = tokenizer(record.text, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
        labels = list(ids)
    else:
        ids, labels = _tokenize_chat(record.messages, tokenizer)
    return {"input_ids": ids[:max_seq_len], "labels": labels[:max_seq_len],
            "truncated": len(ids) > max_seq_len}


def tokenize_pair(record: Record, tokenizer, max_seq_len: int) -> dict:
    """The chosen and the rejected conversation, each labelled on its answer only."""
    sides = {}
    for side in ("chosen", "rejected"):
        messages = record.messages + [{"role": "assistant", "content": getattr(record, side)}]
        ids, labels = _tokenize_chat(messages, tokenizer)
        start = len(tokenizer.apply_chat_template(record.messages, tokenize=True,
                                                  add_generation_prompt=True, return_dict=False))
        labels[:start] = [IGNORE] * start  # earlier assistant turns are the prompt's
        sides[side] = (ids[:max_seq_len], labels[:max_seq_len])
    return {"sides": sides, "truncated": any(len(ids) >= max_seq_len for ids, _ in sides.values())}


def _tokenize_chat(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    # Render growing prefixes of the chat: the tokens an assistant turn adds to the prompt that
    # precedes it are the ones it is trained on. Works for any chat template, not just ours.
    def render(msgs, generation_prompt):
        return tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=generation_prompt,
                                             return_dict=False)

    # The turn's labels end at its end-of-turn token: what follows it (ChatML's newline) is the
    # template's, and the model, stopped at the end of turn, never writes it.
    ids = render(messages, False)
    labels = [IGNORE] * len(ids)
    end_id = end_of_turn_id(tokenizer)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render(messages[:i], True))
        end = len(render(messages[: i + 1], False))
        turn = ids[start:end]
        if end_id in turn:
            end = start + len(turn) - turn[::-1].index(end_id)
        labels[start:end] = ids[start:end]
    return ids, labels


def pack(samples: list[dict], max_seq_len: int, pad_id: int) -> list[dict]:
    """First-fit-decreasing packing into rows of max_seq_len; positions restart per sample."""
    bins: list[list[dict]] = []
    space: list[int] = []
    for sample in sorted(samples, key=lambda s: len(s["input_ids"]), reverse=True):
        n = len(sample["input_ids"])
        for b, free in enumerate(space):
            if n <= free:
                bins[b].append(sample)
                space[b] -= n
                break
        else:
            bins.append([sample])
            space.append(max_seq_len - n)
    return [_row(b, max_seq_len, pad_id) for b in bins]


def pad(samples: list[dict], max_seq_len: int, pad_id: int) -> list[dict]:
    """One sample per row (no packing)."""
    return [_row([s], max_seq_len, pad_id) for s in samples]


def _pair_row(sides: dict, length: int, pad_id: int) -> dict:
    row = {"num_tokens": np.int64(sum(len(ids) for ids, _ in sides.values()))}
    for side, (ids, labels) in sides.items():
        fill = length - len(ids)
        row[f"{side}_input_ids"] = np.array(ids + [pad_id] * fill, dtype=np.int64)
        row[f"{side}_labels"] = np.array(labels + [IGNORE] * fill, dtype=np.int64)
    return row


def _row(samples: list[dict], length: int, pad_id: int) -> dict:
    ids, labels, positions = [], [], []
    for s in samples:
        n = len(s["input_ids"])
        ids += s["input_ids"]
        # A sample's first token is never predicted: in a packed row the token before it
        # belongs to another sample.
        labels += [IGNORE] + s["labels"][1:]
        positions += range(n)
    fill = length - len(ids)
    return {
        "input_ids": np.array(ids + [pad_id] * fill, dtype=np.int64),
        "labels": np.array(labels + [IGNORE] * fill, dtype=np.int64),
        "position_ids": np.array(positions + list(range(fill)), dtype=np.int64),
        "num_tokens": np.int64(len(ids)),
    }


class Tokenize:
    """Ray Data `map_batches` callable: raw records in, rows of fixed length out."""

    def __init__(self, tokenizer_ref: str, chat_template: str | None, max_seq_len: int,
                 packing: bool):
        # Runs in Ray Data's workers; the driver reads and checks records without torch.
        from attune.modeling import load_tokenizer, resolve_on_node

        # the base model as this node has it (modeling.node_ref)
        self.tokenizer = load_tokenizer(resolve_on_node(tokenizer_ref), chat_template)
        self.max_seq_len = max_seq_len
        self.packing = packing

    def __call__(self, batch: dict) -> dict:
        records = [Record(s, json.loads(m) if m else None, t or None, c or None, r or None)
                   for s, m, t, c, r in zip(batch["source"], batch["messages"], batch["text"],
                                            batch["chosen"], batch["rejected"])]
        if records[0].chosen is not None:  # preference pairs: one padded row per pair, no packing
            rows = [_pair_row(tokenize_pair(r, self.tokenizer, self.max_seq_len)["sides"],
                              self.max_seq_len, self.tokenizer.pad_token_id) for r in records]
            return {key: np.stack([r[key] for r in rows]) for key in rows[0]}
        samples = [tokenize(r, self.tokenizer, self.max_seq_len) for r in records]
        rows = (pack if self.packing else pad)(samples, self.max_seq_len, self.tokenizer.pad_token_id)
        return {key: np.stack([r[key] for r in rows]) for key in rows[0]}


@functools.lru_cache(maxsize=4)
def _tokenizer_for(tokenizer_ref: str, chat_template: str | None, max_seq_len: int,
                   packing: bool) -> Tokenize:
    return Tokenize(tokenizer_ref, chat_template, max_seq_len, packing)


def tokenize_batch(batch: dict, **tokenize_args) -> dict:
    """`Tokenize` as a Ray Data task: the tokenizer is loaded once per worker process and kept,
    so the train and eval datasets reuse warm workers instead of starting an actor each."""
    return _tokenizer_for(**tokenize_args)(batch)


def as_items(records: list[Record]) -> list[dict]:
    """Records as flat rows for `ray.data.from_items` (Arrow wants one type per column)."""
    return [{"source": r.source, "messages": json.dumps(r.messages) if r.messages else "",
             "text": r.text or "", "chosen": r.chosen or "", "rejected": r.rejected or ""}
            for r in records]


def split_eval(records: list[Record], fraction: float, seed: int) -> tuple[list, list]:
    """Hold out a seeded random `fraction` of records; with 0, eval on the training records."""
    if fraction == 0:
        return records, records
    order = np.random.default_rng(seed).permutation(len(records))
    n_eval = max(1, int(len(records) * fraction))
    held = set(order[:n_eval].tolist())
    return ([r for i, r in enumerate(records) if i not in held],
            [r for i, r in enumerate(records) if i in held])


def local_rows(records: list[Record], tokenizer_path: str, chat_template: str | None,
               max_seq_len: int, packing: bool) -> list[dict]:
    """The rows Ray Data would produce, built in this process (for runs without Ray)."""
    items = as_items(records)
    batch = {key: [item[key] for item in items] for key in items[0]}
    out = Tokenize(tokenizer_path, chat_template, max_seq_len, packing)(batch)
    return [{key: out[key][i] for key in out} for i in range(len(out["num_tokens"]))]


def batches(rows: list[dict], batch_size: int, seed: int):
    """Shuffled batches of stacked rows, like Ray Data's `iter_torch_batches`."""
    # Runs in the training workers; the driver reads and checks records without torch.
    import torch

    order = np.random.default_rng(seed).permutation(len(rows))
    for start in range(0, len(order), batch_size):
        chunk = [rows[i] for i in order[start:start + batch_size]]
        yield {key: torch.as_tensor(np.stack([r[key] for r in chunk])) for key in chunk[0]}
