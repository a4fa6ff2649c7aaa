"""``report.html``: one self-contained page for an evaluation (or a comparison of several).

At the top a table of each run's mean score per axis and a bar chart of the same (inline SVG); then
the judge's prompts, quoted; then per task the prompt, each run's answer with its images inline, the
ground truth where there is one, and the scores with their reasons. Everything is escaped.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from duogen_agents.eval.scoring import AXES
from duogen_agents.storage.images import write_atomic


def run_label(name: str) -> str:
    """A run as a report names it: a preset file by its file name (its path stays in results.json)."""
    return Path(name).name if "/" in name or "\\" in name else name


BAR_COLORS = ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#eeca3b", "#9d755d")
CHART_HEIGHT = 160
BAR_WIDTH = 14
STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:70rem;margin:2rem auto;padding:0 1rem;line-height:1.45}"
    "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.25rem .5rem;text-align:right}"
    "th:first-child,td:first-child{text-align:left}.partial{background:#fde2e2;padding:.5rem 1rem}"
    "section.task{border-top:1px solid #ddd;margin-top:1.5rem}.answer{display:flex;flex-wrap:wrap;gap:.5rem;"
    "align-items:flex-start}.answer img,.truth img{width:128px;image-rendering:pixelated;border:1px solid #ccc}"
    "blockquote{color:#444;border-left:3px solid #ccc;margin:.5rem 0;padding-left:.75rem;white-space:pre-wrap}"
    ".err{color:#a00}small{color:#666}"
)


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _img(path: Path) -> str:
    try:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
    except OSError:
        return f"<small>(missing image {path.name})</small>"
    return f'<img src="data:image/png;base64,{data}" alt="{_esc(path.stem[:12])}">'


def _png(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode("ascii")}" alt="ground truth">'


def _fmt(v: Any) -> str:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return f"{v:.2f}"
    return "-" if v is None else _esc(v)


SCORED_ON = ("bench", "seed", "limit", "judge")


def _table(runs: list[dict[str, Any]]) -> str:
    on = list(SCORED_ON) if any("scored_on" in r for r in runs) else []  # a comparison's runs
    head = "".join(f"<th>{a}</th>" for a in AXES)
    rows = []
    for r in runs:
        s = r.get("summary") or {}
        errors = f" <small class=err>({_esc(r.get('errors'))} failed)</small>" if r.get("errors") else ""
        if r.get("judge_errors"):
            errors += f" <small class=err>(judge failed on {_esc(r.get('judge_errors'))})</small>"
        partial = " <small class=err>(partial)</small>" if r.get("partial") else ""
        n = len(r.get("tasks", []))
        count = f"{n} of {_esc(r['of'])}" if r.get("of") not in (None, n) else str(n)
        rows.append(
            f"<tr><td>{_esc(run_label(r['preset']))}{errors}{partial}</td>"
            + "".join(f"<td>{_fmt(s.get(a))}</td>" for a in AXES)
            + f"<td>{count}</td><td>{_esc(r.get('seconds', 0))}</td>"
            + "".join(f"<td>{_fmt_on((r.get('scored_on') or {}).get(k))}</td>" for k in on)
            + "</tr>"
        )
    extra = "".join(f"<th>{k}</th>" for k in on)
    return f"<table><tr><th>run</th>{head}<th>tasks</th><th>seconds</th>{extra}</tr>{''.join(rows)}</table>"


def _fmt_on(v: Any) -> str:
    return "-" if v is None else _esc(v)


def _chart(runs: list[dict[str, Any]]) -> str:
    """Grouped bars: one group per axis, one bar per run (scores in [0, 1])."""
    group = BAR_WIDTH * max(1, len(runs)) + 24
    width = group * len(AXES) + 40
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{CHART_HEIGHT + 40}" role="img">']
    parts.append(f'<line x1="30" y1="{CHART_HEIGHT}" x2="{width}" y2="{CHART_HEIGHT}" stroke="#999"/>')
    for tick in (0.0, 0.5, 1.0):
        y = CHART_HEIGHT - tick * (CHART_HEIGHT - 10)
        parts.append(f'<text x="0" y="{y + 4:.0f}" font-size="10">{tick:.1f}</text>')
    for i, axis in enumerate(AXES):
        x0 = 34 + i * group
        for j, r in enumerate(runs):
            v = (r.get("summary") or {}).get(axis)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
            h = max(0.0, min(1.0, float(v))) * (CHART_HEIGHT - 10) if ok else 0.0
            color = BAR_COLORS[j % len(BAR_COLORS)]
            parts.append(
                f'<rect x="{x0 + j * BAR_WIDTH}" y="{CHART_HEIGHT - h:.1f}" width="{BAR_WIDTH - 2}" height="{h:.1f}" '
                f'fill="{color}"><title>{_esc(run_label(r["preset"]))}: {axis} {_fmt(v)}</title></rect>'
            )
        parts.append(f'<text x="{x0}" y="{CHART_HEIGHT + 14}" font-size="11">{axis}</text>')
    for j, r in enumerate(runs):
        color = BAR_COLORS[j % len(BAR_COLORS)]
        parts.append(
            f'<rect x="{34 + j * 150}" y="{CHART_HEIGHT + 24}" width="10" height="10" fill="{color}"/>'
            f'<text x="{48 + j * 150}" y="{CHART_HEIGHT + 33}" font-size="11">{_esc(run_label(r["preset"])[:24])}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _answer(task: dict[str, Any], images_dir: Path) -> str:
    from markdown_it import MarkdownIt

    # No raw HTML, and no Markdown images: the page stays self-contained (nothing fetched from elsewhere).
    md = MarkdownIt("commonmark", {"html": False}).disable("image")
    out = []
    for doc in task.get("documents", []):
        out.append('<div class="answer">')
        for block in doc.get("blocks", []):
            if block["type"] == "text":
                out.append(f"<div>{md.render(block['text'])}</div>")
            else:
                label = "draft" if block.get("origin") == "draft" else block.get("kind", "image")
                out.append(f"<figure>{_img(images_dir / (block['image']['id'] + '.png'))}<figcaption><small>"
                           f"{_esc(label)}: {_esc(block.get('prompt', ''))}</small></figcaption></figure>")  # fmt: skip
        out.append("</div>")
    return "".join(out)


def _truth(expect: dict[str, Any]) -> str:
    try:
        return _truth_panel(expect)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError):
        return "<p class=err>(the ground truth of this task is malformed)</p>"


def _truth_panel(expect: dict[str, Any]) -> str:
    if expect.get("world") != "shapes":
        return ""
    from duogen_agents.worlds.shapes import render, scene_from_json

    scenes = list(expect.get("scenes", []))
    for turn in expect.get("turns", []) or []:
        scenes += [s for s in turn.get("scenes", []) if s not in scenes]
    facts = ", ".join(str(f) for f in expect.get("facts", []))
    pics = "".join(_png(render(scene_from_json(s), size=96)) for s in scenes)
    return f'<div class="truth"><b>Ground truth</b> {pics}<br><small>facts: {_esc(facts or "-")}</small></div>'


def _task_sections(runs: list[dict[str, Any]], out_dir: Path) -> str:
    order: list[str] = []
    by_id: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    for r in runs:
        for t in r.get("tasks", []):
            if t["id"] not in by_id:
                order.append(t["id"])
            by_id.setdefault(t["id"], []).append((r, t))
    parts = []
    for task_id in order:
        entries = by_id[task_id]
        first = entries[0][1]
        prompts = "".join(f"<blockquote>{_esc(p)}</blockquote>" for p in first.get("prompts", []))
        parts.append(
            f'<section class="task"><h3>{_esc(task_id)} <small>{_esc(first.get("mode", ""))}</small></h3>{prompts}'
        )
        parts.append(_truth(first.get("expect") or {}))
        for r, t in entries:
            images_dir = Path(r.get("images_dir") or out_dir / "images")
            parts.append(f"<h4>{_esc(run_label(r['preset']))}</h4>")
            if t.get("status") != "ok":
                parts.append(f'<p class="err">failed: {_esc(t.get("error", ""))}</p>')
                continue
            try:
                parts.append(_answer(t, images_dir))
            except (KeyError, TypeError, AttributeError):
                parts.append("<p class=err>(this answer's record is malformed)</p>")
            if t.get("judge_error"):
                parts.append(f'<p class="err">the judge failed: {_esc(t["judge_error"])}</p>')
            rows = "".join(
                f"<tr><td>{_esc(a)}</td><td>{_fmt(v)}</td><td style='text-align:left'>{_esc((t.get('reasons') or {}).get(a, ''))}</td></tr>"
                for a, v in (t.get("scores") or {}).items()
            )
            parts.append(f"<table><tr><th>axis</th><th>score</th><th>reason</th></tr>{rows}</table>")
        parts.append("</section>")
    return "".join(parts)


def write_report(results: dict[str, Any], out_dir: Path, name: str = "report.html") -> Path:
    runs = results.get("runs", [])
    title = "duogen eval: " + ("comparison" if results.get("compare") else _esc(results.get("bench", "")))
    head = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{title}</title><style>{STYLE}</style></head><body>",
            f"<h1>{title}</h1>"]  # fmt: skip
    if results.get("partial"):
        head.append('<p class="partial">Partial: the run was interrupted; only the finished tasks are shown.</p>')
    meta = {k: results.get(k) for k in ("seed", "limit", "judge", "created") if results.get(k) is not None}
    if results.get("versions"):
        meta["versions"] = ", ".join(f"{k} {v}" for k, v in results["versions"].items())
    if results.get("compare"):
        meta["runs from"] = ", ".join(results["compare"])
    head.append("<p>" + "<br>".join(f"<b>{_esc(k)}</b>: {_esc(v)}" for k, v in meta.items()) + "</p>")
    if results.get("differ"):
        head.append(f'<p class="partial">These runs were scored on different {_esc(", ".join(results["differ"]))}: '
                    "their scores do not compare.</p>")  # fmt: skip
    head.append(_table(runs))
    head.append(_chart(runs))
    if results.get("bench_errors"):
        items = "".join(f"<li>line {e['line']}: {_esc(e['message'])}</li>" for e in results["bench_errors"])
        head.append(f"<h2>Malformed bench lines (skipped)</h2><ul>{items}</ul>")
    p = results.get("prompts")
    if p and results.get("judge"):
        axes = "".join(f"<li>{_esc(k)}: {_esc(v)}</li>" for k, v in p["axes"].items())
        head.append(f"<h2>Judge prompts</h2><blockquote>{_esc(p['system'])}</blockquote>"
                    f"<blockquote>{_esc(p['request'])}</blockquote><ul>{axes}</ul>")  # fmt: skip
    body = _task_sections(runs, out_dir)
    page = "".join(head) + body + "</body></html>\n"
    return write_atomic(out_dir / name, page.encode())
