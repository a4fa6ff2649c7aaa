"""Session records (SQLAlchemy 2 ORM): sessions, their turns, each turn's blocks, and image artifacts.

The schema is created and evolved by the Alembic migrations in ``storage/migrations`` (applied when a
``Database`` opens); these classes describe the head revision. Graph state lives beside them in the
LangGraph saver's tables of the same database (thread id = session id).

::

    duogen_sessions   id (name), title, preset, mode, parent_id (fork origin), times
    duogen_turns      session, number, prompt, mode, status running|complete|interrupted|cancelled,
                      stop_reason, error, base_checkpoint_id (the graph state the turn started from)
    duogen_blocks     turn, position, type text|image, text, image sha256, the block as JSON
    duogen_artifacts  session, turn, sha256, mime, size, width, height, origin upload|generated|draft,
                      parent image (edits), the request that produced it (prompt, references, seed)
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import DateTime, TypeDecorator


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """A point in time, given back as an aware ``datetime`` in UTC on every backend.

    The column is ``DateTime(timezone=True)`` as the migrations create it (no schema change). Written:
    any aware value is converted to UTC first; a naive one is taken to be UTC already. SQLite keeps
    the text of a naive UTC time (as duogen always wrote there: text order is time order, and values
    bound in a query compare with it); PostgreSQL gets the aware UTC value for its ``timestamptz``.
    Read: SQLite's naive text is UTC, and PostgreSQL's value, which arrives in the connection's
    ``TimeZone``, is converted to UTC. A stored value that is not a date still raises ``ValueError``."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if not isinstance(value, datetime):
            return value  # None, or a wrong type that the column's own type refuses
        value = value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if not isinstance(value, datetime):
            return value
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    pass


TURN_STATUSES = ("running", "complete", "interrupted", "cancelled")
# A turn in one of these did not finish: ``resume`` continues it, ``cancel`` drops it.
UNFINISHED = ("running", "interrupted")


class SessionRecord(Base):
    __tablename__ = "duogen_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    title: Mapped[str | None] = mapped_column(Text)
    preset: Mapped[str] = mapped_column(String(200))
    mode: Mapped[str] = mapped_column(String(20))
    parent_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    turns: Mapped[list[TurnRecord]] = relationship(
        back_populates="session", cascade="all, delete-orphan", order_by="TurnRecord.number", passive_deletes=True
    )
    artifacts: Mapped[list[ArtifactRecord]] = relationship(cascade="all, delete-orphan", passive_deletes=True)


class TurnRecord(Base):
    __tablename__ = "duogen_turns"
    __table_args__ = (UniqueConstraint("session_id", "number", name="uq_duogen_turns_session_number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("duogen_sessions.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    prompt: Mapped[str] = mapped_column(Text)
    mode: Mapped[str] = mapped_column(String(20))
    preset: Mapped[str] = mapped_column(String(200))
    seed: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(20), default="running")
    stop_reason: Mapped[str | None] = mapped_column(String(40))
    error: Mapped[str | None] = mapped_column(Text)
    title: Mapped[str | None] = mapped_column(Text)
    base_checkpoint_id: Mapped[str | None] = mapped_column(String(64))
    inputs: Mapped[list[Any]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    session: Mapped[SessionRecord] = relationship(back_populates="turns")
    blocks: Mapped[list[BlockRecord]] = relationship(
        cascade="all, delete-orphan", order_by="BlockRecord.position", passive_deletes=True
    )


class BlockRecord(Base):
    __tablename__ = "duogen_blocks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    turn_id: Mapped[int] = mapped_column(ForeignKey("duogen_turns.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    type: Mapped[str] = mapped_column(String(10))
    text: Mapped[str | None] = mapped_column(Text)
    image_sha256: Mapped[str | None] = mapped_column(String(64))
    data: Mapped[dict[str, Any]] = mapped_column(JSON)


class ArtifactRecord(Base):
    __tablename__ = "duogen_artifacts"
    __table_args__ = (
        UniqueConstraint("session_id", "sha256", name="uq_duogen_artifacts_session_sha256"),
        Index("ix_duogen_artifacts_sha256", "sha256"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("duogen_sessions.id", ondelete="CASCADE"))
    turn_id: Mapped[int | None] = mapped_column(ForeignKey("duogen_turns.id", ondelete="CASCADE"))
    sha256: Mapped[str] = mapped_column(String(64))
    mime: Mapped[str] = mapped_column(String(40))
    size: Mapped[int] = mapped_column(Integer)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    origin: Mapped[str] = mapped_column(String(20))
    parent_sha256: Mapped[str | None] = mapped_column(String(64))
    request: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
