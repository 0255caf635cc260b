"""Feedback rows in a SQL database: a sqlite file on a laptop, PostgreSQL where pages on many
machines write to one place.

    store = FeedbackStore("postgresql://attune@db.internal/attune")   # brought to head on open
    store.add(Feedback("tiny-full", conversation, "12.", correction="BERT-base has 12 layers."))
    for marks in store.answers(model="tiny-full"): ...               # streamed, one answer at a time
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import sqlalchemy as sa

from attune.config import ConfigError, attune_home
from attune.feedback.migrate import upgrade as migrate
from attune.feedback.schema import FEEDBACK, Feedback

# Rows fetched per round trip when streaming; PostgreSQL reads them through a server-side cursor.
_BATCH = 1000


class FeedbackUnavailable(ConfigError):
    """The database did not answer (a server down, a volume gone): the page goes on without it."""


def default_url() -> str:
    return os.environ.get("ATTUNE_FEEDBACK_DB") or f"sqlite:///{attune_home() / 'feedback.db'}"


class FeedbackStore:
    """Feedback rows in a SQL database: a file by default, a server a team shares by URL."""

    def __init__(self, url: str | None = None, *, create: bool = True, lazy: bool = False):
        """`create`: make the database and its table where missing, as the page does; a reader
        (the export) passes False and is told there is none. `lazy`: connect at the first add
        or read, not now (a page starts while its database is down)."""
        self.url = url or default_url()
        self.shown = _without_password(self.url)
        self._create = create
        self._engine = _engine(self.url, self.shown, create)
        self._current = False
        if not lazy:
            self.upgrade()

    def upgrade(self) -> tuple[str | None, str]:
        """Bring the database to this attune's schema; (revision before, after)."""
        with _answering(self.shown):
            revisions = migrate(self._engine, shown=self.shown, create=self._create)
        self._current = True
        return revisions

    def add(self, feedback: Feedback) -> None:
        row = {**asdict(feedback), "conversation": json.dumps(feedback.conversation),
               "settings": json.dumps(feedback.settings)}
        self._ready()
        with _answering(self.shown), self._engine.begin() as connection:
            connection.execute(FEEDBACK.insert().values(**row))

    def all(self, **filters) -> list[Feedback]:
        """Every mark, oldest first (small databases and tests; the export streams `answers`)."""
        return [mark for marks in self._select(by_answer=False, **filters) for mark in marks]

    def answers(self, **filters) -> Iterator[list[Feedback]]:
        """The marks of one answer (same user, model, conversation and answer) at a time, oldest
        first, answers in the order they were first marked. Filters: model, user, since, until
        (ISO 8601 text in UTC: since <= created_at < until)."""
        return self._select(by_answer=True, **filters)

    def _select(self, *, by_answer: bool, model: str | None = None, user: str | None = None,
                since: str | None = None, until: str | None = None) -> Iterator[list[Feedback]]:
        c = FEEDBACK.c
        # The database groups one answer's marks (a window over the four columns), so the export
        # holds one answer in memory however many rows there are.
        first = sa.func.min(c.id).over(partition_by=[c.user, c.model, c.conversation, c.answer])
        first = (first if by_answer else c.id).label("first_mark")
        query = sa.select(*c, first)
        if model is not None:
            query = query.where(c.model == model)
        if user is not None:
            query = query.where(c.user == user)
        if since is not None:
            query = query.where(c.created_at >= since)
        if until is not None:
            query = query.where(c.created_at < until)
        query = query.order_by(first, c.id)
        self._ready()
        with _answering(self.shown), self._engine.connect() as connection:
            rows = connection.execution_options(stream_results=True, yield_per=_BATCH).execute(query)
            group, group_of = [], None
            for row in rows.mappings():
                if group and row["first_mark"] != group_of:
                    yield group
                    group = []
                group_of = row["first_mark"]
                group.append(_feedback(row))
            if group:
                yield group

    def _ready(self) -> None:
        if not self._current:
            self.upgrade()


@contextmanager
def _answering(shown: str) -> Iterator[None]:
    """The driver's 'cannot connect' as one line naming the database."""
    try:
        yield
    except (sa.exc.OperationalError, sa.exc.InterfaceError) as e:
        reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
        raise FeedbackUnavailable(f"feedback database {shown}: not answering ({reason})") from None


def _feedback(row) -> Feedback:
    fields = {k: v for k, v in row.items() if k not in ("id", "first_mark")}
    return Feedback(**{**fields, "conversation": json.loads(row["conversation"]),
                       "settings": json.loads(row["settings"])})


def _engine(url: str, shown: str, create: bool) -> sa.Engine:
    """The engine for `url`; a URL that cannot be one (or a sqlite file not there, for a reader)
    is a ConfigError now, not at the first click."""
    try:
        parsed = sa.make_url(url)
        if parsed.drivername in ("postgresql", "postgres"):  # the driver attune installs
            parsed = parsed.set(drivername="postgresql+psycopg")
        if parsed.get_backend_name() == "sqlite":
            return _sqlite_engine(parsed, shown, create)
        # pre-ping: a pooled connection the server dropped (a restart, a failover) is replaced
        # instead of failing a click; connect_timeout: a server that is down fails in seconds.
        return sa.create_engine(parsed, pool_pre_ping=True, connect_args={"connect_timeout": 5})
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError) as e:
        raise ConfigError(f"feedback database {shown}: {e.__class__.__name__}: "
                          f"{str(e).splitlines()[0]}") from None


def _sqlite_engine(url: sa.URL, shown: str, create: bool) -> sa.Engine:
    file = Path(url.database).expanduser() if url.database not in (None, "", ":memory:") else None
    if file and not create and not file.exists():
        raise ConfigError(f"feedback database {shown}: does not exist (nothing at {file}); "
                          "the chat page creates it with its first feedback")
    if file and create:
        file.parent.mkdir(parents=True, exist_ok=True)
    # timeout: a second page writing at the same moment waits for the file's lock, not fails.
    return sa.create_engine(url, connect_args={"timeout": 30})


def _without_password(url: str) -> str:
    """The URL as lines and logs may show it."""
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return url
