"""User input checked before any work (issue 14, findings 7, 8, 11 and 12)."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import pytest
from markdown_it import MarkdownIt

from duogen_agents.cli import main
from duogen_agents.errors import ConfigError
from duogen_agents.export import to_markdown
from duogen_agents.presets import load_preset
from duogen_agents.sessions import Session, Sessions
from duogen_agents.storage.database import Database, check_session_id
from tests.security.helpers import DONE, OK, image, make_session, one_line, scripted_agent

# ---- 7. session ids ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["abc\n", "", "abc\r\n", "-abc", "a" * 65, "a/b", "../x", "a b"])
def test_bad_session_ids_are_refused(bad, home, tmp_path, capsys) -> None:
    with pytest.raises(ConfigError, match="invalid session id"):
        check_session_id(bad)
    agent = scripted_agent(home, [])
    with Database.open(f"sqlite:///{tmp_path / 'd.db'}", home=home) as db:
        with pytest.raises(ConfigError, match="invalid session id"):
            Session(agent, Sessions(db, agent.store), bad)
    code = main(["run", f"--session={bad}", "hello", "--db", f"sqlite:///{tmp_path / 'd.db'}"])
    assert code == 1 and "invalid session id" in one_line(capsys.readouterr().err)


# ---- 8. presets ----------------------------------------------------------------------------------

PRESETS = [
    ("p.toml", 'base = ["tiny"]', "base must be a preset name"),
    ("p.toml", "[base]\nname = 'tiny'", "base must be a preset name"),
    ("p.toml", b'base = "tiny"\nname = "caf\xe9"', "not UTF-8"),
    ("p.json", "[" * 50_000 + "]" * 50_000, "nested too deeply"),
    ("p.toml", 'base = "tiny"\nseed = 99999999999999999999', "seed"),
    ("p.toml", 'base = "tiny"\nseed = -1', "seed"),
    ("p.toml", 'base = "tiny"\n[image]\nsteps = true', "image.steps"),
    ("p.toml", 'base = "tiny"\n[image]\nsteps = 4.0', "image.steps"),
    ("p.json", '{"base": "tiny", "limits": {"check": 1}}', "limits.check"),
    ("p.json", '{"base": "tiny", "planner": {"max_new_tokens": "64"}}', "planner.max_new_tokens"),
]


@pytest.mark.parametrize("name, content, match", PRESETS)
def test_bad_preset_files_are_one_line_before_any_model(name, content, match, tmp_path, capsys, monkeypatch) -> None:
    from duogen_agents.agent import Agent

    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConfigError, match=match):
        load_preset(path)
    monkeypatch.setattr(Agent, "from_preset", classmethod(lambda *a, **k: pytest.fail("models were loaded")))
    code = main(["run", "hello", "--preset", str(path)])
    line = one_line(capsys.readouterr().err)
    assert code == 1 and match.split(".")[0] in line and "internal error" not in line


def test_good_preset_values_still_load(tmp_path) -> None:
    path = tmp_path / "ok.toml"
    path.write_text('base = "tiny"\nseed = 2147483647\nmodels_dir = "/srv/models"\n[image]\nguidance = 4\nsteps = 3\n')
    preset = load_preset(path)
    assert (preset.seed, preset.image.steps, preset.image.guidance) == (2147483647, 3, 4.0)
    assert str(preset.models_path(tmp_path)) == "/srv/models"


def test_models_may_live_outside_the_data_dir(tmp_path, monkeypatch) -> None:
    preset = load_preset("tiny")
    monkeypatch.delenv("DUOGEN_MODELS", raising=False)
    assert preset.models_path(tmp_path) == tmp_path / "models"
    monkeypatch.setenv("DUOGEN_MODELS", str(tmp_path / "big-disk"))
    assert preset.models_path(tmp_path) == tmp_path / "big-disk"


# ---- 11. validation before the work ---------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--out", "/proc/duogen-out"], "--out /proc/duogen-out"),
        (["--out", "FILE/sub"], "is not a folder"),
        (["--seed", "99999999999999999999"], "seed"),
        (["--seed", "-5"], "seed"),
        (["--prompt-too-long"], "20,000"),
    ],
)
def test_bad_input_is_refused_before_models_load_and_nothing_is_stored(
    extra, match, db_url, home, tmp_path, capsys, monkeypatch
) -> None:
    from duogen_agents.agent import Agent

    make_session(db_url, home, "garden")
    (tmp_path / "FILE").write_text("x")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(Agent, "from_preset", classmethod(lambda *a, **k: pytest.fail("models were loaded")))
    prompt = "x" * 20_001 if extra == ["--prompt-too-long"] else "follow up"
    extra = [] if extra == ["--prompt-too-long"] else extra
    code = main(["run", "--session", "garden", prompt, *extra, "--db", db_url])
    line = one_line(capsys.readouterr().err)
    assert code == 1 and match in line, line
    with Database.open(db_url, home=home) as db:
        assert [t.prompt for t in Sessions(db, None).turns("garden")] == ["Plan a small balcony garden"]  # type: ignore[arg-type]


def test_python_api_checks_seed_and_prompt_first(home) -> None:
    agent = scripted_agent(home, [])
    for kwargs, match in [({"seed": 2**40}, "seed"), ({"seed": True}, "seed"), ({}, "20,000")]:
        prompt = "x" * 20_001 if not kwargs else "hi"
        with pytest.raises(ConfigError, match=match):
            agent.run(prompt, **kwargs)
    assert agent.planner.calls == []


# ---- 12. Markdown exports are safe to open in any viewer ------------------------------------------

ATTACKS = [
    "<script>alert(1)</script>",
    '<img src=x onerror="alert(1)">',
    "[click](javascript:alert(1))",
    "[click](JaVaScRiPt\\:alert(1))",
    "[click](javascript&#58;alert(1))",
    "![x](data:text/html;base64,PHNjcmlwdD4=)",
    "<a href='vbscript:msgbox(1)'>x</a>",
    "[ref]\n\n[ref]: javascript:alert(1)",
]


def test_markdown_export_escapes_html_and_script_links(db_url, home, tmp_path) -> None:
    attack = "\n\n".join(ATTACKS)
    script = [{"type": "text", "text": attack}, image(attack[:30]), OK, DONE]
    make_session(db_url, home, "xss", script=script)
    with Database.open(db_url, home=home) as db:
        sessions = Sessions(db, scripted_agent(home, []).store)
        # The user's prompt goes into the export too.
        doc = sessions.document("xss").model_copy(update={"title": "<script>t()</script>"})
        md = to_markdown(doc)
        exported = sessions.export("xss", "md", tmp_path / "x.md")
    for text in (md, exported.read_text()):
        # Render as a permissive viewer would (raw HTML on), then look at the elements it made.
        found = _Elements()
        found.feed(MarkdownIt("commonmark", {"html": True}).render(text))
        assert found.tags <= {"h1", "p", "img", "a", "em", "strong", "blockquote"}, found.tags
        for tag, attrs in found.elements:
            assert not any(name.startswith("on") for name, _ in attrs), (tag, attrs)
            for name, value in attrs:
                if name in ("href", "src"):
                    scheme = "".join((value or "").split()).lower().split(":")[0]
                    assert scheme not in ("javascript", "vbscript", "data", "file"), (tag, name, value)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in md  # shown as text, not dropped


class _Elements(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, list[tuple[str, str | None]]]] = []

    @property
    def tags(self) -> set[str]:
        return {tag for tag, _ in self.elements}

    def handle_starttag(self, tag, attrs) -> None:
        self.elements.append((tag, attrs))


def test_markdown_keeps_ordinary_markdown(home) -> None:
    from duogen_agents.export import safe_markdown

    text = "## Step 1\n\n- **Water** the [pots](https://example.com/a?b=1&c=2)\n- data: 3 & 4"
    rendered = MarkdownIt("commonmark").render(safe_markdown(text))
    assert "<h2>Step 1</h2>" in rendered and "<strong>Water</strong>" in rendered
    assert 'href="https://example.com/a?b=1&amp;c=2"' in rendered and "data: 3 &amp; 4" in rendered


def test_json_export_keeps_the_text_verbatim(db_url, home) -> None:
    make_session(db_url, home, "raw", script=[{"type": "text", "text": "<b>x</b>"}, DONE])
    with Database.open(db_url, home=home) as db:
        body = Sessions(db, scripted_agent(home, []).store).export("raw", "json", None)
    assert any(b.get("text") == "<b>x</b>" for b in json.loads(str(body))["blocks"])
