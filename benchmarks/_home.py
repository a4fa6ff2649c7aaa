"""A benchmark's scratch home (its sessions, pictures and the models it builds), removed at exit.

The real-shapes runs build random-weight checkpoints of the real sizes there (tens of GB), so a
home left behind in /tmp fills a device machine's disk after a few runs. A run stopped by
``timeout`` (SIGTERM) removes it too.
"""

from __future__ import annotations

import atexit
import shutil
import signal
import sys
import tempfile
from pathlib import Path


def _exit_on_term(signum: int, frame: object) -> None:
    sys.exit(128 + signum)  # unwinds, so the atexit clean-up runs


def scratch_home(prefix: str = "duogen-bench-") -> Path:
    home = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _exit_on_term)
    return home
