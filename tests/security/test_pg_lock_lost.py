"""PostgreSQL: a session's write lock lives on one connection, and dies with it (a server restart,
``idle_session_timeout``, a proxy). The holder notices before it writes again, fails its turn in one
line and writes nothing over the writer that took the lock next; unlocking a dead connection is no
error. Each test kills the lock's backend with ``pg_terminate_backend`` from another connection."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from sqlalchemy import text

from duogen_agents.errors import SessionBusyError, StorageError
from duogen_agents.sessions import Sessions
from duogen_agents.storage.database import Database
from duogen_agents.storage.images import ImageStore
from tests.security.helpers import DONE, OK, TEXT, image, make_session, one_line, scripted_agent


def _terminate_lock_holders(pg_url: str) -> int:
    """Kill every backend holding an advisory lock in the test's database; how many were killed.
    Returns once their locks are gone: ``pg_terminate_backend`` only signals the backend, which lets
    go of its locks as it exits, a moment later (a writer let in at once was sometimes refused as busy)."""
    holders = (
        "SELECT DISTINCT pid FROM pg_locks WHERE locktype = 'advisory' "
        "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) AND pid <> pg_backend_pid()"
    )
    with psycopg.connect(pg_url, autocommit=True) as admin:
        pids = [row[0] for row in admin.execute(holders).fetchall()]
        for pid in pids:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        deadline = time.monotonic() + 30
        while admin.execute(f"SELECT count(*) FROM ({holders}) h WHERE pid = ANY(%s)", (pids,)).fetchone()[0]:
            assert time.monotonic() < deadline, "the killed backends still hold their locks"
            time.sleep(0.01)
        return len(pids)


def _checkpoints(db: Database, session_id: str) -> int:
    with db.engine.connect() as c:
        return c.execute(text("SELECT count(*) FROM checkpoints WHERE thread_id = :t"), {"t": session_id}).scalar()


def test_unlocking_a_dead_connection_is_no_error(pg_url, home) -> None:
    with Database.open(pg_url, home=home) as db, Database.open(pg_url, home=home) as other:
        with db.lock("L1"):
            with pytest.raises(SessionBusyError):
                with other.lock("L1"):
                    pass
            assert _terminate_lock_holders(pg_url) == 1
            with other.lock("L1"):  # the lock went with its connection
                pass
        # Leaving the block raised nothing (before: OperationalError, AdminShutdown, after a good turn).
        with db.lock("L1"):  # the pool dropped the dead connection; a fresh lock holds and checks out
            db.check_lock("L1")  # no false alarm while it is held
            with pytest.raises(SessionBusyError):
                with other.lock("L1"):
                    pass


def test_a_turn_that_lost_its_lock_commits_nothing_over_the_next_writer(pg_url, home) -> None:
    make_session(pg_url, home, "L1")
    paused, go = threading.Event(), threading.Event()

    def long_check(conversation, schema):
        paused.set()
        assert go.wait(60)
        return OK

    first = scripted_agent(home, [TEXT, image("a pot"), long_check, DONE])
    outcome: dict[str, BaseException | None] = {}

    def run_first() -> None:
        try:
            with Database.open(pg_url, home=home) as db:
                first.session("L1", database=db).send("a long turn")
            outcome["error"] = None
        except BaseException as e:  # noqa: BLE001 (inspected below)
            outcome["error"] = e

    worker = threading.Thread(target=run_first)
    worker.start()
    try:
        assert paused.wait(60), outcome
        second = scripted_agent(home, [OK, DONE])
        with Database.open(pg_url, home=home) as db:
            with pytest.raises(SessionBusyError):
                list(second.session("L1", database=db).resume())
            assert _terminate_lock_holders(pg_url) == 1  # the first writer's lock connection dies
            doc = list(second.session("L1", database=db).resume())[-1]["document"]  # let in: the lock is gone
            assert len(doc.images) == 1
            before = _checkpoints(db, "L1")
    finally:
        go.set()
        worker.join(60)

    error = outcome["error"]
    assert isinstance(error, StorageError), repr(error)
    line = one_line(str(error))
    assert (
        "'L1'" in line
        and "lock was lost" in line
        and "nothing more of the turn was written" in line
        and "--resume" in line
    )
    with Database.open(pg_url, home=home) as db:
        assert _checkpoints(db, "L1") == before  # the first writer wrote no checkpoint after losing the lock
        turns = Sessions(db, ImageStore(home)).turns("L1")
    assert [(t.status, t.error) for t in turns] == [("complete", None), ("complete", None)]  # the second's


def test_a_lock_lost_between_its_check_and_the_commit_commits_nothing(pg_url, home, monkeypatch) -> None:
    """The lock is checked in the commit's own transaction, on the lock's own connection: a lock that
    dies after the turn's last check and before its commit (here: killed, and the next writer let in to
    discard the turn) makes the commit fail; it never marks complete a turn that writer dropped, over a
    state that writer put back (before: the check ran first, on another connection, then the commit)."""
    make_session(pg_url, home, "L1")
    commit = Sessions.commit_turn
    late: dict[str, bool] = {}

    def lose_the_lock_first(self, *args, **kwargs):
        if not late:
            late["cancelled"] = True
            assert _terminate_lock_holders(pg_url) == 1
            with Database.open(pg_url, home=home) as other:
                late["cancelled"] = scripted_agent(home, []).session("L1", database=other).cancel()
        return commit(self, *args, **kwargs)

    monkeypatch.setattr(Sessions, "commit_turn", lose_the_lock_first)
    with Database.open(pg_url, home=home) as db:
        with pytest.raises(StorageError) as e:
            scripted_agent(home, [TEXT, DONE]).session("L1", database=db).send("a second turn")
    assert late["cancelled"] is True  # the next writer got in and dropped the turn
    line = one_line(str(e.value))
    assert "'L1'" in line and "lock was lost" in line and "nothing more of the turn was written" in line
    with Database.open(pg_url, home=home) as db:
        sessions = Sessions(db, ImageStore(home))
        assert [t.status for t in sessions.turns("L1")] == ["complete", "cancelled"]
        messages = sessions.state("L1")["messages"]
    assert not any("a second turn" in str(m.content) for m in messages)  # the state is turn one's
