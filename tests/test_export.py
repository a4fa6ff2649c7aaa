from __future__ import annotations

import base64
import re

import pytest

from duogen_agents import StorageError
from duogen_agents.export import to_markdown, write_document


def test_html_shows_images_in_document_order(tiny_agent, tmp_path) -> None:
    doc = tiny_agent.run("How do I repot a plant?", mode="visual-plan", seed=6)
    assert len(doc.images) >= 2
    write_document(doc, tiny_agent.store, tmp_path / "out")
    page = (tmp_path / "out" / "document.html").read_text()
    ids = re.findall(r'data-image-id="([0-9a-f]{64})"', page)
    assert ids == [b.image.id for b in doc.images]
    datas = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert [base64.b64decode(d) for d in datas] == [tiny_agent.store.read_bytes(b.image) for b in doc.images]
    # Text and images interleave in the page exactly as in the document.
    order = re.findall(r'<(section class="text"|figure class="(?:image|draft)")', page)
    assert ["text" if o.startswith("section") else "image" for o in order] == [b.type for b in doc.blocks]
    assert 'src="http' not in page, "self-contained: no external resources"
    md = (tmp_path / "out" / "document.md").read_text()
    assert re.findall(r"images/([0-9a-f]{64})\.png", md) == ids
    assert sorted(p.name for p in (tmp_path / "out" / "images").iterdir()) == sorted({f"{i}.png" for i in ids})
    assert (tmp_path / "out" / "document.json").read_text().startswith("{")


def test_model_html_is_escaped(tiny_agent, tmp_path) -> None:
    from duogen_agents import InterleavedDocument
    from duogen_agents.export import to_html

    doc = InterleavedDocument(
        prompt="<script>",
        mode="interleaved",
        preset="x",
        blocks=[{"type": "text", "text": "<img src=x onerror=alert(1)> **bold**"}],
    )
    page = to_html(doc, tiny_agent.store)
    assert "<img src=x" not in page and "&lt;img" in page and "<strong>bold</strong>" in page
    assert "<script>" not in page


def test_exports_embed_no_image_from_elsewhere(tiny_agent) -> None:
    """Model text with a Markdown image (a tracking pixel) fetches nothing when the export is viewed."""
    from duogen_agents import InterleavedDocument
    from duogen_agents.export import to_html, to_markdown

    text = "see ![p](https://evil.example/p.png) and ![r][ref]\n\n[ref]: https://evil.example/r.png"
    doc = InterleavedDocument(prompt="x", mode="interleaved", preset="x", blocks=[{"type": "text", "text": text}])
    page = to_html(doc, tiny_agent.store)
    assert "evil.example" in page and "<img" not in page.split("<main", 1)[-1].replace('<img src="data:', "")
    assert "![p](https://evil" not in to_markdown(doc) and "![r][ref]" not in to_markdown(doc)


def test_failed_write_leaves_nothing(tiny_agent, tmp_path, monkeypatch) -> None:
    doc = tiny_agent.run("Plan a picnic", mode="visual-plan", seed=7)
    calls = {"n": 0}
    real = tiny_agent.store.read_bytes

    def flaky(ref):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(ref)

    monkeypatch.setattr(tiny_agent.store, "read_bytes", flaky)
    with pytest.raises(StorageError, match="No space left"):
        write_document(doc, tiny_agent.store, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_drafts_are_marked(tiny_agent) -> None:
    doc = tiny_agent.run("Sketch first", mode="draft", seed=1)
    md = to_markdown(doc)
    assert "Draft sketch" in md and "random weights" in md
