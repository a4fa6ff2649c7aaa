"""Ctrl-C twice exits 130 quietly, and the turn stays resumable (issue 14, finding 10)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from duogen_agents.sessions import Sessions
from duogen_agents.storage.database import Database

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize("gap", [0.005, 0.3])
def test_second_ctrl_c_exits_130_without_tracebacks(gap, home, tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'duogen.db'}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "duogen_agents.cli", "run", "--session", "s", "Plan a picnic", "--mode",
         "visual-plan", "--preset", "tiny", "--db", url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "DUOGEN_HOME": str(home)},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # the answer has started: the models are loaded, a turn runs
        assert first, proc.stderr.read() if proc.stderr else ""
        proc.send_signal(signal.SIGINT)
        time.sleep(gap)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    for noise in ("Traceback", "Exception ignored", "cannot schedule new futures", "KeyboardInterrupt"):
        assert noise not in err, err
    with Database.open(url, home=home) as db:
        (turn,) = Sessions(db, None).turns("s")  # type: ignore[arg-type]
    assert turn.status in ("running", "interrupted")  # kept: `--resume` continues it


def test_in_process_main_restores_the_sigint_handler() -> None:
    from duogen_agents.interrupts import ctrl_c_twice_exits

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), ctrl_c_twice_exits():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is before
