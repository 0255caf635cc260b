"""The feedback table as attune created it before migrations (SQLAlchemy's create_all).

Revision ID: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "feedback",
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


def downgrade() -> None:
    op.drop_table("feedback")
