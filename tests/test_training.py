"""``duogen train stage1``: the real planner (tiny Qwen2.5-VL) trained a few steps on shapes data."""

from __future__ import annotations

import json
import os
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch

from duogen_agents.cli import EXIT_ERROR, main
from duogen_agents.errors import ModelLoadError
from duogen_agents.graphs import actions as A
from duogen_agents.presets import load_preset
from duogen_agents.training.data import DataError, load_tasks, planner_examples
from duogen_agents.worlds.shapes import write_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("shapes-train"), 8, split="train", seed=0)


def _train(tmp_path, data, out, *extra: str) -> int:
    return main(
        ["train", "stage1", "--base", "tiny", "--data", str(data), "--out", str(out), "--home", str(tmp_path / "home"),
         "--batch", "4", "--lr", "3e-3", "--warmup", "4", *extra]
    )  # fmt: skip


def _losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_the_examples_are_the_graphs_own_planner_calls(data, tmp_path) -> None:
    tasks = load_tasks(data)
    examples = planner_examples(tasks, load_preset("tiny"), tmp_path)
    plan = [e for e in examples if e.task == tasks[0].id]
    assert json.loads(plan[0].target)["steps"]  # a visual plan starts with its outline
    step = json.loads(plan[1].target)
    assert step["image"]["references"] == [] and step["text"].startswith("Step 1")
    later = [json.loads(e.target) for e in plan[2:] if "image" in json.loads(e.target)]
    assert later and all(len(s["image"]["references"]) == 1 for s in later)  # later steps build on the last image
    # the conversation of a later call holds the earlier pictures, as the graph gives them
    assert any(part["type"] == "image" for turn in plan[-1].conversation for part in turn["content"])


def test_a_changed_picture_is_an_edit_of_the_one_before_whose_prompt_is_the_change(data, tmp_path) -> None:
    """The shapes answers: a picture drawn afresh asks for its whole scene; a picture that changes the one
    before it (in its turn, or the last turn's in a follow-up) is an edit of it that names the change
    alone, so the earlier picture must carry what stays."""
    tasks = load_tasks(data)
    examples = [e for e in planner_examples(tasks, load_preset("tiny"), tmp_path) if e.picture is not None]
    by_task: dict[str, list] = {}
    for e in examples:
        by_task.setdefault(e.task, []).append(e)
    raw = {json.loads(line)["id"]: json.loads(line) for line in data.read_text().splitlines()}
    followups = 0
    for task_id, pictures in by_task.items():
        expect = raw[task_id]["expect"]
        changes = [c for turn in expect.get("turns") or [expect] for c in turn["changes"]]
        assert len(changes) == len(pictures) and changes[0] is None
        for change, e in zip(changes, pictures, strict=True):
            image = json.loads(e.target).get("image") or json.loads(e.target)
            if change is None:
                assert image["kind"] == "generate" and image["references"] == [] and image["prompt"].startswith("a 3x3")
            else:
                assert image["kind"] == "edit" and len(e.references) == 1 and len(image["references"]) == 1
                assert change.startswith(image["prompt"])  # the tiny preset clips prompts to its limit
        followups += len(expect.get("turns") or []) == 2
    assert followups  # a follow-up's second turn edits the first turn's picture


def test_the_users_pictures_are_in_the_planner_calls_as_inference_gives_them(data, tmp_path) -> None:
    """A task's ``turns[].images`` reach the planner as in ``duogen eval``: the planner is trained on the
    conversation it will see; a picture that is missing, outside the data's folder or not a picture is
    one error naming the file and line."""
    from PIL import Image

    Image.new("RGB", (32, 32), (220, 30, 30)).save(data.parent / "input.png")
    raw = json.loads(data.read_text().splitlines()[0])
    raw["turns"][0]["images"] = ["input.png"]
    given = data.parent / "with-input.jsonl"  # beside the images its lines name
    given.write_text(json.dumps(raw) + "\n")

    def images(example) -> int:
        return sum(part["type"] == "image" for turn in example.conversation for part in turn["content"])

    first = planner_examples(load_tasks(given), load_preset("tiny"), tmp_path / "a")[0]
    assert images(first) == 1
    (user,) = [t for t in first.conversation if any(p.get("text") == raw["turns"][0]["prompt"] for p in t["content"])]
    assert [p["type"] for p in user["content"]][:2] == ["text", "image"]  # the prompt's turn holds the picture
    plain = planner_examples(load_tasks(data)[:1], load_preset("tiny"), tmp_path / "b")[0]
    assert images(plain) == 0
    (data.parent / "not-a-picture.png").write_text("hello\n")
    for path, message in [
        ("missing.png", "image not found"),
        ("/etc/hostname", "outside the data file's folder"),
        ("../input.png", "outside the data file's folder"),
        ("not-a-picture.png", "not-a-picture.png"),
    ]:
        raw["turns"][0]["images"] = [path]
        given.write_text("\n" + json.dumps(raw) + "\n")
        with pytest.raises(DataError, match=f"^{given} line 2: turns\\[0\\].images\\[0\\]: .*{message}"):
            load_tasks(given)
    # A dataset's pictures on another disk, behind a link below the data file's folder, are followed
    # (a bench's are not: it may come from elsewhere and go to a judge; training sends nothing out).
    elsewhere = tmp_path / "other-disk"
    elsewhere.mkdir()
    (elsewhere / "input.png").write_bytes((data.parent / "input.png").read_bytes())
    (data.parent / "linked").symlink_to(elsewhere, target_is_directory=True)
    raw["turns"][0]["images"] = ["linked/input.png"]
    given.write_text(json.dumps(raw) + "\n")
    (task,) = load_tasks(given)
    assert task.images[0] == [str(data.parent.resolve() / "linked" / "input.png")]


def test_every_target_is_an_action_the_planners_grammar_accepts(data, tmp_path, monkeypatch) -> None:
    """Stage 1 trains on exactly what decoding can write: the grammar of each call's schema accepts the
    teacher's action, byte for byte (its property order included)."""
    import xgrammar as xgr

    from duogen_agents.models.planner import TransformersPlanner
    from duogen_agents.training import data as D

    preset = load_preset("tiny")
    seen: list[tuple[dict, str]] = []
    generate = D.Teacher.generate

    def spy(self, conversation, schema, **kw):
        out = generate(self, conversation, schema, **kw)
        seen.append((schema, out.text))
        return out

    monkeypatch.setattr(D.Teacher, "generate", spy)
    planner_examples(load_tasks(data), preset, tmp_path)
    planner = TransformersPlanner.from_spec(preset.planner, tmp_path / "models")
    assert len({json.dumps(s) for s, _ in seen}) >= 4  # plans, steps, checks, interleaved actions, drafts
    for schema, text in seen:
        grammar, _ = planner.compile(schema)
        assert xgr.GrammarMatcher(grammar).accept_string(text), text


def test_stage1_loss_falls_and_the_planner_loads_back_through_its_preset(data, tmp_path, capsys) -> None:
    from duogen_agents.models.planner import TransformersPlanner

    out = tmp_path / "out"
    assert _train(tmp_path, data, out, "--steps", "30", "--save-every", "10") == 0
    printed = capsys.readouterr().out
    assert "stage 1:" in printed and str(out / "preset.json") in printed
    losses = _losses(out)
    assert len(losses) == 30
    assert statistics.mean(losses[-5:]) < 0.7 * statistics.mean(losses[:5])
    assert (out / "loss.png").stat().st_size > 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-10", "step-20", "step-30"]
    assert json.loads((out / "preset.json").read_text())["planner"]["model"] == "./planner"  # beside the file
    moved = tmp_path / "moved"
    shutil.move(out, moved)  # the run folder works wherever it is
    preset = load_preset(moved / "preset.json")
    assert preset.planner.model == str((moved / "planner").resolve())
    planner = TransformersPlanner.from_spec(preset.planner, tmp_path / "models")
    schema = A.plan_schema(min_steps=2, max_steps=3, max_title=20)
    conv = [{"role": "user", "content": [{"type": "text", "text": "Plan a 3x3 grid scene."}]}]
    A.parse_action(planner.generate(conv, schema, seed=0).text, A.Plan)


def test_resume_continues_exactly_where_a_run_stopped(data, tmp_path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert _train(tmp_path, data, straight, "--steps", "12", "--save-every", "6") == 0
    assert _train(tmp_path, data, resumed, "--steps", "12", "--save-every", "6") == 0
    assert _losses(straight) == _losses(resumed)  # deterministic with the same seed
    # as if it had crashed while writing step 12: its folder is there, its trainer state is not
    (resumed / "checkpoints" / "step-12" / "trainer.pt").unlink()
    assert _train(tmp_path, data, resumed, "--steps", "12", "--save-every", "6", "--resume") == 0
    assert _losses(resumed) == _losses(straight)


def test_lora_trains_adapters_only_and_merges_them(data, tmp_path) -> None:
    out = tmp_path / "lora"
    assert _train(tmp_path, data, out, "--steps", "4", "--lora-rank", "4") == 0
    from safetensors.torch import load_file

    trained = load_file(str(out / "checkpoints" / "step-4" / "trainable.safetensors"))
    assert trained and all("lora_" in name for name in trained)
    merged = load_file(str(next((out / "planner").glob("*.safetensors"))))
    assert not any("lora_" in name for name in merged)
    load_preset(out / "preset.json")


def test_bad_runs_and_bad_data_are_one_line(data, tmp_path, capsys) -> None:
    out = tmp_path / "again"
    assert _train(tmp_path, data, out, "--steps", "2", "--save-every", "1") == 0
    before = (out / "metrics.jsonl").read_text()
    assert _train(tmp_path, data, out, "--steps", "2") == 1  # would mix two runs' checkpoints
    assert "pass --resume" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == before  # the earlier run's metrics are kept
    assert _train(tmp_path, data, tmp_path / "none", "--steps", "2", "--resume") == 1
    assert "no checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()  # refused before anything was made
    # A finished run's folder (its preset.json), given as another run's OUT: refused, nothing overwritten.
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "preset.json").write_text("{}")
    assert _train(tmp_path, data, finished, "--steps", "2") == 1
    assert "holds an earlier run (preset.json)" in capsys.readouterr().err
    assert (finished / "preset.json").read_text() == "{}" and sorted(p.name for p in finished.iterdir()) == [
        "preset.json"
    ]
    # --resume with the same inputs named another way (an absolute --data) continues
    rc = main(["train", "stage1", "--base", "tiny", "--data", str(data.resolve()), "--out", str(out), "--home",
               str(tmp_path / "home"), "--batch", "4", "--lr", "3e-3", "--warmup", "4", "--steps", "2",
               "--save-every", "1", "--resume"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    other = data.parent / "other.jsonl"  # beside the images its lines name
    other.write_text("\n".join(data.read_text().splitlines()[:4]) + "\n")
    assert _train(tmp_path, other, out, "--steps", "2", "--save-every", "1", "--resume") == 1
    err = capsys.readouterr().err  # what differs, then and now
    assert f"data: {data.resolve()} then, {other.resolve()} now" in err and "examples:" in err
    # a data folder: say which file
    assert _train(tmp_path, data.parent, tmp_path / "x", "--steps", "2") == 1
    assert "is a folder; give its tasks.jsonl" in capsys.readouterr().err

    lines = data.read_text().splitlines()
    bad = data.parent / "bad.jsonl"  # beside the images its lines name
    cases = {
        "not a task of the bench format": [lines[0], "{not json"],
        "needs expect.answer": [json.dumps({**json.loads(lines[0]), "expect": {}})],
        "image not found": [lines[0].replace(".png", "-missing.png")],
        # a picture is opened when the data loads, and must lie inside the data file's folder, as a bench's
        "corrupt or truncated": [_first_picture(lines[0], "truncated.png")],
        "not an image file": [_first_picture(lines[0], "text.png")],
        "outside the data file's folder": [_first_picture(lines[0], "/etc/hostname")],
        "outside the data file's folder ": [_first_picture(lines[0], "../elsewhere.png")],
    }
    picture = data.parent / _first_picture(lines[0])
    (data.parent / "truncated.png").write_bytes(picture.read_bytes()[:100])
    (data.parent / "text.png").write_text("hello\n")
    shutil.copy(picture, data.parent.parent / "elsewhere.png")  # a picture, but outside
    for message, content in cases.items():
        bad.write_text("\n".join(content) + "\n")
        with pytest.raises(DataError, match=message):
            load_tasks(bad)
        assert _train(tmp_path, bad, tmp_path / "bad-out", "--steps", "2") == 1
        err = capsys.readouterr().err
        assert message.strip() in err and f"{bad} line {len(content)}: " in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad-out").exists()  # refused before anything was written


def test_an_answer_that_does_not_fit_the_graph_names_its_file_and_line(data, tmp_path) -> None:
    lines = data.read_text().splitlines()
    plan = next(t for t in map(json.loads, lines) if t["mode"] == "visual-plan" and len(t["turns"]) == 1)
    no_pictures = {**plan, "id": "no-pictures", "expect": {"answer": [[{"type": "text", "text": "hello"}]]}}
    image_first = {**plan, "id": "image-first", "expect": {"answer": [plan["expect"]["answer"][0][1:]]}}
    bad = data.parent / "unfit.jsonl"  # beside the images its lines name
    for task, message in [(no_pictures, "task no-pictures: a plan of 0 steps does not fit"),
                          (image_first, "task image-first: the graph asked for text but the answer has image")]:  # fmt: skip
        bad.write_text("\n".join([*lines[:2], json.dumps(task)]) + "\n")
        with pytest.raises(DataError, match=f"^{bad} line 3: {message}"):
            planner_examples(load_tasks(bad), load_preset("tiny"), tmp_path)


def _first_picture(line: str, path: str | None = None) -> str:
    """The path of the first picture of ``line``'s answer; with ``path``: ``line`` with it replaced."""
    task = json.loads(line)
    block = next(b for blocks in task["expect"]["answer"] for b in blocks if b["type"] == "image")
    if path is None:
        return block["path"]
    block["path"] = path
    return json.dumps(task)


def test_a_diverging_run_stops_at_the_first_non_finite_step_and_writes_no_planner(
    data, tmp_path, capsys, monkeypatch
) -> None:
    """A loss (or gradients, or weights) no longer finite stops the run with one line naming the step and
    --lr; metrics.jsonl stays JSON (no NaN) and no planner or preset is written."""
    from duogen_agents.training.loop import TrainConfig, TrainingDivergedError, run

    for lr in ("inf", "nan", "1e300"):
        assert _train(tmp_path, data, tmp_path / "refused", "--steps", "2", "--lr", lr) == EXIT_ERROR
        assert "--lr must be a finite number above 0" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()

    clip, norms = torch.nn.utils.clip_grad_norm_, iter([1.0, float("inf")])

    def overflowing(params, max_norm):  # the second step's gradients overflow, as a too-high --lr does
        norm = clip(params, max_norm)
        return norm * next(norms, 1.0)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", overflowing)
    out = tmp_path / "diverged"
    assert _train(tmp_path, data, out, "--steps", "4", "--save-every", "1") == EXIT_ERROR
    monkeypatch.undo()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "at step 2: training diverged; lower --lr" in err and "checkpoints up to" in err and "step-1" in err
    assert not (out / "preset.json").exists() and not (out / "planner").exists()
    rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl")) for line in
            (out / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
    assert [r["step"] for r in rows] == [1]

    weight = torch.nn.Parameter(torch.ones(3))

    def loss_of(i: int) -> torch.Tensor:  # finite for two steps, then not
        loss_of.calls += 1
        return (weight**2).sum() * (1.0 if loss_of.calls <= 2 else float("nan"))

    loss_of.calls = 0
    cfg = TrainConfig(steps=5, batch=1, lr=1e-2, warmup=0, save_every=1)
    with pytest.raises(TrainingDivergedError, match="stage: the loss is nan at step 3: .*/step-2 stay; no model"):
        run(tmp_path / "unit", cfg, 4, [weight], loss_of, lambda p: None, lambda p: None, resume=False, label="stage")
    assert len((tmp_path / "unit" / "metrics.jsonl").read_text().splitlines()) == 2
    loss_of.calls = 0  # stage 2's VAE phase names its own option
    with pytest.raises(TrainingDivergedError, match="training diverged; lower --vae-lr"):
        run(tmp_path / "vae", cfg, 4, [weight], loss_of, lambda p: None, lambda p: None, resume=False, label="VAE",
            flags={"lr": "--vae-lr"})  # fmt: skip


def test_ctrl_c_names_the_last_checkpoint_and_the_command_that_resumes_it(data, tmp_path, capsys, monkeypatch) -> None:
    import shlex

    from duogen_agents.interrupts import EXIT_INTERRUPTED
    from duogen_agents.training import loop, stage1

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    out = tmp_path / "stopped"
    monkeypatch.setattr(stage1, "planner_examples", ctrl_c)  # before anything is trained
    assert _train(tmp_path, data, out, "--steps", "2", "--save-every", "1") == EXIT_INTERRUPTED
    assert "interrupted before the run's first checkpoint" in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.setattr(loop, "plot_losses", ctrl_c)  # once both steps' checkpoints are written
    assert _train(tmp_path, data, out, "--steps", "2", "--save-every", "1") == EXIT_INTERRUPTED
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"the run is kept up to its last checkpoint, {out / 'checkpoints' / 'step-2'}: continue it with" in err
    assert "no output was written" not in err
    again = shlex.split(err.split("continue it with ")[1])
    assert again[0] == "duogen" and again[-1] == "--resume"
    monkeypatch.undo()
    assert main(again[1:]) == 0  # the command it names continues the run
    assert (out / "preset.json").is_file()


def test_pretrain_then_stage1_from_its_folder(tmp_path, capsys) -> None:
    """``duogen train pretrain``: next-token loss over whole documents falls, the result loads back as a
    planner, and stage 1 continues from its folder."""
    from duogen_agents.models.planner import TransformersPlanner
    from duogen_agents.worlds.shapes import write_corpus

    text = write_corpus(tmp_path / "corpus.jsonl", 24, seed=3)
    first = json.loads(text.read_text().splitlines()[0])["text"]
    assert first.startswith("user: ") and "\nimage: a 3x3 grid with " in first
    out = tmp_path / "pt"
    args = ["train", "pretrain", "--base", "tiny", "--text", str(text), "--out", str(out), "--home",
            str(tmp_path / "home"), "--batch", "8", "--lr", "3e-3", "--warmup", "3", "--save-every", "10"]  # fmt: skip
    assert main([*args, "--steps", "20"]) == 0
    assert "pretrain: 24 documents" in capsys.readouterr().out
    losses = _losses(out)
    assert len(losses) == 20 and statistics.mean(losses[-3:]) < 0.7 * statistics.mean(losses[:3])
    preset = load_preset(out / "preset.json")
    planner = TransformersPlanner.from_spec(preset.planner, tmp_path / "models")
    from safetensors.torch import load_file

    saved = load_file(str(out / "checkpoints" / "step-20" / "trainable.safetensors"))
    name = next(n for n in saved if "embed_tokens" in n)
    assert torch.equal(dict(planner.model.named_parameters())[name].detach(), saved[name])  # the trained weights
    assert not any(".visual." in f".{n}" for n in saved)  # the vision tower is left as it was

    data = write_dataset(tmp_path / "data", 4, split="train", seed=0)
    s1 = tmp_path / "s1"
    assert main(["train", "stage1", "--base", str(out), "--data", str(data), "--out", str(s1), "--home",
                 str(tmp_path / "home"), "--steps", "2", "--save-every", "2"]) == 0  # fmt: skip
    assert json.loads((s1 / "train.json").read_text())["base"] == str(out)

    capsys.readouterr()
    bad = tmp_path / "bad.jsonl"
    for content, message in (("{not json\n", "bad.jsonl:1: not JSON"), ('{"text": ""}\n', 'non-empty "text"')):
        bad.write_text(content)
        assert main([*args[:4], "--text", str(bad), "--out", str(tmp_path / "bad-out"), "--steps", "2"]) == EXIT_ERROR
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad-out").exists()


def test_a_stage2_preset_names_its_folders_relative_so_runs_moved_together_still_load(tmp_path) -> None:
    from duogen_agents.training.stage2 import write_aligned

    runs = tmp_path / "runs"
    (runs / "s1" / "planner").mkdir(parents=True)
    (runs / "s2" / "aligned").mkdir(parents=True)
    spec = load_preset("tiny").model_dump(mode="json")
    spec["planner"]["model"] = "planner"
    (runs / "s1" / "preset.json").write_text(json.dumps(spec))
    stage1_preset = load_preset(runs / "s1" / "preset.json")  # as train stage2 reads it
    write_aligned(runs / "s2", stage1_preset, runs / "s1" / "planner", size=64, tokens=96, context="planner")
    written = json.loads((runs / "s2" / "preset.json").read_text())
    assert (
        written["planner"]["model"] == os.path.join("..", "s1", "planner") and written["image"]["model"] == "./aligned"
    )
    aligned = json.loads((runs / "s2" / "aligned" / "aligned.json").read_text())
    assert aligned["planner"] == os.path.join("..", "..", "s1", "planner")
    moved = tmp_path / "elsewhere" / "runs"
    shutil.move(runs, moved)
    preset = load_preset(moved / "s2" / "preset.json")
    assert preset.planner.model == str((moved / "s1" / "planner").resolve())
    assert preset.image.model == str((moved / "s2" / "aligned").resolve())


def test_stage2_refuses_before_writing_anything(stage1, data, tmp_path, capsys) -> None:
    """--resume on nothing, an OUT that is stage 1's own run, --vae-from into a run with its own VAE:
    one line each, before any model loads, and nothing written."""
    fresh = tmp_path / "fresh"
    assert _stage2(tmp_path, stage1, data, fresh, "--steps", "2", "--resume") == EXIT_ERROR
    assert "--resume: no checkpoint" in capsys.readouterr().err and not fresh.exists()
    before = sorted(p.relative_to(stage1) for p in stage1.rglob("*"))
    assert _stage2(tmp_path, stage1, data, stage1, "--steps", "2") == EXIT_ERROR
    assert "holds an earlier run (preset.json, planner, checkpoints)" in capsys.readouterr().err
    assert sorted(p.relative_to(stage1) for p in stage1.rglob("*")) == before
    # stopped before its first complete checkpoint (metrics, a step folder without trainer.pt): starts again
    crashed = tmp_path / "crashed"
    (crashed / "vae" / "checkpoints" / "step-2").mkdir(parents=True)
    (crashed / "vae" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    assert _stage2(tmp_path, stage1, data, crashed, "--resume") == EXIT_ERROR
    assert "no checkpoint" in capsys.readouterr().err
    from duogen_agents.training.loop import check_out

    check_out(crashed, False, [crashed / "vae", crashed / "dit"])  # a fresh start is allowed
    own = tmp_path / "own"
    (own / "vae" / "checkpoints" / "step-2").mkdir(parents=True)
    (own / "vae" / "checkpoints" / "step-2" / "trainer.pt").write_bytes(b"")
    vae = tmp_path / "vae-run" / "aligned" / "vae"
    vae.mkdir(parents=True)
    (vae / "config.json").write_text('{"_class_name": "AutoencoderKLWan"}')
    assert _stage2(tmp_path, stage1, data, own, "--vae-from", str(vae.parent.parent), "--resume") == EXIT_ERROR
    assert "trained its own VAE" in capsys.readouterr().err and not (own / "vae_from.json").exists()
    # the VAE's options are named as given, not as the DiT's --steps, --batch, --lr
    for option, message in [("--vae-steps", "--vae-steps must be at least 1"),
                            ("--vae-batch", "--vae-batch must be at least 1"),
                            ("--vae-lr", "--vae-lr must be a finite number above 0")]:  # fmt: skip
        assert _stage2(tmp_path, stage1, data, fresh, "--steps", "2", option, "0") == EXIT_ERROR
        assert capsys.readouterr().err.startswith(f"duogen: error: {message}") and not fresh.exists()


def test_recorded_inputs_match_by_place() -> None:
    from duogen_agents.training.loop import _same_input

    here = Path.cwd()
    assert _same_input("tiny", "tiny") and not _same_input("tiny", "shapes")
    assert _same_input(str(here), ".") and _same_input(".", str(here))  # one folder, named two ways
    assert not _same_input(str(here), str(here.parent))


def test_the_connector_regresses_the_regions_of_the_latent_row_by_row() -> None:
    from duogen_agents.errors import ConfigError
    from duogen_agents.training.stage2 import _connector_class, from_regions, region_grid, regions

    latent = torch.zeros(1, 2, 8, 8)
    for r in range(4):
        for c in range(4):
            latent[0, :, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2] = 4 * r + c
    tiles = regions(latent, region_grid(16, 8))
    assert tiles.shape == (1, 16, 2 * 2 * 2)
    assert [int(t[0]) for t in tiles[0]] == list(range(16)) and all(t.unique().numel() == 1 for t in tiles[0])
    noise = torch.randn(3, 2, 8, 8)
    assert torch.equal(from_regions(regions(noise, 4), 4, 2), noise)
    with pytest.raises(ConfigError, match="square number of queries"):
        region_grid(12, 8)
    with pytest.raises(ConfigError, match="aux_target"):
        _connector_class()(in_dim=6, out_dim=4, aux_dim=8, aux_target="scene")
    connector = _connector_class()(in_dim=6, out_dim=4, tokens=5, queries=16, width=32, aux_dim=8)
    states, mask = torch.randn(2, 5, 6), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    h = connector.hidden(states, mask)
    assert connector(states, mask).shape == (2, 16, 4) and connector.aux(h).shape == (2, 16, 8)
    # padding is ignored: what follows the real tokens does not change the first row's queries
    states2 = states.clone()
    states2[0, 3:] = 5.0
    assert torch.allclose(connector.hidden(states2, mask)[0], h[0], atol=1e-5)


@pytest.fixture(scope="module")
def stage1(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("stage1")
    out = root / "s1"
    assert main(["train", "stage1", "--base", "tiny", "--data", str(data), "--out", str(out), "--home",
                 str(root / "home"), "--steps", "6", "--save-every", "6"]) == 0  # fmt: skip
    return out


def _stage2(tmp_path, stage1, data, out, *extra: str) -> int:
    return main(
        ["train", "stage2", "--planner", str(stage1), "--data", str(data), "--out", str(out), "--home",
         str(tmp_path / "home"), "--batch", "2", "--vae-batch", "2", "--warmup", "2", *extra]
    )  # fmt: skip


def test_stage2_trains_and_the_aligned_family_draws_in_the_graph(stage1, data, tmp_path) -> None:
    from duogen_agents import Agent

    out = tmp_path / "s2"
    assert _stage2(tmp_path, stage1, data, out, "--vae-steps", "30", "--steps", "30", "--save-every", "15") == 0
    vae = [json.loads(line)["loss"] for line in (out / "vae" / "metrics.jsonl").read_text().splitlines()]
    dit = [json.loads(line)["loss"] for line in (out / "dit" / "metrics.jsonl").read_text().splitlines()]
    assert statistics.mean(vae[-5:]) < 0.7 * statistics.mean(vae[:5])
    assert statistics.mean(dit[-5:]) < statistics.mean(dit[:5])
    assert (out / "dit" / "loss.png").is_file() and (out / "dit" / "checkpoints" / "step-30").is_dir()
    connector = json.loads((out / "aligned" / "connector" / "config.json").read_text())
    assert connector["aux_dim"] == 16 * 4 * 4  # 16 queries, each a 4x4 region of the 16x16x16 latent
    assert connector["aux_target"] == "delta"  # the change from the conditioning frame

    preset = load_preset(out / "preset.json")
    assert preset.image.family == "aligned"
    agent = Agent.from_preset(preset, home=tmp_path / "home")
    seen: list[int] = []
    draw = agent.image_tool.draw

    def spy(prompt, **kw):
        drawing = draw(prompt, **kw)
        seen.append(drawing.frames)
        return drawing

    agent.image_tool.draw = spy
    doc = agent.run(
        "Build a scene: a red circle at the top-left, then a blue square in the center", mode="visual-plan", seed=0
    )
    assert doc.images and all(b.family == "aligned" for b in doc.blocks if b.type == "image")
    assert seen[0] == 0 and any(seen[1:])  # later pictures are conditioned on the earlier one

    # examples/shapes/ship.py packs the two runs as a folder of weights with a relative preset.json
    # (the built-in `shapes` preset is such a folder inside the package)
    import runpy
    import sys

    from duogen_agents.presets import shipped_preset

    packed = tmp_path / "packed"
    argv = sys.argv
    sys.argv = ["ship.py", str(stage1), str(out), "--strength", "0.5", "--out", str(packed)]
    try:
        runpy.run_path(str(Path(__file__).parents[1] / "examples" / "shapes" / "ship.py"), run_name="__main__")
    finally:
        sys.argv = argv
    assert not (packed / "planner" / "checkpoints").exists() and not (packed / "aligned" / "checkpoints").exists()
    before = sorted(p.relative_to(packed) for p in packed.rglob("*"))
    for bad in (
        [str(tmp_path / "no-such-run"), str(out), "--out", str(packed)],  # a typo: the shipped folder stays
        [str(stage1), str(out), "--out", str(out / "packed")],  # --out inside a run
        [str(stage1), str(out), "--out", str(tmp_path)],  # a run inside --out (it was deleted with it)
    ):
        sys.argv = ["ship.py", *bad]
        try:
            with pytest.raises(SystemExit, match="nothing changed|overlap"):
                runpy.run_path(str(Path(__file__).parents[1] / "examples" / "shapes" / "ship.py"), run_name="__main__")
        finally:
            sys.argv = argv
    assert sorted(p.relative_to(packed) for p in packed.rglob("*")) == before  # the shipped folder as it was
    assert not (out / "packed").exists() and not list(tmp_path.glob(".packed-*"))
    assert json.loads((packed / "preset.json").read_text())["planner"]["model"] == "planner"
    moved = tmp_path / "moved"
    shutil.move(packed, moved)  # relative paths: the folder works wherever it is
    shipped = shipped_preset(moved)
    assert shipped.name == "shapes" and shipped.image.strength == 0.5 and shipped.planner.temperature == 0.0
    packed_doc = Agent.from_preset(shipped, home=tmp_path / "home2").run(
        "Build a scene: a red circle at the top-left, then a blue square in the center", mode="visual-plan", seed=0
    )
    assert packed_doc.images and all(b.family == "aligned" for b in packed_doc.blocks if b.type == "image")


def test_the_connector_reads_the_states_of_the_prompt_the_planner_wrote(stage1) -> None:
    from duogen_agents.models.planner import TransformersPlanner
    from duogen_agents.training.data import PlannerExample
    from duogen_agents.training.stage2 import planner_states, prompt_of, prompt_positions

    preset = load_preset(stage1 / "preset.json")
    planner = TransformersPlanner.from_spec(preset.planner, None)
    prompt = "a 3x3 grid with a red circle at the top-left"
    action = json.dumps({"text": "Step 1", "image": {"prompt": prompt, "references": [], "kind": "generate"}})
    assert prompt_of(action) == prompt
    ids = planner.tokenizer(action, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    n, picked = prompt_positions(planner.tokenizer, action)
    assert n == len(planner.tokenizer(action, add_special_tokens=False, split_special_tokens=True)["input_ids"])
    assert planner.tokenizer.decode([ids[i] for i in picked]).strip() == prompt
    conversation = [{"role": "user", "content": [{"type": "text", "text": "Draw a red circle at the top-left."}]}]
    states, mask = planner_states(planner, PlannerExample(conversation, action), 96)
    assert int(mask.sum()) == len(picked) and not mask[len(picked) :].any()
    assert states.shape == (96, 2 * planner.model.config.text_config.hidden_size)
    assert states[: len(picked)].abs().sum(dim=1).gt(0).all() and not states[len(picked) :].any()
    # The states follow the prompt: another object in the prompt, other states.
    other = action.replace("red circle", "blue square")
    states2, _ = planner_states(planner, PlannerExample(conversation, other), 96)
    assert not torch.allclose(states, states2)


def test_stage2_prompt_only_context_reuses_a_vae_and_draws_from_the_prompt(stage1, data, tmp_path) -> None:
    from diffusers import AutoencoderKLWan

    from duogen_agents import Agent

    first, t5 = tmp_path / "first", tmp_path / "t5"
    assert _stage2(tmp_path, stage1, data, first, "--vae-steps", "3", "--steps", "2", "--save-every", "2",
                   "--regression", "0") == 0  # fmt: skip
    assert json.loads((first / "aligned" / "connector" / "config.json").read_text())["aux_dim"] == 0
    assert _stage2(tmp_path, stage1, data, t5, "--context", "t5", "--vae-from", str(first), "--steps", "4",
                   "--save-every", "2") == 0  # fmt: skip
    assert not (t5 / "vae").exists()  # no VAE trained: the first run's
    a = AutoencoderKLWan.from_pretrained(first / "aligned" / "vae").state_dict()
    b = AutoencoderKLWan.from_pretrained(t5 / "aligned" / "vae").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    meta = json.loads((t5 / "aligned" / "aligned.json").read_text())
    assert meta["context"] == "t5" and (t5 / "aligned" / "text_encoder" / "config.json").is_file()
    agent = Agent.from_preset(load_preset(t5 / "preset.json"), home=tmp_path / "home")
    assert agent.image_tool.text_encoder is not None
    drawing = agent.image_tool.draw("a 3x3 grid with a red circle at the top-left", seed=0)  # no planner call
    assert drawing.image.size == (64, 64)
    # image.strength < 1 starts from the connector's regressed latent; a connector without one refuses it
    spec = load_preset(t5 / "preset.json").model_dump(mode="json")
    spec["image"]["strength"] = 0.5
    (tmp_path / "strength.json").write_text(json.dumps(spec))
    agent_half = Agent.from_preset(load_preset(tmp_path / "strength.json"), home=tmp_path / "home")
    half = agent_half.image_tool.draw("a 3x3 grid with a red circle at the top-left", seed=0)
    assert half.image.size == (64, 64) and half.image.tobytes() != drawing.image.tobytes()
    spec["image"]["model"] = str(first / "aligned")
    (tmp_path / "strength.json").write_text(json.dumps(spec))
    with pytest.raises(ModelLoadError, match="regression head"):
        Agent.from_preset(load_preset(tmp_path / "strength.json"), home=tmp_path / "home")
    assert main(["train", "stage2", "--planner", str(stage1), "--data", str(data), "--out", str(tmp_path / "x"),
                 "--vae-from", str(tmp_path / "nothing")]) == EXIT_ERROR  # fmt: skip
    # --resume finds the VAE the run was trained with, and refuses other inputs than the checkpoint's.
    shutil.rmtree(t5 / "dit" / "checkpoints" / "step-4")
    assert _stage2(tmp_path, stage1, data, t5, "--context", "t5", "--steps", "4", "--save-every", "2", "--resume") == 0
    shutil.rmtree(t5 / "dit" / "checkpoints" / "step-4")
    assert _stage2(tmp_path, stage1, data, t5, "--steps", "4", "--save-every", "2", "--resume") == EXIT_ERROR
    # An aligned folder of an earlier connector is refused with one line, not a weights error.
    meta.pop("format")
    (t5 / "aligned" / "aligned.json").write_text(json.dumps(meta))
    with pytest.raises(Exception, match="earlier duogen train stage2"):
        Agent.from_preset(load_preset(t5 / "preset.json"), home=tmp_path / "home")


def test_stage2_resume_gives_the_same_losses(stage1, data, tmp_path) -> None:
    straight, resumed = tmp_path / "a", tmp_path / "b"
    args = ("--vae-steps", "4", "--steps", "6", "--save-every", "3")
    assert _stage2(tmp_path, stage1, data, straight, *args) == 0
    assert _stage2(tmp_path, stage1, data, resumed, *args) == 0
    shutil.rmtree(resumed / "dit" / "checkpoints" / "step-6")
    assert _stage2(tmp_path, stage1, data, resumed, *args, "--resume") == 0
    assert _losses(straight / "dit") == _losses(resumed / "dit")
    assert _losses(straight / "vae") == _losses(resumed / "vae")


def test_the_oracle_dit_diagnostic_runs(tmp_path: Path) -> None:
    """benchmarks/shapes_oracle_dit.py (stage 2's image side from a perfect context) at toy size."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "shapes_oracle_dit.py"
    spec = importlib.util.spec_from_file_location("shapes_oracle_dit", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "oracle"
    assert module.main(["--out", str(out), "--examples", "8", "--vae-steps", "2", "--vae-batch", "2",
                        "--dit-steps", "2", "--dit-batch", "2", "--eval", "2", "--eval-every", "1",
                        "--threads", "1"]) == 0  # fmt: skip
    result = json.loads((out / "results.json").read_text())
    assert [r["step"] for r in result["rows"]] == [1, 2]
    assert all(0 <= r[k] <= 1 for r in result["rows"] for k in ("alignment", "fidelity", "consistency"))
    assert 0 <= result["vae_ceiling_alignment"] <= 1 and (out / "sample-0.png").is_file()


def test_the_planner_half_scores_prompts(stage1, capsys) -> None:
    """benchmarks/shapes_planner_eval.py: a stage-1 planner's image prompts against the correct ones."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "shapes_planner_eval.py"
    spec = importlib.util.spec_from_file_location("shapes_planner_eval", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    right = "a 3x3 grid with a red circle at the top-left, a blue square at the center"
    assert module.scene_f1(right, right) == 1.0
    assert module.scene_f1("a 3x3 grid with a red circle at the top-left", right) == pytest.approx(2 / 3)
    assert module.scene_f1("an empty 3x3 grid", "an empty 3x3 grid") == 1.0
    tally = module.Tally()  # edits count apart, and only whole-scene prompts enter the F1
    tally.add("add a red circle at the top", "add a red circle at the top")
    tally.add("remove the blue square at the left", "move the blue square from the left to the top")
    tally.add("a 3x3 grid with a red circle at the top-left", right)
    row = tally.row()
    assert (row["exact"], row["edit_exact"], row["edit_prompts"], row["scene_prompts"]) == (1, 1, 2, 1)
    assert row["scene_f1"] == pytest.approx(2 / 3, abs=1e-3)
    assert module.main(["--preset", str(stage1 / "preset.json"), "--tasks", "2", "--threads", "1"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["prompts"] == 4 and 0 <= row["exact"] <= row["prompts"] and 0 <= row["scene_f1"] <= 1
    assert row["scene_prompts"] + row["edit_prompts"] == 4 and row["edit_prompts"] >= 1
    # --paraphrase rewords the held-out requests; the prompts asked for are the same
    assert module.main(["--preset", str(stage1 / "preset.json"), "--tasks", "2", "--threads", "1",
                        "--paraphrase", "1"]) == 0  # fmt: skip
    reworded = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert reworded["paraphrase"] == 1.0 and reworded["prompts"] == 4


def _toy_aligned(aux_target: str = "delta") -> tuple:
    """A Wan VAE, a Cosmos DiT and a connector of stage 2's toy shapes (random weights)."""
    from duogen_agents.training.stage2 import _connector_class, _normalise, new_transformer, new_vae

    torch.manual_seed(0)
    vae, transformer = new_vae().eval(), new_transformer(64).eval()
    vae.register_to_config(latents_mean=[0.0] * 16, latents_std=[1.0] * 16)
    connector = _connector_class()(in_dim=8, out_dim=64, tokens=96, queries=16, aux_dim=256, aux_target=aux_target)
    assert _normalise(vae, torch.ones(1, 16, 1, 1, 1)).eq(1).all()
    return vae, transformer, connector.eval()


class _Fixed(torch.nn.Module):
    """A regression head that predicts the same change whatever it reads."""

    def __init__(self, tiles: torch.Tensor) -> None:
        super().__init__()
        self.tiles = tiles

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.tiles


def test_keep_holds_the_earlier_picture_where_no_change_is_predicted() -> None:
    """Blended sampling (``keep``): where the connector predicts no change, the latent is the earlier
    picture's; where it predicts a change, the DiT draws; a change everywhere keeps nothing."""
    from duogen_agents.errors import ConfigError
    from duogen_agents.training.stage2 import clip_of, encode_frames, sample, to_image
    from duogen_agents.worlds import shapes as W

    vae, transformer, connector = _toy_aligned()
    states = torch.randn(96, 8)
    reference = W.render({"top-left": ("circle", "red"), "center": ("square", "blue")}, size=64)
    decoded: list[torch.Tensor] = []
    decode = vae.decode
    vae.decode = lambda z: (decoded.append(z.clone()), decode(z))[1]

    def draw(change: float | None, keep: float = 0.3, ref=reference):
        tiles = torch.zeros(1, 16, 256)  # 16 regions (4x4 latent positions each) of 16 channels
        if change is not None:
            tiles[0, 0] = change  # the top-left region only
        connector.aux = _Fixed(tiles if change is not None else torch.full((1, 16, 256), 5.0))
        decoded.clear()
        image = sample(transformer, vae, connector, states, ref, size=64, steps=3, seed=1, keep=keep)
        return image, decoded[-1][0, :, 0]

    with torch.no_grad():
        z = encode_frames(vae, clip_of(reference, reference, 64).unsqueeze(0))[0, :, 0]  # [16, 16, 16]
        kept, latent = draw(0.0)  # no change predicted anywhere: all of it is the earlier picture's
        assert torch.equal(latent, z)
        assert kept.tobytes() == reference.tobytes()  # its own pixels, not the VAE's round trip of them
        assert kept.tobytes() != to_image(decode(z[None, :, None]).sample[0][:, -1]).tobytes()
        drawn, _ = draw(0.0, keep=0.0)
        assert drawn.tobytes() != kept.tobytes()
        part_image, part = draw(5.0)  # a change in the top-left region: it is drawn, grown by two positions
        outside = torch.ones(16, 16, dtype=torch.bool)
        outside[:6, :6] = False
        assert torch.equal(part[:, outside], z[:, outside]) and not torch.equal(part[:, :4, :4], z[:, :4, :4])
        a, b = np.asarray(part_image), np.asarray(reference)  # 4 pixels per latent position
        assert (a[24:] == b[24:]).all() and (a[:, 24:] == b[:, 24:]).all() and (a[:16, :16] != b[:16, :16]).any()
        assert not torch.equal(part[:, 5, :5], z[:, 5, :5])  # the growth: drawn, not kept
        everywhere, _ = draw(None)  # a change everywhere: nothing is kept
        assert everywhere.tobytes() == drawn.tobytes()
        fresh, _ = draw(0.0, ref=None)  # a picture drawn afresh has nothing to keep
        assert fresh.tobytes() == draw(0.0, keep=0.0, ref=None)[0].tobytes()
    _, _, latent_head = _toy_aligned("latent")
    with pytest.raises(ConfigError, match="predicts the change"):
        sample(transformer, vae, latent_head, states, reference, size=64, steps=1, keep=0.3)
    with pytest.raises(ConfigError, match="keep must be"):
        sample(transformer, vae, connector, states, reference, size=64, steps=1, keep=-1.0)


def test_stage2_init_starts_from_an_earlier_runs_dit_and_connector(stage1, data, tmp_path, capsys) -> None:
    from diffusers import AutoencoderKLWan, CosmosTransformer3DModel

    first, second = tmp_path / "first", tmp_path / "second"
    assert _stage2(tmp_path, stage1, data, first, "--vae-steps", "3", "--steps", "4", "--save-every", "4") == 0
    # a learning rate of nothing: the second run's weights are the first run's, and so is its VAE
    assert _stage2(tmp_path, stage1, data, second, "--init", str(first), "--steps", "1", "--lr", "1e-12",
                   "--save-every", "1") == 0  # fmt: skip
    assert not (second / "vae").exists() and "VAE reused" in capsys.readouterr().out
    for sub, cls in (("transformer", CosmosTransformer3DModel), ("vae", AutoencoderKLWan)):
        a = cls.from_pretrained(first / "aligned" / sub).state_dict()
        b = cls.from_pretrained(second / "aligned" / sub).state_dict()
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    con1 = json.loads((first / "aligned" / "connector" / "config.json").read_text())
    assert con1 == json.loads((second / "aligned" / "connector" / "config.json").read_text())
    train = json.loads((second / "dit" / "train.json").read_text())
    assert train["init"] == str((first / "aligned").resolve())
    # the same run without --init starts elsewhere: its first loss differs
    assert _stage2(tmp_path, stage1, data, tmp_path / "fresh", "--vae-from", str(first), "--steps", "1",
                   "--lr", "1e-12", "--save-every", "1") == 0  # fmt: skip
    assert _losses(tmp_path / "fresh" / "dit") != _losses(second / "dit")
    # a folder that is not a stage 2 run, or one trained for another context or size, is one line
    capsys.readouterr()
    assert _stage2(tmp_path, stage1, data, tmp_path / "x", "--init", str(tmp_path / "nothing")) == EXIT_ERROR
    assert "not the OUT of `duogen train stage2`" in capsys.readouterr().err
    assert _stage2(tmp_path, stage1, data, tmp_path / "y", "--init", str(first), "--size", "32") == EXIT_ERROR
    assert "size 64" in capsys.readouterr().err
    assert _stage2(tmp_path, stage1, data, tmp_path / "z", "--init", str(first), "--regression", "0") == EXIT_ERROR
    assert "aux_dim" in capsys.readouterr().err
