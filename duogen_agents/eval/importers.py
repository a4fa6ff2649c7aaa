"""Importers: published interleaved-generation benchmarks converted to the bench format.

- **ISG-Bench** (``Dongping-Chen/ISG``, ``ISG_eval/ISG-Bench.jsonl``): ``id``, ``Category``,
  ``Query`` and ``Golden`` as lists of ``{"type": "text"|"image", "content": ...}``; the prompt is the
  query's text, its images are attached, and the answer should have as many images as ``Golden``.
- **OpenING** (``LanceZPF/OpenING``, ``OpenING-benchmark/test_data.jsonl``): ``total_uid``,
  ``meta_task_name``, ``subtask_name`` and ``conversations`` ``[{"input": [steps]}, {"output":
  [steps]}]`` with steps ``{"image": path|null, "text": ...}``; ``<BEGIN>`` and ``<image>`` markers are
  dropped, input images attached, and the answer should have as many images as the output steps that
  have one.
- **UEval** (Hugging Face ``primerL/UEval``; save it with ``datasets``' ``to_json``): ``id``,
  ``prompt``, ``task_type``, ``image_ref`` (the gold images), ``text_ref``; text-only prompts, and the
  answer should have as many images as ``image_ref``.

Image paths are resolved against ``images_root`` (default: the task file's folder) and must stay inside
it; the bench file names them relative to itself, so it is written in a folder that holds them (or,
with ``copy_images``, they are copied beside it). A malformed line, or one naming a picture that is
not there, is reported with its number and the others are converted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

from duogen_agents.errors import ConfigError
from duogen_agents.eval.tasks import BenchError, Task, _one_line, inside

_MARKERS = re.compile(r"<BEGIN>|<image>")


def _records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, record) for JSONL, or (index + 1, record) for a JSON list."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        except RecursionError:
            raise ConfigError(f"{path}: JSON nested too deeply") from None
        yield from enumerate(data, 1)
        return
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield number, json.loads(line)
            except (ValueError, RecursionError) as e:
                yield number, e


def _isg(record: dict[str, Any], root: Path) -> Task:
    query = record["Query"]
    text = "\n".join(i["content"] for i in query if i["type"] == "text").strip()
    images = [inside(root, i["content"]) for i in query if i["type"] == "image"]
    golden = record.get("Golden") or []
    return Task(
        id=f"isg-{record['id']}-{_slug(record.get('Category', ''))}",
        mode="interleaved",
        turns=[{"prompt": text, "images": images}],
        expect={
            "images": sum(i["type"] == "image" for i in golden),
            "category": record.get("Category"),
            "structure": ["text" if i["type"] == "text" else "image" for i in golden],
        },
        source="ISG-Bench",
    )


def _opening(record: dict[str, Any], root: Path) -> Task:
    conv = record["conversations"]
    steps_in = conv[0]["input"]
    steps_out = conv[1]["output"]
    text = "\n".join(_MARKERS.sub("", s.get("text") or "").strip() for s in steps_in).strip()
    images = [inside(root, s["image"]) for s in steps_in if s.get("image")]
    return Task(
        id=f"opening-{record['total_uid']}",
        mode="interleaved",
        turns=[{"prompt": text, "images": images}],
        expect={
            "images": sum(1 for s in steps_out if s.get("image")),
            "category": f"{record.get('meta_task_name')} / {record.get('subtask_name')}",
        },
        source="OpenING",
    )


def _ueval(record: dict[str, Any], root: Path) -> Task:
    refs = record.get("image_ref") or []
    if not isinstance(refs, list):
        raise ValueError("image_ref must be a list")
    kind = record.get("task_type") or record.get("domain") or "task"
    return Task(
        id=f"ueval-{_slug(kind)}-{record['id']}",
        mode="interleaved",
        turns=[{"prompt": record["prompt"], "images": []}],
        expect={"images": len(refs), "category": kind, "question_type": record.get("question_type")},
        source="UEval",
    )


IMPORTERS: dict[str, Callable[[dict[str, Any], Path], Task]] = {"isg": _isg, "opening": _opening, "ueval": _ueval}


def _slug(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", str(value)).strip("-").lower()[:40] or "task"


def import_tasks(
    kind: str, path: Path | str, images_root: Path | str | None = None
) -> tuple[list[Task], list[BenchError]]:
    """Convert a published task file; returns the tasks and the malformed records (with line numbers)."""
    if kind not in IMPORTERS:
        raise ConfigError(f"unknown benchmark {kind!r}; choose one of: {', '.join(IMPORTERS)}")
    p = Path(path)
    root = Path(images_root) if images_root is not None else p.parent
    convert = IMPORTERS[kind]
    tasks: list[Task] = []
    errors: list[BenchError] = []
    seen: set[str] = set()
    for number, record in _records(p):
        try:
            if isinstance(record, Exception):
                raise ValueError(f"not JSON: {record}")
            if not isinstance(record, dict):
                raise ValueError("not an object")
            task = convert(record, root)
            if task.id in seen:
                raise ValueError(f"duplicate task id {task.id!r}")
        except (ValueError, KeyError, TypeError, IndexError, RecursionError) as e:
            message = f"missing field {e}" if isinstance(e, KeyError) else _one_line(e)
            errors.append(BenchError(line=number, message=message))
            continue
        seen.add(task.id)
        tasks.append(task)
    return tasks, errors


def write_jsonl(tasks: list[Task], out: Path | str, copy_images: bool = False) -> Path:
    """The tasks as a bench file at ``out``, their images named relative to it (a bench names its
    images inside its own folder: ``--out`` must be in a folder that holds them). With
    ``copy_images`` the images are copied into ``OUT``'s folder instead, under ``<stem>-images/``, each
    named by its content (the same picture twice is one file), so the bench can live anywhere; if it
    fails, the copies it made are removed."""
    import hashlib

    from duogen_agents.storage.images import write_atomic

    out = Path(out)
    folder = out.resolve().parent
    copies = folder / f"{out.stem}-images"
    made_folder = not copies.exists()
    made: list[Path] = []  # the copies this call wrote: removed, with the folder it made, if it fails
    try:
        rows = []
        copied: dict[Path, str] = {}
        for t in tasks:
            row = t.model_copy(deep=True)
            for turn in row.turns:
                for k, image in enumerate(turn.images):
                    full = Path(image).resolve()
                    if copy_images:
                        if full not in copied:
                            try:
                                data = full.read_bytes()
                            except OSError as e:
                                raise ConfigError(f"cannot read image {full}: {e.strerror or e}") from None
                            name = hashlib.sha256(data).hexdigest()[:32] + full.suffix.lower()
                            copies.mkdir(parents=True, exist_ok=True)
                            if not (copies / name).is_file():
                                made.append(write_atomic(copies / name, data))
                            copied[full] = f"{copies.name}/{name}"
                        turn.images[k] = copied[full]
                        continue
                    if not full.is_relative_to(folder):
                        raise ConfigError(
                            f"--out {out}: its folder {folder} does not hold the images ({full.parent}); a bench names its "
                            "images inside its own folder, so write it beside or above them, or add --copy-images"
                        )
                    turn.images[k] = full.relative_to(folder).as_posix()
            rows.append(row.model_dump_json(exclude_none=True) + "\n")
        return write_atomic(out, "".join(rows).encode())
    except BaseException:
        for path in made:
            path.unlink(missing_ok=True)
        with suppress(OSError):
            if made_folder and not any(copies.iterdir()):
                copies.rmdir()
        raise
