"""The CLI: a real tiny run, and one clear line (no traceback, no files) for each error."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from duogen_agents.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _one_error_line(err: str, match: str) -> None:
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("duogen:")]
    assert len(lines) == 1 and match in lines[0], err


def test_help_does_not_import_the_heavy_libraries() -> None:
    code = (
        "import sys; from duogen_agents.cli import main\n"
        "try: main(['--help'])\nexcept SystemExit: pass\n"
        "print(sorted(m for m in ('torch','transformers','diffusers','langgraph') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "answer one prompt" in out  # the help text was printed
    assert out.strip().splitlines()[-1] == "[]", out


def test_duogen_run_writes_the_document(home, tmp_path) -> None:
    out_dir = tmp_path / "out"
    proc = subprocess.run(
        [
            "duogen",
            "run",
            "How do I repot a plant?",
            "--mode",
            "visual-plan",
            "--preset",
            "tiny",
            "--out",
            str(out_dir),
            "--seed",
            "1",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "DUOGEN_HOME": str(home)},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "noise" in proc.stderr
    assert "Image 1:" in proc.stdout and ".png" in proc.stdout
    doc = json.loads((out_dir / "document.json").read_text())
    assert doc["mode"] == "visual-plan" and len([b for b in doc["blocks"] if b["type"] == "image"]) >= 2
    assert (out_dir / "document.md").exists() and (out_dir / "document.html").exists()
    assert len(list((out_dir / "images").glob("*.png"))) == len([b for b in doc["blocks"] if b["type"] == "image"])
    assert not [p for p in out_dir.iterdir() if p.name.startswith(".duogen-tmp")]


@pytest.fixture
def out_dir(tmp_path):
    d = tmp_path / "never"
    yield d
    assert not d.exists(), "an error must not leave files in --out"


def test_unknown_preset(capsys, home, out_dir) -> None:
    code, _, err = _run(capsys, "run", "hi", "--preset", "nope", "--out", str(out_dir))
    assert code == 1
    _one_error_line(err, "unknown preset 'nope'")


def test_empty_prompt(capsys, home, out_dir) -> None:
    code, _, err = _run(capsys, "run", "   ", "--out", str(out_dir))
    assert code == 1
    _one_error_line(err, "the prompt is empty")


@pytest.mark.parametrize("content", [b"", b"garbage", b"\x89PNG\r\n\x1a\n" + b"\x00" * 30])
def test_unreadable_or_corrupt_image(capsys, home, tmp_path, out_dir, content) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(content)
    code, _, err = _run(capsys, "run", "hi", "--image", str(bad), "--out", str(out_dir))
    assert code == 1
    _one_error_line(err, "bad.png")


def test_oversized_image(capsys, home, tmp_path, out_dir) -> None:
    from PIL import Image

    big = tmp_path / "big.png"
    Image.new("1", (12000, 12000)).save(big)
    code, _, err = _run(capsys, "run", "hi", "--image", str(big), "--out", str(out_dir))
    assert code == 1
    _one_error_line(err, "too large")


def test_missing_model_path(capsys, home, tmp_path, out_dir) -> None:
    f = tmp_path / "p.toml"
    f.write_text('base = "tiny"\n[planner]\nmodel = "/nonexistent/qwen"\n')
    code, _, err = _run(capsys, "run", "hi", "--preset", str(f), "--out", str(out_dir))
    assert code == 1
    _one_error_line(err, "planner path not found: /nonexistent/qwen")


def test_checkpoint_that_fails_to_load(capsys, home, tmp_path, out_dir) -> None:
    ckpt = tmp_path / "broken"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{ this is not json")
    f = tmp_path / "p.toml"
    f.write_text(f'base = "tiny"\n[image]\ntext2image = "{ckpt}"\n')
    code, _, err = _run(capsys, "run", "hi", "--preset", str(f), "--out", str(out_dir))
    assert code == 1
    _one_error_line(err, "cannot load the image model from")


def test_a_canvas_larger_than_the_dit_holds_is_refused_before_a_turn(capsys, home, tmp_path, out_dir) -> None:
    """A preset whose canvas the tiny DiT cannot hold (at most 256x256: max_size 32 latents of 8 pixels)
    loaded, then every image failed on a tensor size mismatch and left the turn interrupted. It is
    refused when the image model loads, in one line, and the session keeps what it had."""
    db = ("--db", f"sqlite:///{tmp_path / 'd.db'}")
    code, _, err = _run(capsys, "run", "Draw a pot", "--session", "s", "--no-preview", *db)
    assert code == 0, err
    f = tmp_path / "big.toml"
    f.write_text('base = "tiny"\n[image]\nheight = 2048\nwidth = 2048\n')
    code, _, err = _run(capsys, "run", "Draw a cup", "--preset", str(f), "--session", "s", "--out", str(out_dir), *db)
    assert code == 1
    _one_error_line(
        err, "image.height x image.width 2048x2048 is more than the DiT of tiny:text2image holds: at most 256x256"
    )
    code, out, err = _run(capsys, "sessions", "show", "s", *db)
    assert code == 0 and "(1 turns," in out and "interrupted" not in out, out


def test_out_of_memory(capsys, home, out_dir, monkeypatch) -> None:
    import torch
    from diffusers import Cosmos2TextToImagePipeline

    def oom(self, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Cosmos2TextToImagePipeline, "__call__", oom)
    code, _, err = _run(capsys, "run", "hi", "--mode", "visual-plan", "--out", str(out_dir))
    assert code == 1
    _one_error_line(err, "out of GPU memory while running the image model")


def test_ctrl_c(capsys, home, out_dir, monkeypatch) -> None:
    from duogen_agents.agent import Agent

    real = Agent.stream

    def interrupted(self, *a, **k):
        for i, event in enumerate(real(self, *a, **k)):
            if i == 3:
                raise KeyboardInterrupt
            yield event

    monkeypatch.setattr(Agent, "stream", interrupted)
    code, _, err = _run(capsys, "run", "hi", "--mode", "visual-plan", "--out", str(out_dir))
    assert code == 130
    _one_error_line(err, "interrupted")


def test_unknown_mode_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["run", "hi", "--mode", "poem"])
    assert e.value.code == 2
