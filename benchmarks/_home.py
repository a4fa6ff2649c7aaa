"""A benchmark's scratch home (its sessions, pictures and the models it builds), removed at exit.

The real-shapes runs build random-weight checkpoints of the real sizes there (tens of GB), so a
home left behind in /tmp fills a device machine's disk after a few runs.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path


def scratch_home(prefix: str = "duogen-bench-") -> Path:
    home = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    return home
