"""Thumbs and corrections on the page's answers, stored as `attune.feedback` rows.

The Chatbot shows each Turn as two messages, the question then the answer: message i belongs to
turn i // 2, and only odd messages (answers) take feedback.
"""

from __future__ import annotations

from dataclasses import asdict, replace

from attune.feedback import Feedback, FeedbackStore
from attune.ui.chat import Turn


def answered_turn(turns: list[Turn], index) -> int | None:
    """The turn whose answer is Chatbot message `index`; None for a question or a failed turn."""
    index = index[0] if isinstance(index, (list, tuple)) else index
    if not isinstance(index, int) or index % 2 == 0 or index // 2 >= len(turns):
        return None
    turn = turns[index // 2]
    return index // 2 if turn.error is None and turn.model and turn.answer else None


def rate(store: FeedbackStore, turn: Turn, liked, user: str | None) -> None:
    """Record a thumbs up (liked True) or down (False); Gradio's other values (un-liking) are
    not an opinion."""
    if isinstance(liked, bool):
        store.add(_feedback(turn, user, rating="up" if liked else "down"))


def correct(store: FeedbackStore, turn: Turn, text: str, user: str | None) -> Turn:
    """Record `text` as the answer the turn should have had; the turn then carries it on in the
    conversation, remembering the model's own."""
    text = text.strip()
    if not text or text == turn.answer:
        return turn
    store.add(_feedback(turn, user, correction=text))
    return replace(turn, answer=text, original=turn.original or turn.answer, stats=None)


def _feedback(turn: Turn, user: str | None, **opinion) -> Feedback:
    return Feedback(model=turn.model, conversation=turn.asked, answer=turn.original or turn.answer,
                    settings=asdict(turn.settings) if turn.settings else {}, user=user, **opinion)
