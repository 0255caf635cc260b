"""The feedback database beyond one page on one laptop, on sqlite and a real PostgreSQL alike:
migrations that keep the rows, a database made before migrations adopted, one newer than the
code refused, two page processes writing at once, a database that is down, an export that streams.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import sqlalchemy as sa

from attune.cli import main
from attune.config import ConfigError
from attune.feedback import Feedback, FeedbackStore, export, migrate
from attune.feedback.schema import FEEDBACK
from attune.ui.chat import Turn
from attune.ui.feedback import NOT_SAVED, correct, open_store, rate

REPO = Path(__file__).resolve().parents[1]
ASKED = [{"role": "user", "content": "How many layers does BERT-base have?"}]
# A row of revision 0001, as the page wrote it then.
OLD_ROW = {"created_at": "2026-11-01T10:00:00+00:00", "user": "ada", "model": "tiny-full",
           "conversation": json.dumps(ASKED), "answer": "12.", "rating": None,
           "correction": "BERT-base has 12 layers.", "settings": json.dumps({"temperature": 0.0})}


# The table as attune before migrations made it with create_all.
OLD_TABLE = sa.Table(
    "feedback", sa.MetaData(),
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


def revision_of(url: str) -> str | None:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            return connection.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
    finally:
        engine.dispose()


def insert_old_rows(url: str, n: int = 3) -> None:
    engine = sa.create_engine(url)
    table = sa.table("feedback", *map(sa.column, OLD_ROW))
    with engine.begin() as connection:
        connection.execute(table.insert(), [{**OLD_ROW, "answer": f"{i}."} for i in range(n)])
    engine.dispose()


def test_a_database_at_revision_1_is_migrated_with_its_rows(feedback_db, tmp_path):
    engine = sa.create_engine(feedback_db)
    assert migrate.upgrade(engine, shown=feedback_db, to=migrate.FIRST) == (None, "0001")
    engine.dispose()
    insert_old_rows(feedback_db)

    store = FeedbackStore(feedback_db)
    assert revision_of(feedback_db) == migrate.head() == "0002"
    marks = store.all()
    assert [(m.answer, m.correction, m.user, m.settings, m.comment) for m in marks] == [
        (f"{i}.", "BERT-base has 12 layers.", "ada", {"temperature": 0.0}, None) for i in range(3)]
    store.add(Feedback("tiny-full", ASKED, "13.", rating="down", comment="BERT-base has 12"))
    assert store.all()[-1].comment == "BERT-base has 12"
    assert export(store, "dpo", tmp_path / "dpo.jsonl").lines == 3


def test_a_database_made_before_migrations_is_adopted(feedback_db):
    """create_all's table (attune before migrations), with rows and no alembic_version."""
    engine = sa.create_engine(feedback_db)
    OLD_TABLE.metadata.create_all(engine)
    engine.dispose()
    insert_old_rows(feedback_db)

    assert FeedbackStore(feedback_db, create=False, lazy=True).upgrade() == ("0001", "0002")
    assert [m.answer for m in FeedbackStore(feedback_db).all()] == ["0.", "1.", "2."]


def test_the_head_schema_is_the_one_queries_use(feedback_db):
    FeedbackStore(feedback_db)
    engine = sa.create_engine(feedback_db)
    inspector = sa.inspect(engine)
    assert [c["name"] for c in inspector.get_columns("feedback")] == [c.name for c in FEEDBACK.columns]
    assert {i["name"] for i in inspector.get_indexes("feedback")} == {i.name for i in FEEDBACK.indexes}
    engine.dispose()


def test_a_database_newer_than_this_attune_is_refused_in_one_line(feedback_db, tmp_path, capsys):
    FeedbackStore(feedback_db)
    engine = sa.create_engine(feedback_db)
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE alembic_version SET version_num = '0003'"))
    engine.dispose()
    assert main(["feedback", "export", "--as", "dpo", str(tmp_path / "x.jsonl"),
                 "--db", feedback_db]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"attune: feedback database {feedback_db}: at "
                                                   "revision 0003, newer than this attune knows")
    assert "upgrade attune" in err and revision_of(feedback_db) == "0003"
    assert not (tmp_path / "x.jsonl").exists()


def test_the_upgrade_command_says_where_the_database_is(feedback_db, capsys):
    """A new database for the pages (as a managed PostgreSQL starts) gets the table; a second
    run changes nothing."""
    assert main(["feedback", "upgrade", "--db", feedback_db]) == 0
    assert main(["feedback", "upgrade", "--db", feedback_db]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"[attune] {feedback_db}: at revision 0002 (migrated from empty)",
        f"[attune] {feedback_db}: at revision 0002 (this attune's newest)"]


def test_the_export_migrates_an_old_database_and_says_so(feedback_db, tmp_path, capsys):
    engine = sa.create_engine(feedback_db)
    migrate.upgrade(engine, shown=feedback_db, to=migrate.FIRST)
    engine.dispose()
    insert_old_rows(feedback_db, n=1)
    out = tmp_path / "sft.jsonl"
    assert main(["feedback", "export", "--as", "sft", str(out), "--db", feedback_db]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"[attune] {feedback_db}: at revision 0002 (migrated from 0001)",
        f"[attune] {out}: 1 chats from {feedback_db}"]


WRITER = textwrap.dedent("""
    import sys
    from attune.feedback import Feedback, FeedbackStore
    url, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    print("ready", flush=True)
    sys.stdin.readline()  # both start at once: the migration of the empty database too
    store = FeedbackStore(url)
    for i in range(n):
        store.add(Feedback("tiny-full", [{"role": "user", "content": f"{name} {i}"}], "a",
                           rating="up", user=name))
""")


def test_two_page_processes_writing_at_once_lose_nothing(feedback_db):
    n = 150
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, feedback_db, name, str(n)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                cwd=REPO) for name in ("ada", "bob")]
    try:
        for writer in writers:
            assert writer.stdout.readline() == "ready\n"
        for writer in writers:
            writer.stdin.write("go\n")
            writer.stdin.flush()
        assert [writer.wait(timeout=300) for writer in writers] == [0, 0]
    finally:
        for writer in writers:
            writer.kill()
            writer.wait()
    marks = FeedbackStore(feedback_db).all()
    assert sorted(m.conversation[0]["content"] for m in marks) == sorted(
        f"{name} {i}" for name in ("ada", "bob") for i in range(n))
    assert revision_of(feedback_db) == migrate.head()


@pytest.fixture
def take_down(feedback_db, request):
    """Makes the database not answer, and brings it back: the server stopped, or the sqlite
    file's path something sqlite cannot open (a folder)."""
    if feedback_db.startswith("sqlite"):
        file = Path(sa.make_url(feedback_db).database)
        away = file.with_name("away.db")

        def down():
            file.rename(away)
            file.mkdir()

        def up():
            file.rmdir()
            away.rename(file)
        return down, up
    server = request.getfixturevalue("postgres")
    request.addfinalizer(lambda: server.process or server.start())
    return server.stop, server.start


def test_a_database_that_is_down_stops_no_chat(feedback_db, take_down, capfd):
    down, up = take_down
    FeedbackStore(feedback_db).add(Feedback("tiny-full", ASKED, "12.", rating="up"))
    down()
    store = open_store(feedback_db)  # the page starts
    line = capfd.readouterr().err
    assert line.count("\n") == 1 and line.startswith(
        f"[attune] warning: feedback database {feedback_db}: not answering (")
    assert line.endswith("; the page chats without saving feedback until it answers\n")
    turn = Turn(ASKED[0]["content"], "13.", model="tiny-full", asked=ASKED)
    notice = rate(store, turn, True, "ada")
    assert notice.startswith(NOT_SAVED.format(f"feedback database {feedback_db}: not answering ("))
    assert "\n" not in notice
    assert correct(store, turn, "12.", "ada") == (turn, notice)  # the answer stays as it was
    with pytest.raises(ConfigError, match=re.escape(f"feedback database {feedback_db}: not answering")):
        FeedbackStore(feedback_db, create=False)  # the export: one line

    up()
    assert rate(store, turn, False, "ada") is None  # saved again, with nothing restarted
    assert [m.rating for m in FeedbackStore(feedback_db).all()] == ["up", "down"]


EXPORTER = textwrap.dedent("""
    import re, sys, time
    from pathlib import Path
    from attune.feedback import FeedbackStore, export
    store = FeedbackStore(sys.argv[1])
    start = time.perf_counter()
    written = export(store, "dpo", sys.argv[2])
    # VmHWM: this program's peak resident memory (ru_maxrss would count the forking parent's)
    peak_kb = re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text())[1]
    print(written.lines, time.perf_counter() - start, int(peak_kb) // 1024)
""")


def test_the_export_streams_rows(feedback_db, tmp_path):
    """Exporting 40 MB of rows takes about the memory of exporting 400 kB of them."""
    def add_rows(first: int, n: int) -> None:
        engine = sa.create_engine(feedback_db)
        long = "x" * 4000
        with engine.begin() as connection:
            connection.execute(FEEDBACK.insert(), [{
                "created_at": "2026-11-01T10:00:00+00:00", "model": "tiny-full", "settings": "{}",
                "conversation": json.dumps([{"role": "user", "content": f"{i} {long}"}]),
                "answer": "a", "correction": "b"} for i in range(first, first + n)])
        engine.dispose()

    def exported() -> tuple[int, float, int]:
        out = subprocess.run([sys.executable, "-c", EXPORTER, feedback_db, str(tmp_path / "x.jsonl")],
                             capture_output=True, text=True, check=True, cwd=REPO).stdout.split()
        return int(out[0]), float(out[1]), int(out[2])

    FeedbackStore(feedback_db)
    add_rows(0, 100)
    lines, _, small_mb = exported()
    add_rows(100, 9_900)
    lines_then, seconds, large_mb = exported()
    assert (lines, lines_then) == (100, 10_000)
    print(f"export of 10,000 rows (40 MB): {seconds:.1f} s, peak {large_mb} MB "
          f"(100 rows: {small_mb} MB)")
    assert large_mb - small_mb < 20, (small_mb, large_mb)


def test_the_migrations_ship_in_the_wheel(tmp_path):
    """An installed attune migrates too: the wheel holds env.py and every revision."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        (source / name).write_text((REPO / name).read_text())
    subprocess.run(["cp", "-r", str(REPO / "platform"), str(source / "platform")], check=True)
    uv = Path(sys.executable).parent / "uv"
    subprocess.run([str(uv), "build", "--wheel", "--no-build-isolation", "--python", sys.executable,
                    "--out-dir", str(tmp_path), str(source)], check=True, capture_output=True,
                   timeout=300, env={**os.environ, "UV_OFFLINE": "1"})
    (wheel,) = tmp_path.glob("attune-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"attune/feedback/migrations/{p.relative_to(migrate.MIGRATIONS)}"
               for p in migrate.MIGRATIONS.rglob("*.py")}
    assert {"attune/feedback/migrations/env.py",
            "attune/feedback/migrations/versions/0002_comment_and_model_index.py"} <= shipped <= names
