"""Deleting and garbage-collecting sessions: one image store shared by several databases, a delete
that fails half-way, and stored values that do not decode (audit of the persisted sessions)."""

from __future__ import annotations

import os
import sqlite3
import time

import pytest
from PIL import Image
from sqlalchemy import create_engine, text

from duogen_agents.cli import main
from duogen_agents.errors import StorageError
from duogen_agents.sessions import Sessions
from duogen_agents.storage.database import Database
from duogen_agents.storage.images import ImageStore
from duogen_agents.storage.registry import register
from tests.security.helpers import DONE, OK, TEXT, image, make_session, one_line, scripted_agent
from tests.security.test_checkpoints import plant


def _sql(db_url: str, *statements: str) -> None:
    engine = create_engine(db_url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as c:
        for statement in statements:
            c.execute(text(statement))
    engine.dispose()


def _ids(doc) -> set[str]:
    return {b.image.id for b in doc.images}


def _orphan(store: ImageStore, color=(7, 7, 7)) -> str:
    """An image no session references, older than any grace period."""
    ref = store.put(Image.new("RGB", (4, 4), color))
    old = time.time() - 7200
    os.utime(store.path(ref.id), (old, old))
    return ref.id


# ---- 1. one image store, several databases ------------------------------------------------------------


def test_gc_and_delete_keep_what_another_database_on_the_store_references(pg_url, home) -> None:
    sqlite_url = f"sqlite:///{home / 'duogen.db'}"  # the data directory's default database
    local = make_session(sqlite_url, home, "local", script=[TEXT, image("a local pot"), OK, DONE])
    remote = make_session(pg_url, home, "remote", script=[TEXT, image("a remote pot"), OK, DONE])
    shared = make_session(pg_url, home, "shared", script=[TEXT, image("a local pot"), OK, DONE])
    assert _ids(shared) == _ids(local)  # the same pixels: one file for both databases
    store = ImageStore(home)
    orphan = _orphan(store)
    old = time.time() - 7200
    for image_id in _ids(local) | _ids(remote):
        os.utime(store.path(image_id), (old, old))

    pg = Sessions.open(pg_url, home=home)
    lite = Sessions.open(sqlite_url, home=home)
    try:
        # gc on SQLite never connects to the PostgreSQL server on the store's list: it keeps everything.
        report = lite.gc(grace_seconds=0)
        assert report.removed == 0 and "kept every image file" in report.note and "postgresql://" in report.note
        assert store.exists(orphan) and all(store.exists(i) for i in _ids(local) | _ids(remote))
        notes: list[str] = []
        assert lite.delete("local", notes=notes) == 0 and "kept every image file" in notes[0]
        # gc on PostgreSQL reads the SQLite database on the store (a local file): only the orphan goes.
        report = pg.gc(grace_seconds=0)
        assert report.removed == 1 and report.note is None and not store.exists(orphan)
        assert all(store.exists(i) for i in _ids(local) | _ids(remote))
        # Deleting in PostgreSQL removes what no session of either database uses.
        local_again = make_session(sqlite_url, home, "local", script=[TEXT, image("a local pot"), OK, DONE])
        assert _ids(local_again) == _ids(local)
        assert pg.delete("remote") == 1 and not any(store.exists(i) for i in _ids(remote))
        assert pg.delete("shared") == 0 and all(store.exists(i) for i in _ids(local))  # SQLite's "local" uses it
    finally:
        pg.close()
        lite.close()


def test_a_database_that_cannot_be_read_keeps_every_image_and_says_which(db_url, home, capsys) -> None:
    make_session(db_url, home, "garden")
    store = ImageStore(home)
    orphan = _orphan(store)
    # A server gc must not connect to (nothing listens on port 1, and an entry anyone who can write the
    # store could plant must not make gc send PGPASSWORD anywhere); options that hold secrets are not kept.
    register(store, "postgresql://nobody:secret@127.0.0.1:1/elsewhere?sslpassword=s3cret&sslmode=require")
    code = main(["sessions", "gc", "--grace", "0", "--db", db_url])
    cap = capsys.readouterr()
    assert code == 0 and "removed 0" in cap.out and store.exists(orphan)
    note = one_line(cap.err)
    assert "kept every image file" in note and "127.0.0.1:1/elsewhere" in note and "secret" not in note
    entries = "".join(p.read_text() for p in (store.images_dir / ".databases").iterdir())
    assert "secret" not in entries and "s3cret" not in entries and "sslmode" not in entries
    code = main(["sessions", "delete", "garden", "--db", db_url])
    cap = capsys.readouterr()
    assert code == 0 and "0 image file(s)" in cap.out and "kept every image file" in one_line(cap.err)
    assert store.exists(orphan) and len(list(store.iter_files())) > 1
    # An entry that cannot be read stands for any database: everything is kept too.
    assert main(["sessions", "gc", "--forget", "postgresql://nobody@127.0.0.1:1/elsewhere", "--db", db_url]) == 0
    assert "removed 1" in capsys.readouterr().out and not store.exists(orphan)  # forgotten: gc goes on
    orphan = _orphan(store, (8, 8, 8))
    bad = store.images_dir / ".databases" / ("0" * 32 + ".db")
    bad.write_bytes(b"\xff\xfe not a name")
    assert main(["sessions", "gc", "--grace", "0", "--db", db_url]) == 0
    cap = capsys.readouterr()
    assert "removed 0" in cap.out and "cannot be read" in one_line(cap.err) and store.exists(orphan)
    # --forget takes the entry's file as the note names it, and an entry by what it holds, whatever its
    # file is called (a hand-copied one, or one an earlier version wrote with query options).
    legacy = store.images_dir / ".databases" / "legacy.db"
    legacy.write_text("postgresql://u@db.example:5432/app?sslmode=require\n")
    assert main(["sessions", "gc", "--forget", str(bad), "--db", db_url]) == 0
    assert (
        main(["sessions", "gc", "--forget", "postgresql://u@db.example:5432/app?sslmode=require", "--db", db_url]) == 0
    )
    assert not bad.exists() and not legacy.exists() and not store.exists(orphan)


def test_a_database_whose_file_is_not_there_keeps_its_images_until_it_is_forgotten(
    db_url, home, tmp_path, capsys
) -> None:
    """Not there is no proof of gone (an unmounted disk, another container): its entry stays and its
    images are kept, until ``gc --forget`` says the database is gone for good."""
    gone = tmp_path / "disk" / "gone.db"
    gone.parent.mkdir()
    make_session(f"sqlite:///{gone}", home, "old", script=[TEXT, image("an old pot"), OK, DONE])
    away = tmp_path / "unmounted"
    gone.parent.rename(away)
    store = ImageStore(home)
    old = time.time() - 7200
    for _, path in store.iter_files():
        os.utime(path, (old, old))
    sessions = Sessions.open(db_url, home=home)
    try:
        report = sessions.gc(grace_seconds=0)
        assert report.removed == 0 and "is not there" in report.note and len(store.iter_files()) == 1
        away.rename(gone.parent)  # mounted again: its session reads its picture
        back = Sessions.open(f"sqlite:///{gone}", home=home)
        assert back.document("old").images
        back.close()
        away_again = tmp_path / "unmounted"
        gone.parent.rename(away_again)
        code = main(["sessions", "gc", "--grace", "0", "--forget", f"sqlite:///{gone}", "--db", db_url])
        cap = capsys.readouterr()
        assert code == 0 and f"forgot sqlite:///{gone}" in cap.out and "removed 1" in cap.out
        assert store.iter_files() == []
        assert main(["sessions", "gc", "--forget", f"sqlite:///{gone}", "--db", db_url]) == 1
        assert "no such database" in one_line(capsys.readouterr().err)
    finally:
        sessions.close()


# ---- 2. delete: everything read first; records and checkpoints together -------------------------------


def test_delete_is_not_stopped_by_another_sessions_unreadable_state(db_url, home, tmp_path) -> None:
    good = make_session(db_url, home, "good", script=[TEXT, image("a good pot"), OK, DONE])
    bad = make_session(db_url, home, "bad", script=[TEXT, image("a bad pot"), OK, DONE])
    _sql(db_url, "UPDATE duogen_turns SET status='interrupted' WHERE session_id='bad'")
    plant(db_url, "bad", tmp_path / "pwned")
    store = ImageStore(home)
    old = time.time() - 7200
    for image_id in _ids(good):  # drawn before bad's turn began
        os.utime(store.path(image_id), (old, old))
    with Database.open(db_url, home=home) as db:
        sessions = Sessions(db, store)
        assert sessions.gc(grace_seconds=0).note is None
        assert sessions.delete("good") == 1
        assert not sessions.exists("good") and not any(store.exists(i) for i in _ids(good))
        # bad's turn cannot be read: every file written since it began stays.
        assert all(store.exists(i) for i in _ids(bad))
    assert not (tmp_path / "pwned").exists()


def _fail_checkpoint_deletes(db_url: str) -> None:
    """The delete's last statement fails (the session row's), after its checkpoints were deleted in
    the same transaction: only an atomic delete leaves the checkpoints."""
    if db_url.startswith("sqlite"):
        _sql(db_url, "CREATE TRIGGER fail BEFORE DELETE ON duogen_sessions BEGIN SELECT RAISE(ABORT, 'simulated'); END")
    else:
        _sql(
            db_url,
            "CREATE FUNCTION fail() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'simulated'; END $$",
            "CREATE TRIGGER fail BEFORE DELETE ON duogen_sessions FOR EACH ROW EXECUTE FUNCTION fail()",
        )


def test_a_delete_that_fails_leaves_the_whole_session(db_url, home) -> None:
    doc = make_session(db_url, home, "garden")
    _fail_checkpoint_deletes(db_url)
    store = ImageStore(home)
    with Database.open(db_url, home=home) as db:
        sessions = Sessions(db, store)
        before = sessions.state("garden")
        with pytest.raises(Exception, match="simulated"):
            sessions.delete("garden")
        assert sessions.get("garden").turns == 1 and len(sessions.turns("garden")) == 1
        assert sessions.state("garden") == before and all(store.exists(i) for i in _ids(doc))
    _sql(db_url, "DROP TRIGGER fail ON duogen_sessions" if db_url.startswith("postgresql") else "DROP TRIGGER fail")
    with Database.open(db_url, home=home) as db:
        sessions = Sessions(db, store)
        assert sessions.delete("garden") == 1
        assert sessions.list() == [] and sessions.state("garden") == {}


def _said(state) -> list[str]:
    """What the user said in a session's graph state, message by message."""
    out = []
    for m in state["messages"]:
        if m.type == "human":
            parts = m.content if isinstance(m.content, list) else [{"type": "text", "text": m.content}]
            out.append(" ".join(p["text"] for p in parts if isinstance(p, dict) and p.get("type") == "text"))
    return out


def test_a_new_session_never_inherits_state_left_under_its_id(db_url, home) -> None:
    make_session(db_url, home, "garden")
    make_session(db_url, home, "other")
    # What a delete cut short between its two steps left behind: checkpoints without records.
    _sql(
        db_url,
        "DELETE FROM duogen_blocks",
        "DELETE FROM duogen_artifacts",
        "DELETE FROM duogen_turns",
        "DELETE FROM duogen_sessions",
    )
    with Database.open(db_url, home=home) as db:
        agent = scripted_agent(home, [TEXT, DONE])
        agent.session("garden", database=db).send("a brand new conversation")
        sessions = Sessions(db, ImageStore(home))
        assert _said(sessions.state("garden")) == ["a brand new conversation"]
        # A fork onto such an id does not mix the two either, and can still be cancelled cleanly.
        sessions.fork("garden", "other")
        assert _said(sessions.state("other")) == ["a brand new conversation"]


# ---- 3. stored values that do not decode (SQLite stores anything; PostgreSQL's types refuse them) --------


@pytest.fixture
def two_sessions(home, tmp_path):
    url = f"sqlite:///{tmp_path / 'duogen.db'}"
    make_session(url, home, "fine")
    make_session(url, home, "bad", script=[TEXT, image("another pot"), OK, DONE])
    return url


@pytest.mark.parametrize(
    "statement, turn",
    [
        (
            "UPDATE duogen_blocks SET data='{not json' WHERE turn_id IN (SELECT id FROM duogen_turns WHERE session_id='bad')",
            True,
        ),
        ("UPDATE duogen_turns SET inputs='[{' WHERE session_id='bad'", True),
        ("UPDATE duogen_turns SET created_at='garbage' WHERE session_id='bad'", True),
        ("UPDATE duogen_sessions SET updated_at='yesterday' WHERE id='bad'", False),
    ],
)
def test_a_value_that_does_not_decode_is_one_line_naming_the_session(two_sessions, capsys, statement, turn) -> None:
    conn = sqlite3.connect(two_sessions.removeprefix("sqlite:///"))
    conn.execute(statement)
    conn.commit()
    conn.close()
    for argv in (["sessions", "show", "bad"], ["sessions", "export", "bad", "--format", "json"]):
        code = main([*argv, "--db", two_sessions])
        line = one_line(capsys.readouterr().err)
        assert code == 1 and "internal error" not in line, line
        assert ("session 'bad' turn 1:" if turn else "session 'bad':") in line
        assert "malformed" in line and "changed outside duogen" in line
    code = main(["sessions", "list", "--db", two_sessions])
    out = capsys.readouterr().out
    assert code == 0 and "fine" in out and "bad" in out
    assert ("malformed" in out) is not turn  # a turn's bad value does not touch the session's own row
    code = main(["sessions", "show", "fine", "--db", two_sessions])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    code = main(["sessions", "delete", "bad", "--db", two_sessions])
    assert code == 0, capsys.readouterr().err
    sessions = Sessions.open(two_sessions)
    try:
        assert [i.id for i in sessions.list()] == ["fine"]
    finally:
        sessions.close()


def test_a_malformed_session_is_flagged_in_the_list(two_sessions) -> None:
    conn = sqlite3.connect(two_sessions.removeprefix("sqlite:///"))
    conn.execute("UPDATE duogen_sessions SET created_at='not a date' WHERE id='bad'")
    conn.commit()
    conn.close()
    sessions = Sessions.open(two_sessions)
    try:
        infos = {i.id: i for i in sessions.list()}
        assert infos["fine"].malformed is None and "not a date" in (infos["bad"].malformed or "")
        assert infos["bad"].turns == 1
        with pytest.raises(StorageError, match="session 'bad': the stored record is malformed"):
            sessions.get("bad")
    finally:
        sessions.close()
