"""Bringing a feedback database to the schema this attune knows, with Alembic (migrations/).

    before, after = upgrade(engine, shown="sqlite:///~/.attune/feedback.db")   # ("0001", "0002")

A database attune made before it had migrations (the table, no alembic_version) is adopted as
revision 0001. One at a revision this attune does not know (a newer attune migrated it) is
refused. Pages starting at once take turns: the migration runs under a lock the database holds.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from attune.config import ConfigError
from attune.feedback.schema import FEEDBACK

MIGRATIONS = Path(__file__).parent / "migrations"
FIRST = "0001"
_PG_LOCK = 0x617474756E65  # "attune": the advisory lock key migrations take on PostgreSQL


def head() -> str:
    return _script().get_current_head()


def upgrade(engine: sa.Engine, *, shown: str, create: bool = True,
            to: str = "head") -> tuple[str | None, str]:
    """Migrate to `to`; (revision before, revision after). `create`: an empty database gets the
    table (the page's first start); else it is not the page's database, a ConfigError."""
    script = _script()
    with _migrating(engine) as connection:
        before = MigrationContext.configure(connection).get_current_revision()
        if before is None and sa.inspect(connection).has_table(FEEDBACK.name):
            _run(command.stamp, connection, FIRST)  # made by create_all: that is revision 0001
            before = FIRST
        elif before is None and not create:
            raise ConfigError(f"feedback database {shown}: has no {FEEDBACK.name} table "
                              "(not the chat page's database)")
        elif before is not None and before not in {s.revision for s in script.walk_revisions()}:
            raise ConfigError(f"feedback database {shown}: at revision {before}, newer than this "
                              f"attune knows (up to {script.get_current_head()}); upgrade attune "
                              "to use it, or point feedback_db / $ATTUNE_FEEDBACK_DB elsewhere")
        _run(command.upgrade, connection, to)
        return before, MigrationContext.configure(connection).get_current_revision()


def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(_config())


def _config(connection: sa.Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def _run(alembic_command, connection: sa.Connection, revision: str) -> None:
    alembic_command(_config(connection), revision)


@contextmanager
def _migrating(engine: sa.Engine) -> Iterator[sa.Connection]:
    """A connection in a transaction that only one process at a time holds, committed at the end."""
    if engine.dialect.name == "sqlite":
        # pysqlite starts no transaction before DDL; BEGIN IMMEDIATE takes sqlite's write lock
        # first, so a second page waits (its busy timeout) and then finds the schema migrated.
        migrator = sa.create_engine(engine.url, poolclass=sa.NullPool, connect_args={"timeout": 60})
        sa.event.listen(migrator, "connect", lambda dbapi, _: setattr(dbapi, "isolation_level", None))
        sa.event.listen(migrator, "begin", lambda c: c.exec_driver_sql("BEGIN IMMEDIATE"))
        try:
            with migrator.begin() as connection:
                yield connection
        finally:
            migrator.dispose()
        return
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":  # released at commit
            connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK})
        yield connection
