"""The bench format: one task per JSONL line.

::

    {"id": "picnic-1", "mode": "visual-plan",
     "turns": [{"prompt": "Plan a picnic in the park", "images": []}],
     "expect": {"steps": 3, "images": 3}}

``mode`` is ``interleaved``, ``visual-plan`` or ``draft``; ``turns`` are the user's messages in order
(``images`` are paths, relative to the bench file and inside its folder, attached to that message: a
bench from elsewhere cannot make the planner, or a remote planner or judge, read other pictures on
the machine); ``expect`` is optional
and task-specific: ``images`` (how many the answer should have), ``steps`` (of a plan), and for the
shapes world ``world: "shapes"`` with ``scenes`` (the ground truth of each expected image), ``facts``
(what the text must state), ``answer`` (the yes or no of a draft's question; in a training file of
``write_dataset``, the blocks of a correct answer per turn) and, for follow-ups, ``turns`` with the
same per turn.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from duogen_agents.errors import ConfigError
from duogen_agents.validation import validation_line

MAX_TASK_LINE_CHARS = 1_000_000


class Turn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=20_000)
    images: list[str] = Field(default_factory=list)


class Task(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=200)
    mode: Literal["interleaved", "visual-plan", "draft"] = "interleaved"
    turns: list[Turn] = Field(min_length=1)
    expect: dict[str, Any] = Field(default_factory=dict)
    source: str | None = Field(default=None, description="where the task came from (an importer's bench name)")


class BenchError(BaseModel):
    line: int
    message: str


def parse_lines(lines: list[str], base: Path | None = None) -> tuple[list[Task], list[BenchError]]:
    """Tasks from JSONL lines; a malformed line becomes a ``BenchError`` with its number (1-based)
    and the rest still load. Image paths are resolved against ``base`` and must stay inside it."""
    tasks: list[Task] = []
    errors: list[BenchError] = []
    seen: set[str] = set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            if len(line) > MAX_TASK_LINE_CHARS:
                raise ValueError(f"line is longer than {MAX_TASK_LINE_CHARS:,} characters")
            task = Task.model_validate(json.loads(line))
            check_expect(task)
            if task.id in seen:
                raise ValueError(f"duplicate task id {task.id!r}")
            if base is not None:
                for turn in task.turns:
                    turn.images = [inside(base, p) for p in turn.images]
        except (ValueError, ValidationError, RecursionError) as e:
            errors.append(BenchError(line=number, message=_one_line(e)))
            continue
        seen.add(task.id)
        tasks.append(task)
    return tasks, errors


def inside(base: Path, path: str) -> str:
    """``path`` (relative to ``base``) resolved, or ``ValueError`` when it leaves ``base``'s folder
    (an absolute path, ``..``, a link out of it) or is not a file there (a missing picture is the
    bench's mistake, said when it loads, not the model's error at answer time)."""
    root = base.resolve()
    full = (root / path).resolve()
    if Path(path).is_absolute() or not full.is_relative_to(root):
        raise ValueError(
            f"image {path[:80]!r} is outside the bench's folder {root}; name images relative to it, inside it"
        )
    if not full.is_file():
        raise ValueError(f"image {path[:80]!r} is not a file in {root}")
    return str(full)


def check_expect(task: Task) -> None:
    """``expect`` is checked when the bench loads, so a bad one is a line's error, not a crash later
    (or a score outside [0, 1]); each of ``expect.turns`` is checked as ``expect`` is."""
    exp = task.expect
    turns = exp.get("turns")
    if turns is not None and (not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns)):
        raise ValueError("expect.turns must be a list of objects")
    for k, part in enumerate([exp, *(turns or [])]):
        where = "expect" if k == 0 else f"expect.turns[{k - 1}]"
        for key in ("images", "steps"):
            value = part.get(key)
            if key in part and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{where}.{key} must be a whole number >= 0")
    if exp.get("world") == "shapes":
        from duogen_agents.worlds.shapes import check_scene

        for part in [exp, *(turns or [])]:
            scenes = part.get("scenes", [])
            if not isinstance(scenes, list):
                raise ValueError("expect.scenes must be a list")
            for scene in scenes:
                check_scene(scene)
            if not isinstance(part.get("facts", []), list):
                raise ValueError("expect.facts must be a list")
            answer = part.get("answer")
            if answer is not None and not isinstance(answer, list) and answer not in ("yes", "no"):
                raise ValueError("expect.answer must be yes or no (a question's), or a list of blocks per turn")
            changes = part.get("changes")
            if changes is not None and (
                not isinstance(changes, list)
                or len(changes) != len(scenes)
                or not all(c is None or isinstance(c, str) for c in changes)
            ):
                raise ValueError("expect.changes must be a list of instructions (or null), one per scene")


def load_jsonl(path: Path | str) -> tuple[list[Task], list[BenchError]]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read bench file {p}: {getattr(e, 'strerror', None) or e}") from None
    return parse_lines(text.splitlines(), p.parent)


def load_bench(bench: str, *, limit: int | None = None, seed: int = 0) -> tuple[str, list[Task], list[BenchError]]:
    """``shapes`` (the built-in evaluation split) or a JSONL file; returns (name, tasks, errors)."""
    if bench == "shapes":
        from duogen_agents.worlds.shapes import tasks

        # The fixed evaluation split: the same tasks whatever --seed (which seeds the answers).
        n = min(limit, SHAPES_EVAL_TASKS) if limit is not None else SHAPES_EVAL_TASKS
        return "shapes", [Task.model_validate(t) for t in tasks(n, split="eval", seed=SHAPES_EVAL_SEED)], []
    path = Path(bench)
    if path.suffix.lower() not in (".jsonl", ".json") or not path.exists():
        raise ConfigError(f"unknown bench {bench!r}: use shapes or a .jsonl file of tasks")
    tasks_, errors = load_jsonl(path)
    return path.stem, tasks_[:limit] if limit is not None else tasks_, errors


# The fixed evaluation split of the shapes world (``--limit`` takes its first N).
SHAPES_EVAL_TASKS = 48
SHAPES_EVAL_SEED = 0


def _one_line(e: BaseException) -> str:
    if isinstance(e, ValidationError):
        return validation_line(e.errors())
    if isinstance(e, RecursionError):
        return "nested too deeply"
    return " ".join(str(e).split())[:200]
