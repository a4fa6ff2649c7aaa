"""Stored records, lock files, the image store and exports under attack (issue 14, findings 2-6 and 9)."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import create_engine, text

from duogen_agents.cli import main
from duogen_agents.errors import StorageError
from duogen_agents.sessions import Sessions
from duogen_agents.storage.database import Database
from duogen_agents.storage.images import ImageStore, replaceable
from tests.fakes import FailingImageTool, SolidImageTool
from tests.security.helpers import DONE, OK, TEXT, image, make_session, one_line, scripted_agent


def _sql(db_url: str, statement: str, **params) -> None:
    engine = create_engine(db_url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as c:
        c.execute(text(statement), params)
    engine.dispose()


# ---- 2. identifiers read from storage never become paths outside the store ----------------------


def test_crafted_artifact_id_cannot_delete_a_file_outside_the_store(db_url, home, tmp_path, capsys) -> None:
    make_session(db_url, home, "victim")
    crafted = "../../outside/victim"
    # Where the old code resolved it: <home>/images/../../outside/victim.png
    victim = (home / "images" / crafted[:2] / f"{crafted}.png").resolve()
    victim.parent.mkdir(parents=True, exist_ok=True)
    victim.write_bytes(b"precious")
    _sql(db_url, "UPDATE duogen_artifacts SET sha256=:s WHERE session_id='victim'", s=crafted)

    code = main(["sessions", "delete", "victim", "--db", db_url])
    assert code == 0, capsys.readouterr().err
    assert victim.read_bytes() == b"precious"


def test_crafted_block_image_id_is_one_line(db_url, home, capsys) -> None:
    make_session(db_url, home, "victim")
    engine = create_engine(db_url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as c:
        rows = c.execute(text("SELECT id, data FROM duogen_blocks WHERE type='image'")).all()
        for row_id, data in rows:
            data = data if isinstance(data, dict) else __import__("json").loads(data)
            data["image"]["id"] = "../../../etc/passwd"
            c.execute(
                text("UPDATE duogen_blocks SET data=:d WHERE id=:i"), {"d": __import__("json").dumps(data), "i": row_id}
            )
    engine.dispose()
    code = main(["sessions", "show", "victim", "--db", db_url])
    line = one_line(capsys.readouterr().err)
    assert code == 1 and "victim" in line and "malformed" in line and "internal error" not in line


def test_store_paths_are_validated(tmp_path) -> None:
    store = ImageStore(tmp_path / "home")
    for bad in ("../../x", "", "AB" * 32, "ab" * 32 + "\n", "ab" * 31, None):
        with pytest.raises(StorageError, match="invalid image id"):
            store.path(bad)  # type: ignore[arg-type]
    # A symlinked subfolder of the store must not lead outside it.
    outside = tmp_path / "outside"
    outside.mkdir()
    (store.images_dir).mkdir(parents=True)
    (store.images_dir / "ab").symlink_to(outside, target_is_directory=True)
    with pytest.raises(StorageError, match="leads outside"):
        store.path("ab" * 32)
    assert store.iter_files() == []


# ---- 3. lock files do not follow symlinks ---------------------------------------------------------


@pytest.mark.parametrize("name", ["victim.lock", "_setup.lock"])
def test_lock_file_symlink_is_refused_not_truncated(home, tmp_path, capsys, name) -> None:
    db_file = tmp_path / "duogen.db"
    url = f"sqlite:///{db_file}"
    Database.open(url, home=home).close()
    precious = tmp_path / "precious.txt"
    precious.write_text("do not truncate me")
    locks = tmp_path / "duogen.db.locks"
    locks.mkdir(exist_ok=True)
    (locks / name).unlink(missing_ok=True)
    (locks / name).symlink_to(precious)
    agent = scripted_agent(home, [TEXT, DONE])
    with pytest.raises(StorageError, match="symbolic link"), Database.open(url, home=home) as db:
        agent.session("victim", database=db).send("hello")
    assert precious.read_text() == "do not truncate me"


def test_lock_folder_symlink_is_refused(home, tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'duogen.db'}"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "duogen.db.locks").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(StorageError, match="not a folder"), Database.open(url, home=home) as db:
        with db.lock("victim"):
            pass
    assert list(elsewhere.iterdir()) == []


# ---- 4. gc never removes what a running or interrupted turn uses ----------------------------------


class SlowTool(SolidImageTool):
    def draw(self, prompt, **kwargs):
        time.sleep(0.15)
        return super().draw(prompt, **kwargs)


def test_gc_with_no_grace_during_running_turns_removes_nothing_they_use(db_url, home, tmp_path) -> None:
    script = [TEXT, image("one"), OK, image("two"), OK, DONE]
    failures: list[BaseException] = []
    docs = []

    def turns(session_id: str) -> None:
        try:
            with Database.open(db_url, home=home) as db:
                for i in range(3):
                    agent = scripted_agent(home, list(script), tool=SlowTool())
                    docs.append(agent.session(session_id, database=db).send(f"turn {i}"))
        except BaseException as e:  # reported below
            failures.append(e)

    # An orphan image, older than any turn: the turns below draw the same pixels again (dedupe), so
    # put() must refresh it or gc would take it from under them.
    store = ImageStore(home)
    orphan = scripted_agent(home, [image("one"), OK, DONE], tool=SolidImageTool()).run("no session").images[0].image
    old = time.time() - 7200
    os.utime(store.path(orphan.id), (old, old))
    threads = [threading.Thread(target=turns, args=(f"s{i}",)) for i in range(2)]
    with Database.open(db_url, home=home) as db:
        sessions = Sessions(db, store)
        for t in threads:
            t.start()
        runs = 0
        while any(t.is_alive() for t in threads):
            sessions.gc(grace_seconds=0)
            runs += 1
        for t in threads:
            t.join()
        assert not failures, failures
        assert runs > 3 and len(docs) == 6
        assert orphan.id in {b.image.id for d in docs for b in d.images}  # the turns reused it
        for doc in docs:
            for block in doc.images:
                assert store.exists(block.image.id)
        # Once nothing runs, gc with no grace keeps exactly what the sessions reference.
        sessions.gc(grace_seconds=0)
        assert all(store.exists(b.image.id) for d in docs for b in d.images)


def test_gc_keeps_an_interrupted_turns_images_so_it_resumes(db_url, home) -> None:
    script = [TEXT, image("one"), OK, image("two"), OK, DONE]
    with Database.open(db_url, home=home) as db:
        agent = scripted_agent(home, list(script), tool=FailingImageTool(fail_on=2))
        with pytest.raises(RuntimeError):
            agent.session("s1", database=db).send("draw two things")
        report = Sessions(db, ImageStore(home)).gc(grace_seconds=0)
        assert report.kept >= 1
        resumed = scripted_agent(home, [OK, DONE])
        doc = list(resumed.session("s1", database=db).resume())[-1]["document"]
        assert [b.prompt for b in doc.images] == ["one", "two"]


def test_stale_lease_of_a_dead_process_is_dropped(home) -> None:
    store = ImageStore(home)
    ref = store.put(Image.new("RGB", (8, 8), (1, 2, 3)))
    old = time.time() - 7200
    os.utime(store.path(ref.id), (old, old))
    code = "from duogen_agents.storage.images import ImageStore; import os, sys\n" + (
        f"s = ImageStore({str(home)!r}); l = s.lease(); l.__enter__(); os._exit(0)"
    )
    subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert len(list((store.images_dir / ".locks" / "leases").iterdir())) == 1
    with store.collecting(0.0) as cutoff:
        assert cutoff > old  # the dead process's lease does not hold the cut-off back
    assert list((store.images_dir / ".locks" / "leases").iterdir()) == []


# ---- 5. exports: special files, modes, folders ----------------------------------------------------


@pytest.fixture
def exported_session(db_url, home):
    make_session(db_url, home, "garden")
    return db_url


def _export(db_url, out, fmt="html", capsys=None):
    code = main(["sessions", "export", "garden", "--format", fmt, "--out", str(out), "--db", db_url])
    return code, (capsys.readouterr().err if capsys else "")


def test_export_refuses_to_replace_fifo_symlink_and_device(exported_session, tmp_path, capsys) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    target = tmp_path / "target.txt"
    target.write_text("keep")
    link = tmp_path / "link.html"
    link.symlink_to(target)
    cases = [(fifo, "a FIFO"), (link, "a symbolic link")]
    try:
        dev = tmp_path / "null"
        os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        cases.append((dev, "a device"))
    except PermissionError:  # no CAP_MKNOD: check the rule on the system's own device, without writing
        with pytest.raises(StorageError, match="a device"):
            replaceable(Path("/dev/null"))
    for path, kind in cases:
        code, err = _export(exported_session, path, capsys=capsys)
        assert code == 1 and kind in one_line(err), err
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and link.is_symlink() and target.read_text() == "keep"
    for path, _ in cases[2:]:
        assert stat.S_ISCHR(os.lstat(path).st_mode)


def test_export_modes_follow_the_umask_and_keep_a_replaced_files_mode(exported_session, home, tmp_path) -> None:
    old = os.umask(0o027)
    try:
        code, _ = _export(exported_session, tmp_path / "new.html")
        assert code == 0 and stat.S_IMODE(os.stat(tmp_path / "new.html").st_mode) == 0o640
        kept = tmp_path / "kept.json"
        kept.write_text("{}")
        os.chmod(kept, 0o604)
        code, _ = _export(exported_session, kept, fmt="json")
        assert code == 0 and stat.S_IMODE(os.stat(kept).st_mode) == 0o604 and kept.read_text() != "{}"
        md = tmp_path / "md" / "g.md"
        code, _ = _export(exported_session, md, fmt="md")
        assert code == 0
        for f in [md, *(tmp_path / "md" / "g.images").iterdir()]:
            assert stat.S_IMODE(os.stat(f).st_mode) == 0o640, f
    finally:
        os.umask(old)
    # The image store's files are user data: readable like any other (umask 022 gives 0644).
    old = os.umask(0o022)
    try:
        ref = ImageStore(home).put(Image.new("RGB", (8, 8), (9, 9, 9)))
        assert stat.S_IMODE(os.stat(ImageStore(home).path(ref.id)).st_mode) == 0o644
    finally:
        os.umask(old)


def test_export_to_a_path_ending_in_slash_is_a_folder(exported_session, tmp_path, capsys) -> None:
    code, err = _export(exported_session, f"{tmp_path / 'newdir'}/", capsys=capsys)
    assert code == 0, err
    assert (tmp_path / "newdir").is_dir() and (tmp_path / "newdir" / "garden.html").is_file()
    existing = tmp_path / "existing"
    existing.mkdir()
    code, err = _export(exported_session, existing, fmt="json", capsys=capsys)
    assert code == 0 and (existing / "garden.json").is_file()


def test_run_out_never_replaces_a_symlinked_document(home, tmp_path) -> None:
    from duogen_agents.export import write_document

    agent = scripted_agent(home, [TEXT, DONE])
    doc = agent.run("hello")
    out = tmp_path / "out"
    out.mkdir()
    target = tmp_path / "target"
    target.write_text("keep")
    (out / "document.md").symlink_to(target)
    with pytest.raises(StorageError, match="symbolic link"):
        write_document(doc, agent.store, out)
    assert target.read_text() == "keep" and (out / "document.md").is_symlink()


# ---- 6. a corrupt SQLite file: one line, untouched, before any model loads ------------------------


def _damage(db_file: Path) -> bytes:
    data = bytearray(db_file.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    data[page : 2 * page] = b"\xde\xad\xbe\xef" * (page // 4)  # page 2; the header stays valid
    db_file.write_bytes(bytes(data))
    return bytes(data)


def test_corrupt_sqlite_is_one_line_and_left_untouched(home, tmp_path, capsys, monkeypatch) -> None:
    from duogen_agents.agent import Agent

    db_file = tmp_path / "duogen.db"
    url = f"sqlite:///{db_file}"
    make_session(url, home, "garden")
    before = _damage(db_file)
    monkeypatch.setattr(Agent, "from_preset", classmethod(lambda *a, **k: pytest.fail("models were loaded")))
    for argv in (["sessions", "list"], ["run", "--session", "garden", "follow up"], ["sessions", "gc"]):
        code = main([*argv, "--db", url])
        line = one_line(capsys.readouterr().err)
        assert code == 1 and "not a usable SQLite database" in line and "left untouched" in line, line
        assert hashlib.sha256(db_file.read_bytes()).digest() == hashlib.sha256(before).digest()


# ---- 9. disk full -------------------------------------------------------------------------------

DISK_FULL = """
set -e
mount -t tmpfs -o size=256k tmpfs "$DIR"
head -c 200k /dev/zero > "$DIR/filler" 2>/dev/null || true
"$PY" -m duogen_agents.cli sessions list --db "sqlite:///$DIR/new/duogen.db" --home "$DIR/home" 2> "$OUT/new.err" || echo "rc=$?" >> "$OUT/new.err"
ls -a "$DIR/new" > "$OUT/new.ls" 2>&1 || true
cp "$SRC" "$DIR/filler2" 2>/dev/null || true
"$PY" -m duogen_agents.cli sessions export garden --out "$DIR/garden.html" --db "$DB" --home "$HOMEDIR" 2> "$OUT/export.err" || echo "rc=$?" >> "$OUT/export.err"
ls -a "$DIR" > "$OUT/export.ls"
"""


def test_disk_full_is_one_line_and_leaves_no_empty_database(home, tmp_path) -> None:
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is needed to give this test a small disk of its own")
    url = f"sqlite:///{tmp_path / 'duogen.db'}"
    make_session(url, home, "garden")
    big = tmp_path / "big"
    big.write_bytes(os.urandom(200_000))
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir()
    out.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        "DIR": str(mnt),
        "OUT": str(out),
        "SRC": str(big),
        "DB": url,
        "HOMEDIR": str(home),
        "PY": sys.executable,
    }
    # A private mount namespace: the small tmpfs exists only for this shell.
    proc = subprocess.run(["unshare", "-m", "sh", "-c", DISK_FULL], env=env, capture_output=True, text=True)
    if proc.returncode != 0 and "mount" in proc.stderr:
        pytest.fail(f"could not mount a small tmpfs here (root and unshare -m are needed): {proc.stderr.strip()}")
    new_err = (out / "new.err").read_text()
    assert "no space left on the device holding" in one_line(new_err.replace("rc=1", "")), new_err
    assert "rc=1" in new_err and "internal error" not in new_err
    assert "duogen.db\n" not in (out / "new.ls").read_text()  # no empty database left behind
    export_err = (out / "export.err").read_text()
    assert "no space left on the device holding" in export_err and "rc=1" in export_err, export_err
    assert "garden.html" not in (out / "export.ls").read_text()


# ---- review follow-ups: shared images, special files in the store, leases -------------------------


def test_delete_keeps_images_another_sessions_unfinished_turn_holds(db_url, home) -> None:
    script = [TEXT, image("one"), OK, DONE]
    with Database.open(db_url, home=home) as db:
        doc_a = scripted_agent(home, list(script)).session("a", database=db).send("draw")
        shared = doc_a.images[0].image
        # Session b draws the same pixels, then fails before its turn's records are written.
        b = scripted_agent(home, [TEXT, image("one"), OK, image("two"), OK, DONE], tool=FailingImageTool(fail_on=2))
        with pytest.raises(RuntimeError):
            b.session("b", database=db).send("draw")
        sessions = Sessions(db, ImageStore(home))
        sessions.delete("a")
        assert ImageStore(home).exists(shared.id)  # b's checkpoints still refer to it
        doc_b = list(scripted_agent(home, [OK, DONE]).session("b", database=db).resume())[-1]["document"]
        assert doc_b.images[0].image == shared


def test_special_files_in_the_store_are_refused_not_read(home) -> None:
    store = ImageStore(home)
    fake = "ab" * 32
    store.path(fake).parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(store.path(fake))
    with pytest.raises(StorageError, match="not a regular file"):
        store.read_bytes(fake)  # returns at once instead of blocking on the FIFO
    other = "cd" * 32
    store.path(other).parent.mkdir(parents=True, exist_ok=True)
    store.path(other).write_bytes(b"not a png")
    with pytest.raises(StorageError, match="damaged"):
        store.open(other)


def test_a_lease_is_never_visible_unlocked(home) -> None:
    import fcntl

    from duogen_agents.storage.locks import try_flock

    store = ImageStore(home)
    with store.lease():
        leases = list((store.images_dir / ".locks" / "leases").glob("*.lease"))
        assert len(leases) == 1
        fd = os.open(leases[0], os.O_RDONLY)
        try:
            assert not try_flock(fd, fcntl.LOCK_SH)  # held: gc reads it as live
        finally:
            os.close(fd)
    assert not list((store.images_dir / ".locks" / "leases").iterdir())


def test_stored_text_cannot_inject_markup_or_escapes(db_url, home, capsys) -> None:
    make_session(db_url, home, "inj", script=[{"type": "text", "text": "[/b] \x1b]0;pwned\x07 [red]x"}, DONE])
    _sql(db_url, "UPDATE duogen_sessions SET title=:t WHERE id='inj'", t="[/b]\x1b[31mred")
    for argv in (["sessions", "list"], ["sessions", "show", "inj"]):
        code = main([*argv, "--db", db_url])
        out = capsys.readouterr()
        assert code == 0, out.err
        assert "\x1b]0;" not in out.out and "\x1b[31m" not in out.out and "[/b]" in out.out


def test_malformed_session_mode_is_one_line(db_url, home, capsys) -> None:
    make_session(db_url, home, "m")
    _sql(db_url, "UPDATE duogen_turns SET status='cancelled' WHERE session_id='m'")
    _sql(db_url, "UPDATE duogen_sessions SET mode='poem' WHERE id='m'")
    code = main(["sessions", "export", "m", "--format", "json", "--db", db_url])
    line = one_line(capsys.readouterr().err)
    assert code == 1 and "session 'm'" in line and "malformed" in line


def _tampered_start(db: Database, config: dict, tamper: str) -> str | None:
    """What a tampered turn 3 of session 't' names as its start: none, an id no checkpoint has, or a
    real checkpoint of the session that is not its start: turn 2's start (turn one's end), one inside
    turn 2, or the state itself (inside turn 3)."""
    if tamper in ("null", "unknown"):
        return None if tamper == "null" else "not-a-checkpoint"
    engine = create_engine(db.url)
    with engine.connect() as c:
        starts = dict(c.execute(text("SELECT number, base_checkpoint_id FROM duogen_turns WHERE session_id='t'")).all())
    engine.dispose()
    ids = [t.config["configurable"]["checkpoint_id"] for t in db.saver.list(config)]  # newest first
    inside_two = [i for i in ids if starts[2] < i < starts[3]]
    assert starts[2] in ids and len(inside_two) > 2
    return {"earlier-start": starts[2], "earlier-middle": inside_two[len(inside_two) // 2], "own-state": ids[0]}[tamper]


@pytest.mark.parametrize("tamper", ["null", "unknown", "earlier-start", "earlier-middle", "own-state"])
def test_discard_of_a_turn_with_a_tampered_start_deletes_nothing(db_url, home, tamper) -> None:
    """A turn's record names the checkpoint it started from; ``cancel`` (``--discard``) goes back to
    it. Named as none (only a session's first answer starts from no state), as one that does not
    exist, or as a real checkpoint of the session that is not where the turn began (an earlier turn's
    start, a checkpoint inside a turn), the turn is refused in one line: the earlier turns' state
    stays, and the turn resumes (before, a real checkpoint was gone back to: the discard dropped turn
    two's answer from the state while its record still said complete, or left half a turn in it)."""
    with Database.open(db_url, home=home) as db:
        a = scripted_agent(home, [TEXT, image("a terracotta pot"), OK, DONE, TEXT, DONE])
        s = a.session("t", database=db)
        s.send("turn one")
        s.send("turn two")
        broken = scripted_agent(home, [image("x")], tool=FailingImageTool(fail_on=1))
        sb = broken.session("t", database=db)
        with pytest.raises(RuntimeError):
            sb.send("turn three")
        before = sb.graph.get_state(sb._config())
        base = _tampered_start(db, sb._config(), tamper)
        _sql(db_url, "UPDATE duogen_turns SET base_checkpoint_id=:b WHERE session_id='t' AND number=3", b=base)

        with pytest.raises(StorageError, match=r"^session 't' turn 3: the stored record is malformed") as e:
            sb.cancel()
        assert "\n" not in str(e.value)
        after = sb.graph.get_state(sb._config())
        assert after.config["configurable"]["checkpoint_id"] == before.config["configurable"]["checkpoint_id"]
        assert len(after.values["messages"]) == len(before.values["messages"])
        assert after.values["known_images"] == before.values["known_images"]
        assert [t.status for t in sb.history()] == ["complete", "complete", "interrupted"]

        c = scripted_agent(home, [OK, DONE])
        list(c.session("t", database=db).resume())
        assert [t.status for t in c.session("t", database=db).history()] == ["complete"] * 3
