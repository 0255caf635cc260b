"""What people say about the chat page's answers, kept in a database and exported as training data.

    store = FeedbackStore()             # sqlite under $ATTUNE_HOME, $ATTUNE_FEEDBACK_DB, or a URL
    store.add(Feedback("tiny-full", conversation, "12.", correction="BERT-base has 12 layers."))
    export(store, "dpo", "feedback-dpo.jsonl")     # {"messages", "chosen", "rejected"} per line

schema.py: a row; store.py: the database (sqlite or PostgreSQL); migrate.py and migrations/: its
schema's revisions (Alembic); export.py: rows to DPO pairs and SFT chats, streamed.
"""

from attune.feedback.export import EXPORTS, Written, export
from attune.feedback.schema import Feedback
from attune.feedback.store import FeedbackStore, FeedbackUnavailable, default_url

__all__ = ["EXPORTS", "Feedback", "FeedbackStore", "FeedbackUnavailable", "Written", "default_url",
           "export"]
