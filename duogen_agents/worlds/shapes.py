"""The shapes world: scenes on a 3x3 grid that can be drawn, described, and read back exactly.

- **Canvas**: square, white; a 3x3 grid of cells ``top-left, top, top-right, left, center, right,
  bottom-left, bottom, bottom-right``; at most one object per cell, centred, about 60% of the cell.
- **Objects**: shapes ``circle, square, triangle`` in colours ``red, green, blue, yellow, purple,
  orange`` (the saturated RGB values in ``COLORS``).
- ``render(scene)`` draws a scene; ``detect(image)`` reads any image back into a scene with a
  confidence per cell; the ``score_*`` functions give exact scores in [0, 1] for fidelity (a clean
  scene of this world), alignment (the scene asked for), consistency (what should not change did
  not) and text correctness (the facts the text must state).
- ``tasks(...)`` writes tasks in all three modes with their ground truth; the **split by
  composition** keeps evaluation scenes apart from training: ``HELD_OUT`` (shape, colour) pairs
  appear only in evaluation tasks, and every evaluation task uses at least one of them.

>>> scene = {"center": ("circle", "red"), "top-left": ("square", "blue")}
>>> detect(render(scene)).scene == scene
True
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

CELLS = ("top-left", "top", "top-right", "left", "center", "right", "bottom-left", "bottom", "bottom-right")
SHAPES = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
}
WHITE = (255, 255, 255)
CANVAS = 192  # pixels per side when rendering; any size is read back
OBJECT_FRACTION = 0.6  # of the cell's side
# Combinations that appear only in evaluation scenes (the split by composition).
HELD_OUT: frozenset[tuple[str, str]] = frozenset({("circle", "purple"), ("square", "orange"), ("triangle", "green")})

Object = tuple[str, str]  # (shape, colour)
Scene = dict[str, Object]  # cell -> object; empty cells are absent

# Detection thresholds. A pixel is "ink" when it is far from white; a cell holds an object when
# enough of it is ink; the shape follows from how much of the object's bounding box it fills.
INK_DISTANCE = 90
MIN_CHROMA = 50  # the palette's colours are all above 120; greys are near 0
MIN_INK_FRACTION = 0.04
FILL = {"triangle": 0.5, "circle": np.pi / 4, "square": 1.0}
MAX_FILL_ERROR = 0.1
MIN_COLOR_AGREEMENT = 0.8


def cell_box(cell: str, size: int) -> tuple[int, int, int, int]:
    i = CELLS.index(cell)
    row, col = divmod(i, 3)
    step = size / 3
    return round(col * step), round(row * step), round((col + 1) * step), round((row + 1) * step)


def render(scene: Mapping[str, Object], size: int = CANVAS) -> Image.Image:
    """Draw ``scene`` on a white square canvas of ``size`` pixels."""
    image = Image.new("RGB", (size, size), WHITE)
    draw = ImageDraw.Draw(image)
    for cell, (shape, color) in scene.items():
        x0, y0, x1, y1 = cell_box(cell, size)
        side = (x1 - x0) * OBJECT_FRACTION
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
        fill = COLORS[color]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
    return image


@dataclass(frozen=True)
class Detection:
    """What ``detect`` read: the scene, and per cell whether the reading is clean (confident)."""

    scene: Scene
    clean: dict[str, bool] = field(default_factory=dict)

    @property
    def fidelity(self) -> float:
        """Fraction of cells that are cleanly empty or hold one clean object of this world."""
        return sum(self.clean.values()) / len(CELLS)


def _nearest_color(pixels: np.ndarray) -> tuple[str, float]:
    palette = np.array(list(COLORS.values()), dtype=np.float32)
    d = ((pixels[:, None, :] - palette[None, :, :]) ** 2).sum(-1)
    idx = d.argmin(1)
    counts = np.bincount(idx, minlength=len(palette))
    best = int(counts.argmax())
    return list(COLORS)[best], float(counts[best] / max(1, len(idx)))


def detect(image: Image.Image) -> Detection:
    """Read an image back into a scene. Each cell is read on its own: ink (pixels far from white)
    inside the cell gives the colour (the palette colour most ink pixels are nearest to) and the
    shape (how much of the ink's bounding box the ink fills: 1/2 triangle, pi/4 circle, 1 square;
    the same for a canvas stretched to a rectangle, which is read as a square)."""
    image = image.convert("RGB")
    if image.width != image.height:  # the grid spans the whole canvas: read it as a square
        side = min(image.width, image.height)
        image = image.resize((side, side), Image.Resampling.BILINEAR)
    rgb = np.asarray(image, dtype=np.float32)
    size = rgb.shape[0]
    # Ink is coloured and far from white: grid lines, outlines and grey noise are not objects.
    chroma = rgb.max(-1) - rgb.min(-1)
    ink = (np.sqrt(((rgb - np.array(WHITE, dtype=np.float32)) ** 2).sum(-1)) > INK_DISTANCE) & (chroma > MIN_CHROMA)
    scene: Scene = {}
    clean: dict[str, bool] = {}
    for cell in CELLS:
        x0, y0, x1, y1 = cell_box(cell, size)
        mask = ink[y0:y1, x0:x1]
        area = mask.size
        n = int(mask.sum())
        if n < MIN_INK_FRACTION * area:
            clean[cell] = n == 0 or n < MIN_INK_FRACTION * area / 4
            continue
        ys, xs = np.nonzero(mask)
        box_area = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        fill = n / box_area
        shape = min(FILL, key=lambda s: abs(FILL[s] - fill))
        color, agreement = _nearest_color(rgb[y0:y1, x0:x1][mask])
        scene[cell] = (shape, color)
        touches_edge = ys.min() == 0 or xs.min() == 0 or ys.max() == mask.shape[0] - 1 or xs.max() == mask.shape[1] - 1
        clean[cell] = (
            abs(FILL[shape] - fill) <= MAX_FILL_ERROR and agreement >= MIN_COLOR_AGREEMENT and not touches_edge
        )
    return Detection(scene, clean)


# ---- scores -------------------------------------------------------------------------------------


def score_fidelity(image: Image.Image, expected: Mapping[str, Object] | None = None) -> float:
    """The fraction of the cells that should hold or do hold an object where a clean object of this
    world is drawn (a blank image draws nothing asked for: 0). Without ``expected``, over the cells
    with ink; a clean empty grid then scores 1."""
    d = detect(image)
    cells = set(d.scene) | set(expected or {})
    if not cells:
        return 1.0 if expected is None or all(d.clean.values()) else 0.0
    return sum(c in d.scene and d.clean[c] for c in cells) / len(cells)


def score_alignment(image: Image.Image, expected: Mapping[str, Object]) -> float:
    """F1 of the objects drawn against the objects asked for (each an object at a cell); an empty
    grid asked for and drawn is 1. Empty cells earn nothing, so a blank image scores 0."""
    seen = {(c, o) for c, o in detect(image).scene.items()}
    want = {(c, _obj(o)) for c, o in expected.items()}
    if not seen and not want:
        return 1.0
    return 2 * len(seen & want) / (len(seen) + len(want))


def score_consistency(
    before: Image.Image, after: Image.Image, expected_before: Mapping[str, Object], expected_after: Mapping[str, Object]
) -> float | None:
    """Among the objects that should not change between two images, the fraction drawn the same and
    cleanly in both (None when the change leaves nothing in place to compare)."""
    keep = [c for c in CELLS if c in expected_before and _obj(expected_before[c]) == _obj(expected_after.get(c))]
    if not keep:
        return None
    a, b = detect(before), detect(after)
    return sum(c in a.scene and a.scene[c] == b.scene.get(c) and a.clean[c] and b.clean[c] for c in keep) / len(keep)


_SYNONYMS = (("top left", "top-left"), ("top right", "top-right"), ("bottom left", "bottom-left"),
             ("bottom right", "bottom-right"), ("centre", "center"), ("middle", "center"))  # fmt: skip


def normalise(text: str) -> str:
    low = " ".join(text.lower().split())
    for a, b in _SYNONYMS:
        low = low.replace(a, b)
    return low


def yes_no(text: str) -> str | None:
    """The first yes or no of ``text`` (the answer of a draft task), or None."""
    m = re.search(r"(?<![\w-])(yes|no)(?![\w-])", normalise(text))
    return m.group(1) if m else None


def score_text(text: str, facts: list[str]) -> float:
    """Fraction of the facts (short phrases) the text states, case-insensitive."""
    if not facts:
        return 1.0
    low = normalise(text)
    return sum(re.search(rf"(?<![\w-]){re.escape(f.lower())}(?![\w-])", low) is not None for f in facts) / len(facts)


def _obj(value: Any) -> Object | None:
    return tuple(value) if value is not None else None  # type: ignore[return-value]


# ---- tasks --------------------------------------------------------------------------------------


def describe(obj: Object) -> str:
    shape, color = obj
    return f"{color} {shape}"


def _objects(rng: random.Random, split: str) -> list[Object]:
    all_objs = [(s, c) for s in SHAPES for c in COLORS]
    if split == "train":
        return [o for o in all_objs if o not in HELD_OUT]
    return all_objs


def _random_scene(rng: random.Random, split: str, n: int) -> Scene:
    if n <= 0:
        return {}
    objs = _objects(rng, split)
    cells = rng.sample(CELLS, n)
    scene = {c: rng.choice(objs) for c in cells}
    if split == "eval" and not any(o in HELD_OUT for o in scene.values()):
        scene[cells[0]] = rng.choice(sorted(HELD_OUT))
    return scene


def _a(words: str) -> str:
    return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"


def _phrase(scene: Scene) -> str:
    return ", ".join(f"{_a(describe(o))} at the {c}" for c, o in scene.items())


def scene_prompt(scene: Scene) -> str:
    """The image prompt that asks for ``scene``: every object and its cell."""
    return f"a 3x3 grid with {_phrase(scene)}" if scene else "an empty 3x3 grid"


def _change(rng: random.Random, scene: Scene, split: str) -> tuple[Scene, str, list[str]]:
    """One step: add, move, recolour or remove one object. Returns the new scene, the instruction
    and the facts a correct step text states."""
    new = dict(scene)
    empty = [c for c in CELLS if c not in scene]
    ops = ["add"] if not scene else (["add", "move", "recolour", "remove"] if empty else ["recolour", "remove"])
    op = rng.choice(ops)
    if op == "add":
        cell = rng.choice(empty)
        obj = rng.choice(_objects(rng, split))
        new[cell] = obj
        return new, f"add {_a(describe(obj))} at the {cell}", [describe(obj), cell]
    cell = rng.choice(sorted(scene))
    obj = scene[cell]
    if op == "move":
        to = rng.choice(empty)
        del new[cell]
        new[to] = obj
        return new, f"move the {describe(obj)} from the {cell} to the {to}", [describe(obj), to]
    if op == "recolour":
        colors = [c for c in COLORS if c != obj[1] and (split == "eval" or (obj[0], c) not in HELD_OUT)]
        color = rng.choice(colors)
        new[cell] = (obj[0], color)
        return new, f"make the {describe(obj)} at the {cell} {color}", [f"{color} {obj[0]}", cell]
    del new[cell]
    return new, f"remove the {describe(obj)} at the {cell}", [describe(obj), cell]


_PLAN_TEMPLATES = (
    "Show me step by step how to build this scene on a 3x3 grid: {start}. Then {steps}.",
    "Make a visual plan on a 3x3 grid. Start with {start}; then {steps}. Draw the whole scene after each step.",
    "Step by step, with a picture of the grid after each step: begin with {start}, then {steps}.",
)
_INTERLEAVED_TEMPLATES = (
    "On a 3x3 grid, draw {start}. Then {change} and draw the changed scene.",
    "Picture a 3x3 grid with {start}. Show it, then show it again after you {change}.",
)
_DRAFT_TEMPLATES = (
    "On a 3x3 grid there is {start}. Sketch it, then answer: is the {a} {relation} the {b}? Answer yes or no.",
    "Imagine {start} on a 3x3 grid. Draw a sketch to check: is the {a} {relation} the {b}? Say yes or no.",
)
_RELATIONS = {"left of": (1, -1), "right of": (1, 1), "above": (0, -1), "below": (0, 1)}


def _position(cell: str) -> tuple[int, int]:
    row, col = divmod(CELLS.index(cell), 3)
    return row, col


def _relation_holds(a: str, b: str, relation: str) -> bool:
    axis, sign = _RELATIONS[relation]
    pa, pb = _position(a), _position(b)
    return (pa[axis] - pb[axis]) * sign > 0


def tasks(n: int, *, split: str = "eval", seed: int = 0) -> Iterator[dict[str, Any]]:
    """``n`` tasks in the bench format (``id, mode, turns, expect``), cycling through visual plans,
    interleaved answers, drafts and multi-turn follow-ups. ``expect`` holds the ground truth:
    ``scenes`` (one per expected image, in order), ``changes`` (per scene, the instruction that makes it
    from the picture before it, in this turn or the last one; null for a scene drawn afresh), ``facts``
    (what the text must state) and, for follow-ups, a second turn with its own scenes."""
    if split not in ("train", "eval"):
        raise ValueError("split is 'train' or 'eval'")
    rng = random.Random(f"shapes-{split}-{seed}")
    kinds = ("visual-plan", "interleaved", "draft", "follow-up")
    for i in range(n):
        kind = kinds[i % len(kinds)]
        start = _random_scene(rng, split, rng.randint(1, 3))
        task_id = f"shapes-{split}-{seed}-{i:04d}"
        if kind == "visual-plan":
            scenes, changes, facts = [start], [], []
            for _ in range(rng.randint(1, 2)):
                nxt, instruction, f = _change(rng, scenes[-1], split)
                scenes.append(nxt)
                changes.append(instruction)
                facts += f
            prompt = rng.choice(_PLAN_TEMPLATES).format(start=_phrase(start), steps=", then ".join(changes))
            expect = {"scenes": scenes, "changes": [None, *changes], "steps": len(scenes), "facts": facts}
            yield _task(task_id, "visual-plan", [prompt], expect)
        elif kind == "interleaved":
            nxt, instruction, facts = _change(rng, start, split)
            prompt = rng.choice(_INTERLEAVED_TEMPLATES).format(start=_phrase(start), change=instruction)
            yield _task(
                task_id,
                "interleaved",
                [prompt],
                {"scenes": [start, nxt], "changes": [None, instruction], "facts": facts},
            )
        elif kind == "draft":
            if len(start) < 2:
                extra = _random_scene(rng, split, 2)
                start = {**extra, **start} if len({**extra, **start}) >= 2 else extra
            a, b = rng.sample(sorted(start), 2)
            relation = rng.choice(list(_RELATIONS))
            answer = "yes" if _relation_holds(a, b, relation) else "no"
            prompt = rng.choice(_DRAFT_TEMPLATES).format(
                start=_phrase(start), a=describe(start[a]), b=describe(start[b]), relation=relation
            )
            yield _task(
                task_id, "draft", [prompt], {"scenes": [start], "changes": [None], "facts": [answer], "answer": answer}
            )
        else:
            nxt, instruction, facts = _change(rng, start, split)
            first = f"On a 3x3 grid, draw {_phrase(start)}."
            second = f"Now {instruction}."
            yield _task(
                task_id,
                "interleaved",
                [first, second],
                {
                    "scenes": [start],
                    "turns": [
                        {"scenes": [start], "changes": [None], "facts": []},
                        {"scenes": [nxt], "changes": [instruction], "facts": facts},
                    ],
                },
            )


def _task(task_id: str, mode: str, prompts: list[str], expect: dict[str, Any]) -> dict[str, Any]:
    def jsonable(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: jsonable(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [jsonable(v) for v in value]
        return value

    return {
        "id": task_id,
        "mode": mode,
        "turns": [{"prompt": p, "images": []} for p in prompts],
        "expect": {"world": "shapes", **jsonable(expect)},
    }


def check_scene(value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is a scene: cell -> [shape, colour] of this world."""
    if not isinstance(value, Mapping):
        raise ValueError("a scene must be an object of cell: [shape, colour]")
    for cell, obj in value.items():
        if cell not in CELLS:
            raise ValueError(f"unknown cell {cell!r}; cells are {', '.join(CELLS)}")
        if not isinstance(obj, (list, tuple)) or len(obj) != 2 or obj[0] not in SHAPES or obj[1] not in COLORS:
            raise ValueError(f"{cell}: {obj!r} is not [shape, colour] of {', '.join(SHAPES)} / {', '.join(COLORS)}")


def scene_from_json(value: Mapping[str, Any]) -> Scene:
    return {c: (o[0], o[1]) for c, o in value.items()}


# ---- paraphrases ---------------------------------------------------------------------------------
# Other ways people ask for the same tasks: the requests change, the scenes, changes and answers do not.
# They are drawn from their own random stream (``paraphrased``), so the tasks and the evaluation split
# stay exactly what ``tasks`` writes.

_FREE_PLAN = (
    "Build a scene: {start}, then {steps}.",
    "Build a scene step by step: {start}; then {steps}.",
    "Draw {start}. Then {steps}. Show the grid after each step.",
    "Make a visual plan: first {start}, then {steps}.",
    "Plan a 3x3 grid scene: start with {start}, then {steps}.",
    "Show me how to build this step by step: {start}, then {steps}.",
)
_FREE_INTERLEAVED = (
    "Draw {start}, then {change} and draw it again.",
    "Show {start} on a grid. Then {change} and show the result.",
    "Build a scene: {start}. Then {change} and draw the new scene.",
)
_FREE_FIRST = ("Draw {start}.", "Build a scene: {start}.", "Show {start} on a 3x3 grid.", "Put {start} on a grid.")
_FREE_NEXT = ("Now {change}.", "Next, {change}.", "Then {change}.", "{change}.", "Now please {change}.")
_CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")
_INSTRUCTION = re.compile(
    r"^(?:add (?P<add>an? \w+ \w+) at the (?P<add_cell>[\w-]+)"
    r"|move the (?P<move>\w+ \w+) from the (?P<move_from>[\w-]+) to the (?P<move_to>[\w-]+)"
    r"|make the (?P<recolour>\w+ \w+) at the (?P<recolour_cell>[\w-]+) (?P<color>\w+)"
    r"|remove the (?P<remove>\w+ \w+) at the (?P<remove_cell>[\w-]+))$"
)


def _place(rng: random.Random, cell: str, *, to: bool = False) -> str:
    """A cell as people write it: "at the top-left", "in the top left corner", "in the middle";
    ``to``: where something goes ("to the middle"), from the same draws."""
    words = cell.replace("-", " ") if rng.random() < 0.4 else cell
    if cell == "center":
        place = rng.choice(("at the center", "in the center", "in the middle", "in the centre"))
    elif cell in _CORNERS and rng.random() < 0.3:
        place = f"in the {words} corner"
    else:
        place = f"{rng.choice(('at', 'in'))} the {words}"
    return "to " + place.split(" ", 1)[1] if to else place


def _free_scene(rng: random.Random, scene: Mapping[str, Any]) -> str:
    parts = [f"{_a(describe((o[0], o[1])))} {_place(rng, c)}" for c, o in scene.items()]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + rng.choice((", and ", " and ", ", ")) + parts[-1]


def _free_change(rng: random.Random, instruction: str, *, in_list: bool = False) -> str:
    """``instruction`` ("add a red circle at the top", ...) in other words; ``in_list``: it follows a
    scene in a plan, where an added object may stand alone ("then a blue square in the center")."""
    m = _INSTRUCTION.match(instruction)
    if m is None:
        raise ValueError(f"not an instruction of this world: {instruction!r}")
    g = m.groupdict()
    if g["add"]:
        obj, where = g["add"], _place(rng, g["add_cell"])
        forms = [f"add {obj} {where}", f"put {obj} {where}", f"place {obj} {where}"]
        return rng.choice([*forms, f"{obj} {where}"] if in_list else forms)
    if g["move"]:
        obj, a, b = g["move"], g["move_from"], g["move_to"]
        return rng.choice((f"move the {obj} from the {a} to the {b}", f"slide the {obj} from the {a} {_place(rng, b, to=True)}",
                           f"move the {obj} at the {a} to the {b}"))  # fmt: skip
    if g["recolour"]:
        obj, cell, color = g["recolour"], g["recolour_cell"], g["color"]
        return rng.choice((f"make the {obj} {_place(rng, cell)} {color}", f"paint the {obj} {_place(rng, cell)} {color}",
                           f"turn the {obj} {_place(rng, cell)} {color}", f"change the {obj} {_place(rng, cell)} to {color}"))  # fmt: skip
    obj, cell = g["remove"], g["remove_cell"]
    verb = rng.choice(("remove", "delete", "erase", "take away"))
    return f"{verb} the {obj} {_place(rng, cell)}"


def paraphrased(task: Mapping[str, Any], rng: random.Random) -> dict[str, Any]:
    """``task`` with its requests in other words (``_FREE_*``: "Build a scene: a red circle at the
    top-left, then a blue square in the center."); its ``expect`` (scenes, changes, facts) unchanged.
    Drafts keep their question."""
    exp = task["expect"]
    out = {**task, "turns": [dict(t) for t in task["turns"]]}
    if task["mode"] == "draft":
        return out
    if exp.get("turns"):  # a follow-up: the scene, then the change in a second turn
        start, change = exp["turns"][0]["scenes"][0], exp["turns"][1]["changes"][0]
        out["turns"][0]["prompt"] = rng.choice(_FREE_FIRST).format(start=_free_scene(rng, start))
        second = rng.choice(_FREE_NEXT).format(change=_free_change(rng, change))
        out["turns"][1]["prompt"] = second[0].upper() + second[1:]
        return out
    start, changes = exp["scenes"][0], exp["changes"][1:]
    if task["mode"] == "visual-plan":
        steps = ", then ".join(_free_change(rng, c, in_list=True) for c in changes)
        prompt = rng.choice(_FREE_PLAN).format(start=_free_scene(rng, start), steps=steps)
    else:
        prompt = rng.choice(_FREE_INTERLEAVED).format(
            start=_free_scene(rng, start), change=_free_change(rng, changes[0])
        )
    out["turns"][0]["prompt"] = prompt[0].upper() + prompt[1:]
    return out


def write_dataset(out_dir: Any, n: int, *, split: str = "train", seed: int = 0, paraphrase: float = 0.0) -> Any:
    """Training (or evaluation) data: ``out_dir/tasks.jsonl`` in the bench format, each task with
    ``expect.answer``, the interleaved conversation a correct assistant writes (per turn: text and
    image blocks, images rendered to ``out_dir/images/*.png``, each image with the ``prompt`` that asks
    for its scene). ``paraphrase``: the fraction of tasks whose requests are reworded (``paraphrased``,
    from a random stream of their own: the tasks are the same with or without). Returns the JSONL path."""
    import json
    from pathlib import Path

    if not 0.0 <= paraphrase <= 1.0:
        raise ValueError(f"paraphrase is a fraction in [0, 1], not {paraphrase}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    prng = random.Random(f"shapes-paraphrase-{split}-{seed}")
    for task in tasks(n, split=split, seed=seed):
        if paraphrase and prng.random() < paraphrase:
            task = paraphrased(task, prng)
        task["expect"]["answer"] = _answer(task, out)
        lines.append(json.dumps(task))
    path = out / "tasks.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _answer(task: Mapping[str, Any], images: Any = None) -> list[list[dict[str, Any]]]:
    """The interleaved answer a correct assistant writes for ``task``, per turn (pictures rendered into
    ``images/`` of the folder ``images`` when it is given). A picture drawn afresh asks for its whole
    scene (``scene_prompt``); a picture that changes the one before it is an ``edit`` of it whose prompt
    is the change alone (``expect.changes``: "add a red circle at the top"), as an instruction-editing
    model is asked, so the earlier picture carries what stays. Tasks without ``changes`` (written
    before it existed) ask for the whole scene every time."""
    exp = task["expect"]
    answer = []
    for t, turn in enumerate(exp.get("turns") or [exp]):
        blocks: list[dict[str, Any]] = []
        facts = " ".join(str(f) for f in turn.get("facts", []))
        changes = turn.get("changes")
        for k, scene in enumerate(turn.get("scenes", [])):
            name = f"images/{task['id']}-t{t}-{k}.png"
            if images is not None:
                render(scene_from_json(scene)).save(images / name)
            change = changes[k] if changes is not None and k < len(changes) else None
            blocks.append({"type": "text", "text": f"Step {k + 1}: {facts}".strip()})
            blocks.append(
                {
                    "type": "image",
                    "path": name,
                    "kind": "edit" if change or (changes is None and k > 0) else "generate",
                    "prompt": change or scene_prompt(scene_from_json(scene)),
                }
            )
        if task["mode"] == "draft":
            blocks.append({"type": "text", "text": facts})
        answer.append(blocks)
    return answer


def corpus_text(task: Mapping[str, Any]) -> str:
    """A task of ``write_dataset`` as one plain-text document: each turn's prompt, then its answer's
    step texts and image prompts, in order (``duogen train pretrain``'s text: the same scenes and
    changes as the conversations, without the action protocol or pictures)."""
    lines = []
    for turn, blocks in zip(task["turns"], task["expect"]["answer"], strict=True):
        lines.append(f"user: {turn['prompt']}")
        for b in blocks:
            lines.append(f"image: {b['prompt']}" if b["type"] == "image" else f"text: {b['text']}")
    return "\n".join(lines)


def write_corpus(path: Any, n: int, *, seed: int = 0) -> Any:
    """``n`` training-split tasks as plain-text documents, one JSON object ``{"text": ...}`` per line
    (the format ``duogen train pretrain`` reads). No pictures are rendered."""
    import json
    from pathlib import Path

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for task in tasks(n, split="train", seed=seed):
            task["expect"]["answer"] = _answer(task)
            f.write(json.dumps({"text": corpus_text(task)}) + "\n")
    return out
