"""Exact scores: the structure of any answer, and the shapes world's detectors.

Every score is in [0, 1]. ``structure`` checks what any task can be checked for (the answer has the
images the task asks for, a plan has its steps, every image of a plan is placed in a step);
``shapes_scores`` reads the answer's images back into scenes and compares them with the ground truth.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from duogen_agents.document import InterleavedDocument
from duogen_agents.eval.tasks import Task
from duogen_agents.storage.images import ImageStore

AXES = ("structure", "text", "fidelity", "alignment", "consistency")


def _expected_images(task: Task, turn: int) -> int | None:
    exp = _turn_expect(task, turn)
    if "images" in exp:
        return int(exp["images"])
    if "scenes" in exp:
        return len(exp["scenes"])
    return None


def _turn_expect(task: Task, turn: int) -> dict[str, Any]:
    per_turn = task.expect.get("turns")
    if isinstance(per_turn, list) and turn < len(per_turn):
        return dict(per_turn[turn])
    return task.expect if turn == len(task.turns) - 1 else {}


def structure(task: Task, docs: Sequence[InterleavedDocument]) -> tuple[float, str]:
    checks: list[tuple[str, float]] = []
    for turn, doc in enumerate(docs):
        images = doc.images
        want = _expected_images(task, turn)
        if want is not None:
            got = len(images)
            if doc.mode == "draft":  # sketching again is allowed: at least the expected sketches
                checks.append((f"turn {turn + 1}: {got} sketches, {want} wanted", min(got, want) / max(want, 1)))
            else:
                checks.append((f"turn {turn + 1}: {got} of {want} images", min(got, want) / max(got, want, 1)))
        if doc.mode == "visual-plan":
            steps = _turn_expect(task, turn).get("steps")
            plan_steps = len({b.step for b in doc.blocks if b.type == "text" and b.step is not None})
            if steps is not None:
                checks.append((f"{plan_steps} of {steps} steps", min(plan_steps, steps) / max(plan_steps, steps, 1)))
            if images:
                placed = sum(b.step is not None for b in images) / len(images)
                checks.append(("images placed in steps", placed))
        checks.append(("answer has text or images", 1.0 if doc.blocks else 0.0))
    if not checks:
        return 1.0, "nothing to check"
    score = sum(v for _, v in checks) / len(checks)
    return score, "; ".join(f"{name} ({v:.2f})" for name, v in checks)


def shapes_scores(task: Task, docs: Sequence[InterleavedDocument], store: ImageStore) -> dict[str, tuple[float, str]]:
    """Fidelity, alignment, consistency and text of a shapes task, from the detectors. The answer's
    images are matched to the expected scenes in order (a draft task: its last sketch); images beyond
    them have no scene to be faithful to and are left out of fidelity (``structure`` counts them: a
    blank extra picture once scored a perfect fidelity); an axis the task gives nothing to check on is
    left out. Fidelity is the mean over the pictures drawn (none at all: 0), alignment over the
    expected scenes and consistency over the changes between them: a picture the answer lacks counts
    0 in these two (and in ``structure``), not in fidelity (the README's definition)."""
    from duogen_agents.worlds.shapes import (
        scene_from_json,
        score_alignment,
        score_consistency,
        score_fidelity,
        score_text,
        yes_no,
    )

    fidelity: list[float] = []
    alignment: list[float] = []
    consistency: list[float] = []
    text: list[float] = []
    for turn, doc in enumerate(docs):
        exp = _turn_expect(task, turn)
        scenes = [scene_from_json(s) for s in exp.get("scenes", [])]
        images = [store.open(b.image) for b in doc.images]
        if task.mode == "draft" and images:
            images = images[-1:]  # the sketch the answer was drawn from
        for image, scene in zip(images, scenes, strict=False):
            fidelity.append(score_fidelity(image, scene))
        for k, scene in enumerate(scenes):
            alignment.append(score_alignment(images[k], scene) if k < len(images) else 0.0)
        for k in range(1, len(scenes)):
            value = score_consistency(images[k - 1], images[k], scenes[k - 1], scenes[k]) if k < len(images) else 0.0
            if value is not None:
                consistency.append(value)
        answer = exp.get("answer")
        if isinstance(answer, list):  # write_dataset's (training) answer: its blocks per turn, not a yes/no
            answer = _truth_yes_no(answer, turn) if task.mode == "draft" else None
        if isinstance(answer, str):  # a yes/no question: the first yes or no of the answer text counts
            texts = [b.text for b in doc.blocks if b.type == "text"]
            text.append(1.0 if texts and yes_no(texts[-1]) == answer else 0.0)
        elif exp.get("facts"):
            text.append(score_text(doc.text, list(exp["facts"])))
    if scenes_expected(task) and not fidelity:
        fidelity.append(0.0)

    def mean(xs: list[float]) -> tuple[float, str]:
        return sum(xs) / len(xs), f"mean of {len(xs)}: " + ", ".join(f"{x:.2f}" for x in xs[:8])

    out: dict[str, tuple[float, str]] = {}
    for axis, xs in (("fidelity", fidelity), ("alignment", alignment), ("consistency", consistency), ("text", text)):
        if xs:
            out[axis] = mean(xs)
    return out


def _truth_yes_no(answer: list[Any], turn: int) -> str | None:
    """The yes or no of a draft's ground-truth answer in the training format (``expect.answer``, per
    turn the blocks a correct answer has, as ``write_dataset`` writes them): that of its last text,
    where a correct answer states it. None when it has none (its ``facts`` are scored instead)."""
    from duogen_agents.worlds.shapes import yes_no

    blocks = answer[turn] if turn < len(answer) and isinstance(answer[turn], list) else []
    texts = [
        b["text"] for b in blocks if isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str)
    ]
    return yes_no(texts[-1]) if texts else None


def scenes_expected(task: Task) -> bool:
    return bool(task.expect.get("scenes")) or any(t.get("scenes") for t in task.expect.get("turns") or [])
