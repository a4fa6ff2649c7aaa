"""Schema migrations, and databases duogen must refuse without touching them (SQLite and PostgreSQL)."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timezone

import pytest
from sqlalchemy import create_engine, inspect, text

from duogen_agents.errors import StorageError
from duogen_agents.sessions import Sessions
from duogen_agents.storage.database import VERSION_TABLE, Database, _alembic_config
from duogen_agents.storage.images import ImageStore


def test_migrates_an_empty_database_to_head(db_url, tmp_path) -> None:
    with Database.open(db_url, home=tmp_path) as db:
        assert db.revision() == "0002"
        with db.engine.connect() as c:
            tables = set(inspect(c).get_table_names())
            assert {"duogen_sessions", "duogen_turns", "duogen_blocks", "duogen_artifacts", VERSION_TABLE} <= tables
            assert "parent_id" in {col["name"] for col in inspect(c).get_columns("duogen_sessions")}
    with Database.open(db_url, home=tmp_path) as db:  # reopening is a no-op
        assert db.revision() == "0002"


def test_reopens_a_database_made_by_the_previous_schema(db_url, tmp_path) -> None:
    from alembic import command

    db = Database(db_url)
    cfg = _alembic_config()
    now = datetime.now(timezone.utc)
    with db.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
    with db.engine.begin() as conn:
        assert conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar() == "0001"
        conn.execute(
            text("INSERT INTO duogen_sessions (id, title, preset, mode, created_at, updated_at) VALUES (:i, :t, 'tiny', 'interleaved', :n, :n)"),
            {"i": "old", "t": "made by 0001", "n": now},
        )  # fmt: skip
        conn.execute(
            text(
                "INSERT INTO duogen_turns (session_id, number, prompt, mode, preset, seed, status, inputs, created_at)"
                " VALUES ('old', 1, 'hello', 'interleaved', 'tiny', 0, 'complete', '[]', :n)"
            ),
            {"n": now},
        )
    db.close()
    with Database.open(db_url, home=tmp_path) as db:
        assert db.revision() == "0002"
        sessions = Sessions(db, ImageStore(tmp_path))
        info = sessions.get("old")
        assert info.title == "made by 0001" and info.parent_id is None and info.turns == 1
        assert sessions.turns("old")[0].prompt == "hello"


def test_refuses_a_newer_schema(db_url, tmp_path) -> None:
    with Database.open(db_url, home=tmp_path) as db, db.engine.begin() as c:
        c.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = '9999'"))
    with pytest.raises(StorageError, match="newer duogen-agents"):
        Database.open(db_url, home=tmp_path)


def test_refuses_another_applications_database_and_leaves_it_untouched(db_url, tmp_path) -> None:
    engine = create_engine(Database(db_url).url)
    with engine.begin() as c:
        c.execute(text("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)"))
        c.execute(text("INSERT INTO users (id, name) VALUES (1, 'ada')"))
    before = open(Database(db_url).path, "rb").read() if db_url.startswith("sqlite") else None
    with pytest.raises(StorageError, match="not duogen's"):
        Database.open(db_url, home=tmp_path)
    with engine.connect() as c:
        assert set(inspect(c).get_table_names()) == {"users"}
        assert c.execute(text("SELECT name FROM users")).scalar() == "ada"
    engine.dispose()
    if before is not None:
        assert open(Database(db_url).path, "rb").read() == before


def test_refuses_a_corrupt_sqlite_file_and_never_overwrites_it(tmp_path) -> None:
    bad = tmp_path / "notes.db"
    payload = b"These are my notes, not a database.\n" * 200
    bad.write_bytes(payload)
    with pytest.raises(StorageError, match="not a usable SQLite database"):
        Database.open(f"sqlite:///{bad}", home=tmp_path)
    assert bad.read_bytes() == payload
    # A truncated real database is refused too.
    good = tmp_path / "good.db"
    Database.open(f"sqlite:///{good}", home=tmp_path).close()
    data = good.read_bytes()
    trunc = tmp_path / "trunc.db"
    trunc.write_bytes(data[:100] + b"\xff" * 50)
    with pytest.raises(StorageError):
        Database.open(f"sqlite:///{trunc}", home=tmp_path)
    assert sqlite3.connect(good).execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_bad_urls_are_one_line_config_errors(tmp_path) -> None:
    from duogen_agents.errors import ConfigError

    for url in ("mysql://x@y/z", "sqlite://", "sqlite:///:memory:", "::nonsense"):
        with pytest.raises(ConfigError):
            Database(url)
    with pytest.raises(StorageError, match="cannot connect"):
        Database.open("postgresql://postgres@127.0.0.1:1/none", home=tmp_path)
