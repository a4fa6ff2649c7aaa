"""``duogen``: the command line.

Heavy libraries (torch, transformers, diffusers, langgraph) are imported only inside commands, so
``duogen --help`` answers at once. Every error is one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from duogen_agents.errors import DuogenError

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _parser() -> argparse.ArgumentParser:
    from duogen_agents.presets import BUILTIN

    p = argparse.ArgumentParser(
        prog="duogen",
        description="Interleaved text-and-image generation: an MLLM planner and a DiT image tool in a LangGraph agent.",
    )
    p.add_argument("--version", action="version", version="duogen-agents 0.1.0")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="answer one prompt with text and images", description="Answer one prompt.")
    run.add_argument("prompt", help="what to answer; use - to read it from stdin")
    run.add_argument("--mode", default="interleaved", choices=["interleaved", "visual-plan", "draft"])
    run.add_argument("--preset", default="tiny", help=f"built-in ({', '.join(BUILTIN)}) or a .toml/.json file")
    run.add_argument("--image", action="append", default=[], metavar="FILE", help="attach an input image (repeatable)")
    run.add_argument("--out", type=Path, metavar="DIR", help="write document.md/.html/.json and images/ here")
    run.add_argument("--seed", type=int, default=None, help="seed for reproducible output")
    run.add_argument(
        "--home", type=Path, default=None, help="data directory (default: $DUOGEN_HOME or ~/.local/share/duogen)"
    )
    run.add_argument("--no-preview", action="store_true", help="print image paths without half-block previews")
    sub.add_parser("presets", help="list the built-in presets")
    return p


def _cmd_presets() -> int:
    from rich.console import Console
    from rich.table import Table

    from duogen_agents.presets import BUILTIN

    t = Table("preset", "planner", "image tool", "GPU memory", "description")
    for name, p in BUILTIN.items():
        mem = f"~{p.gpu_memory_gb:.0f} GB" if p.gpu_memory_gb else "CPU"
        t.add_row(name, p.planner.model, p.image.text2image, mem, p.description)
    Console().print(t)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markdown import Markdown
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from duogen_agents.errors import ConfigError
    from duogen_agents.presets import load_preset
    from duogen_agents.storage.inputs import load_input_image

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    # Validate everything cheap before loading any model.
    if not prompt.strip():
        raise ConfigError('the prompt is empty; say what you want, e.g. duogen run "How do I repot a plant?"')
    preset = load_preset(args.preset)
    for path in args.image:
        load_input_image(path)
    out = Console()
    err = Console(stderr=True)
    if preset.is_tiny:
        err.print(f"[yellow]note:[/] preset {preset.name!r} uses random weights: its words and pictures are noise.")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise DuogenError(f"--out {args.out} exists and is not a folder")

    from duogen_agents.agent import Agent
    from duogen_agents.render_terminal import HalfBlockImage

    with err.status(f"loading preset {preset.name}..."):
        agent = Agent.from_preset(preset, home=args.home)
    progress: Progress | None = None
    task = None
    doc = None
    try:
        for event in agent.stream(prompt, mode=args.mode, images=args.image, seed=args.seed):
            kind = event["event"]
            if kind == "plan":
                out.print(Markdown(f"# {event['title']}"))
            elif kind == "text":
                out.print(Markdown(event["text"]))
            elif kind == "image_start":
                label = "draft" if event["origin"] == "draft" else "image"
                progress = Progress(
                    TextColumn(f"{label} {event['index']}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TextColumn("steps"),
                    TimeElapsedColumn(),
                    console=err,
                    transient=True,
                )
                progress.start()
                task = progress.add_task("render", total=agent.preset.image.steps)
            elif kind == "image_progress" and progress is not None and task is not None:
                progress.update(task, completed=event["step"], total=event["total"])
            elif kind in ("image_ready", "image_rejected") and progress is not None:
                progress.stop()
                progress = None
                if kind == "image_ready":
                    label = "Draft sketch" if event["origin"] == "draft" else "Image"
                    if not args.no_preview and out.is_terminal:
                        out.print(HalfBlockImage(agent.store.open(event["image"]["id"]), max_width=min(48, out.width)))
                    out.print(f"[dim]{label} {event['index']}: {event['path']}[/]", highlight=False, soft_wrap=True)
                else:
                    err.print(f"[dim]redrawing: the check said {event['note']!r}[/]", highlight=False)
            elif kind == "document":
                doc = event["document"]
    finally:
        if progress is not None:
            progress.stop()
    assert doc is not None
    if args.out is not None:
        agent.save(doc, args.out)
        err.print(f"wrote {args.out}/document.md, document.html, document.json and {len(doc.images)} image(s)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        if args.command == "presets":
            return _cmd_presets()
        return _cmd_run(args)
    except DuogenError as e:
        print(f"duogen: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("duogen: interrupted; no output was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # a bug: still one line, with a way to see more
        if os.environ.get("DUOGEN_DEBUG"):
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        print(
            f"duogen: internal error: {type(e).__name__}: {first} (set DUOGEN_DEBUG=1 for a traceback)", file=sys.stderr
        )
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
