"""``duogen eval``: the shapes world's detectors and calibration, the harness, judges, importers."""

from __future__ import annotations

import json
import random
import shutil
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from PIL import ImageChops, ImageFilter

from duogen_agents.cli import main
from duogen_agents.document import ImageBlock, InterleavedDocument, TextBlock
from duogen_agents.eval import load_bench, run_eval
from duogen_agents.eval.importers import import_tasks
from duogen_agents.eval.runner import reference_answer, score
from duogen_agents.eval.tasks import load_jsonl
from duogen_agents.storage.images import ImageStore
from duogen_agents.worlds import shapes as W

DATA = Path(__file__).parent / "data"


# ---- the world ----------------------------------------------------------------------------------


def _grid(image, width, color):
    from PIL import ImageDraw

    draw, side = ImageDraw.Draw(image), image.width
    for k in (1, 2):
        x = round(k * side / 3)
        draw.line([(x, 0), (x, side)], fill=color, width=width)
        draw.line([(0, x), (side, x)], fill=color, width=width)
    return image


VARIANTS = {
    "clean": lambda im, rng: im,
    "blur": lambda im, rng: im.filter(ImageFilter.GaussianBlur(1.0)),
    "shift": lambda im, rng: ImageChops.offset(im, rng.randint(-4, 4), rng.randint(-4, 4)),
    "small": lambda im, rng: im.resize((48, 48)),
    "grid lines": lambda im, rng: _grid(im, rng.choice([1, 2]), rng.choice([(0, 0, 0), (128, 128, 128)])),
    "stretched to 1280x704": lambda im, rng: im.resize((1280, 704)),
}


def test_detectors_read_generated_images_back(tmp_path) -> None:
    """Accuracy on 300 generated scenes per variant (stated in the README)."""
    rng = random.Random(0)
    accuracy = {}
    for variant, change in VARIANTS.items():
        ok = 0
        for _ in range(300):
            scene = W._random_scene(rng, "eval", rng.randint(1, 6))
            ok += W.detect(change(W.render(scene, size=rng.choice([64, 96, 192, 256])), rng)).scene == scene
        accuracy[variant] = ok / 300
    print(accuracy)
    assert accuracy["clean"] == 1.0 and accuracy["small"] >= 0.99 and accuracy["stretched to 1280x704"] >= 0.99
    assert accuracy["blur"] >= 0.94 and accuracy["shift"] >= 0.98 and accuracy["grid lines"] >= 0.98, accuracy


def test_blank_and_grey_images_score_nothing() -> None:
    from PIL import Image

    scene = {"center": ("circle", "red"), "top": ("square", "blue")}
    for image in (Image.new("RGB", (96, 96), "white"), Image.effect_noise((96, 96), 60).convert("RGB")):
        assert W.score_fidelity(image, scene) == 0.0 and W.score_alignment(image, scene) == 0.0
        assert W.score_consistency(image, image, scene, scene) == 0.0
    assert W.score_alignment(W.render(scene), scene) == 1.0
    assert W.yes_no("Yes or no? Looking at the sketch: no.") == "yes"  # the first one counts, so no hedging
    assert W.score_text("a red circle at the top left, centre", ["top-left", "center"]) == 1.0


def test_split_by_composition() -> None:
    train = list(W.tasks(60, split="train", seed=1))
    evals = list(W.tasks(60, split="eval", seed=1))

    def objects(task):
        exp = task["expect"]
        scenes = list(exp.get("scenes", [])) + [s for t in exp.get("turns", []) for s in t["scenes"]]
        return {tuple(o) for s in scenes for o in s.values()}

    assert not any(objects(t) & W.HELD_OUT for t in train)
    assert all(objects(t) & W.HELD_OUT for t in evals)
    assert {t["mode"] for t in evals} == {"visual-plan", "interleaved", "draft"}
    assert any(len(t["turns"]) == 2 for t in evals)  # follow-ups


def _doc(task, store, scenes, facts="", mode=None):
    blocks = [TextBlock(text=facts)]
    for k, scene in enumerate(scenes):
        blocks.append(
            ImageBlock(image=store.put(W.render(scene)), prompt="x", step=k if task.mode == "visual-plan" else None)
        )
        blocks.append(TextBlock(text=facts, step=k if task.mode == "visual-plan" else None))
    return InterleavedDocument(prompt="p", mode=mode or task.mode, preset="t", blocks=blocks)


def test_calibration_reference_perturbed_and_noise(tmp_path) -> None:
    """Ground truth scores >= 0.95 on every axis; one object changed scores clearly lower on
    alignment; noise scores near 0 (the three rows in the README)."""
    from PIL import Image

    store = ImageStore(tmp_path)
    _, tasks, _ = load_bench("shapes", limit=24)
    rng = random.Random(3)
    rows: dict[str, list[dict]] = {"reference": [], "perturbed": [], "noise": []}
    for task in tasks:
        rows["reference"].append(score(task, reference_answer(task, store), store, None)["scores"])
        perturbed = []
        for doc in reference_answer(task, store):
            blocks = list(doc.blocks)
            images = [i for i, b in enumerate(blocks) if b.type == "image"]
            if images:
                i = rng.choice(images)
                scene = W.detect(store.open(blocks[i].image)).scene
                cell = rng.choice(sorted(scene))
                shape, color = scene[cell]
                scene[cell] = (shape, next(c for c in W.COLORS if c != color))
                blocks[i] = blocks[i].model_copy(update={"image": store.put(W.render(scene))})
            perturbed.append(doc.model_copy(update={"blocks": blocks}))
        rows["perturbed"].append(score(task, perturbed, store, None)["scores"])
        noisy = []
        for doc in reference_answer(task, store):
            blocks = [
                b.model_copy(update={"image": store.put(Image.effect_noise((64, 64), 60).convert("RGB"))})
                if b.type == "image"
                else b.model_copy(update={"text": "lorem ipsum"})
                for b in doc.blocks
            ]
            noisy.append(doc.model_copy(update={"blocks": blocks}))
        rows["noise"].append(score(task, noisy, store, None)["scores"])

    def mean(name, axis):
        xs = [r[axis] for r in rows[name] if axis in r]
        return sum(xs) / len(xs)

    for axis in ("structure", "text", "fidelity", "alignment", "consistency"):
        assert mean("reference", axis) >= 0.95, axis
    assert mean("perturbed", "alignment") <= mean("reference", "alignment") - 0.05
    assert mean("perturbed", "alignment") <= 0.8
    for axis in ("text", "fidelity", "alignment", "consistency"):
        assert mean("noise", axis) <= 0.1, (axis, mean("noise", axis))


# ---- the harness --------------------------------------------------------------------------------


@pytest.mark.slow
def test_duogen_eval_shapes_reference_and_compare(home, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    code = main(["eval", "--bench", "shapes", "--preset", "tiny", "--limit", "6", "--out", str(out), "--reference"])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    results = json.loads((out / "results.json").read_text())
    ref, tiny = results["runs"]
    assert ref["preset"] == "reference" and all(v >= 0.95 for v in ref["summary"].values() if v is not None)
    assert tiny["preset"] == "tiny" and len(tiny["tasks"]) == 6 and tiny["summary"]["alignment"] < 0.5
    assert results["versions"]["python"] and results["seed"] == 0 and not results["partial"]
    assert all(t["seconds"] >= 0 and t["documents"] for t in tiny["tasks"])
    page = (out / "report.html").read_text()
    assert "<svg" in page and page.count("data:image/png;base64,") >= 12 and "Ground truth" in page
    assert "reference" in cap.out and "tiny" in cap.out
    # --resume with nothing left to do: the run's own options, no task run again, no model loaded.
    code = main(["eval", "--resume", str(out)])
    again = json.loads((out / "results.json").read_text())
    assert code == 0 and [r["preset"] for r in again["runs"]] == ["reference", "tiny"]
    assert again["runs"][1]["tasks"] == tiny["tasks"]
    code = main(["eval", "compare", str(out), str(out), "--out", str(tmp_path / "cmp")])
    assert code == 0
    page = (tmp_path / "cmp" / "compare.html").read_text()
    assert page.count("reference (run)") >= 2 and "tiny (run)" in page and "<svg" in page


def test_resume_keeps_finished_tasks_and_ctrl_c_writes_a_partial_report(home, tmp_path) -> None:
    out = tmp_path / "run"
    first = run_eval("shapes", [], limit=2, out=out, reference=True, home=home)
    assert len(first["runs"][0]["tasks"]) == 2

    def stop_at_third(run, done, total):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_eval("shapes", [], limit=5, out=out, reference=True, resume=True, home=home, progress=stop_at_third)
    partial = json.loads((out / "results.json").read_text())
    assert partial["partial"] and len(partial["runs"][0]["tasks"]) == 3
    assert partial["runs"][0]["tasks"][:2] == first["runs"][0]["tasks"]  # kept, not run again
    assert "Partial: the run was interrupted" in (out / "report.html").read_text()
    done = run_eval("shapes", [], limit=5, out=out, reference=True, resume=True, home=home)
    assert not done["partial"] and len(done["runs"][0]["tasks"]) == 5
    # The run's time includes the invocations that made the tasks it reused.
    assert done["runs"][0]["reused"] == 3 and partial["runs"][0]["reused"] == 2
    assert done["runs"][0]["seconds"] >= partial["runs"][0]["seconds"] >= first["runs"][0]["seconds"] > 0
    assert done["runs"][0]["seconds"] >= sum(t["seconds"] for t in done["runs"][0]["tasks"])


def test_jsonl_bench_reports_malformed_lines_and_runs_the_rest() -> None:
    tasks, errors = load_jsonl(DATA / "bench.jsonl")
    assert [t.id for t in tasks] == ["picnic", "pot", "garden"]
    assert [e.line for e in errors] == [3, 4]
    assert errors[0].message.startswith("mode:") and "Expecting value" in errors[1].message
    assert tasks[1].turns[0].images == [str((DATA / "pot.png").resolve())]


@pytest.mark.slow
def test_jsonl_bench_with_the_tiny_presets_planner_as_judge(home, tmp_path, capsys) -> None:
    out = tmp_path / "judged"
    code = main(
        ["eval", "--bench", str(DATA / "bench.jsonl"), "--preset", "tiny", "--judge", "tiny", "--out", str(out)]
    )
    cap = capsys.readouterr()
    assert code == 0, cap.err
    assert "skipped line 3" in cap.err and "skipped line 4" in cap.err
    results = json.loads((out / "results.json").read_text())
    (run,) = results["runs"]
    assert results["judge"] == "preset:tiny" and [t["id"] for t in run["tasks"]] == ["picnic", "pot", "garden"]
    for t in run["tasks"]:
        assert t["status"] == "ok", t.get("error")
        assert set(t["judge_raw"]) == {"text", "fidelity", "alignment", "consistency"}
        assert all(1 <= v <= 10 for v in t["judge_raw"].values())
        assert all(t["reasons"][a].startswith("judge ") for a in t["judge_raw"])
    page = (out / "report.html").read_text()
    assert "Judge prompts" in page and "strict judge of illustrated answers" in page


class _JudgeServer(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).received.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        verdict = {
            a: {"score": 7, "reason": f"{a} looks fine"} for a in ("text", "fidelity", "alignment", "consistency")
        }
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": json.dumps(verdict)}}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(payload.encode())

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def judge_server():
    server = HTTPServer(("127.0.0.1", 0), _JudgeServer)
    _JudgeServer.received = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_openai_compatible_judge(judge_server, home, tmp_path, monkeypatch) -> None:
    """A bench judged by an OpenAI-compatible endpoint on 127.0.0.1 (answers from a scripted planner)."""
    from duogen_agents.eval.judge import make_judge
    from tests.security.helpers import DONE, OK, TEXT, image, scripted_agent

    monkeypatch.setenv("JUDGE_KEY", "sekrit")
    judge = make_judge(judge_server, model="judge-1", api_key_env="JUDGE_KEY")
    agent = scripted_agent(home, [TEXT, image("a pot"), OK, DONE])
    _, tasks, _ = load_bench(str(DATA / "bench.jsonl"))
    doc = agent.run(tasks[1].turns[0].prompt, images=tasks[1].turns[0].images)
    result = score(tasks[1], [doc], agent.store, judge)
    assert result["judge_raw"] == dict.fromkeys(("text", "fidelity", "alignment", "consistency"), 7)
    assert result["scores"]["fidelity"] == pytest.approx(6 / 9)
    (req,) = _JudgeServer.received
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sekrit"
    body = req["body"]
    assert body["model"] == "judge-1" and body["response_format"]["type"] == "json_schema"
    parts = body["messages"][1]["content"]
    assert (
        sum(p["type"] == "image_url" and p["image_url"]["url"].startswith("data:image/png;base64,") for p in parts) == 1
    )


def test_judge_errors_are_one_line(home, tmp_path, capsys) -> None:
    code = main(["eval", "--bench", "shapes", "--judge", "http://127.0.0.1:9/v1", "--out", str(tmp_path / "x")])
    assert code == 1 and "--judge-model" in capsys.readouterr().err
    code = main(["eval", "--bench", "nope.txt", "--out", str(tmp_path / "x")])
    assert code == 1 and "unknown bench" in capsys.readouterr().err
    code = main(["eval", "--limit", "0", "--out", str(tmp_path / "x")])
    assert code == 1 and "--limit" in capsys.readouterr().err


# ---- importers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, file, ids, images, bad",
    [
        ("isg", "isg.jsonl", ["isg-0001-prediction", "isg-0002-howto"], [2, 3], [3]),
        ("opening", "opening.jsonl", ["opening-0101001", "opening-0101002"], [2, 1], [3]),
        ("ueval", "ueval.json", ["ueval-art-7", "ueval-space-7"], [3, 1], [3]),
    ],
)
def test_importers(kind, file, ids, images, bad, tmp_path, capsys) -> None:
    data = tmp_path / "bench"
    shutil.copytree(DATA, data)
    tasks, errors = import_tasks(kind, data / file)
    assert [t.id for t in tasks] == ids and [t.expect["images"] for t in tasks] == images
    assert [e.line for e in errors] == bad
    assert all("<image>" not in t.turns[0].prompt and "<BEGIN>" not in t.turns[0].prompt for t in tasks)
    out = data / "imported" / f"{kind}.jsonl"  # below the images: they would be outside its folder
    if any(t.turns[0].images for t in tasks):
        assert main(["eval", "import", kind, str(data / file), "--out", str(out)]) == 1
        assert "does not hold the images" in capsys.readouterr().err and not out.exists()
    out = data / f"{kind}-imported.jsonl"
    assert main(["eval", "import", kind, str(data / file), "--out", str(out)]) == 0
    assert f"line {bad[0]}:" in capsys.readouterr().err
    assert "pot.png" in out.read_text() and str(data) not in out.read_text() or kind == "ueval"  # relative
    loaded, load_errors = load_jsonl(out)
    assert [t.id for t in loaded] == ids and not load_errors
    # --copy-images: the bench anywhere, its images copied beside it (one file per picture).
    elsewhere = tmp_path / "elsewhere" / f"{kind}.jsonl"
    assert main(["eval", "import", kind, str(data / file), "--out", str(elsewhere), "--copy-images"]) == 0
    copied, copy_errors = load_jsonl(elsewhere)
    assert [t.id for t in copied] == ids and not copy_errors
    for a, b in zip(loaded, copied, strict=True):
        for ta, tb in zip(a.turns, b.turns, strict=True):
            assert [Path(p).read_bytes() for p in ta.images] == [Path(p).read_bytes() for p in tb.images]
            assert all(Path(p).parent == elsewhere.parent / f"{kind}-images" for p in tb.images)
    names = {p for t in copied for turn in t.turns for p in turn.images}
    assert len(names) == len({Path(p).read_bytes() for p in names})  # the same picture is one file


def test_isg_and_opening_attach_the_input_images() -> None:
    (isg, _), _ = import_tasks("isg", DATA / "isg.jsonl")
    assert isg.turns[0].images == [str(DATA / "pot.png")]
    (first, second), _ = import_tasks("opening", DATA / "opening.jsonl")
    assert first.turns[0].images == [] and second.turns[0].images == [str((DATA / "pot.png").resolve())]


def test_training_data_has_answers_and_images(tmp_path) -> None:
    path = W.write_dataset(tmp_path / "train", 8, split="train", seed=0)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(lines) == 8
    for task in lines:
        for turn in task["expect"]["answer"]:
            for block in turn:
                if block["type"] == "image":
                    assert (tmp_path / "train" / block["path"]).is_file()


def test_training_data_scores_as_the_bench_does(tmp_path) -> None:
    """A file of write_dataset is a bench: its expect.answer (the blocks a correct answer has, per
    turn) is not the yes/no of a draft's question, and its ground truth scores as the built-in
    bench's does (text 0.00 on all but one of the first four tasks, before)."""
    store = ImageStore(tmp_path / "store")
    tasks, errors = load_jsonl(W.write_dataset(tmp_path / "ds", 6, split="eval", seed=0))
    assert not errors and any(t.mode == "draft" for t in tasks)
    builtin = {t.id: t for t in load_bench("shapes", limit=6)[1]}
    for task in tasks:
        scores = score(task, reference_answer(task, store), store, None)["scores"]
        assert scores == score(builtin[task.id], reference_answer(builtin[task.id], store), store, None)["scores"]
        assert scores["text"] == 1.0, task.id
    draft = next(t for t in tasks if t.mode == "draft")
    (doc,) = reference_answer(draft, store)
    truth = W.yes_no(doc.text)
    wrong = doc.model_copy(update={"blocks": [*doc.blocks, TextBlock(text="no" if truth == "yes" else "yes")]})
    assert score(draft, [wrong], store, None)["scores"]["text"] == 0.0


def test_paraphrased_requests_ask_for_the_same_scenes_in_other_words(tmp_path) -> None:
    rng = random.Random(0)
    originals = list(W.tasks(40, split="train", seed=3))
    reworded = [W.paraphrased(t, rng) for t in originals]
    for old, new in zip(originals, reworded, strict=True):
        assert new["expect"] == old["expect"] and new["id"] == old["id"] and new["mode"] == old["mode"]
        prompts = [t["prompt"] for t in new["turns"]]
        if old["mode"] == "draft":
            assert prompts == [t["prompt"] for t in old["turns"]]
            continue
        assert prompts != [t["prompt"] for t in old["turns"]]
        # every object of the first scene is named, with its cell in some wording
        first = (old["expect"].get("turns") or [old["expect"]])[0]["scenes"][0]
        said = W.normalise(prompts[0])
        for cell, (shape, color) in first.items():
            assert f"{color} {shape}" in said and cell in said, (cell, prompts[0])
    assert W.paraphrased(originals[0], random.Random(5)) == W.paraphrased(originals[0], random.Random(5))
    # the four kinds of change in other words; #10's example is one of the plan wordings
    rng = random.Random(1)
    seen = {W._free_change(rng, "add a blue square at the center", in_list=True) for _ in range(60)}
    assert "a blue square in the center" in seen and "add a blue square at the center" in seen
    assert any(x.startswith(("delete", "erase", "take away")) for x in
               {W._free_change(rng, "remove the red circle at the top") for _ in range(30)})  # fmt: skip
    assert any(x.startswith(("paint", "turn", "change")) for x in
               {W._free_change(rng, "make the red circle at the top blue") for _ in range(30)})  # fmt: skip
    assert all("bottom" in W.normalise(x) for x in
               {W._free_change(rng, "move the red circle from the top to the bottom") for _ in range(30)})  # fmt: skip
    with pytest.raises(ValueError, match="not an instruction"):
        W._free_change(rng, "paint it all black")
    # write_dataset rewords a fraction of the tasks from a stream of its own: the tasks and answers stay
    plain = [json.loads(x) for x in W.write_dataset(tmp_path / "a", 24, seed=2).read_text().splitlines()]
    mixed = [
        json.loads(x) for x in W.write_dataset(tmp_path / "b", 24, seed=2, paraphrase=0.5).read_text().splitlines()
    ]
    assert [t["expect"] for t in plain] == [t["expect"] for t in mixed]
    changed = sum(a["turns"] != b["turns"] for a, b in zip(plain, mixed, strict=True))
    assert 4 <= changed <= 20
    with pytest.raises(ValueError, match="fraction"):
        W.write_dataset(tmp_path / "c", 2, paraphrase=2.0)


@pytest.mark.slow
def test_jsonl_bench_with_a_judge_behind_an_openai_compatible_endpoint(judge_server, home, tmp_path, capsys) -> None:
    out = tmp_path / "remote"
    code = main(
        ["eval", "--bench", str(DATA / "bench.jsonl"), "--preset", "tiny", "--judge", judge_server,
         "--judge-model", "judge-1", "--out", str(out)]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["judge"] == f"{judge_server} (judge-1)"
    (run,) = results["runs"]
    assert [t["status"] for t in run["tasks"]] == ["ok", "ok", "ok"]
    assert run["summary"]["fidelity"] == pytest.approx(6 / 9)
    assert len(_JudgeServer.received) == 3  # one judgement per task


def test_bad_expectations_are_line_errors(tmp_path) -> None:
    bench = tmp_path / "b.jsonl"
    lines = [
        {
            "id": "a",
            "turns": [{"prompt": "p"}],
            "expect": {"world": "shapes", "scenes": [{"center": ["circle", "pink"]}]},
        },
        {"id": "b", "turns": [{"prompt": "p"}], "expect": {"images": "three"}},
        {"id": "c", "turns": [{"prompt": "p"}], "expect": {"turns": [1]}},
        {
            "id": "d",
            "turns": [{"prompt": "p"}],
            "expect": {"world": "shapes", "scenes": [{"middle": ["circle", "red"]}]},
        },
        {
            "id": "e",
            "turns": [{"prompt": "p"}],
            "expect": {"world": "shapes", "scenes": [{}, {}], "changes": [None]},  # one per scene
        },
        {"id": "f", "turns": [{"prompt": "p"}], "expect": {"world": "shapes", "answer": "maybe"}},  # never scored 1
        # The bench's mistakes, not the model's: they were answered, then a task error (a missing
        # picture, int("two")) or a score outside [0, 1] (-3 images: structure -0.25; -2 steps).
        {"id": "g", "turns": [{"prompt": "p", "images": ["nothere.png"]}]},
        {"id": "h", "turns": [{"prompt": "p"}], "expect": {"turns": [{"images": "two"}]}},
        {"id": "i", "turns": [{"prompt": "p"}], "expect": {"turns": [{"images": -3}]}},
        {"id": "j", "mode": "visual-plan", "turns": [{"prompt": "p"}], "expect": {"turns": [{"steps": -2}]}},
        {"id": "k", "turns": [{"prompt": "p"}, {"prompt": "q"}], "expect": {"turns": [{}, {"steps": True}]}},
        {"id": "ok", "turns": [{"prompt": "p"}]},
    ]
    bench.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    tasks, errors = load_jsonl(bench)
    assert [t.id for t in tasks] == ["ok"] and [e.line for e in errors] == list(range(1, 12))
    assert "pink" in errors[0].message and "expect.images" in errors[1].message and "middle" in errors[3].message
    assert "expect.changes" in errors[4].message and "expect.answer" in errors[5].message
    assert "'nothere.png' is not a file" in errors[6].message
    assert [e.message.split(" must")[0] for e in errors[7:]] == [
        "expect.turns[0].images", "expect.turns[0].images", "expect.turns[0].steps", "expect.turns[1].steps"
    ]  # fmt: skip


@pytest.mark.parametrize(
    "answer", [{"score": 11, "reason": "x"}, {"score": 1e999, "reason": "x"}, {"score": True, "reason": "x"}, "junk"]
)
def test_judge_answers_outside_the_schema_are_refused(answer) -> None:
    from duogen_agents.errors import GenerationError
    from duogen_agents.eval.judge import _parse

    raw = json.dumps(dict.fromkeys(("text", "fidelity", "alignment", "consistency"), answer))
    with pytest.raises(GenerationError, match="did not answer under the schema"):
        _parse(raw.replace("Infinity", "1e999"), "test")


def test_a_failing_task_or_judge_is_that_tasks_error_and_keeps_the_answer(home, tmp_path) -> None:
    from duogen_agents.eval.runner import _one_task
    from duogen_agents.eval.tasks import Task

    class BrokenJudge:
        name = "broken"

        def judge(self, request, docs, store):
            raise ConnectionError("judge unreachable")

    task = Task(id="t", turns=[{"prompt": "p"}], expect={"images": 0})
    store = ImageStore(home)
    entry = _one_task(task, "m", None, 0, BrokenJudge(), store, tmp_path)
    assert entry["status"] == "error" and "has no ground truth" in entry["error"]
    shapes_task = load_bench("shapes", limit=1)[1][0]
    entry = _one_task(shapes_task.model_copy(update={"expect": {}}), "m", None, 0, None, store, tmp_path)
    assert entry["status"] == "error"


def test_resume_reuses_only_matching_results(home, tmp_path) -> None:
    out = tmp_path / "run"
    first = run_eval("shapes", [], limit=2, out=out, reference=True, home=home, seed=0)
    again = run_eval("shapes", [], limit=2, out=out, reference=True, home=home, seed=5, resume=True)
    fp_first = [t["fingerprint"] for t in first["runs"][0]["tasks"]]
    fp_again = [t["fingerprint"] for t in again["runs"][0]["tasks"]]
    assert not set(fp_first) & set(fp_again)  # another seed: every task answered again
    other = tmp_path / "b.jsonl"
    shapes_task = load_bench("shapes", limit=1)[1][0]
    changed = {"id": shapes_task.id, "mode": shapes_task.mode, "turns": [{"prompt": "different"}]}
    other.write_text(json.dumps({**changed, "expect": shapes_task.expect}) + "\n")
    run_eval(str(other), [], out=out, reference=True, home=home, resume=True)
    data = json.loads((out / "results.json").read_text())
    (task,) = data["runs"][0]["tasks"]
    assert task["prompts"] == ["different"] and "reused" not in data["runs"][0]  # not the shapes result
    # another preset's run of another bench is not kept beside this one: its scores would not compare
    run_eval("shapes", ["tiny"], limit=1, out=out, home=home, resume=True)
    data = json.loads((out / "results.json").read_text())
    assert [r["preset"] for r in data["runs"]] == ["tiny"] and data["bench"] == "shapes"


def test_report_escapes_records_and_fetches_nothing(tmp_path) -> None:
    from duogen_agents.eval.report import write_report

    doc = {"blocks": [{"type": "text", "text": "![x](https://tracker.example/p.png) <script>alert(1)</script>"}]}
    results = {
        "bench": "<b>b</b>",
        "runs": [
            {
                "preset": "<img src=x onerror=alert(1)>",
                "errors": "<script>e()</script>",
                "summary": {"structure": "<i>x</i>"},
                "tasks": [{"id": "<t>", "prompts": ["<p>"], "status": "ok", "documents": [doc], "scores": {"a": 1.0},
                           "reasons": {"a": "<u>r</u>"}, "expect": {"world": "shapes", "scenes": [{"x": 1}]}}],
            }
        ],
    }  # fmt: skip
    page = write_report(results, tmp_path).read_text()
    for bad in ("<script", "<img src=x", 'src="https://tracker', "<u>", "<b>b", "<i>x"):
        assert bad not in page, bad
    assert "malformed" in page


def test_compare_refuses_what_is_not_a_result(tmp_path, capsys) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "results.json").write_text("[]")
    code = main(["eval", "compare", str(bad), "--out", str(tmp_path / "c")])
    assert code == 1 and "is not a duogen eval result" in capsys.readouterr().err
    # hand-edited: runs and summaries there, a task without its id or a score that is not a number
    run = {"preset": "p", "summary": {"structure": "high"}, "tasks": [{"status": "ok", "scores": {}}]}
    (bad / "results.json").write_text(json.dumps({"runs": [run]}))
    code = main(["eval", "compare", str(bad), "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 1 and "malformed" in err and "internal error" not in err
    (bad / "results.json").write_text(json.dumps({"options": {"bench": "shapes", "limit": "x"}}))
    code = main(["eval", "--resume", str(bad)])
    assert code == 1 and "options.limit is 'x'" in capsys.readouterr().err


def test_extra_pictures_earn_no_fidelity_and_unmeasured_axes_stay_empty(home) -> None:
    """A blank answer scored fidelity 0, and 1.0 once it added unrequested blank pictures; axes that
    no task of a run could measure stay unmeasured (None, shown as "-"), failures or not."""
    from PIL import Image

    from duogen_agents import InterleavedDocument
    from duogen_agents.eval.runner import _summary
    from duogen_agents.storage.images import ImageStore

    store = ImageStore(home)
    (task,) = [t for t in load_bench("shapes", limit=8)[1] if t.mode == "interleaved"][:1]
    blank = store.put(Image.new("RGB", (192, 192), "white"))
    doc = InterleavedDocument(prompt=task.turns[0].prompt, mode="interleaved", preset="x",
                              blocks=[{"type": "image", "image": blank.model_dump(), "prompt": "p"}] * 5)  # fmt: skip
    scores = score(task, [doc], store, None)["scores"]
    assert scores["fidelity"] < 0.5 and scores["structure"] < 1.0
    tasks = [{"status": "ok", "scores": {"structure": 1.0}}, {"status": "error", "scores": {}}]
    assert _summary(tasks) == {"structure": 0.5, "text": None, "fidelity": None, "alignment": None, "consistency": None}


def test_fidelity_covers_the_pictures_drawn_and_alignment_counts_the_missing_ones(tmp_path) -> None:
    """The README's definition, pinned (the shipped numbers rest on it): drawing the first of two
    expected scenes perfectly scores fidelity 1.00, drawing none 0.00; the missing picture is counted
    by alignment (0.50), consistency (0 for the change to it) and structure (one image short)."""
    store = ImageStore(tmp_path)
    task = next(t for t in load_bench("shapes", limit=8)[1] if len(t.expect.get("scenes", [])) == 2)
    (doc,) = reference_answer(task, store)
    first = next(i for i, b in enumerate(doc.blocks) if b.type == "image")
    one = score(task, [doc.model_copy(update={"blocks": doc.blocks[: first + 1]})], store, None)["scores"]
    assert one["fidelity"] == 1.0 and one["alignment"] == 0.5 and one["consistency"] == 0.0
    assert one["structure"] < 1.0 and one["text"] == 1.0
    text_only = [b for b in doc.blocks if b.type == "text"]
    none = score(task, [doc.model_copy(update={"blocks": text_only})], store, None)["scores"]
    assert none["fidelity"] == 0.0 and none["alignment"] == 0.0 and none["structure"] < one["structure"]


def test_resume_keeps_its_judge_key_and_files_from_any_folder(tmp_path, monkeypatch) -> None:
    import argparse

    from duogen_agents.cli import _resume_defaults
    from duogen_agents.eval.runner import _place

    bench = tmp_path / "b.jsonl"
    shutil.copy(DATA / "bench.jsonl", bench)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").write_text("")  # a file named like a built-in preset: the name stays a name
    assert _place("b.jsonl") == str(bench.resolve()) and _place("tiny") == "tiny" and _place(None) is None
    from duogen_agents.eval.report import run_label

    assert run_label(str(bench.resolve())) == "b.jsonl" and run_label("tiny") == "tiny"
    run = tmp_path / "run"
    run.mkdir()
    options = {"bench": _place("b.jsonl"), "presets": ["tiny"], "seed": 0, "limit": 2, "judge": "http://127.0.0.1:9/v1",
               "judge_model": "m", "judge_key_env": "JKEY"}  # fmt: skip
    (run / "results.json").write_text(json.dumps({"options": options}))
    args = argparse.Namespace(resume=run, bench=None, seed=None, limit=None, preset=None, reference=False,
                              judge=None, judge_model=None, judge_key_env=None)  # fmt: skip
    _resume_defaults(args)
    assert args.judge_key_env == "JKEY" and args.bench == str(bench.resolve())


def test_bench_images_stay_inside_the_bench_folder(tmp_path, capsys) -> None:
    """A bench names its images relative to itself, inside its folder: one from elsewhere cannot make
    the planner (or a remote planner or judge) read other pictures of the machine. The importers keep
    to it too (an ISG query naming /etc/passwd), and write the bench where its images are inside."""
    out = tmp_path / "elsewhere" / "isg.jsonl"
    assert main(["eval", "import", "isg", str(DATA / "isg.jsonl"), "--out", str(out)]) == 1
    assert "does not hold the images" in capsys.readouterr().err and not out.exists()
    secret = tmp_path / "secret.png"
    shutil.copy(DATA / "pot.png", secret)
    bench = tmp_path / "bench" / "b.jsonl"
    bench.parent.mkdir()
    shutil.copy(DATA / "pot.png", bench.parent / "pot.png")
    lines = [
        {"id": "ok", "turns": [{"prompt": "p", "images": ["pot.png"]}]},
        {"id": "up", "turns": [{"prompt": "p", "images": ["../secret.png"]}]},
        {"id": "abs", "turns": [{"prompt": "p", "images": [str(secret)]}]},
    ]
    (bench.parent / "link.png").symlink_to(secret)
    lines.append({"id": "link", "turns": [{"prompt": "p", "images": ["link.png"]}]})
    bench.write_text("".join(json.dumps(x) + "\n" for x in lines))
    tasks, errors = load_jsonl(bench)
    assert [t.id for t in tasks] == ["ok"] and [e.line for e in errors] == [2, 3, 4]
    assert all("outside the bench's folder" in e.message for e in errors)
    isg = tmp_path / "isg.jsonl"
    isg.write_text(json.dumps({"id": "0001", "Category": "x", "Query": [{"type": "text", "content": "hi"},
                                {"type": "image", "content": "/etc/passwd"}], "Golden": []}) + "\n")  # fmt: skip
    imported, bad = import_tasks("isg", isg)
    assert not imported and "outside" in bad[0].message


def test_import_a_missing_picture_is_its_records_error(tmp_path, capsys) -> None:
    """An imported record whose picture is not there is that record's error: without --copy-images
    its path was written (and the task failed at eval time), with it one missing picture aborted the
    whole import and left a stray FILE-stem-images/ folder."""
    src = tmp_path / "isg"
    src.mkdir()
    shutil.copy(DATA / "pot.png", src / "pot.png")
    records = [
        {"id": 1, "Category": "Edit", "Query": [{"type": "text", "content": "Make it blue"},
         {"type": "image", "content": "pot.png"}], "Golden": [{"type": "image", "content": "g.png"}]},
        {"id": 2, "Category": "Edit", "Query": [{"type": "text", "content": "Make it red"},
         {"type": "image", "content": "nothere.png"}], "Golden": [{"type": "image", "content": "g.png"}]},
    ]  # fmt: skip
    (src / "isg.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for out, flags in ((src / "bench.jsonl", []), (tmp_path / "elsewhere" / "bench.jsonl", ["--copy-images"])):
        assert main(["eval", "import", "isg", str(src / "isg.jsonl"), "--out", str(out), *flags]) == 0
        assert "line 2: image 'nothere.png' is not a file" in capsys.readouterr().err
        tasks, errors = load_jsonl(out)
        assert [t.id for t in tasks] == ["isg-1-edit"] and not errors
    # A picture that goes between the import and the copy: the copies made so far go with the folder.
    from duogen_agents.errors import ConfigError
    from duogen_agents.eval import Task
    from duogen_agents.eval.importers import write_jsonl

    (task,), _ = import_tasks("isg", src / "isg.jsonl")
    gone = Task(id="gone", turns=[{"prompt": "p", "images": [str(src / "nothere.png")]}])
    out = tmp_path / "third" / "bench.jsonl"
    with pytest.raises(ConfigError, match="cannot read image"):
        write_jsonl([task, gone], out, copy_images=True)
    assert not out.exists() and not (out.parent / "bench-images").exists()


def test_the_canvas_ceiling_scores_the_ground_truth_at_a_size() -> None:
    """benchmarks/shapes_canvas_ceiling.py: the held-out tasks' own pictures, scaled to a size and back
    as a drawn picture travels, scored by the evaluation's detectors. At the world's canvas they read
    back perfectly; at 32 pixels the detectors find unclean shapes."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from shapes_canvas_ceiling import ceiling

    full, small = ceiling(6, [192, 32])
    assert full["size"] == 192 and full["fidelity"] == 1.0 and full["consistency"] == 1.0
    assert full["pictures"] == small["pictures"] > 0 and small["pairs"] > 0
    assert small["fidelity"] < 1.0


def test_links_planted_in_out_are_refused_before_the_run(home, tmp_path) -> None:
    from duogen_agents.errors import ConfigError, StorageError

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for planted, error in (("report.html", StorageError), ("results.json", StorageError), ("images", ConfigError)):
        out = tmp_path / f"out-{planted}"
        out.mkdir()
        (out / planted).symlink_to(elsewhere / planted if planted != "images" else elsewhere)
        with pytest.raises(error, match="link"):
            run_eval("shapes", [], limit=1, out=out, reference=True, home=home)
        assert not (out / "results.json").exists() or planted == "results.json"
        assert not any(elsewhere.iterdir())  # nothing written through the link


def test_skipped_bench_lines_are_said_before_the_run(home, tmp_path, capsys, monkeypatch) -> None:
    import duogen_agents.eval.runner as runner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C during the first task

    monkeypatch.setattr(runner, "_run_one", interrupted)
    code = main(["eval", "--bench", str(DATA / "bench.jsonl"), "--preset", "tiny", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 130 and "skipped line 3" in err and "skipped line 4" in err


class _FakeAgent:
    """Answers every turn with one white picture and a line of text: a run without loading a model."""

    def __init__(self, store) -> None:
        self.store = store
        self.preset = type("P", (), {"name": "fake"})()

    def stream(self, prompt, mode, images, seed, thread_id):
        from PIL import Image

        ref = self.store.put(Image.new("RGB", (64, 64), "white"))
        blocks = [TextBlock(text="here"), ImageBlock(image=ref, prompt="a picture")]
        yield {
            "event": "document",
            "document": InterleavedDocument(prompt=prompt, mode=mode, preset="fake", blocks=blocks),
        }


@pytest.fixture
def fake_agent(home, monkeypatch):
    from duogen_agents.agent import Agent

    loaded: list[str] = []

    def from_preset(name, home=None):
        loaded.append(name)
        return _FakeAgent(ImageStore(home))

    monkeypatch.setattr(Agent, "from_preset", staticmethod(from_preset))
    return loaded


class _FailingJudgeServer(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(404)
        self.end_headers()

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(500)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_a_failed_judge_keeps_the_answers_own_scores_and_is_shown(home, fake_agent, tmp_path, capsys) -> None:
    """The judge fails on every task: each answer keeps its structure score, the run's summary is the
    mean of those (not 0), the judge's axes stay unmeasured, and the failures are counted and shown."""
    server = HTTPServer(("127.0.0.1", 0), _FailingJudgeServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    bench = tmp_path / "b.jsonl"
    lines = [{"id": i, "turns": [{"prompt": "Show a pot"}], "expect": {"images": n}} for i, n in (("a", 1), ("b", 2))]
    bench.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "o"
    try:
        code = main(["eval", "--bench", str(bench), "--preset", "tiny", "--judge", url, "--judge-model", "m",
                     "--out", str(out)])  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
    cap = capsys.readouterr()
    assert code == 0, cap.err
    (run,) = json.loads((out / "results.json").read_text())["runs"]
    assert [t["status"] for t in run["tasks"]] == ["ok", "ok"] and all("500" in t["judge_error"] for t in run["tasks"])
    structure = [t["scores"]["structure"] for t in run["tasks"]]
    assert run["summary"]["structure"] == pytest.approx(sum(structure) / 2) and sum(structure) > 0
    assert run["summary"]["alignment"] is None and run["errors"] == 0 and run["judge_errors"] == 2
    assert "the judge failed on 2 task(s) of tiny" in " ".join(cap.err.split())
    assert "judge failed on 2" in (out / "report.html").read_text()
    # An unreachable judge is refused before any model loads.
    fake_agent.clear()
    code = main(["eval", "--bench", str(bench), "--preset", "tiny", "--judge", "http://127.0.0.1:9/v1",
                 "--judge-model", "m", "--out", str(tmp_path / "o2")])  # fmt: skip
    assert code == 1 and "cannot be reached" in capsys.readouterr().err and not fake_agent


def test_results_are_written_after_every_task_and_sigterm_keeps_them(home, fake_agent, tmp_path, monkeypatch) -> None:
    """A run ended by anything (here an error escaping the runner, as SIGKILL or running out of memory
    would end it) loses at most the task in progress: results.json is written after every task, marked
    partial, and --resume continues from it. SIGTERM is handled as Ctrl-C: a partial report, exit 143."""
    import os
    import signal

    import duogen_agents.eval.runner as runner

    out = tmp_path / "run"

    def crash_at_third(run, done, total):
        if done == 2:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        run_eval("shapes", [], limit=4, out=out, reference=True, home=home, progress=crash_at_third)
    partial = json.loads((out / "results.json").read_text())
    assert partial["partial"] and [len(r["tasks"]) for r in partial["runs"]] == [2]
    done = run_eval("shapes", [], limit=4, out=out, reference=True, home=home, resume=True)
    assert done["runs"][0]["reused"] == 2 and len(done["runs"][0]["tasks"]) == 4 and not done["partial"]

    one_task = runner._one_task
    finished = []

    def terminated_after_two(*args, **kwargs):
        if len(finished) == 2:  # the third task begins
            os.kill(os.getpid(), signal.SIGTERM)
        finished.append(one_task(*args, **kwargs))
        return finished[-1]

    monkeypatch.setattr(runner, "_one_task", terminated_after_two)
    out = tmp_path / "term"

    def unhandled(signum, frame):  # what the test sees if duogen eval left SIGTERM alone
        raise RuntimeError("SIGTERM reached the test's own handler")

    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        code = main(["eval", "--bench", "shapes", "--preset", "tiny", "--limit", "4", "--out", str(out)])
        assert code == 143 and signal.getsignal(signal.SIGTERM) is unhandled
    finally:
        signal.signal(signal.SIGTERM, previous)
    data = json.loads((out / "results.json").read_text())
    assert data["partial"] and len(data["runs"][0]["tasks"]) == 2
    assert "Partial: the run was interrupted" in (out / "report.html").read_text()


def test_a_closed_terminal_sighup_keeps_the_finished_tasks_as_sigterm_does(
    home, fake_agent, tmp_path, monkeypatch, capsys
) -> None:
    """SIGHUP (the terminal or SSH session closed under a long eval) ended the process and its
    finished tasks were only in the per-task results.json; it is handled as SIGTERM is: a partial
    report, the message saying which signal, exit 129, and the previous handler back afterwards."""
    import os
    import signal

    import duogen_agents.eval.runner as runner

    one_task = runner._one_task
    finished = []

    def hung_up_after_one(*args, **kwargs):
        if len(finished) == 1:
            os.kill(os.getpid(), signal.SIGHUP)
        finished.append(one_task(*args, **kwargs))
        return finished[-1]

    monkeypatch.setattr(runner, "_one_task", hung_up_after_one)

    def unhandled(signum, frame):
        raise RuntimeError("SIGHUP reached the test's own handler")

    previous = signal.signal(signal.SIGHUP, unhandled)
    out = tmp_path / "hup"
    try:
        code = main(["eval", "--bench", "shapes", "--preset", "tiny", "--limit", "3", "--out", str(out)])
        assert code == 129 and signal.getsignal(signal.SIGHUP) is unhandled
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert "duogen: terminated (SIGHUP); the finished tasks are in" in capsys.readouterr().err
    data = json.loads((out / "results.json").read_text())
    assert data["partial"] and len(data["runs"][0]["tasks"]) == 1
    assert "Partial: the run was interrupted" in (out / "report.html").read_text()


def test_a_new_run_refuses_an_out_holding_results(home, tmp_path, capsys) -> None:
    """As duogen train: a fresh run into an OUT with results.json is refused (nothing replaced);
    --resume continues it."""
    out = tmp_path / "run"
    run_eval("shapes", [], limit=1, out=out, reference=True, home=home)
    before = (out / "results.json").read_bytes()
    code = main(["eval", "--bench", "shapes", "--preset", "shapes", "--limit", "1", "--out", str(out)])
    assert code == 1 and "holds an earlier evaluation" in capsys.readouterr().err
    assert (out / "results.json").read_bytes() == before
    assert run_eval("shapes", [], limit=2, out=out, reference=True, home=home, resume=True)["runs"][0]["reused"] == 1


def test_resume_answers_again_when_the_preset_or_its_weights_changed(home, fake_agent, tmp_path) -> None:
    """A finished task is reused only if the preset is the same: its settings, and the files of a
    model it reads from a local folder (a retrained run)."""
    from duogen_agents.eval.runner import preset_digest

    preset = tmp_path / "mine.toml"
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "model.safetensors").write_bytes(b"1")
    preset.write_text('base = "tiny"\nname = "mine"\n[image]\nsteps = 1\n[planner]\nmodel = "./w"\n')
    out = tmp_path / "run"
    notes: list[str] = []
    first = run_eval("shapes", [str(preset)], limit=2, out=out, home=home)
    again = run_eval("shapes", [str(preset)], limit=2, out=out, home=home, resume=True, on_note=notes.append)
    assert again["runs"][0]["reused"] == 2 and again["runs"][0]["tasks"] == first["runs"][0]["tasks"] and not notes
    digest = preset_digest(str(preset))
    preset.write_text(preset.read_text().replace("steps = 1", "steps = 4"))
    assert preset_digest(str(preset)) != digest
    changed = run_eval("shapes", [str(preset)], limit=2, out=out, home=home, resume=True, on_note=notes.append)
    assert "reused" not in changed["runs"][0] and "has changed since its earlier run" in notes[0]
    digest = preset_digest(str(preset))
    (tmp_path / "w" / "model.safetensors").write_bytes(b"22")  # retrained into the same folder
    assert preset_digest(str(preset)) != digest
    retrained = run_eval("shapes", [str(preset)], limit=2, out=out, home=home, resume=True)
    assert "reused" not in retrained["runs"][0]


def test_resume_keeps_other_presets_runs_only_on_the_same_bench_tasks(home, fake_agent, tmp_path) -> None:
    """ "The same bench" is the same tasks (after --limit), not the same file name: a bench edited in
    place drops the earlier runs of other presets, and says so."""
    bench = tmp_path / "tasks.jsonl"
    easy = [{"id": f"easy-{i}", "turns": [{"prompt": "Show a pot"}], "expect": {"images": 2}} for i in (1, 2)]
    bench.write_text("".join(json.dumps(x) + "\n" for x in easy))
    out = tmp_path / "run"
    notes: list[str] = []
    run_eval(str(bench), ["tiny"], out=out, home=home)
    same = run_eval(str(bench), ["tiny-flux2"], out=out, home=home, resume=True, on_note=notes.append)
    assert [r["preset"] for r in same["runs"]] == ["tiny-flux2", "tiny"] and not notes
    shorter = run_eval(str(bench), ["shapes"], limit=1, out=out, home=home, resume=True, on_note=notes.append)
    assert [r["preset"] for r in shorter["runs"]] == ["shapes"] and "tiny-flux2, tiny" in notes[0]
    hard = [{"id": "hard-1", "turns": [{"prompt": "Show five pots"}], "expect": {"images": 5}}]
    run_eval(str(bench), ["tiny"], out=tmp_path / "b", home=home)
    bench.write_text("".join(json.dumps(x) + "\n" for x in hard))
    notes.clear()
    edited = run_eval(str(bench), ["tiny-flux2"], out=tmp_path / "b", home=home, resume=True, on_note=notes.append)
    assert [r["preset"] for r in edited["runs"]] == ["tiny-flux2"] and "bench tasks differ" in notes[0]


def test_reference_without_ground_truth_and_resume_with_another_out_are_refused(home, fake_agent, tmp_path, capsys):
    """--reference on a bench whose tasks have no ground truth is refused before anything loads (it
    was tabled as structure 0.00, every task failed); --resume A --out B is refused (it wrote to A)."""
    bench = tmp_path / "b.jsonl"
    bench.write_text(json.dumps({"id": "pot", "turns": [{"prompt": "Show a pot"}], "expect": {"images": 1}}) + "\n")
    code = main(["eval", "--bench", str(bench), "--preset", "tiny", "--reference", "--out", str(tmp_path / "a")])
    assert code == 1 and "only shapes tasks have" in capsys.readouterr().err
    assert not fake_agent and not (tmp_path / "a").exists()
    assert main(["eval", "--bench", str(bench), "--preset", "tiny", "--out", str(tmp_path / "a")]) == 0
    before = (tmp_path / "a" / "results.json").read_bytes()
    code = main(["eval", "--resume", str(tmp_path / "a"), "--out", str(tmp_path / "b")])
    assert code == 1 and "leave out --out" in capsys.readouterr().err
    assert not (tmp_path / "b").exists() and (tmp_path / "a" / "results.json").read_bytes() == before
    assert main(["eval", "--resume", str(tmp_path / "a"), "--out", str(tmp_path / "a")]) == 0


def test_compare_shows_what_each_run_was_scored_on_and_warns_when_it_differs(home, tmp_path, capsys) -> None:
    for name, limit, seed in (("a", 2, 0), ("b", 2, 0), ("c", 1, 7)):
        run_eval("shapes", [], limit=limit, seed=seed, out=tmp_path / name, reference=True, home=home)
    code = main(["eval", "compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "same")])
    cap = capsys.readouterr()
    assert code == 0 and "warning" not in cap.err and "shapes" in cap.out
    assert "do not compare" not in (tmp_path / "same" / "compare.html").read_text()
    code = main(["eval", "compare", str(tmp_path / "a"), str(tmp_path / "c"), "--out", str(tmp_path / "mixed")])
    cap = capsys.readouterr()
    assert code == 0 and "scored on different bench tasks, seed, limit" in " ".join(cap.err.split())
    page = (tmp_path / "mixed" / "compare.html").read_text()
    assert "scored on different bench tasks, seed, limit" in page and "<th>seed</th>" in page and "<td>7</td>" in page


def test_resume_of_results_written_before_the_digests_reuses_their_tasks(home, fake_agent, tmp_path) -> None:
    """A results.json written by an earlier version (no bench_digest; runs without preset_digest, their
    tasks fingerprinted by task, seed and judge only) resumes as that version did: its finished tasks
    are reused and the other presets' runs kept, with no false note of a changed preset or bench."""
    from duogen_agents.eval.runner import fingerprint

    bench = tmp_path / "tasks.jsonl"
    lines = [{"id": f"t{i}", "turns": [{"prompt": "Show a pot"}], "expect": {"images": 1}} for i in (1, 2)]
    bench.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "run"
    run_eval(str(bench), ["tiny", "tiny-flux2"], limit=2, out=out, home=home)
    data = json.loads((out / "results.json").read_text())
    _, tasks, _ = load_bench(str(bench), limit=2, seed=0)
    old_marks = {t.id: fingerprint(t, 0, None) for t in tasks}  # the earlier version's formula
    del data["bench_digest"]
    for run in data["runs"]:
        del run["preset_digest"]
        for t in run["tasks"]:
            t["fingerprint"] = old_marks[t["id"]]
    (out / "results.json").write_text(json.dumps(data))
    fake_agent.clear()
    notes: list[str] = []
    again = run_eval(str(bench), ["tiny"], limit=2, out=out, home=home, resume=True, on_note=notes.append)
    assert [r["preset"] for r in again["runs"]] == ["tiny", "tiny-flux2"]
    assert again["runs"][0]["reused"] == 2 and not fake_agent  # nothing answered again
    assert not any("changed" in n or "differ" in n for n in notes) and "earlier version" in notes[0]
    notes.clear()  # the reused tasks now carry this version's fingerprints: reused again, no note
    third = run_eval(str(bench), ["tiny"], limit=2, out=out, home=home, resume=True, on_note=notes.append)
    assert third["runs"][0]["reused"] == 2 and not fake_agent and not notes


def test_bench_digest_is_by_content_not_by_folder(tmp_path) -> None:
    """The same bench (its tasks and pictures) in two folders has one digest; another picture differs."""
    from duogen_agents.eval.runner import bench_digest

    line = {"id": "pot", "turns": [{"prompt": "Show this pot", "images": ["pot.png"]}], "expect": {"images": 1}}
    digests = []
    for folder in ("m1", "m2", "m3"):
        (tmp_path / folder).mkdir()
        shutil.copy(DATA / "pot.png", tmp_path / folder / "pot.png")
        (tmp_path / folder / "bench.jsonl").write_text(json.dumps(line) + "\n")
    (tmp_path / "m3" / "pot.png").write_bytes((DATA / "pot.png").read_bytes() + b"\0")
    for folder in ("m1", "m2", "m3"):
        _, tasks, _ = load_bench(str(tmp_path / folder / "bench.jsonl"))
        digests.append(bench_digest(tasks))
    assert digests[0] == digests[1] != digests[2]


def test_compare_does_not_warn_of_a_limit_that_left_the_same_tasks(home, fake_agent, tmp_path, capsys) -> None:
    bench = tmp_path / "two.jsonl"
    lines = [{"id": f"t{i}", "turns": [{"prompt": "Show a pot"}], "expect": {"images": 1}} for i in (1, 2)]
    bench.write_text("".join(json.dumps(x) + "\n" for x in lines))
    run_eval(str(bench), ["tiny"], out=tmp_path / "a", home=home)
    run_eval(str(bench), ["tiny"], limit=5, out=tmp_path / "b", home=home)
    run_eval(str(bench), ["tiny"], limit=1, out=tmp_path / "c", home=home)
    capsys.readouterr()
    code = main(["eval", "compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "same")])
    assert code == 0 and "warning" not in capsys.readouterr().err
    code = main(["eval", "compare", str(tmp_path / "a"), str(tmp_path / "c"), "--out", str(tmp_path / "fewer")])
    assert code == 0 and "scored on different bench tasks, limit" in " ".join(capsys.readouterr().err.split())


def test_interrupted_before_any_task_finished_says_nothing_was_written(home, fake_agent, tmp_path, capsys, monkeypatch):
    """Ctrl-C (or SIGTERM) while the judge is probed: no results.json exists, so none is named or resumed."""
    from duogen_agents.eval.judge import OpenAIJudge

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(OpenAIJudge, "probe", interrupted)
    bench = tmp_path / "b.jsonl"
    bench.write_text(json.dumps({"id": "pot", "turns": [{"prompt": "Show a pot"}], "expect": {"images": 1}}) + "\n")
    out = tmp_path / "o"
    code = main(["eval", "--bench", str(bench), "--preset", "tiny", "--judge", "http://127.0.0.1:9/v1",
                 "--judge-model", "m", "--out", str(out)])  # fmt: skip
    err = " ".join(capsys.readouterr().err.split())
    assert code == 130 and not (out / "results.json").exists()
    assert "nothing was written" in err and "--resume" not in err and "finished tasks are in" not in err
