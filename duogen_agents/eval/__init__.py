"""``duogen eval``: score any preset on interleaved-generation tasks.

- ``load_bench("shapes" | "tasks.jsonl")``: the built-in shapes world (exact scores from detectors)
  or a JSONL bench (``eval/tasks.py`` documents the format; ``eval/importers.py`` converts
  ISG-Bench, OpenING and UEval task files);
- ``run_eval(bench, presets, ...)``: answers, scores (structure; detectors or a judge), writes
  ``results.json`` and ``report.html``; ``compare(dirs)`` puts runs side by side.
"""

from __future__ import annotations

from duogen_agents.eval.runner import compare, run_eval
from duogen_agents.eval.tasks import Task, load_bench, load_jsonl

__all__ = ["Task", "compare", "load_bench", "load_jsonl", "run_eval"]
