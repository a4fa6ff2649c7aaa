"""Running a bench: each preset answers each task, and every answer is scored.

>>> results = run_eval("shapes", ["tiny"], limit=6, out="eval-out")          # doctest: +SKIP
>>> results["runs"][0]["summary"]                                            # doctest: +SKIP

Results go to ``OUT/results.json`` (versions, preset, seed, timings, per task the answer, scores and
reasons) and ``OUT/report.html``; images are copied to ``OUT/images``. One preset's models are loaded
at a time. ``resume=True`` keeps the tasks ``OUT/results.json`` already holds. ``results.json`` is
written (atomically, marked partial) after every finished task, so a run ended any way loses at most
the task in progress. Ctrl-C (and ``duogen eval``'s SIGTERM) keeps what finished and writes a partial
report marked so, then raises ``KeyboardInterrupt``.
"""

from __future__ import annotations

import gc
import hashlib
import json
import platform
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from duogen_agents.document import ImageBlock, InterleavedDocument, TextBlock
from duogen_agents.errors import ConfigError, DuogenError
from duogen_agents.eval import prompts
from duogen_agents.eval.scoring import AXES, shapes_scores, structure
from duogen_agents.eval.tasks import BenchError, Task, load_bench
from duogen_agents.storage.images import ImageStore, default_home, replaceable, write_atomic

RESULTS_FORMAT = 1
REFERENCE = "reference"

Progress = Callable[[str, int, int], None]  # (run name, tasks done, tasks in all)


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("duogen-agents", "torch", "transformers", "diffusers", "langgraph"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


def reference_answer(task: Task, store: ImageStore) -> list[InterleavedDocument]:
    """The ground truth as an answer (shapes tasks): each expected scene drawn, the facts stated."""
    from duogen_agents.eval.scoring import _turn_expect
    from duogen_agents.worlds.shapes import render, scene_from_json

    if task.expect.get("world") != "shapes":
        raise ConfigError(f"task {task.id!r} has no ground truth to answer with (only shapes tasks do)")
    docs = []
    for turn, t in enumerate(task.turns):
        exp = _turn_expect(task, turn)
        blocks: list[Any] = []
        scenes = exp.get("scenes", [])
        facts = " ".join(str(f) for f in exp.get("facts", []))
        for k, scene in enumerate(scenes):
            ref = store.put(render(scene_from_json(scene)))
            step = k if task.mode == "visual-plan" else None
            blocks.append(
                TextBlock(text=f"Step {k + 1}: {facts}" if step is not None else facts or "Here it is.", step=step)
            )
            blocks.append(
                ImageBlock(
                    image=ref,
                    prompt=f"scene {k + 1}",
                    step=step,
                    origin="draft" if task.mode == "draft" else "generated",
                )
            )
        if task.mode == "draft" or not scenes:
            blocks.append(TextBlock(text=facts or "Done."))
        docs.append(InterleavedDocument(prompt=t.prompt, mode=task.mode, preset=REFERENCE, blocks=blocks))
    return docs


def _answer(agent: Any, task: Task, seed: int) -> list[InterleavedDocument]:
    docs = []
    thread = f"eval-{task.id}-{seed}"
    for t in task.turns:
        doc = None
        for event in agent.stream(t.prompt, mode=task.mode, images=t.images, seed=seed, thread_id=thread):
            if event.get("event") == "document":
                doc = event["document"]
        assert doc is not None
        docs.append(doc)
    return docs


def score(task: Task, docs: Sequence[InterleavedDocument], store: ImageStore, judge: Any) -> dict[str, Any]:
    """Scores in [0, 1] with reasons: structure always; the shapes detectors for shapes tasks; the
    judge (raw 1-10 kept) for the other axes of other tasks when one is given."""
    scores: dict[str, float] = {}
    reasons: dict[str, str] = {}
    scores["structure"], reasons["structure"] = structure(task, docs)
    raw: dict[str, int] = {}
    if task.expect.get("world") == "shapes":
        for axis, (value, reason) in shapes_scores(task, docs, store).items():
            scores[axis], reasons[axis] = value, f"detectors: {reason}"
    elif judge is not None:
        raw = _judge(task, docs, store, judge, scores, reasons)
    return {"scores": scores, "reasons": reasons, "judge_raw": raw}


def _judge(
    task: Task,
    docs: Sequence[InterleavedDocument],
    store: ImageStore,
    judge: Any,
    scores: dict[str, float],
    reasons: dict[str, str],
) -> dict[str, int]:
    """The judge's scores added to ``scores`` and ``reasons``; its raw 1-10 scores returned."""
    request = "\n\n".join(t.prompt for t in task.turns)
    raw: dict[str, int] = {}
    for axis, (value, reason) in judge.judge(request, docs, store).items():
        raw[axis] = value
        scores[axis], reasons[axis] = (value - 1) / 9, f"judge {value}/10: {reason}"
    return raw


def _summary(tasks: list[dict[str, Any]]) -> dict[str, float | None]:
    """Mean per axis over the scores that exist; a failed task (no answer) counts 0 on every axis that
    the run measures (one no task could measure stays ``None``: no judge, no detectors, or a judge that
    always failed). A task whose judge failed counts on its own scores only."""
    out: dict[str, float | None] = {}
    for axis in AXES:
        values = [t["scores"][axis] for t in tasks if t["status"] == "ok" and axis in t["scores"]]
        if values or axis == "structure":
            values += [0.0 for t in tasks if t["status"] != "ok"]
        out[axis] = sum(values) / len(values) if values else None
    return out


def _images_dir(out: Path) -> Path:
    """``OUT/images``, refused when it is a link (planted: the pictures would land wherever it points)."""
    folder = out / "images"
    if folder.is_symlink():
        raise ConfigError(f"{folder} is a symbolic link; remove it (the run's pictures go in a real folder)")
    return folder


def _copy_images(docs: Sequence[InterleavedDocument], store: ImageStore, out: Path) -> None:
    folder = _images_dir(out)
    for doc in docs:
        for block in doc.images:
            target = folder / block.image.filename
            if not target.exists():
                write_atomic(target, store.read_bytes(block.image))


def run_eval(
    bench: str,
    presets: Sequence[str],
    *,
    limit: int | None = None,
    seed: int = 0,
    out: Path | str = "eval-out",
    judge: Any = None,
    reference: bool = False,
    resume: bool = False,
    home: Path | str | None = None,
    progress: Progress | None = None,
    on_skipped: Callable[[list[BenchError]], None] | None = None,
    on_note: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run ``bench`` with each preset (and the ground truth with ``reference``); see the module doc."""
    from duogen_agents.eval.report import write_report

    name, tasks, errors = load_bench(bench, limit=limit, seed=seed)
    if not tasks:
        first = "; ".join(f"line {e.line}: {e.message}" for e in errors[:3])
        raise ConfigError(
            f"bench {bench!r} has no runnable task" + (f" ({len(errors)} malformed lines; {first})" if errors else "")
        )
    if reference:
        check_reference(name, tasks)
    if on_skipped is not None and errors:  # said before the run, not after it
        on_skipped(errors)
    out_dir = Path(out)
    for name_ in ("results.json", "report.html"):  # a planted link or FIFO: refused now, not after the run
        replaceable(out_dir / name_)
    _images_dir(out_dir)
    root = Path(home) if home is not None else default_home()
    store = ImageStore(root)
    previous: dict[str, dict[str, Any]] = {}
    comparable = True  # the earlier runs were scored on the same bench tasks, seed and judge as this one
    differs: list[str] = []
    digest = bench_digest(tasks)
    results_file = out_dir / "results.json"
    check_out(out_dir, resume)
    if judge is not None and hasattr(judge, "probe") and any(t.expect.get("world") != "shapes" for t in tasks):
        judge.probe()  # an unreachable judge: refused now, before any model loads
    if resume and results_file.exists():
        try:
            old = json.loads(results_file.read_text())
            # by place: a run recorded before files were kept by absolute path named them as given
            previous = {
                str(_place(r["preset"])): r for r in old.get("runs", []) if isinstance(r, dict) and "preset" in r
            }
            # the bench by its tasks (after --limit), not its name: an edited file or another of that name
            # differs. Results written before bench_digest was recorded: the earlier rule (the bench's name
            # and --limit), as they cannot say more
            if old.get("bench_digest") is not None:
                then = {"bench tasks": old.get("bench_digest")}
                now = {"bench tasks": digest}
            else:
                then = {"bench": old.get("bench"), "limit": old.get("limit")}
                now = {"bench": name, "limit": limit}
            then.update(seed=old.get("seed"), judge=old.get("judge"))
        except (ValueError, TypeError, AttributeError) as e:
            raise ConfigError(f"cannot resume from {results_file}: {e}") from None
        now.update(seed=seed, judge=getattr(judge, "name", None))
        differs = [k for k in now if then[k] != now[k]]
        comparable = not differs
    results: dict[str, Any] = {
        "format": RESULTS_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "bench": name,
        "bench_digest": digest,
        "options": {  # what --resume continues with: files by absolute path, from any working directory
            "bench": _place(bench),
            "presets": [_place(p) for p in presets],
            "limit": limit,
            "seed": seed,
            "reference": reference,
            "judge": _place(getattr(judge, "spec", None)),
            "judge_model": getattr(judge, "model", None),
            "judge_key_env": getattr(judge, "api_key_env", None),
        },
        "seed": seed,
        "limit": limit,
        "partial": False,
        "judge": getattr(judge, "name", None),
        "bench_errors": [e.model_dump() for e in errors],
        "prompts": {"system": prompts.JUDGE_SYSTEM, "request": prompts.JUDGE_REQUEST, "axes": prompts.JUDGE_AXES},
        "runs": [],
    }
    runs = ([REFERENCE] if reference else []) + [str(_place(p)) for p in presets]
    # Earlier runs of other presets stay, if their scores compare with this run's (the same bench, seed
    # and judge); a preset run again reuses only the tasks whose fingerprint is the same.
    others = [r for name, r in previous.items() if name not in runs]
    kept = others if comparable else []
    if others and not comparable and on_note is not None:
        from duogen_agents.eval.report import run_label

        on_note(
            f"the earlier runs of {', '.join(run_label(str(r['preset'])) for r in others)} in {out_dir} are dropped: "
            f"their {' and '.join(differs)} differ from this run's, so their scores would not compare"
        )
    results["options"]["presets"] += [str(_place(r["preset"])) for r in kept if r["preset"] != REFERENCE]

    def checkpoint(current: dict[str, Any]) -> None:
        """After each finished task: results.json as it stands (marked partial), so that a run ended any
        way (SIGKILL, out of memory) loses at most the task in progress, and ``--resume`` continues it."""
        _write_results({**results, "partial": True, "runs": [*results["runs"], current, *kept]}, out_dir)

    try:
        for run_name in runs:
            run = _run_one(
                run_name,
                tasks,
                previous.get(run_name),
                seed,
                judge,
                store,
                root,
                out_dir,
                progress,
                checkpoint,
                on_note,
            )
            results["runs"].append(run)
            if run.get("partial"):
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        results["partial"] = True
        results["runs"] += kept
        _write(results, out_dir, write_report)
        raise
    results["runs"] += kept
    _write(results, out_dir, write_report)
    return results


def check_reference(name: str, tasks: Sequence[Task]) -> None:
    """``--reference`` answers with the ground truth: refused up front unless every task has one."""
    if bare := [t.id for t in tasks if t.expect.get("world") != "shapes"]:
        raise ConfigError(
            f"--reference answers with each task's ground truth, which only shapes tasks have: {len(bare)} of "
            f"{len(tasks)} tasks of {name!r} have none (the first: {bare[0]!r}); run without --reference"
        )


def check_out(out_dir: Path, resume: bool) -> None:
    """As ``duogen train``: a new run never replaces the results of an earlier one in its OUT."""
    if not resume and (out_dir / "results.json").exists():
        raise ConfigError(
            f"{out_dir} holds an earlier evaluation (results.json); pass --resume {out_dir} to continue it "
            "(or to add presets to it), or choose another --out"
        )


def bench_digest(tasks: Sequence[Task]) -> str:
    """The tasks a run was scored on (after ``limit``): runs compare only when this is the same. By
    content: a task's pictures by their bytes, not their (absolute) paths, so the same bench in another
    folder or on another machine is the same."""
    dumps = []
    for t in tasks:
        dump = t.model_dump(mode="json")
        for turn in dump["turns"]:
            turn["images"] = [_image_digest(p) for p in turn.get("images", [])]
        dumps.append(dump)
    key = json.dumps(dumps, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _image_digest(path: str) -> str:
    """A bench picture by its bytes (checked to be a file when the bench loaded); its path if unreadable."""
    try:
        return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return path


def _place(value: str | None) -> str | None:
    """A preset or bench file (``.toml``, ``.json``, ``.jsonl``) that exists: its absolute path;
    anything else (a built-in name such as ``tiny`` or ``shapes``, a URL) as given."""
    if value is None or value.startswith(("http://", "https://")):
        return value
    path = Path(value).expanduser()
    return str(path.resolve()) if path.suffix.lower() in (".toml", ".json", ".jsonl") and path.is_file() else value


def fingerprint(task: Task, seed: int, judge: Any, preset: str | None = None) -> str:
    """What a finished task's result depends on: resume reuses it only when this is the same.
    ``preset``: the run's ``preset_digest`` (none for the ground truth, which depends on no model)."""
    parts: list[Any] = [task.model_dump(mode="json"), seed, getattr(judge, "name", None)]
    key = json.dumps(parts + ([preset] if preset is not None else []), sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


MODEL_KEYS = ("model", "text2image", "video2world")  # a preset's fields that may name local model files


def preset_digest(name: str) -> str:
    """What a preset's answers depend on: its resolved settings and, for each model it reads from a
    local file or folder (a trained run's), the names, sizes and modification times of those files.
    Cheap: no weights are read. A hub id's files are not looked at (the id is in the settings)."""
    from duogen_agents.presets import load_preset

    spec = load_preset(name).model_dump(mode="json")
    files: list[Any] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                if k in MODEL_KEYS and isinstance(v, str) and v and ":" not in v:
                    files.append([v, _files_identity(Path(v).expanduser())])
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    walk(spec)
    key = json.dumps([spec, files], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _files_identity(path: Path) -> list[Any] | None:
    """(relative name, size, mtime in ns) of a file or of every file in a folder; None if not local."""
    try:
        if path.is_file():
            st = path.stat()
            return [[path.name, st.st_size, st.st_mtime_ns]]
        if not path.is_dir():
            return None
        out = []
        for f in sorted(path.rglob("*")):
            if f.is_file():
                st = f.stat()
                out.append([str(f.relative_to(path)), st.st_size, st.st_mtime_ns])
        return out
    except OSError:
        return None


def _run_one(
    run_name: str,
    tasks: list[Task],
    previous: dict[str, Any] | None,
    seed: int,
    judge: Any,
    store: ImageStore,
    root: Path,
    out_dir: Path,
    progress: Progress | None,
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
    on_note: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    digest = None if run_name == REFERENCE else preset_digest(run_name)
    done = {
        t.get("fingerprint"): t
        for t in (previous or {}).get("tasks", [])
        if isinstance(t, dict) and t.get("status") == "ok" and t.get("fingerprint") and not t.get("judge_error")
    }
    # An earlier run recorded before preset_digest was (results of an earlier version): its tasks were
    # fingerprinted without the preset, so they are matched that way (what that version reused them by).
    legacy = digest is not None and previous is not None and previous.get("preset_digest") is None
    run: dict[str, Any] = {"preset": run_name, "reference": run_name == REFERENCE, "tasks": [], "seconds": 0.0}
    if digest is not None:
        run["preset_digest"] = digest
        earlier = (previous or {}).get("preset_digest")
        if done and earlier is not None and earlier != digest and on_note is not None:
            on_note(
                f"{run_name} has changed since its earlier run here (its settings or model files): "
                "its tasks are answered again"
            )
        elif done and legacy and on_note is not None:
            on_note(
                f"the earlier run of {run_name} here was recorded by an earlier version, without its settings: "
                "its finished tasks are reused as they are (a change to the preset since would not show)"
            )
    agent = None
    started = time.perf_counter()

    def close() -> dict[str, Any]:
        # A resumed run's time is the earlier invocations' (which made the reused tasks) and this one's.
        earlier = (previous or {}).get("seconds", 0.0) if run.get("reused") else 0.0
        earlier = earlier if isinstance(earlier, (int, float)) and earlier >= 0 else 0.0
        run["seconds"] = round(earlier + time.perf_counter() - started, 3)
        run["summary"] = _summary(run["tasks"])
        run["errors"] = sum(t["status"] != "ok" for t in run["tasks"])
        run["judge_errors"] = sum(bool(t.get("judge_error")) for t in run["tasks"])
        run["of"] = len(tasks)
        return run

    try:
        for i, task in enumerate(tasks):
            if progress:
                progress(run_name, i, len(tasks))
            mark = fingerprint(task, seed, judge, digest)
            reuse = done.get(mark) or (done.get(fingerprint(task, seed, judge)) if legacy else None)
            if reuse is not None:
                run["tasks"].append({**reuse, "fingerprint": mark})  # the next --resume matches it as now
                run["reused"] = run.get("reused", 0) + 1
                continue
            if agent is None and run_name != REFERENCE:
                from duogen_agents.agent import Agent

                agent = Agent.from_preset(run_name, home=root)
                run["preset_name"] = agent.preset.name
            run["tasks"].append(_one_task(task, mark, agent, seed, judge, store, out_dir))
            if checkpoint is not None:
                checkpoint(close())
        if progress:
            progress(run_name, len(tasks), len(tasks))
    except KeyboardInterrupt:
        run["partial"] = True
    finally:
        del agent
        _free_models()
    return close()


def _one_task(
    task: Task, mark: str, agent: Any, seed: int, judge: Any, store: ImageStore, out_dir: Path
) -> dict[str, Any]:
    """Answer and score one task. Any failure is that task's error, never the run's. When only the
    judge failed, the task is answered (``status`` ok) with its own scores (structure) and the judge's
    failure in ``judge_error``: its judge axes are missing, not 0, and ``--resume`` answers and judges it again."""
    t0 = time.perf_counter()
    entry: dict[str, Any] = {
        "id": task.id,
        "mode": task.mode,
        "prompts": [t.prompt for t in task.turns],
        "fingerprint": mark,
        "expect": task.expect,
        "scores": {},
        "reasons": {},
    }
    try:
        docs = reference_answer(task, store) if agent is None else _answer(agent, task, seed)
        entry["documents"] = [d.model_dump(mode="json") for d in docs]
        _copy_images(docs, store, out_dir)
        entry.update(score(task, docs, store, None))  # the answer's own scores: structure, detectors
        entry["status"] = "ok"
    except Exception as e:  # one task's failure (a model, a bad task): recorded, the run goes on
        entry.update(status="error", error=_one_line(e))
    if entry["status"] == "ok" and judge is not None and task.expect.get("world") != "shapes":
        scores, reasons = dict(entry["scores"]), dict(entry["reasons"])
        try:
            entry["judge_raw"] = _judge(task, docs, store, judge, scores, reasons)
            entry.update(scores=scores, reasons=reasons)
        except Exception as e:  # the judge failed: the answer and its own scores stay, the judge's axes are missing
            entry["judge_error"] = _one_line(e)
    entry["seconds"] = round(time.perf_counter() - t0, 3)
    return entry


def _one_line(e: Exception) -> str:
    message = str(e) if isinstance(e, DuogenError) else f"{type(e).__name__}: {e}"
    return " ".join(message.split())[:500]


def _free_models() -> None:
    """One preset's models at a time: drop the last one's memory before the next loads."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _write_results(results: dict[str, Any], out_dir: Path) -> None:
    write_atomic(out_dir / "results.json", (json.dumps(results, indent=2) + "\n").encode())


def _write(results: dict[str, Any], out_dir: Path, write_report: Callable[[dict[str, Any], Path], Path]) -> None:
    _write_results(results, out_dir)
    write_report(results, out_dir)


SCORED_ON = ("bench", "bench_digest", "seed", "limit", "judge")  # what a run's scores compare under


def _differ(scored_on: list[dict[str, Any]]) -> list[str]:
    """What differs between the runs of a comparison: bench (by name, or by its tasks where both runs
    recorded them), seed, limit (not where every run recorded the same tasks: a --limit above the bench's
    size, or none), judge."""
    out = []
    digests = [o.get("bench_digest") for o in scored_on]
    same_tasks = None not in digests and len(set(digests)) == 1  # --limit made no difference to the tasks
    for key in ("bench", "seed", "limit", "judge"):
        if key == "limit" and same_tasks:
            continue
        values = {json.dumps(o.get(key)) for o in scored_on}
        if key == "bench" and len(values) == 1:
            values = {o.get("bench_digest") for o in scored_on if o.get("bench_digest") is not None}
        if len(values) > 1:
            out.append(key if key != "bench" or len({o.get("bench") for o in scored_on}) > 1 else "bench tasks")
    return out


def compare(dirs: Sequence[Path | str], out: Path | str | None = None) -> dict[str, Any]:
    """Runs from several result folders side by side (one report: table and chart), each with what it
    was scored on (``scored_on``: bench, seed, limit, judge); ``differ`` names what is not the same."""
    from duogen_agents.eval.report import run_label, write_report

    runs = []
    for d in dirs:
        f = Path(d) / "results.json"
        try:
            data = json.loads(f.read_text())
            for run in data["runs"]:
                if not isinstance(run.get("tasks"), list) or not isinstance(run.get("summary"), dict):
                    raise ValueError("a run without tasks or summary")
                label = f"{run_label(run['preset'])} ({Path(d).name})"
                on = {k: data.get(k) for k in SCORED_ON}
                runs.append({**run, "preset": label, "images_dir": str(Path(d) / "images"), "scored_on": on})
        except OSError as e:
            raise ConfigError(f"cannot read {f}: {e.strerror or e}") from None
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"{f} is not a duogen eval result ({type(e).__name__}: {e})") from None
    merged = {"format": RESULTS_FORMAT, "compare": [str(d) for d in dirs], "runs": runs, "partial": False}
    merged["differ"] = _differ([r["scored_on"] for r in runs])
    if out is not None:
        try:
            write_report(merged, Path(out), name="compare.html")
        except (KeyError, TypeError, ValueError, AttributeError) as e:  # hand-edited results
            raise ConfigError(
                f"the results of {', '.join(map(str, dirs))} are malformed ({type(e).__name__}: {e})"
            ) from None
    return merged
