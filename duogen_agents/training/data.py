"""Training data: the bench format with the answer a correct assistant writes, as planner calls.

A data file is the evaluation format (``eval/tasks.py``), one task per JSONL line, where
``expect.answer`` holds, per user turn, the answer's blocks in order::

    {"id": "t1", "mode": "visual-plan", "turns": [{"prompt": "...", "images": []}],
     "expect": {"answer": [[{"type": "text", "text": "Step 1: a red circle, top-left"},
                            {"type": "image", "path": "images/t1-0.png", "prompt": "a 3x3 grid with ...",
                             "kind": "generate"}, ...]]}}

Image paths are relative to the data file, inside its folder (as a bench's are), and each must open
as a picture: a bad one is an error naming the file and line when the data loads.
``duogen_agents.worlds.shapes.write_dataset`` writes such files. Stage 1 needs the *planner calls* of each answer: the conversation the graph hands the planner
at each call, and the action the planner should write. They are taken from the real graph: a
``Teacher`` stands in for the planner and plays the answer back action by action (each written for
the schema of the call it answers: the plan, a step, a check, an interleaved action or a draft), and
an image tool hands back the answer's pictures. So training sees exactly the prompts that inference
builds, and the targets are the actions the graph decodes.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from duogen_agents.errors import ConfigError, InputImageError
from duogen_agents.inputs import load_input_image
from duogen_agents.models.protocols import ChatTurn, PlannerOutput

MAX_LINE_CHARS = 1_000_000


class DataError(ConfigError):
    """A training data file that does not match the format: one line naming the file and line."""


@dataclass
class TrainingTask:
    id: str
    mode: str
    prompts: list[str]
    answer: list[list[dict[str, Any]]]  # per turn: blocks, image paths made absolute
    line: int
    images: list[list[str]] = field(default_factory=list)  # per turn: the user's pictures, paths made absolute
    source: str = ""  # the data file, for errors: "{source} line {line}"


@dataclass
class PlannerExample:
    """One planner call: the conversation it is given, and the action it should write."""

    conversation: list[ChatTurn]
    target: str
    task: str = ""
    # For calls that request a picture: the references the graph handed the image tool, and the
    # picture of the answer (stage 2 trains on these).
    references: list[Any] | None = None
    picture: Any = None


def load_tasks(path: Path | str) -> list[TrainingTask]:
    """Read and check a data file; a line that does not match is a ``DataError`` naming it."""
    from pydantic import ValidationError

    from duogen_agents.eval.tasks import Task

    path = Path(path)
    if path.is_dir() and (path / "tasks.jsonl").is_file():
        raise DataError(f"{path} is a folder; give its tasks.jsonl ({path / 'tasks.jsonl'})")
    if not path.is_file():
        raise DataError(f"training data not found: {path} (write one with duogen_agents.worlds.shapes.write_dataset)")
    base = path.parent
    out: list[TrainingTask] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; a data file is JSON lines") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        if len(line) > MAX_LINE_CHARS:
            raise DataError(f"{where}: longer than {MAX_LINE_CHARS:,} characters")
        try:
            raw = json.loads(line)
            task = Task.model_validate(raw)
        except (ValueError, ValidationError, RecursionError) as e:
            first = str(e).strip().splitlines()[0]
            raise DataError(f"{where}: not a task of the bench format ({first})") from None
        answer = task.expect.get("answer")
        if not isinstance(answer, list) or len(answer) != len(task.turns):
            raise DataError(
                f"{where}: task {task.id!r} needs expect.answer, a list of blocks for each of its "
                f"{len(task.turns)} turn(s)"
            )
        images = [
            [_picture(base, p, f"{where}: turns[{t}].images[{i}]") for i, p in enumerate(turn.images)]
            for t, turn in enumerate(task.turns)
        ]
        turns: list[list[dict[str, Any]]] = []
        for t, blocks in enumerate(answer):
            if not isinstance(blocks, list) or not blocks:
                raise DataError(f"{where}: expect.answer[{t}] must be a non-empty list of blocks")
            turns.append([_check_block(b, base, f"{where}: expect.answer[{t}][{i}]") for i, b in enumerate(blocks)])
        out.append(TrainingTask(task.id, task.mode, [t.prompt for t in task.turns], turns, number, images, str(path)))
    if not out:
        raise DataError(f"{path}: no tasks")
    return out


def _picture(base: Path, path: str, where: str) -> str:
    """``path`` (relative to the data file's folder, below it as written: no absolute path, no ``..``)
    made absolute, once it opens as a picture; else a ``DataError`` naming ``where``. Unlike a bench's
    pictures, a link out of the folder is followed: a dataset's pictures often live on another disk
    behind one, and training sends nothing it reads to a server."""
    if Path(path).is_absolute() or ".." in Path(path).parts:
        raise DataError(
            f"{where}: image {path[:80]!r} is outside the data file's folder {base.resolve()}; "
            "name images relative to it, inside it"
        )
    full = base.resolve() / path
    try:
        load_input_image(full)
    except InputImageError as e:
        raise DataError(f"{where}: {e}") from None
    return str(full)


def _check_block(block: Any, base: Path, where: str) -> dict[str, Any]:
    if not isinstance(block, dict) or block.get("type") not in ("text", "image"):
        raise DataError(f'{where}: a block is {{"type": "text", "text": ...}} or {{"type": "image", "path": ...}}')
    if block["type"] == "text":
        if not isinstance(block.get("text"), str) or not block["text"].strip():
            raise DataError(f"{where}: a text block needs a non-empty text")
        return dict(block)
    path = block.get("path")
    if not isinstance(path, str):
        raise DataError(f"{where}: an image block needs a path")
    full = _picture(base, path, where)
    kind = block.get("kind", "generate")
    if kind not in ("generate", "edit", "continue"):
        raise DataError(f"{where}: kind must be generate, edit or continue, not {kind!r}")
    prompt = block.get("prompt", "")
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{where}: an image block needs the prompt that asks for it")
    return {"type": "image", "path": str(full), "kind": kind, "prompt": prompt}


# ---- playing answers through the graph --------------------------------------------------------


def _variants(schema: dict[str, Any]) -> list[dict[str, Any]]:
    return list(schema.get("anyOf", [schema]))


def _type_of(variant: dict[str, Any]) -> str | None:
    return (variant.get("properties", {}).get("type") or {}).get("const")


def _kinds(variant: dict[str, Any]) -> list[str]:
    kind = variant["properties"]["kind"]
    return [kind["const"]] if "const" in kind else list(kind["enum"])


@dataclass
class Teacher:
    """A planner that writes the given answer, one action per call, and records each call."""

    blocks: list[dict[str, Any]] = field(default_factory=list)
    plan_titles: list[str] = field(default_factory=list)
    records: list[PlannerExample] = field(default_factory=list)
    task: str = ""
    drawn: int = 0  # images of this turn requested so far

    def start_turn(self, blocks: list[dict[str, Any]], task: str) -> None:
        self.blocks, self.task, self.drawn = list(blocks), task, 0
        texts = [b["text"] for b in blocks if b["type"] == "text"]
        self.plan_titles = texts

    def generate(
        self,
        conversation: Sequence[ChatTurn],
        schema: dict[str, Any] | None,
        *,
        max_new_tokens: int | None = None,
        seed: int | None = None,
        on_token: Any = None,
        cache_key: str | None = None,
        client_schema: bool = False,
    ) -> PlannerOutput:
        if schema is None:
            raise DataError(f"task {self.task}: the graph asked for free text; training covers actions only")
        action = self._action(schema)
        target = json.dumps(action, ensure_ascii=False)
        self.records.append(PlannerExample([_copy_turn(t) for t in conversation], target, self.task))
        return PlannerOutput(text=target, num_tokens=len(target), prompt_tokens=0)

    # Each schema the graph uses, recognised by its properties.
    def _action(self, schema: dict[str, Any]) -> dict[str, Any]:
        props = schema.get("properties", {})
        if "verdict" in props:
            return {"verdict": "ok", "note": "it shows what was asked"}
        if "steps" in props:
            item = props["steps"]
            n = sum(1 for b in self.blocks if b["type"] == "image")
            if not item["minItems"] <= n <= item["maxItems"]:
                raise DataError(
                    f"task {self.task}: a plan of {n} steps does not fit the preset's limits "
                    f"({item['minItems']} to {item['maxItems']} steps)"
                )
            width = props["title"].get("maxLength", 80)
            titles = [_clip(b["text"], width) for b in self.blocks if b["type"] == "text"][:n]
            titles += [f"Step {i + 1}" for i in range(len(titles), n)]
            return {"title": _clip(f"A plan in {n} steps", width), "steps": [{"title": t} for t in titles]}
        if "text" in props and "image" in props:  # a visual-plan step
            text = self._take("text")
            image = self._take("image")
            return {
                "text": _clip(text["text"], props["text"].get("maxLength")),
                "image": self._request(props["image"], image),
            }
        variants = _variants(schema)
        types = {_type_of(v): v for v in variants}
        if "draft" in types or "answer" in types:
            # A draft has no text of its own: a caption just before a sketch is not part of it.
            while (
                "draft" in types
                and len(self.blocks) > 1
                and self.blocks[0]["type"] == "text"
                and self.blocks[1]["type"] == "image"
            ):
                self.blocks.pop(0)
            nxt = self._peek()
            if nxt is not None and nxt["type"] == "image" and "draft" in types:
                return {
                    "type": "draft",
                    **self._request({"anyOf": [v for v in variants if _type_of(v) == "draft"]}, self._take("image")),
                }
            if nxt is not None and nxt["type"] == "text" and "answer" in types:
                text = self._take("text")["text"]
                return {"type": "answer", "text": _clip(text, types["answer"]["properties"]["text"].get("maxLength"))}
            raise DataError(f"task {self.task}: the draft answer does not fit the graph (next block: {nxt})")
        if "text" in types or "image" in types or "done" in types:
            nxt = self._peek()
            if nxt is None:
                if "done" not in types:
                    raise DataError(f"task {self.task}: the answer ended before the graph allowed it to")
                return {"type": "done"}
            if nxt["type"] == "text":
                text = self._take("text")["text"]
                return {"type": "text", "text": _clip(text, types["text"]["properties"]["text"].get("maxLength"))}
            if "image" not in types:
                raise DataError(f"task {self.task}: the answer has more pictures than the preset's max_images")
            image_variants = [v for v in variants if _type_of(v) == "image"]
            return {"type": "image", **self._request({"anyOf": image_variants}, self._take("image"))}
        raise DataError(f"task {self.task}: a planner call the teacher cannot answer (schema keys {sorted(props)})")

    def _peek(self) -> dict[str, Any] | None:
        return self.blocks[0] if self.blocks else None

    def _take(self, kind: str) -> dict[str, Any]:
        if not self.blocks or self.blocks[0]["type"] != kind:
            got = self.blocks[0]["type"] if self.blocks else "the end"
            raise DataError(f"task {self.task}: the graph asked for {kind} but the answer has {got} next")
        return self.blocks.pop(0)

    def _request(self, schema: dict[str, Any], block: dict[str, Any]) -> dict[str, Any]:
        """An image request for ``block``: no references for the first picture of a turn's answer,
        else the most recent picture, with the block's kind where the schema offers it."""
        variants = _variants(schema)
        first = self.drawn == 0 and block["kind"] == "generate"
        self.drawn += 1
        chosen: tuple[dict[str, Any], list[str], str] | None = None
        for v in variants:
            refs = v["properties"]["references"]
            kinds = _kinds(v)
            if first or refs.get("maxItems", 0) == 0:
                if first and refs.get("maxItems", 0) == 0:
                    chosen = (v, [], "generate")
                    break
                continue
            known = refs["items"]["enum"]
            for kind in (block["kind"], "continue", "edit", "generate"):
                if kind in kinds:
                    chosen = chosen or (v, [known[-1]], kind)
                    if kind == block["kind"]:
                        chosen = (v, [known[-1]], kind)
                    break
        if chosen is None:  # nothing to refer to yet: draw from the prompt alone
            chosen = (variants[0], [], "generate")
        variant, references, kind = chosen
        request: dict[str, Any] = {}
        for key in variant["properties"]:
            if key == "type":
                continue
            if key == "prompt":
                request["prompt"] = _clip(block["prompt"], variant["properties"]["prompt"].get("maxLength"))
            elif key == "references":
                request["references"] = references
            elif key == "kind":
                request["kind"] = kind
        return request


def _clip(text: str, limit: int | None) -> str:
    """``text`` cut to fit ``limit`` as the decoder counts it: UTF-8 bytes of the JSON string body
    (an escape such as ``\\n`` is two), so a target is always one the planner can write."""
    if limit is None:
        return text

    def size(s: str) -> int:
        return len(json.dumps(s, ensure_ascii=False)[1:-1].encode())

    while text and size(text) > limit:
        text = text[: max(0, min(len(text) - 1, limit))]
    return text.rstrip() or text


def _copy_turn(turn: ChatTurn) -> ChatTurn:
    return {"role": turn["role"], "content": list(turn["content"])}  # images are not changed later


@dataclass
class AnswerImages:
    """An image tool that hands back the answer's pictures in order."""

    queue: list[str] = field(default_factory=list)
    capabilities: dict[str, int] = field(default_factory=lambda: {"generate": 4, "edit": 4, "continue": 4})
    draws: list[tuple[list[Any], Any]] = field(default_factory=list)  # (references, picture) per draw

    def draw(
        self, prompt: str, *, kind: str = "generate", references: Any = (), seed: int = 0, on_step: Any = None
    ) -> Any:
        if not self.queue:
            raise DataError("the graph drew more pictures than the answer has")
        with Image.open(self.queue.pop(0)) as im:
            picture = im.convert("RGB")
        self.draws.append((list(references), picture))
        return picture


def planner_examples(
    tasks: Sequence[TrainingTask], preset: Any, home: Path, teacher: Teacher | None = None
) -> list[PlannerExample]:
    """Every planner call of every task's answer, played through the turn graph of ``preset``
    (its limits and sizes; no model is loaded). ``teacher``: a ``Teacher`` (or subclass) to play them."""
    from duogen_agents.agent import Agent

    teacher, images = teacher if teacher is not None else Teacher(), AnswerImages()
    agent = Agent(preset, planner=teacher, image_tool=images, home=home)
    for task in tasks:
        try:
            _play(task, agent, teacher, images)
        except ConfigError as e:  # an answer that does not fit the graph, or the preset: name its line
            where = f"{task.source} line {task.line}" if task.source else f"line {task.line}"
            raise DataError(f"{where}: {e}") from None
    requests = [ex for ex in teacher.records if _requests_image(ex.target)]
    if len(requests) != len(images.draws):
        raise DataError(f"{len(requests)} image requests but {len(images.draws)} pictures drawn")
    for ex, (refs, picture) in zip(requests, images.draws, strict=True):
        ex.references, ex.picture = refs, picture
    return teacher.records


def _play(task: TrainingTask, agent: Any, teacher: Teacher, images: AnswerImages) -> None:
    from duogen_agents.agent import last_document

    thread = f"train-{uuid.uuid4().hex}"
    inputs = task.images or [[] for _ in task.prompts]
    for prompt, given, blocks in zip(task.prompts, inputs, task.answer, strict=True):
        teacher.start_turn(blocks, task.id)
        images.queue = [b["path"] for b in blocks if b["type"] == "image"]
        # the user's pictures, as `duogen eval` passes them: the planner sees the prompt it will see
        last_document(agent.stream(prompt, mode=task.mode, images=given, seed=0, thread_id=thread))
        if teacher.blocks:
            raise DataError(
                f"task {task.id}: the graph ended the turn before the answer did "
                f"({len(teacher.blocks)} block(s) left; check the preset's limits)"
            )


def _requests_image(target: str) -> bool:
    action = json.loads(target)
    return "image" in action or action.get("type") in ("image", "draft")
