"""``duogen``: the command line.

Heavy libraries (torch, transformers, diffusers, langgraph) are imported only inside commands, so
``duogen --help`` answers at once. Every error is one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from duogen_agents.errors import DuogenError
from duogen_agents.interrupts import EXIT_INTERRUPTED, ctrl_c_twice_exits, sigterm_interrupts

EXIT_ERROR = 1
EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    from duogen_agents.presets import BUILTIN

    p = argparse.ArgumentParser(
        prog="duogen",
        description="Interleaved text-and-image generation: an MLLM planner and a DiT image tool in a LangGraph agent.",
    )
    p.add_argument("--version", action="version", version="duogen-agents 0.1.0")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="answer one prompt with text and images", description="Answer one prompt.")
    run.add_argument("prompt", nargs="?", help="what to answer; use - to read it from stdin")
    run.add_argument(
        "--mode",
        default=None,
        choices=["interleaved", "visual-plan", "draft"],
        help="default: the session's mode, else interleaved",
    )
    run.add_argument(
        "--preset",
        default=None,
        help=f"built-in ({', '.join(BUILTIN)}) or a .toml/.json file (default: $DUOGEN_PRESET, else tiny: noise)",
    )
    run.add_argument("--image", action="append", default=[], metavar="FILE", help="attach an input image (repeatable)")
    run.add_argument("--out", type=Path, metavar="DIR", help="write document.md/.html/.json and images/ here")
    run.add_argument("--seed", type=int, default=None, help="seed for reproducible output")
    run.add_argument(
        "--home", type=Path, default=None, help="data directory (default: $DUOGEN_HOME or ~/.local/share/duogen)"
    )
    run.add_argument("--no-preview", action="store_true", help="print image paths without half-block previews")
    run.add_argument("--session", metavar="ID", help="keep the conversation in session ID (created on first use)")
    run.add_argument("--resume", action="store_true", help="continue the session's interrupted turn")
    run.add_argument("--discard", action="store_true", help="drop the session's interrupted turn, then send")
    _db_args(run)
    sub.add_parser("presets", help="list the built-in presets")

    chat = sub.add_parser("chat", help="a terminal chat that streams interleaved answers")
    chat.add_argument("--session", metavar="ID", help="continue session ID (default: a new session)")
    chat.add_argument(
        "--preset", default=None, help="built-in preset or a .toml/.json file (default: $DUOGEN_PRESET, else tiny)"
    )
    chat.add_argument("--mode", default=None, choices=["interleaved", "visual-plan", "draft"])
    chat.add_argument("--images", default="auto", choices=["auto", "sixel", "kitty", "halfcell", "off"])
    _db_args(chat)

    ev = sub.add_parser(
        "eval",
        help="score presets on a bench (shapes or a JSONL file); compare runs; import published benches",
        description="Answer every task of a bench with each preset and score the answers: structure always; "
        "the shapes world exactly (detectors); other benches with --judge. Writes OUT/results.json and "
        "OUT/report.html.",
    )
    ev.add_argument("--bench", default=None, help="shapes (built in, the default) or a .jsonl file of tasks")
    ev.add_argument("--preset", action="append", default=[], help="a preset to run (repeatable; default: tiny)")
    ev.add_argument("--limit", type=int, default=None, metavar="N", help="the first N tasks")
    ev.add_argument("--seed", type=int, default=None, help="default 0")
    ev.add_argument("--out", type=Path, default=None, metavar="DIR", help="default eval-out (with --resume: its DIR)")
    ev.add_argument(
        "--resume", type=Path, default=None, metavar="DIR", help="continue the run in DIR (its options by default)"
    )
    ev.add_argument("--reference", action="store_true", help="also score the ground truth as an answer")
    ev.add_argument("--judge", default=None, help="a preset (its planner judges) or an OpenAI-compatible URL")
    ev.add_argument("--judge-model", default=None, help="the model name at the judge URL")
    ev.add_argument("--judge-key-env", default=None, metavar="VAR", help="environment variable holding the API key")
    ev.add_argument(
        "--home", type=Path, default=None, help="data directory (default: $DUOGEN_HOME or ~/.local/share/duogen)"
    )
    evsub = ev.add_subparsers(dest="eval_action", metavar="ACTION")
    cmp_ = evsub.add_parser("compare", help="put runs side by side: DIR/compare.html")
    cmp_.add_argument("dirs", nargs="+", type=Path)
    cmp_.add_argument("--out", type=Path, default=Path("eval-compare"), metavar="DIR")
    imp = evsub.add_parser("import", help="convert ISG-Bench, OpenING or UEval task files to the bench format")
    imp.add_argument("kind", choices=["isg", "opening", "ueval"])
    imp.add_argument("file", type=Path)
    imp.add_argument("--out", type=Path, required=True, metavar="FILE")
    imp.add_argument("--images-root", type=Path, default=None, metavar="DIR")
    imp.add_argument(
        "--copy-images",
        action="store_true",
        help="copy the images into FILE's folder (FILE-stem-images/, named by content), so FILE can be written anywhere",
    )

    tr = sub.add_parser(
        "train",
        help="DuoGen's training: pretrain (optional), stage1 (the planner), stage2 (DiT and connector)",
        description="DuoGen's two stages: stage1 instruction-tunes the planner on a data file (the bench "
        "format with expect.answer, e.g. written by duogen_agents.worlds.shapes.write_dataset); stage2 "
        "trains a VAE, then aligns a Cosmos DiT to the stage-1 planner's states through a connector. "
        "pretrain (optional, first) trains a from-scratch planner's language model on plain text. Each "
        "writes OUT/preset.json; see `duogen train STAGE --help`.",
    )
    trsub = tr.add_subparsers(dest="stage", metavar="STAGE", required=True)
    s1 = trsub.add_parser("stage1", help="fine-tune the planner; writes OUT/planner and OUT/preset.json")
    s1.add_argument("--base", required=True, help="a preset (name or file) or an earlier run's OUT folder")
    s1.add_argument("--data", required=True, type=Path, help="tasks.jsonl with expect.answer")
    s1.add_argument("--out", required=True, type=Path, metavar="DIR")
    s1.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    s1.add_argument("--batch", type=int, default=4, help="examples per optimizer step (default 4)")
    s1.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    s1.add_argument("--warmup", type=int, default=10, help="steps of linear warm-up (default 10)")
    s1.add_argument("--seed", type=int, default=0, help="seed of the data order and initial weights (default 0)")
    s1.add_argument("--save-every", type=int, default=50, metavar="N", help="checkpoint every N steps")
    s1.add_argument("--lora-rank", type=int, default=0, metavar="R", help="train LoRA adapters of rank R (peft)")
    s1.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUT")
    s1.add_argument(
        "--home", type=Path, default=None, help="data directory (default: $DUOGEN_HOME or ~/.local/share/duogen)"
    )

    pt = trsub.add_parser(
        "pretrain",
        help="language-model pretraining of a from-scratch planner on plain text, before stage 1",
        description="Next-token prediction over every token of plain-text documents (JSONL, one "
        '{"text": ...} per line, e.g. written by duogen_agents.worlds.shapes.write_corpus). Writes '
        "OUT/planner and OUT/preset.json; pass OUT as stage 1's --base.",
    )
    pt.add_argument("--base", required=True, help="a preset (name or file) or an earlier run's OUT folder")
    pt.add_argument("--text", required=True, type=Path, help='JSONL of {"text": ...} documents')
    pt.add_argument("--out", required=True, type=Path, metavar="DIR")
    pt.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    pt.add_argument("--batch", type=int, default=32, help="documents per optimizer step, one padded batch (default 32)")
    pt.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    pt.add_argument("--warmup", type=int, default=100, help="steps of linear warm-up (default 100)")
    pt.add_argument("--max-tokens", type=int, default=512, help="documents are cut to this many tokens")
    pt.add_argument("--seed", type=int, default=0, help="seed of the data order and initial weights (default 0)")
    pt.add_argument("--save-every", type=int, default=200, metavar="N", help="checkpoint every N steps")
    pt.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUT")
    pt.add_argument(
        "--home", type=Path, default=None, help="data directory (default: $DUOGEN_HOME or ~/.local/share/duogen)"
    )

    s2 = trsub.add_parser(
        "stage2", help="train a VAE, then a Cosmos DiT and a connector from the stage-1 planner's states"
    )
    s2.add_argument("--planner", required=True, type=Path, help="the OUT folder of `duogen train stage1`")
    s2.add_argument("--data", required=True, type=Path, help="tasks.jsonl with expect.answer")
    s2.add_argument("--out", required=True, type=Path, metavar="DIR")
    s2.add_argument("--steps", type=int, default=400, help="DiT and connector steps (default 400)")
    s2.add_argument("--vae-steps", type=int, default=200, help="VAE steps, first (default 200)")
    s2.add_argument("--batch", type=int, default=4, help="DiT examples per step (default 4)")
    s2.add_argument("--vae-batch", type=int, default=16, help="VAE pictures per step (default 16)")
    s2.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the DiT and connector (default 1e-3)")
    s2.add_argument("--vae-lr", type=float, default=1e-3)
    s2.add_argument("--warmup", type=int, default=100, help="steps of linear warm-up, each phase (default 100)")
    s2.add_argument(
        "--context",
        choices=["planner", "t5"],
        default="planner",
        help="the DiT's context: the planner's states over its prompt (DuoGen), or a frozen T5 over the prompt text",
    )
    s2.add_argument(
        "--regression",
        type=float,
        default=1.0,
        metavar="W",
        help="weight of the connector's regression loss (each query predicts its region of the target's latent) "
        "beside the DiT's loss; 0 trains the connector by the DiT's loss alone (default 1.0)",
    )
    s2.add_argument(
        "--vae-from", type=Path, default=None, metavar="DIR", help="reuse the VAE of an earlier stage 2 (its OUT)"
    )
    s2.add_argument(
        "--init",
        type=Path,
        default=None,
        metavar="DIR",
        help="start the DiT and connector from an earlier stage 2 (its OUT or aligned folder), with its VAE",
    )
    s2.add_argument("--size", type=int, default=64, help="picture side in pixels (a multiple of 16)")
    s2.add_argument("--seed", type=int, default=0, help="seed of the data order, noise and initial weights (default 0)")
    s2.add_argument("--save-every", type=int, default=50, metavar="N")
    s2.add_argument("--resume", action="store_true", help="continue from the last checkpoints in OUT")
    s2.add_argument(
        "--home", type=Path, default=None, help="data directory (default: $DUOGEN_HOME or ~/.local/share/duogen)"
    )

    ses = sub.add_parser("sessions", help="list, show, export, fork or delete sessions; gc the image store")
    ssub = ses.add_subparsers(dest="action", metavar="ACTION", required=True)
    _db_args(ssub.add_parser("list", help="list the sessions"))
    show = ssub.add_parser("show", help="print a session's turns")
    show.add_argument("id")
    _db_args(show)
    exp = ssub.add_parser("export", help="export a session as html, md or json")
    exp.add_argument("id")
    exp.add_argument("--format", default="html", choices=["html", "md", "json"])
    exp.add_argument(
        "--out", metavar="FILE", help="write here; a folder (or a path ending in /) gets ID.FORMAT (default: stdout)"
    )
    _db_args(exp)
    fork = ssub.add_parser("fork", help="copy a session to a new id")
    fork.add_argument("id")
    fork.add_argument("--as", dest="new_id", metavar="NEW_ID", help="the new session's id")
    _db_args(fork)
    delete = ssub.add_parser("delete", help="delete a session, its checkpoints and images no other session uses")
    delete.add_argument("id")
    _db_args(delete)
    gc = ssub.add_parser("gc", help="remove image files that no session references")
    gc.add_argument(
        "--grace", type=float, default=3600.0, metavar="SECONDS", help="keep files younger than this (default 3600)"
    )
    gc.add_argument(
        "--forget",
        metavar="NAME",
        help="first drop the database NAME (as gc's note names it) from the store's list of databases that share "
        "it, once that database is gone for good",
    )
    _db_args(gc)

    srv = sub.add_parser(
        "serve",
        help="serve the preset's models (OpenAI-compatible) and the agent's sessions over HTTP",
        description="An HTTP server: /v1/chat/completions, /v1/images/*, /v1/sessions/*, /health. "
        "Bearer tokens come from $DUOGEN_API_KEY (comma-separated); a non-loopback --host needs one.",
    )
    srv.add_argument(
        "--preset", default=None, help="built-in preset or a .toml/.json file (default: $DUOGEN_PRESET, else tiny)"
    )
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    srv.add_argument(
        "--queue", type=int, default=16, metavar="N", help="requests that may wait per model, 429 above (default 16)"
    )
    srv.add_argument("--turns", type=int, default=4, metavar="N", help="agent turns that run at once (default 4)")
    srv.add_argument("--max-body-mb", type=float, default=32.0, metavar="MB", help="request body limit (default 32)")
    srv.add_argument(
        "--cors-origin", action="append", default=[], metavar="ORIGIN", help="allow this browser origin (repeatable)"
    )
    srv.add_argument(
        "--grace",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="on shutdown, wait this long for running turns (default 30)",
    )
    srv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    _db_args(srv)

    mcp = sub.add_parser(
        "mcp",
        help="serve the agent as MCP tools (stdio or Streamable HTTP)",
        description="An MCP server: visual_plan, answer_with_images, continue_session, list_sessions, draw_image. "
        "HTTP serves /mcp; with $DUOGEN_API_KEY set every request needs 'Authorization: Bearer <key>', and a "
        "non-loopback --host needs one.",
    )
    mcp.add_argument(
        "--preset", default=None, help="built-in preset or a .toml/.json file (default: $DUOGEN_PRESET, else tiny)"
    )
    mcp.add_argument("--transport", default="stdio", choices=["stdio", "http"], help="default: stdio")
    mcp.add_argument("--host", default="127.0.0.1", help="http: address to bind (default 127.0.0.1)")
    mcp.add_argument("--port", type=int, default=8765, help="http: port (default 8765; 0: any free port)")
    _db_args(mcp)
    return p


def _db_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--db",
        metavar="URL",
        help="sqlite:///file or postgresql://... (default: $DUOGEN_DATABASE_URL, else SQLite in the data directory)",
    )
    if not any(a.dest == "home" for a in p._actions):
        p.add_argument(
            "--home", type=Path, default=None, help="data directory (default: $DUOGEN_HOME or ~/.local/share/duogen)"
        )
    p.add_argument(
        "--wait",
        type=float,
        nargs="?",
        const=float("inf"),
        default=None,
        metavar="SECONDS",
        help="if another process is writing the session, wait for it (for ever, or SECONDS)",
    )


def _cmd_presets() -> int:
    from rich.console import Console
    from rich.table import Column, Table

    from duogen_agents.presets import BUILTIN

    # The name is what a user types: never cut (the other columns wrap)
    t = Table(Column("preset", no_wrap=True), "planner", "image tool", "GPU memory", "description")
    for name, p in BUILTIN.items():
        mem = f"~{p.gpu_memory_gb:.0f} GB" if p.gpu_memory_gb else "CPU"
        t.add_row(name, p.planner.describe(), p.image.describe(), mem, p.description)
    Console().print(t)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from duogen_agents.errors import ConfigError
    from duogen_agents.inputs import load_input_image
    from duogen_agents.presets import load_preset
    from duogen_agents.validation import check_out_dir, check_prompt, check_seed

    # Validate everything cheap before loading any model.
    if args.resume and args.session is None:
        raise ConfigError("--resume needs --session ID")
    if args.resume and (args.prompt or args.image):
        raise ConfigError("--resume continues the interrupted turn; give no prompt or images with it")
    if args.discard and args.session is None:
        raise ConfigError("--discard needs --session ID")
    if args.resume and args.discard:  # before anything is touched: --discard would drop what --resume continues
        raise ConfigError("--resume continues the interrupted turn and --discard drops it; give one of them")
    if args.session is not None:
        from duogen_agents.storage.database import check_session_id

        check_session_id(args.session)
    check_seed(args.seed)
    prompt = ""
    if not args.resume:
        if args.prompt is None:
            raise ConfigError('give a prompt, e.g. duogen run "How do I repot a plant?" (or - to read stdin)')
        prompt = check_prompt(sys.stdin.read() if args.prompt == "-" else args.prompt)
    preset = load_preset(args.preset)
    if args.mode is not None and (problem := preset.mode_problem(args.mode)):
        raise ConfigError(problem)
    for path in args.image:
        load_input_image(path)
    if args.out is not None:
        check_out_dir(args.out)
    out = Console()
    err = Console(stderr=True)

    session = None
    db = None
    if args.session is not None:
        from duogen_agents.sessions import Sessions

        sessions = Sessions.open(args.db, home=args.home)
        db = sessions.db
        pending = sessions.last_turn(args.session)
        if args.resume:
            if not sessions.exists(args.session):
                from duogen_agents.errors import SessionNotFoundError

                raise SessionNotFoundError(f"no session {args.session!r}; `duogen sessions list` shows the sessions")
            if pending is None or pending.status not in ("running", "interrupted"):
                err.print(f"session {args.session!r} has nothing to resume: its last turn finished.")
                return 0
        with db.lock(args.session, wait=args.wait):  # fail fast, before loading the models
            if sessions.exists(args.session):
                sessions.state(args.session)  # a tampered checkpoint is refused here, not after the load
                if not (args.resume or args.discard) and sessions.unfinished_turn(args.session) is not None:
                    from duogen_agents.errors import SessionStateError

                    raise SessionStateError(
                        f"session {args.session!r} has an unfinished turn; resume it (--resume) or drop it and "
                        "send this message (--discard)"
                    )

    if preset.is_tiny:
        err.print(f"[yellow]note:[/] preset {preset.name!r} uses random weights: its words and pictures are noise.")
    from duogen_agents.agent import Agent

    with err.status(f"loading preset {preset.name}..."):
        agent = Agent.from_preset(preset, home=args.home)
    if args.session is not None:
        session = agent.session(args.session, database=db, wait=args.wait)
        if args.discard and session.cancel():
            err.print(f"dropped the interrupted turn of session {args.session!r}")
        if args.resume:
            events = session.resume()
        else:
            events = session.stream(prompt, mode=args.mode, images=args.image, seed=args.seed)
    else:
        events = agent.stream(prompt, mode=args.mode or "interleaved", images=args.image, seed=args.seed)
    try:
        doc = print_events(events, agent, out, err, preview=not args.no_preview)
    except KeyboardInterrupt:
        if args.session is not None:
            print(
                f"duogen: interrupted; the turn is kept: continue it with duogen run --session {args.session} --resume",
                file=sys.stderr,
            )
            return EXIT_INTERRUPTED
        raise
    if args.out is not None:
        agent.save(doc, args.out)
        err.print(f"wrote {args.out}/document.md, document.html, document.json and {len(doc.images)} image(s)")
    return 0


def print_events(events: Any, agent: Any, out: Any, err: Any, *, preview: bool = True) -> Any:
    """Print a turn's events (the chat's renderer: Markdown text, a progress bar per image on stderr,
    previews and paths); return its document."""
    from duogen_agents.terminal.events import EventRenderer

    mode = "halfcell" if preview and out.is_terminal else "off"
    return EventRenderer(
        out, status=err, open_image=agent.store.open, image_mode=mode, steps=agent.preset.image.steps
    ).render(events)


def _cmd_eval(args: argparse.Namespace) -> int:
    from rich.console import Console

    from duogen_agents.errors import ConfigError
    from duogen_agents.terminal.render import safe_text

    err = Console(stderr=True)
    if args.eval_action == "import":
        from duogen_agents.eval.importers import import_tasks, write_jsonl

        tasks, errors = import_tasks(args.kind, args.file, args.images_root)
        for e in errors:
            err.print(f"line {e.line}: {safe_text(e.message)}", highlight=False)
        write_jsonl(tasks, args.out, copy_images=args.copy_images)
        err.print(f"wrote {len(tasks)} task(s) to {args.out}" + (f"; {len(errors)} malformed" if errors else ""))
        return 0
    if args.eval_action == "compare":
        from duogen_agents.eval import compare

        merged = compare(args.dirs, args.out)
        _print_summary(merged, Console())
        if merged["differ"]:
            err.print(f"[yellow]warning[/]: these runs were scored on different {', '.join(merged['differ'])}: "
                      "their scores do not compare", highlight=False, soft_wrap=True)  # fmt: skip
        err.print(f"wrote {args.out}/compare.html")
        return 0
    from duogen_agents.eval import run_eval
    from duogen_agents.eval.judge import make_judge
    from duogen_agents.eval.runner import check_out, check_reference
    from duogen_agents.eval.tasks import load_bench
    from duogen_agents.presets import load_preset
    from duogen_agents.validation import check_out_dir, check_seed

    # Everything cheap first: no model loads for a bad option.
    if args.resume is not None:
        _resume_defaults(args)
    bench = args.bench or "shapes"
    seed = 0 if args.seed is None else args.seed
    if args.limit is not None and args.limit < 1:
        raise ConfigError("--limit must be at least 1")
    check_seed(seed)
    if args.resume is not None and args.out is not None and args.out.resolve() != args.resume.resolve():
        raise ConfigError(f"--resume {args.resume} writes to {args.resume}; leave out --out {args.out}")
    out = args.resume or args.out or Path("eval-out")
    check_out_dir(out)
    check_out(out, resume=args.resume is not None)
    presets = args.preset or [os.environ.get("DUOGEN_PRESET") or DEFAULT_PRESET]
    for p in presets:
        load_preset(p)
    if args.reference:  # before a judge's model loads
        name, tasks, _ = load_bench(bench, limit=args.limit, seed=seed)
        check_reference(name, tasks)
    judge = make_judge(args.judge, model=args.judge_model, api_key_env=args.judge_key_env, home=args.home)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bars = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err
    )
    ids: dict[str, Any] = {}

    def skipped(errors: list[Any]) -> None:
        for e in errors:
            err.print(f"[yellow]skipped[/] line {e.line}: {safe_text(e.message)}", highlight=False)

    def note(line: str) -> None:
        err.print(f"[yellow]note[/]: {safe_text(line)}", highlight=False, soft_wrap=True)

    def progress(run: str, done: int, total: int) -> None:
        if run not in ids:
            ids[run] = bars.add_task(run, total=total)
        bars.update(ids[run], completed=done)

    try:
        with sigterm_interrupts() as signalled, bars:
            results = run_eval(
                bench, presets, limit=args.limit, seed=seed, out=out, judge=judge,
                reference=args.reference, resume=args.resume is not None, home=args.home, progress=progress,
                on_skipped=skipped, on_note=note,
            )  # fmt: skip
    except KeyboardInterrupt:
        how = f"terminated ({signalled['signal']})" if signalled["terminated"] else "interrupted"
        if (out / "results.json").exists():
            print(f"duogen: {how}; the finished tasks are in {out}/results.json and {out}/report.html (partial; "
                  f"`duogen eval --resume {out}` continues)", file=sys.stderr)  # fmt: skip
        else:  # before any task finished (a judge probed, a bench or preset loading): nothing to continue
            print(f"duogen: {how} before any task finished; nothing was written to {out}", file=sys.stderr)
        return signalled["code"] if signalled["terminated"] else EXIT_INTERRUPTED
    _print_summary(results, Console())
    from duogen_agents.eval.report import run_label

    for run in results["runs"]:
        if run.get("judge_errors"):
            first = next(t["judge_error"] for t in run["tasks"] if t.get("judge_error"))
            err.print(f"[yellow]warning[/]: the judge failed on {run['judge_errors']} task(s) of "
                      f"{safe_text(run_label(run['preset']))}, whose judge axes are missing (the first: {safe_text(first)}); "
                      f"`duogen eval --resume {out}` answers and judges them again", highlight=False, soft_wrap=True)  # fmt: skip
    err.print(f"wrote {out}/results.json and {out}/report.html")
    return 0


def _resume_defaults(args: argparse.Namespace) -> None:
    """``--resume DIR`` continues the run in DIR with its options, unless the command line gives others."""
    import json

    from duogen_agents.errors import ConfigError

    f = args.resume / "results.json"
    try:
        old = json.loads(f.read_text())
        options = old["options"]
        for key in ("seed", "limit"):
            if options.get(key) is not None and (type(options[key]) is not int):
                raise ValueError(f"options.{key} is {options[key]!r}, not a whole number")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"cannot resume from {f}: {getattr(e, 'strerror', None) or e}") from None
    args.bench = args.bench or options.get("bench")
    args.seed = options.get("seed") if args.seed is None else args.seed
    args.limit = options.get("limit") if args.limit is None else args.limit
    args.preset = args.preset or list(options.get("presets") or [])
    args.reference = args.reference or bool(options.get("reference"))
    if args.judge is None and options.get("judge"):
        args.judge, args.judge_model = options["judge"], args.judge_model or options.get("judge_model")
        args.judge_key_env = args.judge_key_env or options.get("judge_key_env")


def _print_summary(results: dict[str, Any], console: Any) -> None:
    from rich.table import Column, Table

    from duogen_agents.eval.report import run_label
    from duogen_agents.eval.scoring import AXES
    from duogen_agents.terminal.render import safe_text

    judged = any(run.get("judge_errors") for run in results["runs"])  # a column only when the judge failed
    t = Table(
        Column("run", no_wrap=True, min_width=12), *AXES, "tasks", "failed", *(["judge failed"] if judged else [])
    )
    for run in results["runs"]:
        s = run.get("summary") or {}
        t.add_row(
            safe_text(run_label(run["preset"])), *("-" if s.get(a) is None else f"{s[a]:.2f}" for a in AXES),
            str(len(run["tasks"])), str(run.get("errors", 0)), *([str(run.get("judge_errors") or 0)] if judged else []),
        )  # fmt: skip
    console.print(t)
    if results.get("compare"):  # what each run was scored on
        on = Table(Column("run", no_wrap=True, min_width=12), "bench", "seed", "limit", "judge")
        for run in results["runs"]:
            o = run.get("scored_on") or {}
            on.add_row(safe_text(run_label(run["preset"])),
                       *(safe_text("-" if o.get(k) is None else str(o[k])) for k in ("bench", "seed", "limit", "judge")))  # fmt: skip
        console.print(on)


def _cmd_train(args: argparse.Namespace) -> int:
    try:
        return _train(args)
    except KeyboardInterrupt:
        from duogen_agents.training.loop import latest_checkpoint

        out = Path(args.out)
        runs = [out / "dit", out / "vae"] if args.stage == "stage2" else [out]
        ckpt = next((c for c in map(latest_checkpoint, runs) if c is not None), None)
        if ckpt is None:
            print("duogen: interrupted before the run's first checkpoint; run the same command to start again",
                  file=sys.stderr)  # fmt: skip
        else:
            again = shlex.join(["duogen", *args.argv, *([] if args.resume else ["--resume"])])
            print(f"duogen: interrupted; the run is kept up to its last checkpoint, {ckpt}: continue it with {again}",
                  file=sys.stderr)  # fmt: skip
        return EXIT_INTERRUPTED


def _train(args: argparse.Namespace) -> int:
    from duogen_agents.errors import ConfigError
    from duogen_agents.training.loop import TrainConfig
    from duogen_agents.training.stage1 import train_stage1
    from duogen_agents.validation import check_seed

    check_seed(args.seed)
    cfg = TrainConfig(
        steps=args.steps, batch=args.batch, lr=args.lr, warmup=args.warmup, seed=args.seed, save_every=args.save_every
    )
    if args.stage == "pretrain":
        from duogen_agents.training.pretrain import train_pretrain

        r0 = train_pretrain(
            args.base, args.text, args.out, cfg, max_tokens=args.max_tokens, resume=args.resume, home=args.home
        )
        print(
            f"pretrain: {r0.documents} documents, {r0.tokens} tokens; loss {r0.first_loss:.4f} -> {r0.last_loss:.4f} "
            f"(OUT/metrics.jsonl, OUT/loss.png)\nplanner: {r0.planner}\npreset:  {r0.preset} "
            f"(duogen train stage1 --base {args.out} ...)"
        )
        return 0
    if args.stage == "stage2":
        from duogen_agents.training.stage2 import train_stage2

        vae_cfg = TrainConfig(
            steps=args.vae_steps, batch=args.vae_batch, lr=args.vae_lr, warmup=args.warmup, seed=args.seed,
            save_every=args.save_every,
        )  # fmt: skip
        r2 = train_stage2(
            args.planner, args.data, args.out, cfg, vae_cfg, size=args.size, context=args.context,
            regression=args.regression, vae_from=args.vae_from, init=args.init, resume=args.resume, home=args.home,
        )  # fmt: skip
        print(
            f"stage 2: {r2.examples} pictures; "
            + (
                f"VAE loss {r2.vae_loss[0]:.4f} -> {r2.vae_loss[1]:.4f}; "
                if args.vae_from is None and args.init is None
                else "VAE reused; "
            )
            + f"DiT loss {r2.dit_loss[0]:.4f} -> {r2.dit_loss[1]:.4f} (OUT/vae, OUT/dit: metrics.jsonl, loss.png)"
            f"\naligned models: {r2.out / 'aligned'}\npreset:  {r2.preset}"
        )
        return 0
    if args.lora_rank < 0:
        raise ConfigError("--lora-rank must be 0 (full fine-tuning) or more")
    result = train_stage1(
        args.base, args.data, args.out, cfg, lora_rank=args.lora_rank, resume=args.resume, home=args.home
    )
    print(
        f"stage 1: {result.examples} planner calls; loss {result.first_loss:.4f} -> {result.last_loss:.4f} "
        f"(OUT/metrics.jsonl, OUT/loss.png)\nplanner: {result.planner}\npreset:  {result.preset} "
        f"(duogen run --preset {result.preset} ...)"
    )
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from duogen_agents.errors import ConfigError

    if not 0 < args.port < 65536 or args.queue < 0 or args.turns < 1 or args.max_body_mb <= 0 or args.grace < 0:
        raise ConfigError("--port 1-65535, --queue >= 0, --turns >= 1, --max-body-mb > 0 and --grace >= 0")
    try:
        from duogen_agents.serve.app import ServeSettings, serve
    except ImportError as e:
        raise ConfigError(
            f"duogen serve needs its extra ({e.name} is missing): pip install 'duogen-agents[serve]'"
        ) from e
    settings = ServeSettings(
        queue=args.queue, turns=args.turns, max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        cors_origins=tuple(args.cors_origin), grace_s=args.grace,
        session_wait_s=args.wait if args.wait is not None else 0.0,  # --wait alone: for ever
    )  # fmt: skip
    serve(
        args.preset, host=args.host, port=args.port, database=args.db,
        home=str(args.home) if args.home else None, settings=settings, log_level=args.log_level,
    )  # fmt: skip
    return 0


def _cmd_mcp(args: argparse.Namespace) -> int:
    from duogen_agents.serve.mcp import serve

    return serve(
        preset=args.preset, transport=args.transport, host=args.host, port=args.port, db=args.db, home=args.home,
        wait=args.wait,
    )  # fmt: skip


def _cmd_sessions(args: argparse.Namespace) -> int:
    from rich.console import Console

    from duogen_agents.sessions import Sessions
    from duogen_agents.terminal.render import safe_text

    out = Console()
    err = Console(stderr=True)
    sessions = Sessions.open(args.db, home=args.home)
    try:
        if args.action == "list":
            items = sessions.list()
            if not items:
                err.print('no sessions yet: start one with duogen run --session NAME "..."')
                return 0
            from duogen_agents.terminal.render import sessions_table

            if out.is_terminal:
                out.print(sessions_table(items, width=out.width))
            else:  # piped: whole rows, as wide as they are (a console's width caps what it prints)
                Console(width=100_000).print(sessions_table(items))
        elif args.action == "show":
            info = sessions.get(args.id)
            fork = f", forked from {info.parent_id}" if info.parent_id else ""
            out.print(
                f"[bold]{info.id}[/]: {safe_text(info.title or '')} ({info.turns} turns, {info.images} images"
                f"{safe_text(fork)})"
            )
            for turn in sessions.turns(args.id):
                status = "" if turn.status == "complete" else f" [yellow]({turn.status})[/]"
                out.print(f"\n[bold]#{turn.number} you:[/] {safe_text(turn.prompt)}{status}", highlight=False)
                for b in turn.document.blocks:
                    if b.type == "text":
                        out.print(safe_text(b.text), highlight=False)
                    else:
                        label = "draft" if b.draft else "image"
                        ref = f" (edit of {b.references[0][:12]})" if b.kind == "edit" and b.references else ""
                        out.print(
                            f"[dim]\\[{label} {b.image.short}{ref}] {safe_text(b.prompt)} -> "
                            f"{safe_text(sessions.store.path(b.image.id))}[/]",
                            highlight=False,
                            soft_wrap=True,
                        )
        elif args.action == "export":
            result = sessions.export(args.id, args.format, args.out)
            if args.out is None:
                text = str(result)
                if sys.stdout.isatty():  # stored text on a terminal: no escape sequences it would obey
                    from duogen_agents.terminal.render import strip_controls

                    text = strip_controls(text)
                sys.stdout.write(text)
            else:
                err.print(f"wrote {result}", highlight=False)
        elif args.action == "fork":
            info = sessions.fork(args.id, args.new_id, wait=args.wait)
            out.print(f"forked {args.id} -> {info.id}")
        elif args.action == "delete":
            notes: list[str] = []
            removed = sessions.delete(args.id, wait=args.wait, notes=notes)
            out.print(f"deleted session {args.id} and {removed} image file(s) no other session uses")
            for note in notes:
                err.print(safe_text(note), highlight=False, soft_wrap=True)
        elif args.action == "gc":
            if args.forget is not None:
                from duogen_agents.errors import ConfigError
                from duogen_agents.storage.registry import forget

                if not forget(sessions.store, args.forget):
                    raise ConfigError(f"--forget {args.forget}: no such database in the store's list")
                out.print(f"forgot {args.forget}", highlight=False, soft_wrap=True)
            report = sessions.gc(grace_seconds=args.grace)
            out.print(
                f"removed {report.removed} unreferenced image file(s), {report.freed_bytes:,} bytes; kept {report.kept}"
            )
            if report.note:
                err.print(safe_text(report.note), highlight=False, soft_wrap=True)
    finally:
        sessions.close()
    return 0


DEFAULT_PRESET = "tiny"


def main(argv: Sequence[str] | None = None, *, process_exits: bool = False) -> int:
    """Run one ``duogen`` command; returns its exit code (0, 1 on an error, 2 on usage, 130 on Ctrl-C)."""
    parser = _parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as given: `duogen train` repeats it for --resume
    if getattr(args, "preset", "unset") is None:
        args.preset = os.environ.get("DUOGEN_PRESET") or DEFAULT_PRESET
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    with ctrl_c_twice_exits(process_exits=process_exits):
        return _main(args)


def console_main() -> None:
    """The ``duogen`` command: ``main`` in a process that exits right after."""
    sys.exit(main(process_exits=True))


def _storage_where(args: argparse.Namespace) -> str:
    db = getattr(args, "db", None) or os.environ.get("DUOGEN_DATABASE_URL") or ""
    if db.startswith("sqlite:///"):
        return str(Path(db.removeprefix("sqlite:///")).expanduser().parent)
    from duogen_agents.storage.images import default_home

    return str(args.home or default_home())


def _main(args: argparse.Namespace) -> int:
    try:
        if args.command == "presets":
            return _cmd_presets()
        if args.command == "sessions":
            return _cmd_sessions(args)
        if args.command == "eval":
            return _cmd_eval(args)
        if args.command == "train":
            return _cmd_train(args)
        if args.command == "serve":
            return _cmd_serve(args)
        if args.command == "mcp":
            return _cmd_mcp(args)
        if args.command == "chat":
            from duogen_agents.terminal.chat import ChatApp

            return ChatApp(
                preset=args.preset, mode=args.mode, session_id=args.session, db=args.db, home=args.home,
                images=args.images, wait=args.wait,
            ).run()  # fmt: skip
        return _cmd_run(args)
    except DuogenError as e:
        print(f"duogen: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("duogen: interrupted; no output was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # a bug, or a library's storage failure: still one line
        if os.environ.get("DUOGEN_DEBUG"):
            raise
        from duogen_agents.storage.database import describe_failure

        if (line := describe_failure(e, _storage_where(args))) is not None:
            print(f"duogen: error: {line}", file=sys.stderr)
            return EXIT_ERROR
        first = (str(e).strip().splitlines() or [""])[0]
        print(
            f"duogen: internal error: {type(e).__name__}: {first} (set DUOGEN_DEBUG=1 for a traceback)", file=sys.stderr
        )
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    console_main()
