from __future__ import annotations

import pytest

from duogen_agents import ConfigError, load_preset
from duogen_agents.presets import BUILTIN


def test_builtin_presets_validate_and_name_public_checkpoints() -> None:
    real = [p for p in BUILTIN.values() if not p.is_tiny and not p.is_shipped]
    assert len(real) >= 2
    families = set()
    for p in real:
        assert "/" in p.planner.model and p.gpu_memory_gb
        families.add(p.image.family)
        if p.image.family == "cosmos2":
            assert p.image.text2image.startswith("nvidia/Cosmos-Predict2")
            assert p.image.video2world.startswith("nvidia/Cosmos-Predict2")
        else:
            assert p.image.model == "black-forest-labs/FLUX.2-klein-4B"
    assert families == {"cosmos2", "flux2-klein"}


def test_image_spec_needs_its_familys_checkpoints(tmp_path) -> None:
    f = tmp_path / "p.toml"
    f.write_text('base = "tiny"\n[image]\nfamily = "flux2-klein"\nmodel = ""\n')
    with pytest.raises(ConfigError, match="flux2-klein family needs a model"):
        load_preset(f)
    f.write_text('base = "tiny-flux2"\n[image]\nfamily = "cosmos2"\n')
    with pytest.raises(ConfigError, match="cosmos2 family needs text2image and video2world"):
        load_preset(f)


def test_toml_preset_with_base(tmp_path) -> None:
    f = tmp_path / "mine.toml"
    f.write_text('base = "tiny"\n[image]\nsteps = 2\n[limits]\nmax_images = 1\n')
    p = load_preset(f)
    assert p.name == "mine" and p.image.steps == 2 and p.limits.max_images == 1
    assert p.planner.model == "tiny:qwen2_5_vl"


def test_a_file_that_moves_a_base_to_another_family_drops_that_familys_switches(tmp_path) -> None:
    # The compiled Cosmos presets turn on image.cfg_batch, which only the cosmos2 family takes: a file
    # that keeps the family keeps it, one that moves to FLUX.2 klein loads without it, and one that asks
    # for it on FLUX.2 klein is refused.
    base = 'base = "qwen2.5-vl-7b+cosmos2-2b"\n[image]\n'
    f = tmp_path / "p.toml"
    f.write_text(base + "steps = 20\n")
    assert load_preset(f).image.cfg_batch is True
    f.write_text(base + 'family = "flux2-klein"\nmodel = "black-forest-labs/FLUX.2-klein-4B"\n')
    p = load_preset(f)
    assert p.image.family == "flux2-klein" and p.image.cfg_batch is False and p.image.steps == 35
    f.write_text(base + 'family = "flux2-klein"\nmodel = "black-forest-labs/FLUX.2-klein-4B"\ncfg_batch = true\n')
    with pytest.raises(ConfigError, match="cfg_batch applies to the local cosmos2 family only"):
        load_preset(f)


def test_json_preset(tmp_path) -> None:
    f = tmp_path / "p.json"
    f.write_text(BUILTIN["tiny"].model_dump_json())
    assert load_preset(f) == BUILTIN["tiny"]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('base = "tiny"\n[image]\nheight = 30\n', "image.height: .*multiple of 16"),
        ('base = "tiny"\n[planner]\nbogus = 1\n', "planner.bogus"),
        ("not = [valid", "not valid TOML"),
        ('base = "nope"\n', "unknown base preset"),
    ],
)
def test_bad_preset_files(tmp_path, content, match) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(content)
    with pytest.raises(ConfigError, match=match):
        load_preset(f)


def test_unknown_preset_name() -> None:
    with pytest.raises(ConfigError, match="unknown preset 'nope'; choose one of: tiny"):
        load_preset("nope")


def test_the_compile_switches_are_on_where_a_gpu_measured_them() -> None:
    """Planner decode (Qwen2.5-VL) and DiT blocks (Cosmos-Predict2) compiled on the real presets of
    the classes measured faster on an H200; off with offload (a CUDA graph keeps weight addresses),
    off for the classes not measured (Qwen3-VL planners, FLUX.2 klein), off on the tiny presets."""
    on = {
        name: (p.planner.compile, p.image.compile)
        for name, p in ((n, load_preset(n)) for n in BUILTIN)
        if name != "shapes"
    }
    assert on["qwen2.5-vl-7b+cosmos2-2b"] == (True, True)
    assert on["qwen2.5-vl-3b+cosmos2-2b-fast"] == (True, True)
    assert on["qwen2.5-vl-3b+flux2-klein-4b"] == (True, False)
    assert on["qwen3-vl-8b+cosmos2-2b"] == (False, True)
    assert on["qwen3-vl-8b+flux2-klein-4b"] == (False, False)
    assert on["qwen2.5-vl-7b+cosmos2-2b-24gb"] == (False, False)
    assert on["tiny"] == (False, False)


def test_model_folders_named_relative_to_the_preset_file_are_read_from_beside_it(tmp_path, monkeypatch) -> None:
    """A ``duogen train`` run's or a shipped folder's ``preset.json`` names its models relative to
    itself; loaded by path from anywhere, it must not send "planner" to the model hub."""
    from duogen_agents.presets import SHIPPED

    monkeypatch.chdir(tmp_path)
    shipped = SHIPPED / "shapes" / "preset.json"
    if shipped.is_file():
        by_path, builtin = load_preset(shipped), load_preset("shapes")
        assert by_path.planner.model == builtin.planner.model and by_path.image.model == builtin.image.model
    run = tmp_path / "run"
    (run / "planner").mkdir(parents=True)
    (run / "preset.toml").write_text('base = "tiny"\n[planner]\nmodel = "planner"\n[image]\ntext2image = "not-here"\n')
    preset = load_preset(run / "preset.toml")
    assert preset.planner.model == str((run / "planner").resolve())
    assert preset.image.text2image == "not-here"  # not beside the file: left as written (a hub id, say)
    assert load_preset("tiny").planner.model.startswith("tiny:")
    # a remote section's model is the name its server serves, even where a folder of that name is beside
    (run / "remote.toml").write_text(
        'base = "tiny"\n[planner]\nbackend = "openai"\nbase_url = "http://127.0.0.1:8000/v1"\nmodel = "planner"\n'
    )
    assert load_preset(run / "remote.toml").planner.model == "planner"
