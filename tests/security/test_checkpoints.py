"""A crafted checkpoint must never run code: every read path refuses it with one line naming the session.

The attack (issue 14, finding 1): plant a msgpack extension ``["os", "system", [cmd]]`` in the stored
state of a session, then touch the session (a follow-up, fork, gc with a turn pending, export...). LangGraph's
default serializer imports and calls it; ours refuses before importing anything.
"""

from __future__ import annotations

import sqlite3

import ormsgpack
import pytest
from langgraph.checkpoint.serde import jsonplus
from pydantic import BaseModel
from sqlalchemy import create_engine, text
from typing_extensions import TypedDict

from duogen_agents.cli import main
from duogen_agents.errors import UnsafeCheckpointError
from duogen_agents.graphs.turn import build_state_graph
from duogen_agents.sessions import Sessions
from duogen_agents.storage.database import Database
from duogen_agents.storage.serde import CheckpointSerializer, harden
from tests.security.helpers import make_session, one_line


def evil(marker) -> ormsgpack.Ext:
    return ormsgpack.Ext(jsonplus.EXT_CONSTRUCTOR_POS_ARGS, ormsgpack.packb(["os", "system", [f"touch {marker}"]]))


def plant(db_url: str, session_id: str, marker) -> None:
    """Rewrite the session's stored channel values as an attacker with write access to the tables would."""
    opts = ormsgpack.OPT_NON_STR_KEYS
    if db_url.startswith("sqlite"):
        conn = sqlite3.connect(db_url.removeprefix("sqlite:///"))
        row = conn.execute(
            "SELECT checkpoint_id, checkpoint FROM checkpoints WHERE thread_id=? ORDER BY checkpoint_id DESC LIMIT 1",
            (session_id,),
        ).fetchone()
        ck = ormsgpack.unpackb(row[1], ext_hook=lambda code, data: ormsgpack.Ext(code, data), option=opts)
        ck["channel_values"]["title"] = evil(marker)
        ck["channel_values"]["mode"] = evil(marker)
        conn.execute(
            "UPDATE checkpoints SET checkpoint=? WHERE checkpoint_id=?", (ormsgpack.packb(ck, option=opts), row[0])
        )
        conn.commit()
        conn.close()
    else:
        engine = create_engine(db_url.replace("postgresql://", "postgresql+psycopg://"))
        with engine.begin() as c:
            n = c.execute(
                text("UPDATE checkpoint_blobs SET type='msgpack', blob=:b WHERE thread_id=:t"),
                {"b": ormsgpack.packb(evil(marker)), "t": session_id},
            ).rowcount
            assert n > 0
        engine.dispose()


@pytest.fixture
def planted(db_url, home, tmp_path):
    marker = tmp_path / "pwned"
    make_session(db_url, home, "victim")
    plant(db_url, "victim", marker)
    return marker


def test_reading_the_state_refuses_and_runs_nothing(db_url, tmp_path, planted) -> None:
    with Database.open(db_url, home=tmp_path) as db:
        sessions = Sessions(db, None)  # type: ignore[arg-type]
        with pytest.raises(UnsafeCheckpointError, match=r"session 'victim'.*os\.system.*refused"):
            sessions.state("victim")
    assert not planted.exists()


def test_follow_up_fork_gc_and_export_refuse(db_url, home, tmp_path, planted, capsys, monkeypatch) -> None:
    from duogen_agents.agent import Agent

    # The refusal comes before any model loads.
    monkeypatch.setattr(Agent, "from_preset", classmethod(lambda *a, **k: pytest.fail("models were loaded")))
    db = ("--db", db_url)

    def refused(*argv: str) -> None:
        code, err = main([*argv, *db]), capsys.readouterr().err
        assert code == 1, (argv, err)
        line = one_line(err)
        assert "session 'victim'" in line and "os.system" in line and "internal error" not in line, (argv, err)

    refused("run", "--session", "victim", "follow up")
    refused("sessions", "fork", "victim", "--as", "copy")
    assert not planted.exists()
    # With a turn pending, resume and gc read the state too: resume refuses; gc goes on without it,
    # keeping every file written since that turn began (here: all of them), and runs nothing either.
    engine = create_engine(db_url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as c:
        c.execute(text("UPDATE duogen_turns SET status='interrupted' WHERE session_id='victim'"))
    engine.dispose()
    refused("run", "--session", "victim", "--resume")
    before = sorted((home / "images").rglob("*.png")) if (home / "images").exists() else []
    code, err = main(["sessions", "gc", "--grace", "0", *db]), capsys.readouterr().err
    assert code == 0 and err == "", err
    assert (sorted((home / "images").rglob("*.png")) if (home / "images").exists() else []) == before
    assert not planted.exists()


def test_planted_pending_write_is_refused(db_url, tmp_path) -> None:
    """The writes table is read back too (pending writes of the newest checkpoint)."""
    marker = tmp_path / "pwned"
    make_session(db_url, tmp_path, "victim")
    with Database.open(db_url, home=tmp_path) as db:
        config = db.saver.get_tuple({"configurable": {"thread_id": "victim"}}).config
        db.saver.put_writes(config, [("title", evil(marker))], task_id="attacker")
        with pytest.raises(UnsafeCheckpointError, match="session 'victim'"):
            Sessions(db, None).state("victim")  # type: ignore[arg-type]
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload, match",
    [
        (("pickle", b"cos\nsystem\n(S'true'\ntR."), "'pickle'"),
        (("json", b'{"lc": 2, "type": "constructor", "id": ["os", "system"], "args": ["true"]}'), "'json'"),
        (
            ("msgpack", ormsgpack.packb({"a": [ormsgpack.Ext(3, ormsgpack.packb(["os", "system", "x", "y"]))]})),
            "os.system",
        ),
        (("msgpack", ormsgpack.packb([ormsgpack.Ext(99, b"\x90")])), "extension 99"),
        (
            (
                "msgpack",
                ormsgpack.packb(
                    ormsgpack.Ext(
                        jsonplus.EXT_DELTA_SNAPSHOT,
                        ormsgpack.packb(
                            [
                                ormsgpack.Ext(
                                    jsonplus.EXT_PYDANTIC_V2, ormsgpack.packb(["subprocess", "Popen", {"args": "true"}])
                                )
                            ]
                        ),
                    )
                ),
            ),
            "subprocess.Popen",
        ),
        (("msgpack", b"\xc1\xc1"), "not valid msgpack"),
    ],
)
def test_serializer_refuses_everything_outside_the_allow_list(payload, match) -> None:
    with pytest.raises(UnsafeCheckpointError, match=match):
        CheckpointSerializer().loads_typed(payload)


def test_serializer_round_trips_what_the_graph_stores() -> None:
    import datetime
    import uuid

    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

    serde = CheckpointSerializer()
    value = {
        "messages": [SystemMessage("s"), HumanMessage([{"type": "image", "file_id": "ab" * 32}]), AIMessage("x")],
        "when": datetime.datetime(2026, 11, 26, tzinfo=datetime.timezone.utc),
        "id": uuid.UUID(int=7),
        "tags": {"a", "b"},
        "n": 3,
    }
    assert serde.loads_typed(serde.dumps_typed(value)) == value


def test_harden_swaps_only_the_permissive_default() -> None:
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer

    class CallersOwn(JsonPlusSerializer):
        pass

    assert isinstance(harden(InMemorySaver()).serde, CheckpointSerializer)
    own = CallersOwn()
    assert harden(InMemorySaver(serde=own)).serde is own


class Order(BaseModel):
    item: str


class HostState(TypedDict):
    order: Order


def test_a_callers_shared_saver_is_left_as_it_was(tmp_path) -> None:
    """The host application's one checkpointer, shared with duogen's graph: the host's graph still
    reads back its own types (duogen used to swap the saver's serializer in place, after which the host
    got UnsafeCheckpointError for its own pydantic state), while duogen's graph reads through the
    allow-list from the same storage."""
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.checkpoint.sqlite import SqliteSaver
    from langgraph.graph import START, StateGraph

    def host(saver):
        g = StateGraph(HostState)
        g.add_node("n", lambda s: {"order": Order(item="pot")})
        g.add_edge(START, "n")
        return g.compile(checkpointer=saver)

    conn = sqlite3.connect(tmp_path / "host.db", check_same_thread=False)
    for saver in (InMemorySaver(), SqliteSaver(conn)):
        permissive = saver.serde
        mine = host(saver)
        cfg = {"configurable": {"thread_id": "order-1"}}
        mine.invoke({"order": Order(item="x")}, cfg)
        ours = build_state_graph(saver)
        assert saver.serde is permissive  # not changed
        assert mine.get_state(cfg).values == {"order": Order(item="pot")}
        # duogen's graph reads the same storage, through the allow-list: the host's type is refused there.
        with pytest.raises(UnsafeCheckpointError, match="Order"):
            ours.get_state(cfg)
