"""The revisions, oldest first; the next is written by hand beside the last (docs/feedback.md)."""
