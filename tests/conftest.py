from __future__ import annotations

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
