"""The rater's optional comment; an index for the export's --model and date filters.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    op.add_column("feedback", sa.Column("comment", sa.Text))
    op.create_index("ix_feedback_model_created_at", "feedback", ["model", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_feedback_model_created_at", table_name="feedback")
    with op.batch_alter_table("feedback") as batch:  # sqlite drops a column by copying the table
        batch.drop_column("comment")
