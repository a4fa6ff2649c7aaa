"""Exports of an ``InterleavedDocument``: Markdown, one self-contained HTML page, and JSON.

``write_document`` writes ``document.md``, ``document.html``, ``document.json`` and ``images/*.png``
into a folder atomically: everything is written to a temporary folder first and moved into place
only when complete, so an error or Ctrl-C never leaves half-written files behind.
"""

from __future__ import annotations

import base64
import html
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from duogen_agents.document import ImageBlock, ImageRef, InterleavedDocument, TextBlock
from duogen_agents.errors import StorageError
from duogen_agents.storage.images import ImageStore, replaceable, write_atomic  # noqa: F401 (re-exported)

NOISE_NOTE = "Made with the tiny preset: random weights, so its words and pictures are noise."


def _is_noise(doc: InterleavedDocument) -> bool:
    return doc.preset.startswith("tiny")


def _caption(block: ImageBlock) -> str:
    label = "Draft sketch" if block.draft else "Image"
    return f"{label}: {block.prompt}"


# Link schemes that run code or smuggle content when a viewer follows them. A destination cannot
# hold spaces, so "javascript :" is no longer a link; ``&`` is escaped, so no entity spells a colon.
_UNSAFE_SCHEME = re.compile(r"(?i)\b(javascript|vbscript|data|file)\s*(\\?:)(?=\S)")


def safe_markdown(text: str) -> str:
    """Model or user text made safe for any Markdown viewer, keeping its Markdown: raw HTML is
    escaped (it shows as text), links cannot use a script or data scheme, and it embeds no image
    (``![x](https://...)`` would be fetched when the page is viewed: it shows as a link)."""
    text = _UNSAFE_SCHEME.sub(lambda m: f"{m.group(1)} {m.group(2)}", html.escape(text, quote=False))
    return text.replace("![", "!\\[")


def _destination(target: str) -> str:
    """A link destination CommonMark reads whole: a path with spaces or parentheses in ``<...>``
    (``my garden.images/x.png``, readable as it is); one with ``<``, ``>`` or a line break, which
    ``<...>`` cannot hold, percent-encoded."""
    from urllib.parse import quote

    if any(c in target for c in "<>\n\r"):
        return quote(target, safe="/:")
    return f"<{target}>" if any(c in target for c in " ()") else target


def to_markdown(
    doc: InterleavedDocument, image_dir: str = "images", *, link: Callable[[ImageRef], str] | None = None
) -> str:
    """Markdown with images linked as ``image_dir/<id>.png`` (or whatever ``link(ref)`` returns).
    Titles, prompts and model text go through ``safe_markdown``: no raw HTML, no script links."""
    lines: list[str] = []
    if doc.title:
        lines += [f"# {safe_markdown(' '.join(doc.title.split()))}", ""]
    if _is_noise(doc):
        lines += [f"> {NOISE_NOTE}", ""]
    for block in doc.blocks:
        if isinstance(block, TextBlock):
            lines += [safe_markdown(block.text), ""]
        else:
            alt = safe_markdown(_caption(block)).replace("[", "(").replace("]", ")").replace("\n", " ")
            target = link(block.image) if link is not None else f"{image_dir}/{block.image.filename}"
            lines += [f"![{alt}]({_destination(target)})", ""]
            if block.draft:
                lines += ["*Draft sketch: the agent drew this to think, not as part of the answer.*", ""]
    return "\n".join(lines).rstrip() + "\n"


def _markdown_html(text: str) -> str:
    from markdown_it import MarkdownIt

    # Raw HTML in model text is escaped, never passed through, and Markdown images are not rendered:
    # the page is self-contained (nothing is fetched from elsewhere when it is viewed).
    return MarkdownIt("commonmark", {"html": False}).disable("image").render(text)


def to_html(doc: InterleavedDocument, store: ImageStore) -> str:
    """One self-contained page: text and images (inline data URIs) in document order."""
    title = html.escape(doc.title or doc.prompt[:80] or "duogen document")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{title}</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:52rem;margin:2rem auto;padding:0 1rem;"
        "line-height:1.5}figure{margin:1.5rem 0}img{max-width:100%;image-rendering:auto;border-radius:6px}"
        "figure.draft img{opacity:.8;border:2px dashed #999}figcaption{color:#555;font-size:.9rem}"
        ".note{background:#fff4d6;padding:.5rem 1rem;border-radius:6px}</style>",
        "</head><body>",
        f'<header><p class="prompt"><strong>Prompt:</strong> {html.escape(doc.prompt)}</p></header>',
    ]
    if doc.title:
        parts.append(f"<h1>{html.escape(doc.title)}</h1>")
    if _is_noise(doc):
        parts.append(f'<p class="note">{html.escape(NOISE_NOTE)}</p>')
    for i, block in enumerate(doc.blocks):
        if isinstance(block, TextBlock):
            parts.append(f'<section class="text" data-block="{i}">{_markdown_html(block.text)}</section>')
        else:
            data = base64.b64encode(store.read_bytes(block.image)).decode("ascii")
            cls = "draft" if block.draft else "image"
            caption = html.escape(_caption(block))
            parts.append(
                f'<figure class="{cls}" data-block="{i}" data-image-id="{block.image.id}">'
                f'<img src="data:image/png;base64,{data}" alt="{caption}" '
                f'width="{block.image.width}" height="{block.image.height}">'
                f"<figcaption>{caption}</figcaption></figure>"
            )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def to_json(doc: InterleavedDocument) -> str:
    return doc.model_dump_json(indent=2) + "\n"


def write_document(doc: InterleavedDocument, store: ImageStore, out_dir: Path | str) -> list[Path]:
    """Write the three exports and the images into ``out_dir``; return the written paths."""
    out = Path(out_dir)
    for name in ("document.md", "document.html", "document.json"):
        replaceable(out / name)  # never replace a symlink, FIFO or device with our file
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".duogen-tmp-", dir=out))
    except OSError as e:
        raise StorageError(f"cannot create output folder {out}: {e.strerror or e}") from e
    written: list[Path] = []
    try:
        (tmp / "images").mkdir()
        files: dict[str, bytes] = {}
        for block in doc.images:
            files[f"images/{block.image.filename}"] = store.read_bytes(block.image)
        for img in doc.inputs:
            files[f"images/{img.filename}"] = store.read_bytes(img)
        files["document.json"] = to_json(doc).encode()
        files["document.md"] = to_markdown(doc).encode()
        files["document.html"] = to_html(doc, store).encode()
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        (out / "images").mkdir(exist_ok=True)
        # Images first, documents last: a document never points at an image that is not there.
        for name in sorted(files, key=lambda n: not n.startswith("images/")):
            os.replace(tmp / name, out / name)
            written.append(out / name)
    except OSError as e:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise StorageError(f"cannot write the document to {out}: {e.strerror or e}") from e
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written
