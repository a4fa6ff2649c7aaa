"""The planner half on held-out compositions: does a trained planner write the right image prompts?

Held-out tasks of the shapes world (the evaluation split) are played back through the real turn graph
by the teacher (as ``duogen train`` builds its examples). At each call that asks for a picture, the
planner under test decodes greedily, under the call's own grammar, from the teacher's conversation, and
its image prompt is compared with the correct one: exactly (whole-scene prompts and edits' changes
apart), and, for whole-scene prompts, as a scene (F1 of the objects at their cells it names, against the
true ones).

    python benchmarks/shapes_planner_eval.py --preset runs/stage1/preset.json --tasks 24

``--text`` scores a ``duogen train pretrain`` planner in its own plain-text format instead
(``shapes.corpus_text``: the document up to ``image:``, then a greedy continuation to the line's end).
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from pathlib import Path
from typing import Any

_OBJECT = re.compile(r"an? (\w+) (\w+) at the ([\w-]+)")


def scene_f1(written: str, correct: str) -> float:
    a, b = set(_OBJECT.findall(written)), set(_OBJECT.findall(correct))
    return 1.0 if not a and not b else 2 * len(a & b) / (len(a) + len(b))


def is_scene(prompt: str) -> bool:
    """A whole-scene prompt (a picture drawn afresh), not an edit's change ("add a red circle at the top")."""
    return prompt.startswith(("a 3x3 grid", "an empty 3x3 grid"))


class Tally:
    """Exact prompts, for whole scenes and for edits apart, and the scene F1 over the whole-scene ones."""

    def __init__(self) -> None:
        self.exact = {"scene": 0, "edit": 0}
        self.count = {"scene": 0, "edit": 0}
        self.f1: list[float] = []

    def add(self, got: str, want: str) -> None:
        kind = "scene" if is_scene(want) else "edit"
        self.count[kind] += 1
        self.exact[kind] += got == want
        if kind == "scene":
            self.f1.append(scene_f1(got, want))

    def row(self) -> dict[str, Any]:
        return {"prompts": sum(self.count.values()), "exact": sum(self.exact.values()),
                "scene_prompts": self.count["scene"], "scene_exact": self.exact["scene"],
                "edit_prompts": self.count["edit"], "edit_exact": self.exact["edit"],
                "scene_f1": round(sum(self.f1) / max(1, len(self.f1)), 3)}  # fmt: skip


def _actions(preset: Any, tasks: int, seed: int, paraphrase: float = 0.0) -> list[tuple[Any, str, Any]]:
    """(schema, correct action, conversation) of every planner call of the held-out tasks."""
    from duogen_agents.training import data as D
    from duogen_agents.worlds import shapes as W

    seen: list[tuple[Any, str, Any]] = []

    class Recording(D.Teacher):
        def generate(self, conversation: Any, schema: Any, **kw: Any) -> Any:
            out = super().generate(conversation, schema, **kw)
            seen.append((schema, out.text, [D._copy_turn(t) for t in conversation]))
            return out

    with tempfile.TemporaryDirectory(prefix="duogen-planner-eval-") as tmp:
        data = W.write_dataset(Path(tmp) / "data", tasks, split="eval", seed=seed, paraphrase=paraphrase)
        D.planner_examples(D.load_tasks(data), preset, Path(tmp) / "home", teacher=Recording())
    return seen


def _greedy_planner(preset: Any) -> Any:
    from duogen_agents.models.planner import TransformersPlanner
    from duogen_agents.storage.images import default_home

    spec = preset.planner.model_copy(update={"temperature": 0.0})  # greedy, whatever the preset samples with
    return TransformersPlanner.from_spec(spec, preset.models_path(default_home()))


def evaluate_actions(preset_path: Path, tasks: int, seed: int = 0, paraphrase: float = 0.0) -> dict[str, Any]:
    from duogen_agents.presets import load_preset
    from duogen_agents.training.stage2 import prompt_of

    preset = load_preset(preset_path)
    planner = _greedy_planner(preset)
    tally = Tally()
    for schema, target, conversation in _actions(preset, tasks, seed, paraphrase):
        want = prompt_of(target)
        if not want:
            continue
        tally.add(prompt_of(planner.generate(conversation, schema, seed=0).text), want)
    return {"preset": str(preset_path), "format": "actions", "tasks": tasks, "paraphrase": paraphrase, **tally.row()}


def evaluate_text(preset_path: Path, tasks: int, seed: int = 0) -> dict[str, Any]:
    import torch

    from duogen_agents.presets import load_preset
    from duogen_agents.worlds import shapes as W

    preset = load_preset(preset_path)
    planner = _greedy_planner(preset)
    model, tok = planner.model, planner.tokenizer
    tally = Tally()
    for task in W.tasks(tasks, split="eval", seed=seed):
        task["expect"]["answer"] = W._answer(task)
        lines = W.corpus_text(task).split("\n")
        for i, line in enumerate(lines):
            if not line.startswith("image: "):
                continue
            ids = tok("\n".join(lines[:i]) + "\nimage:", return_tensors="pt", add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                out = model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=80, do_sample=False
                )
            got = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).split("\n")[0].strip()
            tally.add(got, line[len("image: ") :])
    return {"preset": str(preset_path), "format": "text", "tasks": tasks, **tally.row()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", type=Path, required=True, help="the preset.json of a pretrain or stage-1 run")
    p.add_argument("--tasks", type=int, default=24, help="held-out tasks (evaluation split)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text", action="store_true", help="score in the pretraining text format, not actions")
    p.add_argument(
        "--paraphrase",
        type=float,
        default=0.0,
        metavar="F",
        help="reword this fraction of the held-out requests (shapes.paraphrased; 1: all but the drafts)",
    )
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    if args.text:
        if args.paraphrase:
            p.error("--paraphrase scores actions, not the text format")
        print(json.dumps(evaluate_text(args.preset, args.tasks, args.seed)))
    else:
        print(json.dumps(evaluate_actions(args.preset, args.tasks, args.seed, args.paraphrase)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
