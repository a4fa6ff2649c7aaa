from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from duogen_agents.models.tiny import ensure_tiny_checkpoints


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny checkpoints, built once per test session with save_pretrained."""
    root = tmp_path_factory.mktemp("duogen-models")
    ensure_tiny_checkpoints(root, "qwen2_5_vl")
    return root


@pytest.fixture
def home(tmp_path: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh DUOGEN_HOME that shares the session's tiny checkpoints."""
    h = tmp_path / "home"
    h.mkdir()
    (h / "models").symlink_to(models_dir, target_is_directory=True)
    monkeypatch.setenv("DUOGEN_HOME", str(h))
    return h


@pytest.fixture(scope="session")
def tiny_agent(tmp_path_factory: pytest.TempPathFactory, models_dir: Path):
    from duogen_agents import Agent

    h = tmp_path_factory.mktemp("agent-home")
    (h / "models").symlink_to(models_dir, target_is_directory=True)
    return Agent.from_preset("tiny", home=h)


PG_ADMIN_URL = os.environ.get("DUOGEN_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def _pg_admin():
    import psycopg

    try:
        return psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as e:
        if os.environ.get("CI"):
            raise RuntimeError(f"CI must reach PostgreSQL at {PG_ADMIN_URL}: {e}") from e
        pytest.skip(f"no PostgreSQL server reachable at {PG_ADMIN_URL} ({str(e).strip().splitlines()[0]})")


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database per test (as langgraph's saver tests do), dropped afterwards."""
    admin = _pg_admin()
    name = f"duogen_t_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The shared storage suite runs against SQLite and against PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'duogen.db'}"
    return request.getfixturevalue("pg_url")
