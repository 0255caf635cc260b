"""A feedback row: the Feedback a page records, and the table it lands in at the newest revision.

The table is what migrations/versions/ build, revision by revision; queries use this copy, and
tests/test_feedback_db.py checks that a database at head has exactly these columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone

import sqlalchemy as sa

METADATA = sa.MetaData()
FEEDBACK = sa.Table(
    "feedback", METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("created_at", sa.String(32), nullable=False),
    sa.Column("user", sa.String(200)),
    sa.Column("model", sa.String(500), nullable=False),
    sa.Column("conversation", sa.Text, nullable=False),
    sa.Column("answer", sa.Text, nullable=False),
    sa.Column("rating", sa.String(4)),
    sa.Column("correction", sa.Text),
    sa.Column("settings", sa.Text, nullable=False),
    sa.Column("comment", sa.Text),  # revision 0002
    sa.Index("ix_feedback_model_created_at", "model", "created_at"),  # revision 0002
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
    comment: str | None = None
    """Why the rater marked it so, in their words (optional)."""
    created_at: str = field(
        default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    """When, in UTC, as ISO 8601 (so that text order is time order)."""
