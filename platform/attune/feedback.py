"""What people say about the chat page's answers, kept in a database and exported as training data.

    store = FeedbackStore()                       # sqlite under $ATTUNE_HOME, or any SQLAlchemy URL
    store.add(Feedback("tiny-full", conversation, "12.", correction="BERT-base has 12 layers."))
    store.export("dpo", "feedback-dpo.jsonl")    # {"messages", "chosen", "rejected"} per line

Every mark is a row; an answer's latest rating and latest correction count, so a person who
changes their mind leaves one opinion. A corrected answer is a preference pair (the correction
chosen, the model's answer rejected) and an SFT chat; a thumbs-up answer is an SFT chat.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import sqlalchemy as sa

from attune.config import ConfigError, attune_home

EXPORTS = ("dpo", "sft")
_METADATA = sa.MetaData()
_FEEDBACK = sa.Table(
    "feedback", _METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("created_at", sa.String(32), nullable=False),
    sa.Column("user", sa.String(200)),
    sa.Column("model", sa.String(500), nullable=False),
    sa.Column("conversation", sa.Text, nullable=False),
    sa.Column("answer", sa.Text, nullable=False),
    sa.Column("rating", sa.String(4)),
    sa.Column("correction", sa.Text),
    sa.Column("settings", sa.Text, nullable=False),
)


@dataclass
class Feedback:
    model: str
    """The model id that gave the answer, as the endpoint lists it."""
    conversation: list[dict]
    """The OpenAI messages the model answered: system prompt, earlier turns, the question."""
    answer: str
    """The model's answer, as it gave it."""
    rating: str | None = None
    """'up' or 'down'; None for a correction alone."""
    correction: str | None = None
    """The answer as the person says it should have been."""
    settings: dict = field(default_factory=dict)
    """The sampling settings the answer was generated with."""
    user: str | None = None
    """The page login that gave it, when the page has one."""
    created_at: str = field(
        default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))


def default_url() -> str:
    return os.environ.get("ATTUNE_FEEDBACK_DB") or f"sqlite:///{attune_home() / 'feedback.db'}"


def _sqlite_file(url: str) -> Path | None:
    if not url.startswith("sqlite:///"):
        return None
    return Path(url.removeprefix("sqlite:///")).expanduser()


class FeedbackStore:
    """Feedback rows in a SQL database: a file by default, a server a team shares by URL."""

    def __init__(self, url: str | None = None, create: bool = True):
        """`create`: make the database and its table where missing, as the page does for the
        first feedback; a reader (the export) passes False and is told there is none."""
        self.url = url or default_url()
        file = _sqlite_file(self.url)
        if file and not create and not file.is_file():
            raise ConfigError(f"feedback database {self.url}: does not exist (nothing at {file}); "
                              "the chat page creates it with its first feedback")
        if file:
            file.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._engine = sa.create_engine(self.url)
            if create:
                _METADATA.create_all(self._engine)
            elif not sa.inspect(self._engine).has_table(_FEEDBACK.name):
                raise ConfigError(f"feedback database {self.url}: has no {_FEEDBACK.name} table "
                                  "(not the chat page's database)")
        except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, sa.exc.OperationalError) as e:
            raise ConfigError(f"feedback database {self.url}: {e.__class__.__name__}: "
                              f"{str(e).splitlines()[0]}") from None

    def add(self, feedback: Feedback) -> None:
        row = asdict(feedback)
        row["conversation"] = json.dumps(row["conversation"])
        row["settings"] = json.dumps(row["settings"])
        with self._engine.begin() as connection:
            connection.execute(_FEEDBACK.insert().values(**row))

    def all(self, model: str | None = None) -> list[Feedback]:
        query = _FEEDBACK.select().order_by(_FEEDBACK.c.id)
        if model:
            query = query.where(_FEEDBACK.c.model == model)
        with self._engine.connect() as connection:
            rows = connection.execute(query).mappings().all()
        return [Feedback(**{**{k: v for k, v in row.items() if k != "id"},
                            "conversation": json.loads(row["conversation"]),
                            "settings": json.loads(row["settings"])}) for row in rows]

    def export(self, kind: str, path: str | Path, model: str | None = None) -> int:
        """Write the feedback as JSONL of `kind` ('dpo' or 'sft'); returns the number of lines."""
        if kind not in EXPORTS:
            raise ConfigError(f"--as {kind}: expected one of {', '.join(EXPORTS)}")
        lines = training_lines(latest_opinions(self.all(model)), kind)
        Path(path).write_text("".join(json.dumps(line) + "\n" for line in lines))
        return len(lines)


def latest_opinions(marks: list[Feedback]) -> list[Feedback]:
    """One Feedback per answer (same person, model, conversation and answer), with the latest
    rating and the latest correction given to it, in the order the answers were first marked."""
    opinions: dict[tuple, Feedback] = {}
    for mark in marks:
        key = (mark.user, mark.model, json.dumps(mark.conversation), mark.answer)
        opinion = opinions.setdefault(key, Feedback(**{**asdict(mark), "rating": None,
                                                        "correction": None}))
        opinion.rating = mark.rating or opinion.rating
        opinion.correction = mark.correction or opinion.correction
    return list(opinions.values())


def training_lines(opinions: list[Feedback], kind: str) -> list[dict]:
    """DPO: a corrected answer, as {messages, chosen, rejected}. SFT: a corrected or thumbs-up
    answer, as {messages} ending in it."""
    lines = []
    for o in opinions:
        if kind == "dpo" and o.correction and o.correction != o.answer:
            lines.append({"messages": o.conversation, "chosen": o.correction, "rejected": o.answer})
        elif kind == "sft" and (o.correction or o.rating == "up"):
            answer = o.correction or o.answer
            lines.append({"messages": [*o.conversation, {"role": "assistant", "content": answer}]})
    return lines
