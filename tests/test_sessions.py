"""Persisted sessions: one suite, run against SQLite and against PostgreSQL (the ``db_url`` fixture)."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
from PIL import Image

from duogen_agents import Agent
from duogen_agents.errors import SessionBusyError, SessionNotFoundError, SessionStateError
from duogen_agents.presets import load_preset
from duogen_agents.sessions import Sessions
from duogen_agents.storage.database import Database
from tests.fakes import FailingImageTool, ScriptedPlanner, SolidImageTool

TEXT = {"type": "text", "text": "Water the pots in the morning."}
DONE = {"type": "done"}
OK = {"verdict": "ok"}


def _image(prompt, refs=(), kind="generate"):
    return {"type": "image", "prompt": prompt, "references": list(refs), "kind": kind}


def _agent(home, script, tool=None, **limits):
    preset = load_preset("tiny")
    preset.limits = preset.limits.model_copy(update=limits)
    return Agent(preset, planner=ScriptedPlanner(script), image_tool=tool or SolidImageTool(), home=home)


@pytest.fixture
def db(db_url, tmp_path):
    d = Database.open(db_url, home=tmp_path)
    yield d
    d.close()


def test_follow_up_edit_reaches_the_image_tool_with_the_earlier_image(db, tmp_path) -> None:
    a1 = _agent(tmp_path, [TEXT, _image("a terracotta pot"), OK, DONE])
    doc1 = a1.session("balcony", database=db).send("Plan a small balcony garden")
    pot = doc1.images[0].image

    tool = SolidImageTool()
    a2 = _agent(tmp_path, [_image("the same pot, blue", [pot.short], "edit"), OK, DONE], tool=tool)
    s2 = a2.session("balcony", database=db)
    doc2 = s2.send("Redraw the pot in blue")

    # The planner of turn 2 saw turn 1's message and its image.
    conversation = a2.planner.calls[0][0]
    texts = [p.get("text", "") for t in conversation for p in t["content"]]
    assert any("Plan a small balcony garden" in t for t in texts)
    assert sum(p["type"] == "image" for t in conversation for p in t["content"]) >= 1
    # The image tool got the earlier image's pixels as its reference.
    (frame,) = tool.requests[0]["references"]
    assert np.array_equal(np.asarray(frame), np.asarray(a1.store.open(pot)))
    # The edit is a new image; the earlier version is kept, and the record names its parent.
    edit = doc2.images[0]
    assert edit.kind == "edit" and edit.references == [pot.id] and edit.image.id != pot.id
    arts = {a["sha256"]: a for a in s2.sessions.image_artifacts("balcony")}
    assert arts[edit.image.id]["parent_sha256"] == pot.id
    assert arts[edit.image.id]["request"]["prompt"] == "the same pot, blue"
    assert a1.store.exists(pot.id) and a1.store.exists(edit.image.id)
    history = s2.history()
    assert [t.prompt for t in history] == ["Plan a small balcony garden", "Redraw the pot in blue"]
    assert [t.status for t in history] == ["complete", "complete"]
    assert history[0].document.images[0].image == pot


def test_records_and_listing(db, tmp_path) -> None:
    sessions = Sessions(db, _agent(tmp_path, []).store)
    assert sessions.list() == []
    a = _agent(tmp_path, [TEXT, _image("a", []), OK, DONE, TEXT, DONE])
    s = a.session("garden", database=db)
    s.send("first", mode="interleaved")
    s.send("second")
    (info,) = sessions.list()
    assert (info.id, info.turns, info.images, info.mode, info.last_status) == (
        "garden",
        2,
        1,
        "interleaved",
        "complete",
    )
    assert info.title == "first"
    with pytest.raises(SessionNotFoundError):
        sessions.get("nope")
    doc = sessions.document("garden")
    assert [b.type for b in doc.blocks] == ["text", "text", "image", "text", "text"]
    html = sessions.export("garden", "html", None)
    assert "data:image/png;base64," in html and "second" in html
    sessions.export("garden", "md", tmp_path / "out" / "g.md")
    md = (tmp_path / "out" / "g.md").read_text()
    name = doc.images[0].image.filename
    assert f"(g.images/{name})" in md and (tmp_path / "out" / "g.images" / name).exists()


def test_exception_mid_turn_then_resume_completes_without_duplicates(db, tmp_path) -> None:
    script = [TEXT, _image("one"), OK, _image("two"), OK, DONE]
    a = _agent(tmp_path, list(script), tool=FailingImageTool(fail_on=2))
    s = a.session("s1", database=db)
    with pytest.raises(RuntimeError, match="fell over"):
        s.send("draw two things")
    pending = s.pending_turn()
    assert pending is not None and pending.status == "interrupted" and "fell over" in (pending.error or "")
    # A new message is refused until the turn is resumed or dropped; nothing is lost.
    with pytest.raises(SessionStateError, match="unfinished turn"):
        s.send("something else")
    # Resume with a working tool: the planner continues where the turn stopped (image two is redrawn).
    b = _agent(tmp_path, [OK, DONE])
    b2 = b.session("s1", database=db)
    events = list(b2.resume())
    doc = events[-1]["document"]
    assert [blk.type for blk in doc.blocks] == ["text", "image", "image"]
    assert [blk.prompt for blk in doc.images] == ["one", "two"]
    (turn,) = b2.history()
    assert turn.status == "complete" and turn.error is None
    shas = [x["sha256"] for x in b2.sessions.image_artifacts("s1")]
    assert len(shas) == len(set(shas)) == 2
    assert b2.pending_turn() is None
    with pytest.raises(SessionStateError, match="nothing to resume"):
        list(b2.resume())


def test_cancel_restores_the_state_before_the_turn(db, tmp_path) -> None:
    a = _agent(tmp_path, [TEXT, DONE])
    s = a.session("c1", database=db)
    s.send("turn one")
    before = s.graph.get_state(s._config()).values
    broken = _agent(tmp_path, [_image("x"), OK, _image("y")], tool=FailingImageTool(fail_on=2))
    sb = broken.session("c1", database=db)
    with pytest.raises(RuntimeError):
        sb.send("turn two")
    assert sb.cancel() is True
    after = sb.graph.get_state(sb._config()).values
    assert [m.content for m in after["messages"]] == [m.content for m in before["messages"]]
    assert after["known_images"] == before["known_images"]
    c = _agent(tmp_path, [TEXT, DONE])
    doc = c.session("c1", database=db).send("turn three")
    assert doc.text == TEXT["text"]
    turns = c.session("c1", database=db).history()
    assert [t.status for t in turns] == ["complete", "cancelled", "complete"]
    # The cancelled turn's images are no longer referenced by the session's records.
    assert c.session("c1", database=db).sessions.image_artifacts("c1") == []
    # A cancelled first turn leaves no state at all.
    d = _agent(tmp_path, [_image("x")], tool=FailingImageTool(fail_on=1))
    sd = d.session("c2", database=db)
    with pytest.raises(RuntimeError):
        sd.send("first")
    assert sd.cancel() is True
    assert not sd.graph.get_state(sd._config()).values
    # The next turn starts from no state as well (its record names no checkpoint): it is dropped too.
    e = _agent(tmp_path, [_image("y")], tool=FailingImageTool(fail_on=1))
    se = e.session("c2", database=db)
    with pytest.raises(RuntimeError):
        se.send("second")
    assert se.cancel() is True
    assert not se.graph.get_state(se._config()).values
    assert [t.status for t in se.history()] == ["cancelled", "cancelled"]


def _cancel_killed_after_its_revert(session, monkeypatch) -> None:
    """``session.cancel()`` killed (a second Ctrl-C) between its state revert and its status write."""
    write_status = session.sessions.set_turn_status

    def killed(session_id, turn_id, status, error=None):
        if status == "cancelled":
            raise SystemExit(130)  # os._exit(130) between the revert and the status write
        write_status(session_id, turn_id, status, error)

    monkeypatch.setattr(session.sessions, "set_turn_status", killed)
    with pytest.raises(SystemExit):
        session.cancel()


def test_a_cancel_cut_short_after_its_revert_never_answers_with_the_previous_turn(db, tmp_path, monkeypatch) -> None:
    """``cancel`` reverts the state, then marks the turn cancelled in a second transaction. A process
    killed between the two (the chat's second Ctrl-C) leaves the turn unfinished over the reverted
    state: resuming it answers the turn's own message, and a second cancel finishes the first."""
    for sid in ("r1", "d1"):
        a = _agent(tmp_path, [TEXT, _image("a red pot"), OK, DONE])
        a.session(sid, database=db).send("turn one")
        broken = _agent(tmp_path, [_image("a blue square")], tool=FailingImageTool(fail_on=1))
        sb = broken.session(sid, database=db)
        with pytest.raises(RuntimeError):
            sb.send("turn two: draw a blue square")
        _cancel_killed_after_its_revert(sb, monkeypatch)
        assert [t.status for t in sb.history()] == ["complete", "interrupted"]

    # Resumed (a new process): the turn runs again from its message, and its answer is its own.
    c = _agent(tmp_path, [_image("a blue square"), OK, DONE])
    sc = c.session("r1", database=db)
    list(sc.resume())
    one, two = sc.history()
    assert two.status == "complete" and [i.prompt for i in two.document.images] == ["a blue square"]
    assert [i.prompt for i in one.document.images] == ["a red pot"]
    texts = [p.get("text", "") for t in c.planner.calls[0][0] for p in t["content"]]
    assert any("turn one" in t for t in texts) and any("turn two: draw a blue square" in t for t in texts)
    messages = sc.graph.get_state(sc._config()).values["messages"]
    assert sum("turn two: draw a blue square" in str(m.content) for m in messages) == 1

    # Discarded instead: the cancel is finished, and the state is turn one's.
    d = _agent(tmp_path, [])
    sd = d.session("d1", database=db)
    assert sd.cancel() is True
    assert [t.status for t in sd.history()] == ["complete", "cancelled"]
    messages = sd.graph.get_state(sd._config()).values["messages"]
    contents = [str(m.content) for m in messages]
    assert any("turn one" in c for c in contents) and not any("turn two" in c for c in contents)


def test_a_turn_started_again_over_a_cancels_copy_can_still_be_dropped(db, tmp_path, monkeypatch) -> None:
    """``cancel`` goes back only to the checkpoint where the turn began, as the checkpoints show it.
    A turn whose cancel was cut short after its revert starts again from its message on the copy the
    revert made, not on that checkpoint itself; cut short once more, it is still dropped."""
    a = _agent(tmp_path, [TEXT, _image("a red pot"), OK, DONE])
    a.session("c", database=db).send("turn one")
    broken = _agent(tmp_path, [_image("a blue square")], tool=FailingImageTool(fail_on=1))
    sb = broken.session("c", database=db)
    with pytest.raises(RuntimeError):
        sb.send("turn two: draw a blue square")
    _cancel_killed_after_its_revert(sb, monkeypatch)
    again = _agent(tmp_path, [_image("a blue square")], tool=FailingImageTool(fail_on=1))
    sa = again.session("c", database=db)
    with pytest.raises(RuntimeError):
        list(sa.resume())  # from its message again, over the copy; cut short again
    base = sa.sessions.unfinished_turn("c").base_checkpoint_id
    newest_input = next(t for t in db.saver.list(sa._config()) if t.metadata.get("source") == "input")
    assert newest_input.parent_config["configurable"]["checkpoint_id"] != base  # it follows the copy

    sd = _agent(tmp_path, []).session("c", database=db)
    assert sd.cancel() is True
    assert [t.status for t in sd.history()] == ["complete", "cancelled"]
    contents = [str(m.content) for m in sd.graph.get_state(sd._config()).values["messages"]]
    assert any("turn one" in c for c in contents) and not any("turn two" in c for c in contents)


def test_a_redraw_cut_short_is_drawn_again_on_resume_and_a_forks_turn_can_be_dropped(db, tmp_path, monkeypatch) -> None:
    """A redraw whose cancel was cut short after its revert was resumed as a message to plan: nothing
    was drawn and the turn was stored complete without its image. And a failed turn of a fork could
    not be dropped on SQLite (a raw KeyError: the fork's only checkpoint had no namespace)."""
    a = _agent(tmp_path, [TEXT, _image("a red pot"), OK, DONE])
    a.session("s", database=db).send("draw a pot")
    broken = _agent(tmp_path, [], tool=FailingImageTool(fail_on=1))
    sb = broken.session("s", database=db)
    with pytest.raises(RuntimeError):
        list(sb.redraw(1, seed=7))
    _cancel_killed_after_its_revert(sb, monkeypatch)
    tool = SolidImageTool()
    c = _agent(tmp_path, [OK, DONE], tool=tool)
    list(c.session("s", database=db).resume())
    assert [r["prompt"] for r in tool.requests] == ["a red pot"]  # drawn again, not re-planned
    _, again = c.session("s", database=db).history()
    assert again.status == "complete" and [i.prompt for i in again.document.images] == ["a red pot"]

    sessions = Sessions(db, a.store)
    sessions.fork("s", "f")
    failing = _agent(tmp_path, [_image("a hat")], tool=FailingImageTool(fail_on=1))
    sf = failing.session("f", database=db)
    with pytest.raises(RuntimeError):
        sf.send("and a hat")
    assert sf.cancel() is True
    assert [t.status for t in sf.history()][-1] == "cancelled"


def test_second_writer_is_busy_or_waits(db_url, tmp_path) -> None:
    db1 = Database.open(db_url, home=tmp_path)
    db2 = Database.open(db_url, home=tmp_path)
    try:
        with db1.lock("shared"):
            with pytest.raises(SessionBusyError, match="busy"):
                with db2.lock("shared"):
                    pass
            t0 = time.monotonic()
            with pytest.raises(SessionBusyError):
                with db2.lock("shared", wait=0.3):
                    pass
            assert time.monotonic() - t0 >= 0.3
            with db2.lock("other"):  # another session proceeds
                pass
            a = _agent(tmp_path, [TEXT, DONE])
            with pytest.raises(SessionBusyError):
                a.session("shared", database=db2).send("hello")
        # Waiting: the first holder releases after a moment, the waiter then gets the lock.
        got = threading.Event()
        with db1.lock("shared"):

            def waiter() -> None:
                with db2.lock("shared", wait=30):
                    got.set()

            th = threading.Thread(target=waiter)
            th.start()
            time.sleep(0.3)
            assert not got.is_set()
        th.join(10)
        assert got.is_set()
    finally:
        db1.close()
        db2.close()


def test_fork_delete_and_gc(db, tmp_path) -> None:
    a = _agent(tmp_path, [_image("shared pot"), OK, DONE])
    a.session("orig", database=db).send("draw a pot")
    sessions = Sessions(db, a.store)
    info = sessions.fork("orig", "copy")
    assert info.parent_id == "orig" and info.turns == 1
    pot = sessions.document("orig").images[0].image
    # The fork continues on its own: its planner sees the copied history.
    b = _agent(tmp_path, [_image("pot, forked", [pot.short], "edit"), OK, DONE])
    b.session("copy", database=db).send("make it green")
    seen = [p.get("text", "") for t in b.planner.calls[0][0] for p in t["content"]]
    assert any("draw a pot" in t for t in seen) and any("make it green" in t for t in seen)
    assert len(sessions.turns("copy")) == 2 and len(sessions.turns("orig")) == 1
    forked_only = sessions.document("copy").images[-1].image
    # An orphan file (no record) and a fresh orphan (inside the grace period).
    orphan = a.store.put(Image.new("RGB", (4, 4), (1, 2, 3)))
    old = time.time() - 7200
    os.utime(a.store.path(orphan.id), (old, old))
    fresh = a.store.put(Image.new("RGB", (4, 4), (3, 2, 1)))
    report = sessions.gc(grace_seconds=3600)
    assert report.removed == 1 and not a.store.exists(orphan.id) and a.store.exists(fresh.id)
    # Deleting the original keeps the pot (the fork references it).
    assert sessions.delete("orig") == 0
    assert a.store.exists(pot.id)
    assert not db.saver.get_tuple({"configurable": {"thread_id": "orig"}})
    # Deleting the fork removes both images: nobody references them any more.
    assert sessions.delete("copy") == 2
    assert not a.store.exists(pot.id) and not a.store.exists(forked_only.id)
    assert sessions.list() == []
    with pytest.raises(SessionNotFoundError):
        sessions.delete("copy")


def _checkpoint_bytes(db: Database) -> tuple[int, int]:
    """(bytes stored for checkpoints and their writes, number of checkpoints)."""
    from sqlalchemy import text

    with db.engine.connect() as c:
        if db.backend == "sqlite":
            b = c.execute(
                text(
                    "SELECT (SELECT COALESCE(SUM(LENGTH(checkpoint) + LENGTH(metadata)), 0) FROM checkpoints)"
                    " + (SELECT COALESCE(SUM(LENGTH(value)), 0) FROM writes)"
                )
            ).scalar()
        else:
            b = c.execute(
                text(
                    "SELECT (SELECT COALESCE(SUM(pg_column_size(checkpoint) + pg_column_size(metadata)), 0)"
                    " FROM checkpoints) + (SELECT COALESCE(SUM(pg_column_size(blob)), 0) FROM checkpoint_blobs)"
                    " + (SELECT COALESCE(SUM(pg_column_size(blob)), 0) FROM checkpoint_writes)"
                )
            ).scalar()
        n = c.execute(text("SELECT COUNT(*) FROM checkpoints")).scalar()
    return int(b), int(n)


def test_checkpoint_bytes_do_not_grow_with_the_images_of_a_session(db, tmp_path, capsys) -> None:
    """One image per turn: a turn's checkpoints cost the same bytes with 1 or 20 earlier images."""
    per_turn: list[float] = []
    agent = _agent(tmp_path, [], check=False)
    s = agent.session("big", database=db)
    for i in range(21):
        agent.planner.script = [_image(f"picture {i}"), DONE]
        b0, n0 = _checkpoint_bytes(db)
        s.send(f"turn {i}")
        b1, n1 = _checkpoint_bytes(db)
        per_turn.append((b1 - b0) / (n1 - n0))
    assert len(s.graph.get_state(s._config()).values["known_images"]) == 21
    with capsys.disabled():
        print(
            f"\n[{db.backend}] bytes per checkpoint: first turn {per_turn[0]:.0f}, "
            f"with 1 earlier image {per_turn[1]:.0f}, with 20 earlier images {per_turn[20]:.0f}"
        )
    # messages and known_images are DeltaChannels: a checkpoint stores what its step wrote, not the
    # history, so 19 more images (and their messages) add nothing per checkpoint.
    assert per_turn[20] < per_turn[1] * 1.05 + 32


def test_image_count_is_the_pictures_the_answers_show(db, tmp_path) -> None:
    """The session's image count took in the pictures a check rejected, so it said 3 where ``show``,
    exports and ``/redraw`` knew 2 (``/redraw 3``: "this session has 2 image(s)")."""
    redraw = {"verdict": "redraw", "note": "the pot should be red"}
    revised = {"prompt": "a red pot", "references": [], "kind": "generate"}
    a = _agent(tmp_path, [_image("a pot"), redraw, revised, OK, _image("a rake"), OK, DONE], redraw_budget=1)
    doc = a.session("garden", database=db).send("draw a pot and a rake")
    sessions = Sessions(db, a.store)
    assert len(doc.images) == 2 and len(doc.images[0].rejected) == 1  # three drawn, one rejected
    assert sessions.get("garden").images == sessions.list()[0].images == 2


def test_fork_waits_for_a_writer_when_asked(db_url, tmp_path) -> None:
    """``sessions fork --wait`` was taken and ignored: a fork of a session a turn was writing failed at
    once as busy, its message advising the very ``--wait`` it had been given."""
    d = Database.open(db_url, home=tmp_path)
    try:
        a = _agent(tmp_path, [TEXT, DONE])
        a.session("s", database=d).send("hi")
        sessions = Sessions(d, a.store)
        other = Database.open(db_url, home=tmp_path)  # another writer, holding the session's lock for a while
        try:
            held, release = threading.Event(), threading.Event()

            def writer() -> None:
                with other.lock("s"):
                    held.set()
                    release.wait(10)

            thread = threading.Thread(target=writer)
            thread.start()
            held.wait(10)
            with pytest.raises(SessionBusyError):
                sessions.fork("s", "t1")
            threading.Timer(0.5, release.set).start()
            assert sessions.fork("s", "t2", wait=10).parent_id == "s"
            thread.join()
        finally:
            other.close()
    finally:
        d.close()


def test_a_malformed_row_fails_a_fork_in_one_line_and_writes_nothing(tmp_path) -> None:
    """Forking a session with a malformed stored value (a date, a block's JSON) was an internal error;
    ``show`` and ``export`` of the same rows give the one-line "malformed" message, and so does it now.
    (SQLite: PostgreSQL's own types refuse such values when they are written.)"""
    from sqlalchemy import text

    from duogen_agents.errors import StorageError

    db = Database.open(f"sqlite:///{tmp_path / 'duogen.db'}", home=tmp_path)
    a = _agent(tmp_path, [TEXT, _image("a pot"), OK, DONE])
    a.session("s", database=db).send("hi")
    sessions = Sessions(db, a.store)
    with db.transaction() as s:
        s.execute(text("UPDATE duogen_blocks SET data = '{bad' WHERE position = 0"))
    try:
        with pytest.raises(StorageError, match="session 's'.*malformed"):
            sessions.fork("s", "copy")
        assert not sessions.exists("copy") and [i.id for i in sessions.list()] == ["s"]
    finally:
        db.close()


def test_a_markdown_export_with_a_missing_picture_writes_nothing(db, tmp_path) -> None:
    """A Markdown export whose session lost a picture from the store gave its one-line error, but left
    the pictures copied before the missing one in the export's folder, beside no Markdown file."""
    from duogen_agents.errors import StorageError

    a = _agent(tmp_path, [_image("a pot"), OK, _image("a rake"), OK, DONE])
    doc = a.session("s", database=db).send("draw")
    a.store.path(doc.images[1].image.id).unlink()
    out = tmp_path / "export"
    out.mkdir()
    with pytest.raises(StorageError):
        Sessions(db, a.store).export("s", "md", out)
    assert list(out.rglob("*")) == []


@pytest.fixture
def new_york_time(monkeypatch):
    """This process's local time zone is New York's for the test (the CLI shows local time)."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_times_read_back_as_the_same_aware_utc_datetimes_on_sqlite_and_postgresql(
    pg_url, tmp_path, monkeypatch, capsys, new_york_time
) -> None:
    """The same session on SQLite and on a PostgreSQL connection whose ``TimeZone`` is not UTC: every
    time the storage layer gives back is the same aware UTC datetime, and the CLI lists the same time.
    (SQLite used to give naive datetimes, PostgreSQL aware ones in the connection's zone.)"""
    from datetime import datetime, timedelta, timezone
    from zoneinfo import ZoneInfo

    from sqlalchemy import func, select, text

    from duogen_agents.cli import main
    from duogen_agents.sessions import archive, repository
    from duogen_agents.storage.records import ArtifactRecord, SessionRecord

    moment = datetime(2026, 11, 27, 23, 35, 12, 345678, tzinfo=timezone.utc)
    # Written as an aware time in yet another zone: it must be stored as the same instant.
    monkeypatch.setattr(repository, "utcnow", lambda: moment.astimezone(ZoneInfo("Asia/Kolkata")))
    monkeypatch.setattr(archive, "utcnow", lambda: moment.astimezone(ZoneInfo("Asia/Kolkata")))
    monkeypatch.setenv("DUOGEN_HOME", str(tmp_path))
    new_york = moment.astimezone(ZoneInfo("America/New_York"))
    urls = {
        "sqlite": f"sqlite:///{tmp_path / 'duogen.db'}",
        "postgresql": pg_url + "?options=-cTimeZone%3DAmerica/New_York",
    }
    seen = {}
    for backend, url in urls.items():
        db = Database.open(url, home=tmp_path)
        try:
            if backend == "postgresql":
                with db.engine.connect() as c:
                    assert c.execute(text("SHOW TimeZone")).scalar() == "America/New_York"
            agent = _agent(tmp_path, [TEXT, _image("a terracotta pot"), OK, DONE])
            agent.session("balcony", database=db).send("Plan a small balcony garden")
            sessions = Sessions(db, agent.store)
            sessions.fork("balcony", "balcony-2")
            info, (turn,) = sessions.get("balcony"), sessions.turns("balcony")
            (listed, _fork) = sorted(sessions.list(), key=lambda i: i.id)
            with db.transaction() as s:
                artifact_times = list(s.scalars(select(ArtifactRecord.created_at)))
                # Bound values compare as instants, whatever their zone.
                matching = s.scalar(select(func.count()).where(SessionRecord.updated_at == new_york))
                later = s.scalar(
                    select(func.count()).where(SessionRecord.updated_at > new_york - timedelta(microseconds=1))
                )
                newer = s.scalar(select(func.count()).where(SessionRecord.updated_at > new_york))
        finally:
            db.close()
        times = [
            info.created_at, info.updated_at, listed.created_at, listed.updated_at,
            turn.created_at, turn.finished_at, *artifact_times,
        ]  # fmt: skip
        assert len(artifact_times) == 2  # the image, and its copy in the fork
        for t in times:
            assert t is not None and t.tzinfo is timezone.utc, (backend, t)
            assert t == moment and t < datetime.now(timezone.utc), (backend, t)
        assert (matching, later, newer) == (2, 2, 0), backend
        seen[backend] = times
        assert main(["sessions", "list", "--db", url]) == 0
        out = capsys.readouterr().out
        assert "2026-11-27 18:35" in out and "23:35" not in out, (backend, out)  # New York's local time
    assert seen["sqlite"] == seen["postgresql"]
    assert [repr(t) for t in seen["sqlite"]] == [repr(t) for t in seen["postgresql"]]
