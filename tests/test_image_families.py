"""Image requests mean what they say, for every family: spies on the real tiny pipelines check what
each received (frames, order, sizes, no crop, horizon), and every kind with references is drawn."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from duogen_agents import Agent
from duogen_agents.errors import ConfigError, GenerationError
from duogen_agents.models.images import build_image_tool
from duogen_agents.models.images import video2world as video2world_module
from duogen_agents.models.images.cosmos2 import CosmosImageTool, conditioning_frames, dit_limits
from duogen_agents.models.protocols import letterbox, refusal
from duogen_agents.presets import ImageSpec, load_preset
from duogen_agents.storage.images import ImageStore
from duogen_agents.tools.render import Renderer
from tests.fakes import ScriptedPlanner

DONE = {"type": "done"}


@pytest.fixture(scope="module")
def tools(models_dir):
    """The real tiny image tools: Cosmos + FLUX.2 klein for references (``tiny``), FLUX alone (``tiny-flux2``)."""
    return {
        "tiny": build_image_tool(load_preset("tiny").image, models_dir),
        "tiny-flux2": build_image_tool(load_preset("tiny-flux2").image, models_dir),
    }


class Spy:
    """Records the keyword arguments of every call of a pipeline class, then calls it."""

    def __init__(self, monkeypatch, cls) -> None:
        self.calls: list[dict] = []
        original = cls.__call__

        def spy(pipe, *args, **kwargs):
            self.calls.append(kwargs)
            return original(pipe, *args, **kwargs)

        monkeypatch.setattr(cls, "__call__", spy)


@pytest.fixture
def spies(monkeypatch):
    from diffusers import Cosmos2TextToImagePipeline, Cosmos2VideoToWorldPipeline, Flux2KleinPipeline

    return {
        "text2image": Spy(monkeypatch, Cosmos2TextToImagePipeline),
        "video2world": Spy(monkeypatch, Cosmos2VideoToWorldPipeline),
        "flux2": Spy(monkeypatch, Flux2KleinPipeline),
    }


def _uploads(tmp_path):
    """A wide red image and a tall blue one: letterboxing (not cropping) is visible in their bars."""
    wide, tall = tmp_path / "wide.png", tmp_path / "tall.png"
    Image.new("RGB", (128, 64), (250, 10, 10)).save(wide)
    Image.new("RGB", (32, 64), (10, 10, 250)).save(tall)
    return wide, tall


def _agent(tool, home, script, preset="tiny"):
    p = load_preset(preset)
    p.limits = p.limits.model_copy(update={"check": False})
    return Agent(p, planner=ScriptedPlanner(script), image_tool=tool, home=home)


def _ids_in_order(conversation) -> list[str]:
    labels = [p["text"] for t in conversation for p in t["content"] if p["type"] == "text"]
    return [x[len("[image ") : -1] for x in labels if x.startswith("[image ")]


def _request(kind, pick, prompt="the pot"):
    """A scripted planner step that references the uploads by id, newest first (the wrong order)."""

    def step(conversation, schema):
        ids = _ids_in_order(conversation)
        refs = [ids[i] for i in pick]
        assert set(refs) <= set(json.dumps(schema).split('"'))  # offered by the grammar
        return {"type": "image", "prompt": prompt, "references": refs, "kind": kind}

    return step


def _letterboxed(path):
    return np.asarray(letterbox(Image.open(path), (64, 64)))


def test_two_builds_of_the_tiny_checkpoints_draw_the_same_picture(tmp_path) -> None:
    """Same seed, same picture from two separately built tiny caches (the T5 tokenizer used to be
    trained anew each build, by a trainer that picks different pieces each time)."""
    from duogen_agents.models.tiny import _train_tokenizer

    special = ["<pad>", "</s>", "<unk>"]
    assert _train_tokenizer("unigram", 300, special).to_str() == _train_tokenizer("unigram", 300, special).to_str()
    spec = load_preset("tiny").image.model_copy(update={"references": None})
    a, b = (build_image_tool(spec, tmp_path / name) for name in ("a", "b"))
    for kind, refs in (("generate", []), ("continue", [Image.new("RGB", (64, 64), (200, 40, 40))])):
        pa = a.draw("a pot on a windowsill", kind=kind, references=refs, seed=5).image
        pb = b.draw("a pot on a windowsill", kind=kind, references=refs, seed=5).image
        assert pa.tobytes() == pb.tobytes()


def test_letterbox_never_crops() -> None:
    wide = Image.new("RGB", (128, 64), (250, 10, 10))
    out = np.asarray(letterbox(wide, (64, 64)))
    assert out.shape == (64, 64, 3)
    assert (out[16:48] == (250, 10, 10)).all()  # the whole picture, scaled
    assert (out[:16] == 0).all() and (out[48:] == 0).all()  # bars, not a crop


def test_conditioning_frames_are_one_or_five_with_the_horizon_ahead() -> None:
    a, b, c = (Image.new("RGB", (8, 8), (i, 0, 0)) for i in (1, 2, 3))
    frames, n, index = conditioning_frames([a], horizon=8, temporal_factor=4)
    assert frames == [a] and n == 9 and index == 8
    frames, n, index = conditioning_frames([a, b, c], horizon=8, temporal_factor=4)
    assert frames == [a, b, c, c, c] and n == 13 and index == 12
    frames, n, index = conditioning_frames([a], horizon=28, temporal_factor=4)
    assert n == 29 and index == 28
    with pytest.raises(ValueError, match="1 to 5"):
        conditioning_frames([a] * 6, horizon=8, temporal_factor=4)


def test_continue_goes_to_video2world_oldest_first_letterboxed_with_the_horizon(tools, spies, tmp_path) -> None:
    wide, tall = _uploads(tmp_path)
    agent = _agent(tools["tiny"], tmp_path / "home", [_request("continue", [1, 0]), DONE])
    doc = agent.run("what happens next", images=[wide, tall], seed=0)
    (call,) = spies["video2world"].calls
    assert not spies["flux2"].calls and not spies["text2image"].calls
    frames = [np.asarray(f) for f in call["video"]]
    # Oldest first (the planner wrote them newest first), padded to Video2World's five frames.
    assert len(frames) == 5
    assert np.array_equal(frames[0], _letterboxed(wide)) and np.array_equal(frames[1], _letterboxed(tall))
    assert all(np.array_equal(f, _letterboxed(tall)) for f in frames[2:])
    horizon = load_preset("tiny").image.horizon_frames
    assert call["num_frames"] >= 5 + horizon and (call["num_frames"] - 1) % 4 == 0
    (block,) = doc.images
    assert block.kind == "continue" and block.references == [r.id for r in doc.inputs]
    assert (block.family, block.pipeline, block.frames, block.horizon) == ("cosmos2", "video2world", 5, horizon)


def test_generate_without_references_is_text_to_image(tools, spies, tmp_path) -> None:
    agent = _agent(
        tools["tiny"],
        tmp_path / "home",
        [{"type": "image", "prompt": "a pot", "references": [], "kind": "generate"}, DONE],
    )
    doc = agent.run("draw a pot")
    assert len(spies["text2image"].calls) == 1 and not spies["video2world"].calls and not spies["flux2"].calls
    assert (doc.images[0].family, doc.images[0].pipeline, doc.images[0].frames) == ("cosmos2", "text2image", 0)


@pytest.mark.parametrize("kind", ["edit", "generate"])
def test_edit_and_generate_with_references_go_to_the_references_family(tools, spies, tmp_path, kind) -> None:
    wide, tall = _uploads(tmp_path)
    agent = _agent(tools["tiny"], tmp_path / "home", [_request(kind, [1, 0], "make it blue"), DONE])
    doc = agent.run("change it", images=[wide, tall], seed=0)
    (call,) = spies["flux2"].calls
    assert not spies["video2world"].calls
    images = [np.asarray(i) for i in call["image"]]
    assert [i.shape for i in images] == [(64, 64, 3)] * 2
    # generate: oldest first, whatever order the planner wrote; edit: the image to change (the
    # planner's first reference, the newer one here) first.
    first, second = (tall, wide) if kind == "edit" else (wide, tall)
    assert np.array_equal(images[0], _letterboxed(first)) and np.array_equal(images[1], _letterboxed(second))
    assert call["prompt"] == "make it blue" and (call["height"], call["width"]) == (64, 64)
    (block,) = doc.images
    assert (block.kind, block.family, block.pipeline, block.frames) == (
        kind,
        "flux2-klein",
        "flux2-klein-references",
        2,
    )


@pytest.mark.parametrize("kind", ["generate", "edit", "continue"])
def test_tiny_flux2_draws_every_kind_with_references(tools, spies, tmp_path, kind) -> None:
    wide, tall = _uploads(tmp_path)
    agent = _agent(tools["tiny-flux2"], tmp_path / "home", [_request(kind, [0]), DONE], preset="tiny-flux2")
    doc = agent.run("go on", images=[wide, tall], seed=0)
    (call,) = spies["flux2"].calls
    assert len(call["image"]) == 1 and np.array_equal(np.asarray(call["image"][0]), _letterboxed(wide))
    assert ("next moment" in call["prompt"]) == (kind == "continue")
    assert doc.images[0].kind == kind and doc.images[0].family == "flux2-klein"


def test_a_family_without_references_is_never_offered_them_and_refuses_them(models_dir, tmp_path) -> None:
    spec = load_preset("tiny").image.model_copy(update={"references": None})
    cosmos = CosmosImageTool.from_spec(spec, models_dir)
    assert dict(cosmos.capabilities) == {"continue": 5}
    wide, tall = _uploads(tmp_path)

    def look(conversation, schema):
        text = json.dumps(schema)
        assert '"edit"' not in text and '"continue"' in text  # only what the family can do
        return DONE

    agent = _agent(cosmos, tmp_path / "home", [{"type": "text", "text": "hi"}, look])
    agent.run("x", images=[wide, tall])
    renderer = Renderer(cosmos, ImageStore(tmp_path / "home"))
    ref = renderer.store.put(Image.new("RGB", (64, 64)))
    with pytest.raises(GenerationError, match="cannot edit with references"):
        renderer.render("p", [ref], kind="edit")
    with pytest.raises(GenerationError, match="at most 5"):
        renderer.render("p", [ref] * 6, kind="continue")


def test_a_canvas_or_horizon_the_dit_cannot_hold_is_refused_when_it_loads(models_dir, spies, monkeypatch) -> None:
    """Past its config's ``max_size`` (latent frames, height, width) the Cosmos DiT fails at every call
    (a tensor size mismatch); a preset asking for more was accepted and then failed at every image.
    The limit comes from the loaded DiT's config and the VAE's factors: the tiny DiT's max_size
    (8, 32, 32) in patches of (1, 2, 2), through Wan's x8 and x4, holds 256x256 and clips of 29 frames."""
    spec = load_preset("tiny").image.model_copy(update={"references": None, "steps": 1})
    tool = CosmosImageTool.from_spec(spec.model_copy(update={"height": 256, "width": 256}), models_dir)
    assert dit_limits(tool.text2image) == dit_limits(tool.video2world) == (29, 256, 256)
    assert tool.draw("a pot", seed=1).image.size == (256, 256)  # the limit itself draws
    for height, width in ((2048, 2048), (272, 64), (64, 272)):
        with pytest.raises(ConfigError, match=r"at most 256x256 \(its max_size \(8, 32, 32\)") as caught:
            CosmosImageTool.from_spec(spec.model_copy(update={"height": height, "width": width}), models_dir)
        assert f"{height}x{width}" in str(caught.value) and "\n" not in str(caught.value)
    # Video2World's clip: five conditioning frames and the horizon, 29 frames at most
    far = CosmosImageTool.from_spec(spec.model_copy(update={"horizon_frames": 25}), models_dir)
    refs = [Image.new("RGB", (64, 64))] * 5
    with pytest.raises(ConfigError, match=r"image.horizon_frames 25 .* at most 24 \(a clip of 29 frames"):
        far.draw("later", kind="continue", references=refs)
    assert len(spies["text2image"].calls) == 1 and not spies["video2world"].calls  # refused before the DiT ran
    loads = []
    real = video2world_module.ConditioningVideo2World.from_pretrained
    monkeypatch.setattr(
        video2world_module.ConditioningVideo2World,
        "from_pretrained",
        lambda *a, **k: loads.append(1) or real(*a, **k),
    )
    for _ in range(2):  # refused again without loading the pipeline again (a server's every request)
        with pytest.raises(ConfigError, match=r"image.horizon_frames 25 .* at most 24"):
            far.draw("later", kind="continue", references=refs)
    assert loads == []
    near = CosmosImageTool.from_spec(spec.model_copy(update={"horizon_frames": 24}), models_dir)
    assert near.draw("later", kind="continue", references=refs).details["num_frames"] == 29


def test_refusal_rules() -> None:
    caps = {"continue": 5}
    assert refusal(caps, "generate", 0) is None
    assert "needs at least one reference" in (refusal(caps, "edit", 0) or "")
    assert "cannot generate with references" in (refusal(caps, "generate", 1) or "")
    assert refusal(caps, "continue", 5) is None
    assert refusal({"generate": 4, "edit": 4, "continue": 5}, "edit", 5) is not None


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny", "tiny-flux2"])
def test_duogen_run_with_each_tiny_preset(preset, home, tmp_path, capsys) -> None:
    from duogen_agents.cli import main

    wide, tall = _uploads(tmp_path)
    out = tmp_path / "out"
    code = main(["run", "Plan a picnic", "--preset", preset, "--mode", "visual-plan", "--image", str(wide),
                 "--image", str(tall), "--out", str(out), "--seed", "1"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    doc = json.loads((out / "document.json").read_text())
    images = [b for b in doc["blocks"] if b["type"] == "image"]
    assert images and all(b["family"] in ("cosmos2", "flux2-klein") for b in images)
    assert all(b["pipeline"] and b["seed"] is not None for b in images)


def test_vae_tiling_reaches_the_vae_and_its_tiles_run(models_dir, monkeypatch) -> None:
    """``image.vae_tiling``: a picture larger than one tile is encoded and decoded tile by tile by the
    real diffusers VAE (Cosmos: Text2Image decodes, Video2World encodes its frames and decodes)."""
    spec = load_preset("tiny").image.model_copy(update={"references": None, "vae_tiling": True})
    tool = CosmosImageTool.from_spec(spec, models_dir)
    vae = tool.text2image.vae
    assert vae.use_tiling and tool.video2world.vae is vae
    size = (spec.width, spec.height)
    # Wan's tiles are 256 pixels, more than the tiny DiT draws: tiles of 32 make the tiny pictures tile.
    vae.enable_tiling(
        tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_stride_height=24, tile_sample_stride_width=24
    )
    seen: list[str] = []
    for name in ("tiled_encode", "tiled_decode"):
        original = getattr(type(vae), name)
        monkeypatch.setattr(
            type(vae), name, lambda self, *a, _o=original, _n=name, **k: seen.append(_n) or _o(self, *a, **k)
        )
    first = tool.draw("a pot on a windowsill", seed=3).image
    assert seen == ["tiled_decode"] and first.size == size
    seen.clear()
    assert tool.draw("the pot, later", kind="continue", references=[first], seed=3).image.size == size
    assert "tiled_encode" in seen and "tiled_decode" in seen
    # Off by default; refused where the server decodes.
    assert not CosmosImageTool.from_spec(
        spec.model_copy(update={"vae_tiling": False}), models_dir
    ).text2image.vae.use_tiling
    with pytest.raises(ValueError, match="vae_tiling applies to local"):
        ImageSpec(backend="openai-images", base_url="http://127.0.0.1:9/v1", vae_tiling=True)
    assert load_preset("qwen2.5-vl-7b+cosmos2-2b-24gb").image.vae_tiling


@pytest.mark.parametrize("tiled", [False, True])
@pytest.mark.parametrize("n_refs", [1, 3])
def test_video2world_encodes_only_its_conditioning_frames_and_draws_what_diffusers_draws(
    models_dir, monkeypatch, n_refs, tiled
) -> None:
    """Our Video2World pipeline sends only the conditioning frames (1, or 5 for 2-5 references) through
    the VAE encoder, where diffusers' pads them to the whole clip first, and its picture is diffusers'
    to the bit: the same clip, seed and settings through the stock ``Cosmos2VideoToWorldPipeline`` built
    from the same modules."""
    import torch
    from diffusers import Cosmos2VideoToWorldPipeline

    spec = load_preset("tiny").image.model_copy(update={"references": None, "vae_tiling": tiled})
    tool = CosmosImageTool.from_spec(spec, models_dir)
    vae = tool.video2world.vae
    if tiled:  # tiles of 32 make the tiny pictures tile (Wan's own are 256 pixels)
        vae.enable_tiling(
            tile_sample_min_height=32,
            tile_sample_min_width=32,
            tile_sample_stride_height=24,
            tile_sample_stride_width=24,
        )
    encoded: list[int] = []
    real_encode = vae.encode
    monkeypatch.setattr(vae, "encode", lambda x, *a, **k: encoded.append(x.shape[2]) or real_encode(x, *a, **k))
    rng = np.random.default_rng(n_refs)
    refs = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(n_refs)]

    ours = tool.draw("the pot, later", kind="continue", references=refs, seed=5)
    frames, num_frames, index = conditioning_frames(
        refs, spec.horizon_frames, tool.video2world.vae_scale_factor_temporal
    )
    assert encoded == [len(frames)] and num_frames > len(frames) + 3  # the padded clip would be longer

    encoded.clear()
    stock = Cosmos2VideoToWorldPipeline(**tool.video2world.components)
    stock.set_progress_bar_config(disable=True)
    out = stock(video=frames, num_frames=num_frames, fps=spec.fps, **tool._common("the pot, later", 5, None))
    assert encoded == [num_frames]  # diffusers encodes the whole padded clip
    assert np.array_equal(np.asarray(ours.image), np.asarray(out.frames[0][index].convert("RGB")))
    # To the bit before the 8-bit picture too: the denoised latents of both pipelines.
    latents = [
        pipe(video=frames, num_frames=num_frames, fps=spec.fps, output_type="latent", **tool._common("later", 5, None))
        for pipe in (tool.video2world, stock)
    ]
    assert torch.equal(latents[0].frames, latents[1].frames)
