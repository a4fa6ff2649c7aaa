"""Sessions, turns, blocks and image artifacts.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "duogen_sessions",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("title", sa.Text()),
        sa.Column("preset", sa.String(200), nullable=False),
        sa.Column("mode", sa.String(20), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "duogen_turns",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("session_id", sa.String(64), sa.ForeignKey("duogen_sessions.id", ondelete="CASCADE"), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("mode", sa.String(20), nullable=False),
        sa.Column("preset", sa.String(200), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("stop_reason", sa.String(40)),
        sa.Column("error", sa.Text()),
        sa.Column("title", sa.Text()),
        sa.Column("base_checkpoint_id", sa.String(64)),
        sa.Column("inputs", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.UniqueConstraint("session_id", "number", name="uq_duogen_turns_session_number"),
    )
    op.create_index("ix_duogen_turns_session_id", "duogen_turns", ["session_id"])
    op.create_table(
        "duogen_blocks",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("turn_id", sa.Integer(), sa.ForeignKey("duogen_turns.id", ondelete="CASCADE"), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("type", sa.String(10), nullable=False),
        sa.Column("text", sa.Text()),
        sa.Column("image_sha256", sa.String(64)),
        sa.Column("data", sa.JSON(), nullable=False),
    )
    op.create_index("ix_duogen_blocks_turn_id", "duogen_blocks", ["turn_id"])
    op.create_table(
        "duogen_artifacts",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("session_id", sa.String(64), sa.ForeignKey("duogen_sessions.id", ondelete="CASCADE"), nullable=False),
        sa.Column("turn_id", sa.Integer(), sa.ForeignKey("duogen_turns.id", ondelete="CASCADE")),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("mime", sa.String(40), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("origin", sa.String(20), nullable=False),
        sa.Column("parent_sha256", sa.String(64)),
        sa.Column("request", sa.JSON()),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("session_id", "sha256", name="uq_duogen_artifacts_session_sha256"),
    )


def downgrade() -> None:
    op.drop_table("duogen_artifacts")
    op.drop_table("duogen_blocks")
    op.drop_table("duogen_turns")
    op.drop_table("duogen_sessions")
