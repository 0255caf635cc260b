"""Thumbs and corrections on the page's answers, stored as `attune.feedback` rows.

The Chatbot shows each Turn as two messages, the question then the answer: message i belongs to
turn i // 2, and only odd messages (answers) take feedback. A database that does not answer
stops no chat: the page says feedback is not being saved, and saves again once it answers.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, replace

from attune.feedback import Feedback, FeedbackStore, FeedbackUnavailable
from attune.ui.chat import Turn

NOT_SAVED = "Feedback is not being saved: {}"


def open_store(url: str | None) -> FeedbackStore:
    """The page's store, brought up to date; a database that is down is one warning line, and
    the page starts anyway. A bad URL or a database newer than this attune is a ConfigError."""
    store = FeedbackStore(url, lazy=True)
    try:
        before, after = store.upgrade()
    except FeedbackUnavailable as e:
        print(f"[attune] warning: {e}; the page chats without saving feedback until it answers",
              file=sys.stderr, flush=True)
        return store
    if before != after:
        print(f"[attune] feedback database {store.shown}: migrated from {before or 'empty'} to "
              f"{after}", file=sys.stderr, flush=True)
    return store


def answered_turn(turns: list[Turn], index) -> int | None:
    """The turn whose answer is Chatbot message `index`; None for a question or a failed turn."""
    index = index[0] if isinstance(index, (list, tuple)) else index
    if not isinstance(index, int) or index % 2 == 0 or index // 2 >= len(turns):
        return None
    turn = turns[index // 2]
    return index // 2 if turn.error is None and turn.model and turn.answer else None


def rate(store: FeedbackStore, turn: Turn, liked, user: str | None) -> str | None:
    """Record a thumbs up (liked True) or down (False); Gradio's other values (un-liking) are
    not an opinion. Returns why it was not saved, if it was not."""
    if isinstance(liked, bool):
        return _save(store, _feedback(turn, user, rating="up" if liked else "down"))
    return None


def correct(store: FeedbackStore, turn: Turn, text: str, user: str | None) -> tuple[Turn, str | None]:
    """Record `text` as the answer the turn should have had; the turn then carries it on in the
    conversation, remembering the model's own. Not saved: the turn as it was, and why."""
    text = text.strip()
    if not text or text == turn.answer:
        return turn, None
    if notice := _save(store, _feedback(turn, user, correction=text)):
        return turn, notice
    return replace(turn, answer=text, original=turn.original or turn.answer, stats=None), None


def _save(store: FeedbackStore, feedback: Feedback) -> str | None:
    try:
        store.add(feedback)
    except FeedbackUnavailable as e:
        return NOT_SAVED.format(e)
    return None


def _feedback(turn: Turn, user: str | None, **opinion) -> Feedback:
    return Feedback(model=turn.model, conversation=turn.asked, answer=turn.original or turn.answer,
                    settings=asdict(turn.settings) if turn.settings else {}, user=user, **opinion)
