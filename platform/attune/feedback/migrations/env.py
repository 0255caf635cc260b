"""Alembic's environment: attune.feedback.migrate hands it a connection already in a transaction
that holds the migration lock, so every revision runs in that transaction (one migrator at a time)."""

from alembic import context

context.configure(connection=context.config.attributes["connection"])
with context.begin_transaction():
    context.run_migrations()
