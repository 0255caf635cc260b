"""Feedback as training data: DPO pairs or SFT chats, written as JSONL while the rows stream in.

    written = export(store, "dpo", "feedback-dpo.jsonl", model="tiny-full", since=utc_text("2026-11-01", "--since"))
    written.lines, written.skipped     # 120, {"a thumbs-up without a correction (...)": 40, ...}

An answer's latest rating and latest correction count, so a person who changes their mind leaves
one opinion. A corrected answer is a preference pair (the correction chosen, the model's answer
rejected) and an SFT chat; a thumbs-up answer is an SFT chat.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, time, timedelta, timezone
from pathlib import Path

from attune.config import ConfigError
from attune.feedback.schema import Feedback
from attune.feedback.store import FeedbackStore

EXPORTS = ("dpo", "sft")
# Why an answer makes no line of a kind.
THUMBS_UP_ONLY = "a thumbs-up without a correction (a pair needs the answer it should have been)"
THUMBS_DOWN_ONLY = "a thumbs-down without a correction (nothing to train towards)"
UNCHANGED = "a correction the same as the answer"


@dataclass
class Written:
    lines: int = 0
    """Lines written."""
    skipped: Counter = field(default_factory=Counter)
    """Answers that made no line, by why."""

    def skipped_line(self) -> str | None:
        if not self.skipped:
            return None
        reasons = ", ".join(f"{n} {why}" for why, n in self.skipped.most_common())
        total = sum(self.skipped.values())
        return f"skipped {total} answer{'s' if total != 1 else ''}: {reasons}"


def export(store: FeedbackStore, kind: str, path: str | Path, **filters) -> Written:
    """Write `kind` ('dpo' or 'sft') lines to `path`, one answer in memory at a time; the file
    appears only when complete. Filters as FeedbackStore.answers takes them."""
    if kind not in EXPORTS:
        raise ConfigError(f"--as {kind}: expected one of {', '.join(EXPORTS)}")
    written = Written()
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    try:
        with partial.open("w") as out:
            for opinion in map(latest_opinion, store.answers(**filters)):
                line, why = training_line(opinion, kind)
                if line is None:
                    written.skipped[why] += 1
                else:
                    out.write(json.dumps(line) + "\n")
                    written.lines += 1
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return written


def latest_opinion(marks: Iterable[Feedback]) -> Feedback:
    """One answer's marks (oldest first) as one Feedback: the latest rating, the latest correction."""
    marks = list(marks)
    opinion = Feedback(**{**asdict(marks[0]), "rating": None, "correction": None})
    for mark in marks:
        opinion.rating = mark.rating or opinion.rating
        opinion.correction = mark.correction or opinion.correction
    return opinion


def training_line(o: Feedback, kind: str) -> tuple[dict | None, str | None]:
    """DPO: a corrected answer as {messages, chosen, rejected}. SFT: a corrected or thumbs-up
    answer as {messages} ending in it. (line, None), or (None, why there is none)."""
    if kind == "dpo" and o.correction:
        if o.correction == o.answer:
            return None, UNCHANGED
        return {"messages": o.conversation, "chosen": o.correction, "rejected": o.answer}, None
    if kind == "sft" and (o.correction or o.rating == "up"):
        answer = o.correction or o.answer
        return {"messages": [*o.conversation, {"role": "assistant", "content": answer}]}, None
    return None, THUMBS_UP_ONLY if o.rating == "up" else THUMBS_DOWN_ONLY


def utc_text(text: str, flag: str, *, end: bool = False) -> str:
    """ISO 8601 date or time (UTC unless it says) as the rows' created_at text. A date alone is
    its whole day: its start, or with `end` the next day's start (--until is exclusive of that)."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"{flag} {text}: not an ISO 8601 date or time "
                          "(2026-11-30, 2026-11-30T12:00, 2026-11-30T12:00+01:00)") from None
    if len(text) == 10 and end:  # a date: through its last second
        when = datetime.combine(when.date() + timedelta(days=1), time())
    when = when if when.tzinfo else when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc).isoformat(timespec="seconds")
