"""Soak mode of the benchmark suite: ``python bench/run.py --soak MINUTES``.

Starts a private PostgreSQL and the daemon (`twistd -n omni_httpd --http-workers 2`, as
bench/run.py does), puts W1 load on it with wrk for MINUTES, changes a handler every
``--reload-every`` seconds (a configuration reload, checked: recorded in
configuration_reloads and served), and samples the RSS of the master and of each worker
from /proc every ``--sample-every`` seconds. Prints the samples as a table and, per
process, the least-squares slope of its RSS in KB/min over the whole run and over its
second half (after the warm-up), so a leak shows as a steady positive slope. Writes
``soak-<timestamp>.json`` and ``.md`` to the results directory.

Exit status: 0 when the daemon and all its workers lived through the run, wrk saw no
error and every reload was applied; 1 otherwise.
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional

import psycopg2

import httpcheck
import loaders
from servers import DaemonServer, ServerError, _children, _rss_kb
from workloads import WORKLOADS


def log(message: str) -> None:
    print("[soak %s] %s" % (time.strftime("%H:%M:%S"), message), flush=True)


def slope_kb_per_min(points: List[tuple]) -> Optional[float]:
    """Least-squares slope of (seconds, KB) points, in KB per minute."""
    if len(points) < 2:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return None
    return sum((t - mean_t) * (v - mean_v) for t, v in points) / var * 60.0


def _slot(pid: int) -> str:
    """The worker's slot, from its command line (``--slot N``)."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as handle:
            argv = handle.read().split(b"\0")
        return "w" + argv[argv.index(b"--slot") + 1].decode()
    except (OSError, ValueError, IndexError):
        return "child"


def sample(master_pid: int) -> Dict[str, int]:
    """RSS in KB of the master and of each of its children (the workers), keyed by name:
    a restarted worker is a new series."""
    out = {"master": _rss_kb(master_pid)}
    for pid in sorted(_children(master_pid)):
        out["%s pid %d" % (_slot(pid), pid)] = _rss_kb(pid)
    return out


def _last_reload_id(cur) -> int:
    cur.execute("SELECT coalesce(max(id), 0) FROM omni_httpd.configuration_reloads")
    return cur.fetchone()[0]


def reload_once(server: DaemonServer, n: int, timeout: float = 30.0) -> Optional[float]:
    """Change the reload listener's handler: seconds from the commit until the new text is
    served and a reload row is recorded (both checked), None on failure."""
    expected = ("reload %d" % n).encode()
    conn = psycopg2.connect(server.ctx.dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            before = _last_reload_id(cur)
            cur.execute("UPDATE omni_httpd.handlers SET query = %s WHERE id = %s",
                        ("SELECT omni_httpd.http_response('reload %d') FROM request" % n, server.reload_handler_id))
            started = time.monotonic()
            served, recorded, answer = None, False, None
            while time.monotonic() < started + timeout and not (served and recorded):
                if served is None:
                    try:
                        answer = httpcheck.http1(server.ports["reload"], "GET", "/", timeout=5)
                        if answer[0] == 200 and answer[2] == expected:
                            served = time.monotonic() - started
                    except OSError as exc:
                        answer = exc
                if not recorded:
                    recorded = _last_reload_id(cur) > before
                time.sleep(0.005)
    except psycopg2.Error as exc:
        log("reload %d failed: %s" % (n, str(exc).strip().splitlines()[0]))
        return None
    finally:
        conn.close()
    if served is None or not recorded:
        log("reload %d not applied within %gs (served: %s, last answer %r; recorded: %s)"
            % (n, timeout, served is not None, answer, recorded))
        return None
    return served


def run(ctx, args) -> dict:
    """The soak itself, against the database in ``ctx`` (see run.py's Context)."""
    w1 = WORKLOADS["W1"]
    duration = max(1, int(round(args.soak * 60)))
    results: dict = {"minutes": args.soak, "duration_s": duration, "reload_every_s": args.reload_every,
                     "sample_every_s": args.sample_every, "samples": [], "reloads": [], "notes": []}
    server = DaemonServer(ctx, [w1])
    log("starting omni_httpd")
    try:
        server.start()
        port = server.port("h1", w1)
        deadline = time.monotonic() + args.ready_timeout
        while True:
            status, ctype, body = httpcheck.http1(port, w1.method, w1.path, timeout=5)
            error = w1.check(status, ctype, body)
            if error is None:
                break
            if time.monotonic() > deadline:
                raise ServerError("W1 check failed: %s" % error)
            time.sleep(0.1)
        master = server.proc.pid
        results["workers_at_start"] = sorted(_children(master))
        url = "http://127.0.0.1:%d%s" % (port, w1.path)
        load: dict = {}

        def generate():
            try:
                load["m"] = loaders.wrk(url, duration)
            except loaders.LoadError as exc:
                load["error"] = str(exc)

        log("W1 load (wrk -c%d) for %ds, a reload every %gs, RSS every %gs"
            % (loaders.WRK_CONNECTIONS, duration, args.reload_every, args.sample_every))
        loader = threading.Thread(target=generate, daemon=True)
        t0 = time.monotonic()
        loader.start()
        next_sample, next_reload, n = t0, t0 + args.reload_every, 0
        # bounded: wrk stops itself after `duration` (loaders.wrk gives it 30 s more)
        while loader.is_alive() and time.monotonic() < t0 + duration + 60:
            now = time.monotonic()
            if now >= next_sample:
                results["samples"].append({"t": round(now - t0, 2), "rss_kb": sample(master)})
                next_sample += args.sample_every
            if now >= next_reload and now < t0 + duration - 1:
                n += 1
                seconds = reload_once(server, n)
                results["reloads"].append({"t": round(now - t0, 2), "seconds": seconds})
                next_reload += args.reload_every
            loader.join(max(0.0, min(next_sample, next_reload) - time.monotonic()))
        loader.join(5)
        results["samples"].append({"t": round(time.monotonic() - t0, 2), "rss_kb": sample(master)})
        if "m" in load:
            m = load["m"]
            results["load"] = {"requests": m.requests, "rps": m.rps, "p50_ms": m.p50_ms, "p99_ms": m.p99_ms,
                               "errors": m.errors, "non2xx": m.non2xx}
        else:
            results["load"] = {"error": load.get("error", "wrk did not finish")}
        results["alive"] = server.proc.alive()
        results["workers_at_end"] = sorted(_children(master)) if results["alive"] else []
    except (ServerError, OSError, psycopg2.Error) as exc:
        results["error"] = "%s: %s" % (type(exc).__name__, exc)
        log(results["error"])
    finally:
        log("stopping omni_httpd")
        server.stop()
        results["exit_code"] = getattr(server, "exit_code", None)
    results["series"] = series(results["samples"])
    return results


def series(samples: List[dict]) -> Dict[str, dict]:
    """Per process: first, last, max RSS (KB) and slopes (KB/min), all and second half."""
    out = {}
    names = []
    for s in samples:
        names.extend(k for k in s["rss_kb"] if k not in names)
    for name in names:
        points = [(s["t"], s["rss_kb"][name]) for s in samples if s["rss_kb"].get(name)]
        if not points:
            continue
        half = [p for p in points if p[0] >= points[-1][0] / 2.0]
        out[name] = {"first_kb": points[0][1], "last_kb": points[-1][1], "max_kb": max(v for _, v in points),
                     "slope_kb_min": slope_kb_per_min(points), "slope2_kb_min": slope_kb_per_min(half),
                     "samples": len(points)}
    return out


def ok(results: dict) -> bool:
    load = results.get("load") or {}
    return (not results.get("error") and results.get("alive") and results.get("exit_code") == 0
            and results.get("workers_at_start") == results.get("workers_at_end")
            and load.get("requests", 0) > 0 and load.get("errors") == 0 and load.get("non2xx") == 0
            and all(r["seconds"] is not None for r in results["reloads"]))


def _fmt(value, pattern="%.1f"):
    return "-" if value is None else pattern % value


def text(results: dict, markdown: bool = False) -> List[str]:
    names = list(results["series"])
    lines = []
    header = ["t (s)"] + [n + " KB" for n in names]
    rows = [[_fmt(s["t"])] + [str(s["rss_kb"].get(n, "")) for n in names] for s in results["samples"]]
    summary_header = ["process", "first KB", "last KB", "max KB", "slope KB/min", "2nd half KB/min"]
    summary = [[n, str(v["first_kb"]), str(v["last_kb"]), str(v["max_kb"]), _fmt(v["slope_kb_min"]),
                _fmt(v["slope2_kb_min"])] for n, v in results["series"].items()]
    for table_header, table in ((header, rows), (summary_header, summary)):
        if markdown:
            lines.append("| " + " | ".join(table_header) + " |")
            lines.append("|" + "---|" * len(table_header))
            lines.extend("| " + " | ".join(r) + " |" for r in table)
        else:
            widths = [max(len(r[i]) for r in [table_header] + table) for i in range(len(table_header))]
            lines.extend("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [table_header] + table)
        lines.append("")
    load = results.get("load") or {}
    if "requests" in load:
        lines.append("W1 load: %d requests, %.0f req/s, p50 %.2f ms, p99 %.2f ms, errors %d, non-2xx %d"
                     % (load["requests"], load["rps"], load["p50_ms"], load["p99_ms"], load["errors"],
                        load["non2xx"]))
    elif load:
        lines.append("W1 load failed: %s" % load.get("error"))
    done = [r["seconds"] for r in results["reloads"] if r["seconds"] is not None]
    lines.append("reloads: %d, failed %d%s" % (len(results["reloads"]), len(results["reloads"]) - len(done),
                                               ", median %.0f ms, max %.0f ms" % (
                                                   statistics.median(done) * 1000, max(done) * 1000)
                                               if done else ""))
    if results.get("workers_at_start") != results.get("workers_at_end"):
        lines.append("WORKERS CHANGED: %s -> %s" % (results.get("workers_at_start"), results.get("workers_at_end")))
    if results.get("error"):
        lines.append("ERROR: %s" % results["error"])
    lines.append("daemon exit code: %s" % results.get("exit_code"))
    return lines


def main(args, start_database) -> int:
    """Entry point from run.py (which parsed ``args`` and knows how to start PostgreSQL)."""
    from run import Context, git_commit  # run.py imported this module: no cycle at import time
    if shutil.which("wrk") is None:
        print("missing benchmark tools: wrk\ninstall them with:\n    apt-get update && apt-get install -y wrk",
              file=sys.stderr)
        return 2
    timestamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    workdir = tempfile.mkdtemp(prefix="omni_httpd_soak_")
    os.chmod(workdir, 0o755)
    pg = None
    try:
        log("starting PostgreSQL in %s" % workdir)
        pg, dsn, _ = start_database(workdir, max_connections=50)
        ctx = Context(workdir=workdir, dsn=dsn, pg_host=pg.socket_dir, pg_port=5432, venv=args.venv,
                      peer_pool=args.peer_pool)
        results = run(ctx, args)
    finally:
        if pg is not None:
            pg.stop()
        if args.keep:
            log("kept %s" % workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    results.update(timestamp=timestamp, commit=git_commit(), cpus=os.cpu_count())
    results["ok"] = bool(ok(results))
    os.makedirs(args.results_dir, exist_ok=True)
    stem = os.path.join(args.results_dir, "soak-%s" % timestamp)
    with open(stem + ".json", "w") as handle:
        json.dump(results, handle, indent=1)
    with open(stem + ".md", "w") as handle:
        handle.write("# omni_httpd soak, %s (commit %s, %d CPUs)\n\n" % (timestamp, results["commit"],
                                                                      results["cpus"]))
        handle.write("W1 for %g min with a configuration reload every %g s; RSS of the master and each worker "
                     "every %g s.\n\n" % (args.soak, args.reload_every, args.sample_every))
        handle.write("\n".join(text(results, markdown=True)) + "\n")
    print()
    print("\n".join(text(results)))
    print("\nwritten: %s.md" % stem)
    return 0 if results["ok"] else 1
