"""Load test of ``duogen serve``: N concurrent sessions of T turns each, sessions on a database.

Starts ``duogen serve`` in its own process (or uses ``--url`` of a running one), runs every session in
its own client thread (the turns of a session one after the other, as a user would), then reads the
sessions back and counts lost turns (sent and answered 200 but not stored complete) and duplicated
ones (stored more often than sent). Prints latency per turn (p50, p95, max), the time turns waited in
the server's turn queue (its ``x-duogen-queue-wait-ms`` header), and the whole run's wall time.

    python benchmarks/serve_load.py --preset tiny --db postgresql://postgres@127.0.0.1:5432/test \
        --sessions 8 --turns 2

``--json FILE`` also writes the figures as JSON (the test suite runs this script that way).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(preset: str, db: str | None, token: str, turns: int, timeout: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "duogen_agents.cli", "serve", "--preset", preset, "--port", str(port),
           "--turns", str(turns), "--log-level", "warning"]  # fmt: skip
    if db:
        cmd += ["--db", db]
    proc = subprocess.Popen(cmd, env={**os.environ, "DUOGEN_API_KEY": token})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"duogen serve exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise SystemExit(f"duogen serve was not ready within {timeout:.0f} s")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[k]


def run_load(url: str, token: str, sessions: int, turns: int, mode: str, timeout: float) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    tag = secrets.token_hex(3)
    ids = [f"load-{tag}-{i}" for i in range(sessions)]
    latencies: list[float] = []
    waits: list[float] = []
    failures: list[str] = []
    answered: dict[str, int] = {sid: 0 for sid in ids}
    lock = threading.Lock()

    def user(sid: str) -> None:
        with httpx.Client(base_url=url, headers=headers, timeout=timeout) as h:
            for t in range(turns):
                start = time.monotonic()
                r = h.post(f"/v1/sessions/{sid}/turns", json={"prompt": f"Turn {t + 1}: plan a picnic", "mode": mode})
                elapsed = time.monotonic() - start
                with lock:
                    if r.status_code == 200:
                        answered[sid] += 1
                        latencies.append(elapsed)
                        waits.append(float(r.headers.get("x-duogen-queue-wait-ms", "nan")) / 1000)
                    else:
                        failures.append(f"{sid} turn {t + 1}: {r.status_code} {r.text[:200]}")

    wall_start = time.monotonic()
    threads = [threading.Thread(target=user, args=(sid,)) for sid in ids]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.monotonic() - wall_start

    lost = duplicated = 0
    with httpx.Client(base_url=url, headers=headers, timeout=60) as h:
        for sid in ids:
            r = h.get(f"/v1/sessions/{sid}")
            history = r.json().get("history", []) if r.status_code == 200 else []
            complete = [t for t in history if t["status"] == "complete"]
            numbers = [t["number"] for t in history]
            lost += max(0, answered[sid] - len(complete))
            duplicated += max(0, len(history) - turns) + (len(numbers) - len(set(numbers)))
    return {
        "sessions": sessions,
        "turns_per_session": turns,
        "mode": mode,
        "turns_sent": sessions * turns,
        "turns_answered": sum(answered.values()),
        "lost": lost,
        "duplicated": duplicated,
        "failures": failures,
        "latency_p50_s": percentile(latencies, 0.5),
        "latency_p95_s": percentile(latencies, 0.95),
        "latency_max_s": max(latencies) if latencies else float("nan"),
        "queue_wait_p50_s": percentile(waits, 0.5),
        "queue_wait_p95_s": percentile(waits, 0.95),
        "queue_wait_mean_s": statistics.fmean(waits) if waits else float("nan"),
        "wall_s": wall,
        "turns_per_minute": 60 * sum(answered.values()) / wall if wall else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running duogen serve (default: start one)")
    p.add_argument("--token", default=os.environ.get("DUOGEN_API_KEY") or secrets.token_hex(16))
    p.add_argument("--preset", default="tiny")
    p.add_argument("--db", help="database URL for the server's sessions (PostgreSQL for the scale-out setup)")
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--turns", type=int, default=2)
    p.add_argument("--server-turns", type=int, default=4, help="turns the server runs at once (its --turns)")
    p.add_argument("--mode", default="interleaved", choices=["interleaved", "visual-plan", "draft"])
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request and for the server to start")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)

    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(args.preset, args.db, args.token, args.server_turns, args.timeout)
    try:
        result = run_load(url, args.token, args.sessions, args.turns, args.mode, args.timeout)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    result["server_turns"] = args.server_turns
    result["database"] = (args.db or "sqlite (default)").split("://")[0]
    print(f"duogen serve load: {result['sessions']} sessions x {result['turns_per_session']} turns ({result['mode']}, "
          f"{result['database']}, server --turns {args.server_turns})")  # fmt: skip
    print("| figure | value |")
    print("|---|---|")
    rows = [
        ("turns answered / sent", f"{result['turns_answered']} / {result['turns_sent']}"),
        ("lost / duplicated turns", f"{result['lost']} / {result['duplicated']}"),
        ("latency per turn p50 / p95 / max", f"{result['latency_p50_s']:.2f} / {result['latency_p95_s']:.2f} / "
                                             f"{result['latency_max_s']:.2f} s"),
        ("queue wait p50 / p95 / mean", f"{result['queue_wait_p50_s']:.2f} / {result['queue_wait_p95_s']:.2f} / "
                                        f"{result['queue_wait_mean_s']:.2f} s"),
        ("wall time", f"{result['wall_s']:.1f} s ({result['turns_per_minute']:.1f} turns/min)"),
    ]  # fmt: skip
    for name, value in rows:
        print(f"| {name} | {value} |")
    for line in result["failures"]:
        print(f"failed: {line}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if not result["failures"] and not result["lost"] and not result["duplicated"] else 1


if __name__ == "__main__":
    sys.exit(main())
