#!/usr/bin/env python3
"""Benchmark omni_httpd against peers and ceilings. The one entry point of bench/.

    python bench/run.py [--duration 10] [--workloads W1,W1route,W2,W3] [--targets ...] [--smoke]
    python bench/run.py --soak MINUTES [--reload-every 10] [--sample-every 5]

Starts a private PostgreSQL (omni_httpd.embedded_pg) in a temporary directory, then runs
each target in turn (never two at once): omni_httpd over HTTP/1.1 (wrk) and h2c (h2load),
the peers gunicorn+psycopg2 and uvicorn+asyncpg (installed into bench/.venv on first use),
nginx returning the same bodies (the HTTP ceiling) and pgbench running the handler
statement (the database ceiling). Every target's response is checked before it is
measured. Prints one table and writes bench/results/<timestamp>.{md,json,png} (and
latest.* for a full run: every target, every workload). Run it with the project's
interpreter: it needs psycopg2, h2 and the omni_httpd package, and starts `twistd` from
the same environment.

--soak runs the daemon alone under W1 for MINUTES with a configuration reload every
10 s, sampling the RSS of its master and workers (bench/soak.py).
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
if REPO not in sys.path:
    sys.path.append(REPO)

import httpcheck  # noqa: E402
import loaders  # noqa: E402
import report  # noqa: E402
from servers import (DaemonServer, NginxServer, PeerServer, ServerError, cpu_per_request,  # noqa: E402
                     cpu_snapshot)
from workloads import WORKLOADS, Workload, peer_sql, pgbench_sql  # noqa: E402


@dataclass
class Target:
    id: str
    label: str
    server: str  # daemon | gunicorn | uvicorn | nginx | pgbench
    protocol: str  # h1 | h2c | pg


TARGETS = [
    Target("daemon-h1", "omni_httpd HTTP/1.1", "daemon", "h1"),
    Target("daemon-h2c", "omni_httpd h2c", "daemon", "h2c"),
    Target("gunicorn", "gunicorn 2 sync + psycopg2", "gunicorn", "h1"),
    Target("uvicorn", "uvicorn 2 + asyncpg", "uvicorn", "h1"),
    Target("nginx-h1", "nginx HTTP/1.1 (ceiling)", "nginx", "h1"),
    Target("nginx-h2c", "nginx h2c (ceiling)", "nginx", "h2c"),
    Target("pgbench", "pgbench (DB ceiling)", "pgbench", "pg"),
]
SERVER_ORDER = ["daemon", "gunicorn", "uvicorn", "nginx", "pgbench"]
SMOKE_TARGETS = ["daemon-h1", "daemon-h2c"]

# tool -> Debian package that ships it
TOOLS = {"wrk": "wrk", "h2load": "nghttp2-client", "nginx": "nginx", "pgbench": "postgresql"}


@dataclass
class Context:
    workdir: str
    dsn: str
    pg_host: str
    pg_port: int
    venv: str
    peer_pool: int
    body_files: Dict[str, str] = field(default_factory=dict)


def log(message: str) -> None:
    print("[bench %s] %s" % (time.strftime("%H:%M:%S"), message), flush=True)


# -- tools and the peers' virtualenv ------------------------------------------------------
def needed_tools(targets: List[Target]) -> List[str]:
    tools = []
    for t in targets:
        tool = {"h1": "wrk", "h2c": "h2load", "pg": "pgbench"}[t.protocol]
        for name in ([tool] + (["nginx"] if t.server == "nginx" else [])):
            if name not in tools:
                tools.append(name)
    return tools


def find_pgbench(bin_dir: Optional[str]) -> Optional[str]:
    if bin_dir and os.access(os.path.join(bin_dir, "pgbench"), os.X_OK):
        return os.path.join(bin_dir, "pgbench")
    return shutil.which("pgbench")


def missing_tools(tools: List[str]) -> List[str]:
    missing = []
    for tool in tools:
        if tool == "pgbench":
            from omni_httpd.master.embedded_pg import EmbeddedPostgresError, find_bin_dir
            try:
                bin_dir = find_bin_dir()
            except EmbeddedPostgresError:
                bin_dir = None
            if not find_pgbench(bin_dir):
                missing.append(tool)
        elif not shutil.which(tool):
            missing.append(tool)
    return missing


def install_hint(missing: List[str]) -> str:
    packages = sorted({TOOLS[t] for t in missing})
    return "apt-get update && apt-get install -y %s" % " ".join(packages)


def ensure_venv(venv: str) -> None:
    """bench/.venv with the peers (and matplotlib), reinstalled when requirements change."""
    requirements = os.path.join(HERE, "requirements-peers.txt")
    with open(requirements, "rb") as handle:
        digest = hashlib.sha256(handle.read()).hexdigest()
    stamp = os.path.join(venv, ".requirements.sha256")
    python = os.path.join(venv, "bin", "python")
    if os.path.exists(python) and os.path.exists(stamp) and open(stamp).read().strip() == digest:
        return
    log("installing the peers into %s (first run only)" % venv)
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r", requirements],
                   check=True)
    with open(stamp, "w") as handle:
        handle.write(digest + "\n")


# -- checks and measurements ---------------------------------------------------------------
def check_http(protocol: str, port: int, workload: Workload, timeout: float = 5.0) -> Optional[str]:
    request = httpcheck.h2c if protocol == "h2c" else httpcheck.http1
    try:
        status, ctype, body = request(port, workload.method, workload.path, workload.body,
                                      workload.request_content_type, timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - every failure is a reason to report
        return "%s: %s" % (type(exc).__name__, exc)
    return workload.check(status, ctype, body)


def check_until(protocol: str, port: int, workload: Workload, deadline_s: float) -> Optional[str]:
    deadline = time.monotonic() + deadline_s
    while True:
        error = check_http(protocol, port, workload)
        if error is None or time.monotonic() >= deadline:
            return error
        time.sleep(0.1)


def measure_http(target: Target, port: int, workload: Workload, ctx: Context, duration: int):
    url = "http://127.0.0.1:%d%s" % (port, workload.path)
    body_file = ctx.body_files.get(workload.name)
    if target.protocol == "h2c":
        return loaders.h2load(url, duration, ctx.workdir, body_file, workload.request_content_type)
    return loaders.wrk(url, duration, body_file, workload.request_content_type)


def row(target: Target, workload: Workload, status: str = "ok", message: str = "", m=None) -> dict:
    out = {"target": target.id, "label": target.label, "workload": workload.name, "status": status,
           "message": message, "rps": None}
    if m is not None:
        out.update(rps=m.rps, p50_ms=m.p50_ms, p99_ms=m.p99_ms, errors=m.errors, non2xx=m.non2xx,
                   requests=m.requests, seconds=m.seconds, cpu_us=m.detail.get("cpu_us"))
    return out


def run_http_server(server, targets: List[Target], workloads: List[Workload], ctx: Context,
                    args, results: dict) -> None:
    """Start one server, check and measure each of its targets on each workload, stop it."""
    log("starting %s" % server.name)
    import psycopg2
    try:
        server.start()
    except (ServerError, OSError, psycopg2.Error) as exc:
        for t in targets:
            for w in workloads:
                results["rows"].append(row(t, w, "NOT MEASURED (did not start)", str(exc)))
        server.stop()
        return
    first = True
    try:
        for t in targets:
            for w in workloads:
                if w.static_file is not None and not isinstance(server, (DaemonServer, NginxServer)):
                    results["rows"].append(row(t, w, "n/a (static file)", ""))
                    continue
                port = server.port(t.protocol, w)
                if server.proc.alive():
                    # the first check may wait for the server to come up; later ones barely
                    error = check_until(t.protocol, port, w, args.ready_timeout if first else 2.0)
                    if first and error is None and isinstance(server, DaemonServer):
                        results.setdefault("daemon", {}).update(
                            schema_s=server.schema_seconds,
                            first_start_s=time.monotonic() - server.started_at)
                    first = False
                else:
                    error = "not running"
                if error is not None and not server.proc.alive():
                    error += " (%s)" % server.describe_failure()
                if error is not None:
                    log("%s %s: check FAILED: %s" % (t.label, w.name, error))
                    results["rows"].append(row(t, w, "NOT MEASURED (check failed)", error))
                    continue
                try:
                    if args.warmup:
                        measure_http(t, port, w, ctx, args.warmup)
                    before = cpu_snapshot(server.proc.pid)
                    m = measure_http(t, port, w, ctx, args.duration)
                    m.detail["cpu_us"] = cpu_per_request(before, cpu_snapshot(server.proc.pid), m.requests)
                except loaders.LoadError as exc:
                    results["rows"].append(row(t, w, "NOT MEASURED (load failed)", str(exc)))
                    continue
                log("%s %s: %.0f req/s, p50 %.2f ms, p99 %.2f ms, errors %d, non-2xx %s"
                    % (t.label, w.name, m.rps, m.p50_ms, m.p99_ms, m.errors, m.non2xx))
                results["rows"].append(row(t, w, m=m))
        rss = server.rss()
        try:
            measure_extras(server, rss, workloads, args, results)
        except Exception as exc:  # noqa: BLE001 - keep the figures measured so far
            results["notes"].append("%s: extra measurements failed: %s: %s" % (server.name, type(exc).__name__, exc))
    finally:
        log("stopping %s" % server.name)
        server.stop()
        if isinstance(server, DaemonServer):
            daemon = results.setdefault("daemon", {})
            daemon["exit_code"] = getattr(server, "exit_code", None)
            daemon["stop_s"] = getattr(server, "stop_seconds", None)


def measure_extras(server, rss, workloads: List[Workload], args, results: dict) -> None:
    """RSS after the load; for the daemon also reload latency and restart time."""
    if not isinstance(server, DaemonServer):
        if rss:
            results.setdefault("peer_rss", {})[server.name] = rss
        return
    daemon = results.setdefault("daemon", {})
    daemon["rss"] = rss
    if server.proc.alive() and server.ports.get("reload"):
        log("omni_httpd: reload latency (%d samples)" % args.reload_samples)
        daemon["reload"] = server.reload_latency(args.reload_samples)
    w1 = WORKLOADS["W1"] if "W1" in server.ports else workloads[0]
    if server.proc.alive():
        log("omni_httpd: restart -> first served request")
        try:
            seconds = server.restart_time(w1, lambda p: check_http("h1", p, w1, timeout=2))
            daemon["restart_s"] = seconds
            daemon["restart_ready_s"] = getattr(server, "restart_ready_seconds", None)
            if seconds is None:
                daemon["restart_error"] = "no correct response within 60 s"
        except ServerError as exc:
            daemon["restart_error"] = str(exc)


def run_pgbench(target: Target, workloads: List[Workload], ctx: Context, pgbench_bin: str,
                args, results: dict) -> None:
    import psycopg2
    conn = psycopg2.connect(ctx.dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT to_regtype('omni_http.http_method') IS NOT NULL AND EXISTS (SELECT FROM pg_proc "
                        "WHERE proname = 'http_response' AND pronamespace = 'omni_httpd'::regnamespace)")
            has_schema = cur.fetchone()[0]
    except psycopg2.Error:
        has_schema = False
    finally:
        conn.close()
    if not has_schema:
        results["notes"].append("pgbench ran the peers' statements: the omni_httpd schema was not installed "
                                "(the daemon did not run first)")
    for w in workloads:
        if w.static_file is not None:
            results["rows"].append(row(target, w, "n/a (static file)", ""))
            continue
        sql = pgbench_sql(w) if has_schema else peer_sql(w)
        try:
            conn = psycopg2.connect(ctx.dsn)
            try:
                with conn.cursor() as cur:
                    cur.execute(sql)
                    rows = cur.fetchall()
            finally:
                conn.close()
            error = None if len(rows) == 1 else "the statement returned %d rows (expected 1)" % len(rows)
        except psycopg2.Error as exc:
            error = "the statement fails: %s" % str(exc).strip().splitlines()[0]
        if error:
            log("%s %s: check FAILED: %s" % (target.label, w.name, error))
            results["rows"].append(row(target, w, "NOT MEASURED (check failed)", error))
            continue
        try:
            common = dict(clients=args.pg_clients, workdir=ctx.workdir, host=ctx.pg_host, port=ctx.pg_port,
                          user="postgres", dbname="bench")
            if args.warmup:
                loaders.pgbench(pgbench_bin, sql, args.warmup, **common)
            m = loaders.pgbench(pgbench_bin, sql, args.duration, **common)
        except loaders.LoadError as exc:
            results["rows"].append(row(target, w, "NOT MEASURED (load failed)", str(exc)))
            continue
        log("%s %s: %.0f tps, p50 %.2f ms, p99 %.2f ms, failed %d" % (target.label, w.name, m.rps,
                                                                        m.p50_ms, m.p99_ms, m.errors))
        results["rows"].append(row(target, w, m=m))


# -- database ---------------------------------------------------------------------------------
def start_database(workdir: str, max_connections: int):
    import psycopg2
    from omni_httpd.master.embedded_pg import EmbeddedPostgres
    pg = EmbeddedPostgres(os.path.join(workdir, "pg"),
                          settings={"max_connections": str(max_connections), "fsync": "off",
                                    "synchronous_commit": "off", "full_page_writes": "off"})
    pg.start()
    admin = psycopg2.connect(pg.dsn)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute("CREATE DATABASE bench")
    admin.close()
    dsn = "host=%s port=5432 user=postgres dbname=bench" % pg.socket_dir
    conn = psycopg2.connect(dsn)
    with conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE users (id integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
                    "handle text NOT NULL UNIQUE, name text NOT NULL)")
        cur.execute("INSERT INTO users (handle, name) VALUES ('johndoe', 'John')")
        cur.execute("SELECT convert_from(%s, 'UTF8')::jsonb::text", (psycopg2.Binary(WORKLOADS["W2"].body),))
        w2_response = cur.fetchone()[0].encode("utf-8")
    conn.close()
    return pg, dsn, w2_response


# -- output -----------------------------------------------------------------------------------
def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def tool_versions(targets: List[Target], venv: str, pgbench_bin: Optional[str]) -> Dict[str, str]:
    """Versions of the load generators and servers used, for the report."""
    def first_line(argv: List[str], pattern: str = r"[\d]+\.[\d.]+") -> Optional[str]:
        import re
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        match = re.search(pattern, proc.stdout + proc.stderr)
        return match.group(0) if match else None

    versions = {"python": "%d.%d.%d" % sys.version_info[:3]}
    servers = {t.server for t in targets}
    protocols = {t.protocol for t in targets}
    if "h1" in protocols:
        versions["wrk"] = first_line(["wrk", "--version"])
    if "h2c" in protocols:
        versions["h2load"] = first_line(["h2load", "--version"])
    if "nginx" in servers:
        versions["nginx"] = first_line(["nginx", "-v"])
    if pgbench_bin:
        versions["PostgreSQL/pgbench"] = first_line([pgbench_bin, "--version"])
    if servers & {"gunicorn", "uvicorn"} and os.path.exists(os.path.join(venv, "bin", "python")):
        wanted = ("gunicorn", "uvicorn", "uvloop", "httptools", "asyncpg", "psycopg2-binary")
        proc = subprocess.run([os.path.join(venv, "bin", "python"), "-m", "pip", "list", "--format=freeze",
                               "--disable-pip-version-check"], capture_output=True, text=True, timeout=60)
        for line in proc.stdout.splitlines():
            name, _, version = line.partition("==")
            if name.lower() in wanted:
                versions[name.lower()] = version
    return {k: v for k, v in versions.items() if v}


def draw_chart(results: dict, json_path: str, png_path: str, venv: str) -> Optional[str]:
    """Returns None when the PNG was written, else why not."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        python = os.path.join(venv, "bin", "python")
        if not os.path.exists(python):
            return "matplotlib is not installed (pip install '.[bench]')"
        proc = subprocess.run([python, os.path.join(HERE, "chart.py"), json_path, png_path],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            return "chart failed: %s" % (proc.stderr.strip().splitlines() or ["?"])[-1]
        return None
    import chart
    chart.draw(results, png_path)
    return None


def write_outputs(results: dict, results_dir: str, venv: str, latest: bool) -> str:
    os.makedirs(results_dir, exist_ok=True)
    stem = os.path.join(results_dir, results["timestamp"])
    with open(stem + ".json", "w") as handle:
        json.dump(results, handle, indent=1)
    why_not = draw_chart(results, stem + ".json", stem + ".png", venv)
    if why_not:
        results.setdefault("notes", []).append("no chart: " + why_not)
    png = os.path.basename(stem + ".png") if not why_not else None
    with open(stem + ".md", "w") as handle:
        handle.write(report.markdown(results, png))
    if latest:
        with open(os.path.join(results_dir, "latest.md"), "w") as handle:
            handle.write(report.markdown(results, "latest.png" if png else None))
        shutil.copyfile(stem + ".json", os.path.join(results_dir, "latest.json"))
        if png:
            shutil.copyfile(stem + ".png", os.path.join(results_dir, "latest.png"))
    return stem + ".md"


# -- main -------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=None, help="seconds per measurement (default 10, smoke 1)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="seconds of unrecorded load before each measurement (default 2, smoke 0)")
    parser.add_argument("--workloads", default="W1,W1route,W2,W3,W4",
                        help="comma-separated, from W1,W1route (W1 as a route),W2,W3,W4")
    parser.add_argument("--targets", default=None,
                        help="comma-separated, from %s (default all; smoke: %s)"
                        % (",".join(t.id for t in TARGETS), ",".join(SMOKE_TARGETS)))
    parser.add_argument("--smoke", action="store_true",
                        help="~1 s per target, omni_httpd only, no goals: checks that the suite works")
    parser.add_argument("--soak", type=float, default=None, metavar="MINUTES",
                        help="soak mode: W1 on the daemon for MINUTES with reloads, sampling RSS (bench/soak.py)")
    parser.add_argument("--reload-every", type=float, default=10.0, help="soak: seconds between reloads (10)")
    parser.add_argument("--sample-every", type=float, default=5.0, help="soak: seconds between RSS samples (5)")
    parser.add_argument("--reload-samples", type=int, default=None, help="default 20 (smoke 5)")
    parser.add_argument("--pg-clients", type=int, default=2,
                        help="pgbench connections: the daemon's DB connections (one per worker, 2)")
    parser.add_argument("--peer-pool", type=int, default=2, help="asyncpg pool size per uvicorn worker")
    parser.add_argument("--ready-timeout", type=float, default=20.0,
                        help="seconds a server may take to answer its first check correctly")
    parser.add_argument("--results-dir", default=os.path.join(HERE, "results"))
    parser.add_argument("--venv", default=os.path.join(HERE, ".venv"), help="where the peers are installed")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    parser.add_argument("--metrics", default="none", metavar="ENDPOINT",
                        help="the daemon's --metrics (default none; e.g. tcp:0:interface=127.0.0.1 "
                             "to measure what counting costs; the peers export nothing)")
    args = parser.parse_args(argv)
    if args.duration is None:
        args.duration = 1 if args.smoke else 10
    if args.duration < 1:
        parser.error("--duration must be at least 1 (second)")
    if args.soak is not None and (args.soak <= 0 or args.reload_every <= 0 or args.sample_every <= 0):
        parser.error("--soak, --reload-every and --sample-every must be positive")
    if args.warmup is None:
        args.warmup = 0 if args.smoke else 2
    if args.reload_samples is None:
        args.reload_samples = 5 if args.smoke else 20
    by_name = {name.upper(): name for name in WORKLOADS}
    names = [by_name.get(w.strip().upper(), w.strip()) for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in names if w not in WORKLOADS]
    if unknown or not names:
        parser.error("unknown workload(s): %s" % ", ".join(unknown or ["(none)"]))
    args.workload_list = [WORKLOADS[w] for w in names]
    ids = [t.strip() for t in (args.targets or ",".join(SMOKE_TARGETS if args.smoke else
                                                          [t.id for t in TARGETS])).split(",") if t.strip()]
    known = {t.id: t for t in TARGETS}
    bad = [i for i in ids if i not in known]
    if bad or not ids:
        parser.error("unknown target(s): %s" % ", ".join(bad or ["(none)"]))
    args.target_list = [t for t in TARGETS if t.id in ids]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.soak is not None:
        import soak
        return soak.main(args, start_database)
    targets, workloads = args.target_list, args.workload_list

    missing = missing_tools(needed_tools(targets))
    if missing and args.smoke and "wrk" not in missing and args.targets is None:
        # smoke: h2c is optional when h2load is missing; wrk is not
        log("h2load is missing: smoke run without h2c (%s)" % install_hint(["h2load"]))
        targets = [t for t in targets if t.protocol != "h2c"]
        missing = missing_tools(needed_tools(targets))
    if missing:
        print("missing benchmark tools: %s\ninstall them with:\n    %s"
              % (", ".join(missing), install_hint(missing)), file=sys.stderr)
        return 2
    try:
        import h2  # noqa: F401
        import psycopg2  # noqa: F401
        import omni_httpd.master.embedded_pg  # noqa: F401
    except ImportError as exc:
        print("run this with the project's environment (pip install -e '.[bench]'): %s" % exc, file=sys.stderr)
        return 2
    peers_unavailable = None
    if any(t.server in ("gunicorn", "uvicorn") for t in targets):
        try:
            ensure_venv(args.venv)
        except (OSError, subprocess.CalledProcessError) as exc:
            peers_unavailable = "could not install the peers into %s: %s" % (args.venv, exc)
            log(peers_unavailable)

    timestamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    results = {"timestamp": timestamp, "smoke": args.smoke, "duration": args.duration, "warmup": args.warmup,
               "commit": git_commit(), "cpus": os.cpu_count(), "pg_clients": args.pg_clients,
               "workloads": {w.name: w.title for w in workloads}, "rows": [], "notes": [],
               "peer_pool": args.peer_pool, "load_start": "%.2f" % os.getloadavg()[0],
               "daemon_metrics": args.metrics}
    workdir = tempfile.mkdtemp(prefix="omni_httpd_bench_")
    os.chmod(workdir, 0o755)  # the PostgreSQL account and nginx's workers must traverse it
    pg = None
    try:
        log("starting PostgreSQL in %s" % workdir)
        try:
            pg, dsn, w2_response = start_database(workdir, max_connections=50 + 4 * args.peer_pool)
        except Exception as exc:  # noqa: BLE001 - EmbeddedPostgresError, psycopg2.Error: one line
            print("cannot start the benchmark's PostgreSQL: %s" % exc, file=sys.stderr)
            return 2
        ctx = Context(workdir=workdir, dsn=dsn, pg_host=pg.socket_dir, pg_port=5432, venv=args.venv,
                      peer_pool=args.peer_pool)
        for w in workloads:
            if w.body:
                path = os.path.join(workdir, "%s.body" % w.name)
                with open(path, "wb") as handle:
                    handle.write(w.body)
                ctx.body_files[w.name] = path
        for server_kind in SERVER_ORDER:
            group = [t for t in targets if t.server == server_kind]
            if not group:
                continue
            if server_kind in ("gunicorn", "uvicorn") and peers_unavailable:
                for t in group:
                    for w in workloads:
                        results["rows"].append(row(t, w, "NOT MEASURED (not installed)", peers_unavailable))
                continue
            if server_kind == "pgbench":
                run_pgbench(group[0], workloads, ctx, find_pgbench(pg.bin_dir), args, results)
                continue
            if server_kind == "daemon":
                server = DaemonServer(ctx, workloads, metrics=args.metrics)
            elif server_kind == "nginx":
                server = NginxServer(ctx, w2_response)
            else:
                server = PeerServer(ctx, server_kind)
            run_http_server(server, group, workloads, ctx, args, results)
    except KeyboardInterrupt:
        results["notes"].append("interrupted")
        log("interrupted")
    finally:
        if pg is not None:
            pg.stop()
        if args.keep:
            log("kept %s" % workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    results["load_end"] = "%.2f" % os.getloadavg()[0]
    try:
        results["versions"] = tool_versions(targets, args.venv, find_pgbench(pg.bin_dir) if pg else None)
    except (OSError, subprocess.SubprocessError):
        pass
    # the row order of the table: targets as listed, workloads as given
    order = {t.id: i for i, t in enumerate(TARGETS)}
    wl = {w.name: i for i, w in enumerate(workloads)}
    results["rows"].sort(key=lambda r: (wl[r["workload"]], order[r["target"]]))
    complete = (not args.smoke and len(targets) == len(TARGETS) and len(workloads) == len(WORKLOADS))
    md_path = write_outputs(results, args.results_dir, args.venv, latest=complete)

    print()
    print(report.text_table(results))
    cpu = report.cpu_table(results, markdown=False)
    if cpu:
        print("\nCPU per request (server main process, its workers, PostgreSQL backends):")
        print("\n".join(cpu))
        print()
    for line in report.extras(results):
        print(line)
    if not args.smoke:
        print("\nGoals (W1):")
        for line in report.goals(results):
            print("  " + line)
    for line in report.notes(results):
        print("note: " + line)
    print("\nwritten: %s" % md_path)
    if args.smoke:
        failed = [r for r in results["rows"] if r["rps"] is None or r["requests"] == 0 or r["errors"]
                  or r["non2xx"]]
        return 1 if failed or not results["rows"] else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
