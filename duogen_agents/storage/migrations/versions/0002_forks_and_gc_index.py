"""Fork lineage on sessions; an index on artifact sha256 for deletes and garbage collection.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("duogen_sessions") as batch:
        batch.add_column(sa.Column("parent_id", sa.String(64)))
    op.create_index("ix_duogen_artifacts_sha256", "duogen_artifacts", ["sha256"])


def downgrade() -> None:
    op.drop_index("ix_duogen_artifacts_sha256", "duogen_artifacts")
    with op.batch_alter_table("duogen_sessions") as batch:
        batch.drop_column("parent_id")
