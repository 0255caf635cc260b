"""The chat page's feedback: its database, its export as data the recipes read, and the page's
mapping of Chatbot messages to turns. (The browser round trip is in test_ui_browser.py.)"""

from __future__ import annotations

import json

import pytest

from attune import data
from attune.cli import main
from attune.config import ConfigError
from attune.feedback import Feedback, FeedbackStore
from attune.ui.chat import GenerationSettings, Turn
from attune.ui.feedback import answered_turn, correct, rate

ASKED = [{"role": "user", "content": "How many layers does BERT-base have?"}]


@pytest.fixture
def store(tmp_path):
    return FeedbackStore(f"sqlite:///{tmp_path}/feedback.db")


def test_the_latest_opinion_on_an_answer_counts_and_exports_as_data_the_recipes_read(store, tmp_path):
    other = [{"role": "user", "content": "Who released BERT-base?"}]
    store.add(Feedback("tiny-full", ASKED, "12.", rating="down", user="ada"))
    store.add(Feedback("tiny-full", ASKED, "12.", correction="BERT-base has 12 layers.", user="ada"))
    store.add(Feedback("tiny-full", ASKED, "12.", correction="It has 12 layers.", user="ada"))
    store.add(Feedback("tiny-full", other, "Google.", rating="up", user="ada"))
    store.add(Feedback("tiny-full", other, "Google.", rating="down", user="bob"))  # no training line
    store.add(Feedback("tiny-llama", other, "zz", rating="up"))

    assert store.export("dpo", tmp_path / "dpo.jsonl", model="tiny-full") == 1
    pairs = data.read_records([str(tmp_path / "dpo.jsonl")], "preference")
    assert [(r.messages, r.chosen, r.rejected) for r in pairs] == [(ASKED, "It has 12 layers.", "12.")]

    assert store.export("sft", tmp_path / "sft.jsonl", model="tiny-full") == 2
    chats = data.read_records([str(tmp_path / "sft.jsonl")], "messages")
    assert [r.messages[-1]["content"] for r in chats] == ["It has 12 layers.", "Google."]
    assert store.export("sft", tmp_path / "all.jsonl") == 3


def test_the_page_records_answers_with_their_model_settings_and_user(store):
    settings = GenerationSettings(temperature=0.5, max_tokens=32)
    turns = [Turn("q1", error="endpoint down"),
             Turn(ASKED[0]["content"], "12.", model="tiny-full", asked=ASKED, settings=settings)]
    assert [answered_turn(turns, i) for i in range(5)] == [None, None, None, 1, None]  # answers only

    rate(store, turns[1], True, "ada")
    rate(store, turns[1], "", "ada")  # Gradio's un-like: no opinion recorded
    corrected = correct(store, turns[1], " BERT-base has 12 layers. ", "ada")
    again = correct(store, corrected, "It has 12 layers.", "ada")
    assert (again.answer, again.original) == ("It has 12 layers.", "12.")

    marks = store.all()
    assert [(m.rating, m.correction) for m in marks] == [
        ("up", None), (None, "BERT-base has 12 layers."), (None, "It has 12 layers.")]
    assert {(m.model, m.answer, m.user, m.settings["temperature"]) for m in marks} == {
        ("tiny-full", "12.", "ada", 0.5)}


def test_feedback_export_command(store, tmp_path, capsys):
    store.add(Feedback("tiny-full", ASKED, "12.", correction="BERT-base has 12 layers."))
    out = tmp_path / "pairs.jsonl"
    assert main(["feedback", "export", "--as", "dpo", str(out), "--db", store.url]) == 0
    assert f"{out}: 1 preference pairs from {store.url}" in capsys.readouterr().out
    assert json.loads(out.read_text())["chosen"] == "BERT-base has 12 layers."


def test_a_bad_database_url_is_named():
    with pytest.raises(ConfigError, match="feedback database nosuch://x"):
        FeedbackStore("nosuch://x")
