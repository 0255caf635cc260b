"""The chat page's feedback: its database (sqlite and a real PostgreSQL, the same tests), its
export as data the recipes read, and the page's mapping of Chatbot messages to turns.
(Migrations, two writers, a database that is down: test_feedback_db.py. The browser round trip:
test_ui_browser.py.)"""

from __future__ import annotations

import json

import pytest

from attune.cli import main
from attune.config import ConfigError
from attune.feedback import Feedback, FeedbackStore, export
from attune.feedback.export import THUMBS_DOWN_ONLY, THUMBS_UP_ONLY, utc_text
from attune.train.records import read_records
from attune.ui.chat import GenerationSettings, Turn
from attune.ui.feedback import answered_turn, correct, rate

ASKED = [{"role": "user", "content": "How many layers does BERT-base have?"}]
OTHER = [{"role": "user", "content": "Who released BERT-base?"}]


@pytest.fixture
def store(feedback_db):
    return FeedbackStore(feedback_db)


def test_the_latest_opinion_on_an_answer_counts_and_exports_as_data_the_recipes_read(store, tmp_path):
    store.add(Feedback("tiny-full", ASKED, "12.", rating="down", user="ada"))
    store.add(Feedback("tiny-full", ASKED, "12.", correction="BERT-base has 12 layers.", user="ada"))
    store.add(Feedback("tiny-full", OTHER, "Google.", rating="up", user="ada"))
    store.add(Feedback("tiny-full", ASKED, "12.", correction="It has 12 layers.", user="ada"))
    store.add(Feedback("tiny-full", OTHER, "Google.", rating="down", user="bob"))  # no training line
    store.add(Feedback("tiny-llama", OTHER, "zz", rating="up"))

    dpo = export(store, "dpo", tmp_path / "dpo.jsonl", model="tiny-full")
    assert (dpo.lines, dict(dpo.skipped)) == (1, {THUMBS_UP_ONLY: 1, THUMBS_DOWN_ONLY: 1})
    pairs = read_records([str(tmp_path / "dpo.jsonl")], "preference")
    assert [(r.messages, r.chosen, r.rejected) for r in pairs] == [(ASKED, "It has 12 layers.", "12.")]

    sft = export(store, "sft", tmp_path / "sft.jsonl", model="tiny-full")
    assert (sft.lines, dict(sft.skipped)) == (2, {THUMBS_DOWN_ONLY: 1})
    chats = read_records([str(tmp_path / "sft.jsonl")], "messages")
    # in the order the answers were first marked, whatever order their later marks came in
    assert [r.messages[-1]["content"] for r in chats] == ["It has 12 layers.", "Google."]
    assert export(store, "sft", tmp_path / "all.jsonl").lines == 3
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".db") == [
        "all.jsonl", "dpo.jsonl", "sft.jsonl"]  # no partial files left


def test_the_export_filters_by_model_user_and_time(store, tmp_path):
    for user, day in (("ada", "2026-11-01"), ("ada", "2026-11-02"), ("bob", "2026-11-02"),
                      ("ada", "2026-11-03")):
        store.add(Feedback("tiny-full", [{"role": "user", "content": f"{user} {day}"}], "a",
                           correction="b", user=user, created_at=f"{day}T10:00:00+00:00"))
    store.add(Feedback("tiny-llama", ASKED, "a", correction="b", user="ada",
                       created_at="2026-11-02T10:00:00+00:00"))

    def asked(**filters):
        export(store, "dpo", tmp_path / "out.jsonl", **filters)
        return [json.loads(line)["messages"][0]["content"]
                for line in (tmp_path / "out.jsonl").read_text().splitlines()]

    assert asked(model="tiny-full", user="ada", since=utc_text("2026-11-02", "--since"),
                 until=utc_text("2026-11-02", "--until", end=True)) == ["ada 2026-11-02"]
    assert asked(model="tiny-full", since=utc_text("2026-11-02T10:00", "--since")) == [
        "ada 2026-11-02", "bob 2026-11-02", "ada 2026-11-03"]
    assert asked(until=utc_text("2026-11-02T11:00+01:00", "--until", end=True)) == ["ada 2026-11-01"]
    assert asked(user="nobody") == []


def test_a_time_that_is_not_iso_is_named():
    with pytest.raises(ConfigError, match=r"^--since 30/11/2026: not an ISO 8601 date or time"):
        utc_text("30/11/2026", "--since")


def test_the_page_records_answers_with_their_model_settings_and_user(store):
    settings = GenerationSettings(temperature=0.5, max_tokens=32)
    turns = [Turn("q1", error="endpoint down"),
             Turn(ASKED[0]["content"], "12.", model="tiny-full", asked=ASKED, settings=settings)]
    assert [answered_turn(turns, i) for i in range(5)] == [None, None, None, 1, None]  # answers only

    assert rate(store, turns[1], True, "ada") is None
    rate(store, turns[1], "", "ada")  # Gradio's un-like: no opinion recorded
    corrected, notice = correct(store, turns[1], " BERT-base has 12 layers. ", "ada")
    again, notice = correct(store, corrected, "It has 12 layers.", "ada")
    assert (again.answer, again.original, notice) == ("It has 12 layers.", "12.", None)

    marks = store.all()
    assert [(m.rating, m.correction) for m in marks] == [
        ("up", None), (None, "BERT-base has 12 layers."), (None, "It has 12 layers.")]
    assert {(m.model, m.answer, m.user, m.settings["temperature"]) for m in marks} == {
        ("tiny-full", "12.", "ada", 0.5)}


def test_feedback_export_command(store, tmp_path, capsys):
    store.add(Feedback("tiny-full", ASKED, "12.", correction="BERT-base has 12 layers."))
    store.add(Feedback("tiny-full", OTHER, "Google.", rating="up"))
    out = tmp_path / "pairs.jsonl"
    assert main(["feedback", "export", "--as", "dpo", str(out), "--db", store.url,
                 "--model", "tiny-full", "--since", "2020-01-01"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"[attune] {out}: 1 preference pairs from {store.shown}",
        f"[attune] skipped 1 answer: 1 {THUMBS_UP_ONLY}"]
    assert json.loads(out.read_text())["chosen"] == "BERT-base has 12 layers."


def test_a_password_in_the_url_is_not_shown(postgres):
    url = postgres.url("nosuchdb").replace("attune@", "attune:s3cret@")
    with pytest.raises(ConfigError) as failed:
        FeedbackStore(url)
    assert "s3cret" not in str(failed.value) and "attune:***@" in str(failed.value)


def test_a_bad_database_url_is_named():
    with pytest.raises(ConfigError, match="feedback database nosuch://x"):
        FeedbackStore("nosuch://x")
