"""The servers under test: this daemon, the two peers, nginx. Each is started in its own
process group (so it and its workers can be stopped by that group's id) and stopped
before the next one starts."""
from __future__ import annotations

import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

import psycopg2

import httpcheck
from workloads import Workload

HERE = os.path.dirname(os.path.abspath(__file__))
PEERS_DIR = os.path.join(HERE, "peers")


class ServerError(Exception):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Proc:
    """A child process in its own session/process group, output to a log file."""

    def __init__(self, argv: List[str], log_path: str, env: Optional[dict] = None, cwd: Optional[str] = None):
        self.argv, self.log_path, self.env, self.cwd = argv, log_path, env, cwd
        self.popen: Optional[subprocess.Popen] = None
        self.stop_seconds: Optional[float] = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd,
                                          start_new_session=True)

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def tail(self, lines: int = 5) -> str:
        try:
            with open(self.log_path, errors="replace") as handle:
                text = [line.rstrip() for line in handle.readlines() if line.strip()]
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def stop(self, grace: float = 15.0, group_first: bool = True) -> Optional[int]:
        """SIGTERM (to the whole group, or to the main process only), then SIGKILL to the
        group after `grace`. Returns the exit code, None if it had to be killed."""
        if self.popen is None:
            return None
        started = time.monotonic()
        try:
            return self._stop(grace, group_first)
        finally:
            self.stop_seconds = time.monotonic() - started

    def _stop(self, grace: float, group_first: bool) -> Optional[int]:
        if self.popen.poll() is None:
            try:
                if group_first:
                    os.killpg(self.popen.pid, signal.SIGTERM)
                else:
                    self.popen.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                return self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        else:
            code = self.popen.returncode
            self._kill_group()
            return code
        self._kill_group()
        self.popen.wait(10)
        return None

    def _kill_group(self) -> None:
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _rss_kb(pid: int) -> int:
    try:
        with open("/proc/%d/status" % pid) as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid: int) -> List[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as handle:
                stat = handle.read()
        except OSError:
            continue
        # the command may contain spaces and parentheses: ppid follows the last ')'
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def _cpu_ticks(pid: int) -> int:
    try:
        with open("/proc/%d/stat" % pid) as handle:
            stat = handle.read()
    except OSError:
        return 0
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _postgres_backends(dbname: str) -> List[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % entry, "rb") as handle:
                cmdline = handle.read()
        except OSError:
            continue
        if cmdline.startswith(b"postgres: ") and (b" %s " % dbname.encode()) in cmdline:
            found.append(int(entry))
    return found


def cpu_snapshot(pid: Optional[int], dbname: str = "bench") -> Dict[str, Dict[int, int]]:
    """CPU ticks of a server's main process, its direct children, and the database's backends."""
    snap = {"main": {}, "children": {}, "postgres": {}}
    if pid is not None:
        snap["main"][pid] = _cpu_ticks(pid)
        for child in _children(pid):
            snap["children"][child] = _cpu_ticks(child)
    for backend in _postgres_backends(dbname):
        snap["postgres"][backend] = _cpu_ticks(backend)
    return snap


def cpu_per_request(before: dict, after: dict, requests: int) -> Dict[str, float]:
    """Microseconds of CPU per request in each group between two snapshots (processes that
    came or went in between count from 0 or not at all)."""
    tick_us = 1e6 / os.sysconf("SC_CLK_TCK")
    out = {}
    for group in ("main", "children", "postgres"):
        ticks = sum(max(0, t - before[group].get(p, 0)) for p, t in after[group].items())
        out[group] = ticks * tick_us / requests if requests else 0.0
    return out


def process_rss(pid: int) -> Dict[str, object]:
    """RSS in MB of a server's main process and of its direct children (its workers)."""
    children = _children(pid)
    return {"main_mb": _rss_kb(pid) / 1024.0,
            "workers_mb": sorted((_rss_kb(child) / 1024.0 for child in children), reverse=True)}


class Server:
    name = "server"
    proc: Optional[Proc] = None

    def start(self) -> None:
        raise NotImplementedError

    def port(self, protocol: str, workload: Workload) -> int:
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def rss(self) -> Optional[Dict[str, object]]:
        if self.proc is None or not self.proc.alive():
            return None
        return process_rss(self.proc.pid)

    def describe_failure(self) -> str:
        if self.proc is None:
            return ""
        state = "running" if self.proc.alive() else "exited %s" % self.proc.popen.returncode
        return "%s; log: %s" % (state, self.proc.tail())


class PeerServer(Server):
    """A peer serving all workloads on one port, routed by path (see peers/common.py)."""

    def __init__(self, ctx, kind: str):
        self.ctx, self.kind = ctx, kind
        self.name = kind
        self._port = free_port()
        venv_bin = os.path.join(ctx.venv, "bin")
        env = dict(os.environ, BENCH_DSN=ctx.dsn, BENCH_POOL=str(ctx.peer_pool), PYTHONUNBUFFERED="1")
        if kind == "gunicorn":
            argv = [os.path.join(venv_bin, "gunicorn"), "--workers", "2", "--worker-class", "sync",
                    "--bind", "127.0.0.1:%d" % self._port, "--chdir", PEERS_DIR,
                    "--log-level", "warning", "wsgi_app:app"]
        elif kind == "uvicorn":
            argv = [os.path.join(venv_bin, "uvicorn"), "asgi_app:app", "--app-dir", PEERS_DIR,
                    "--host", "127.0.0.1", "--port", str(self._port), "--workers", "2",
                    "--loop", "uvloop", "--http", "httptools", "--no-access-log",
                    "--log-level", "warning"]
        else:
            raise ValueError(kind)
        self.proc = Proc(argv, os.path.join(ctx.workdir, "%s.log" % kind), env=env, cwd=ctx.workdir)

    def start(self) -> None:
        self.proc.start()

    def port(self, protocol: str, workload: Workload) -> int:
        return self._port


class NginxServer(Server):
    """nginx serving each workload's expected body from a file: the HTTP ceiling (h1 and h2c)."""
    name = "nginx"

    def __init__(self, ctx, w2_response: bytes):
        self.ctx = ctx
        self.h1_port, self.h2_port = free_port(), free_port()
        root = os.path.join(ctx.workdir, "nginx")
        www = os.path.join(root, "www")
        os.makedirs(www, exist_ok=True)
        os.chmod(root, 0o755)
        os.chmod(www, 0o755)
        for name, data in (("w1", b"Hello, <b>John</b>!"), ("w2", w2_response), ("w3", b"x" * 262144)):
            with open(os.path.join(www, name), "wb") as handle:
                handle.write(data)
            os.chmod(os.path.join(www, name), 0o644)
        write_static_root(os.path.join(www, "static"))
        temp = "\n".join("  %s_temp_path %s/%s;" % (kind, root, kind)
                         for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        conf = """worker_processes 2;
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 100000000;
  keepalive_timeout 75s;
{temp}
  server {{
    listen 127.0.0.1:{h1};
    listen 127.0.0.1:{h2} http2;
    location = /users/johndoe {{ default_type text/html; alias {www}/w1; }}
    location = /big {{ default_type "text/plain; charset=utf-8"; alias {www}/w3; }}
    # the static module answers POST with 405: turn that into an internal GET of the file
    location = /echo {{ default_type application/json; alias {www}/w2; error_page 405 =200 $uri; }}
    # W4: the static module, as the daemon's static files (ETag, Last-Modified, ranges)
    location /static/ {{ alias {www}/static/; types {{ text/css css; }} charset utf-8; charset_types text/css; }}
  }}
}}
""".format(root=root, www=www, temp=temp, h1=self.h1_port, h2=self.h2_port)
        conf_path = os.path.join(root, "nginx.conf")
        with open(conf_path, "w") as handle:
            handle.write(conf)
        self.proc = Proc(["nginx", "-p", root, "-e", os.path.join(root, "error.log"), "-c", conf_path],
                         os.path.join(ctx.workdir, "nginx.log"), cwd=root)

    def start(self) -> None:
        self.proc.start()

    def port(self, protocol: str, workload: Workload) -> int:
        return self.h2_port if protocol == "h2c" else self.h1_port


def write_static_root(directory: str) -> str:
    """The W4 file in ``directory`` (readable by any account: nginx's and the daemon's
    workers may run as another)."""
    from workloads import W4_NAME, w4_file
    os.makedirs(directory, exist_ok=True)
    os.chmod(directory, 0o755)
    path = os.path.join(directory, W4_NAME)
    with open(path, "wb") as handle:
        handle.write(w4_file())
    os.chmod(path, 0o644)
    return directory


class DaemonServer(Server):
    """`twistd -n omni_httpd` against the benchmark database: one listener (port 0) and
    handler per workload, plus one listener used to measure reload latency."""
    name = "omni_httpd"

    def __init__(self, ctx, workloads: List[Workload], workers: int = 2, metrics: str = "none"):
        self.ctx, self.workloads, self.workers = ctx, workloads, workers
        self.metrics = metrics
        self.listener_ids: Dict[str, int] = {}
        self.ports: Dict[str, int] = {}
        self.reload_handler_id: Optional[int] = None
        self.started_at = 0.0
        self.schema_seconds: Optional[float] = None
        self.proc = self._make_proc()

    def _make_proc(self) -> Proc:
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        if not os.access(twistd, os.X_OK):
            twistd = "twistd"
        argv = [twistd, "-n", "--pidfile", os.path.join(self.ctx.workdir, "twistd.pid"), "omni_httpd",
                "--dsn", self.ctx.dsn, "--http-workers", str(self.workers), "--no-init", "--admin", "none",
                # like the peers (uvicorn --no-access-log, nginx access_log off)
                "--no-access-log", "--metrics", self.metrics]
        # the same omni_httpd (and its twisted/plugins) as this process, installed or not
        import omni_httpd
        root = os.path.dirname(os.path.dirname(os.path.abspath(omni_httpd.__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        # W4's file (bench/workloads.py), served from disk
        argv += ["--static-root", "bench=" + write_static_root(os.path.join(self.ctx.workdir, "static"))]
        return Proc(argv, os.path.join(self.ctx.workdir, "omni_httpd.log"), env=env, cwd=self.ctx.workdir)

    def _connect(self):
        conn = psycopg2.connect(self.ctx.dsn)
        conn.autocommit = True
        return conn

    def _wait(self, what: str, predicate, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.proc.alive():
                raise ServerError("daemon exited (%s) while waiting for %s: %s"
                                  % (self.proc.popen.returncode, what, self.proc.tail()))
            try:
                if predicate():
                    return
            except psycopg2.Error:
                pass
            time.sleep(0.05)
        raise ServerError("timed out after %ds waiting for %s; log: %s" % (timeout, what, self.proc.tail()))

    def start(self) -> None:
        self.started_at = time.monotonic()
        self.proc.start()
        conn = self._connect()
        try:
            from omni_httpd.master.migrations import migrations
            shipped = [version for version, _name, _sql in migrations()]

            def schema_ready():
                # Every migration, not just the first tables: the daemon applies them one
                # transaction each, and the workloads may use any (static_files: 011).
                with conn.cursor() as cur:
                    cur.execute("SELECT to_regclass('omni_httpd.schema_migrations') IS NOT NULL")
                    if not cur.fetchone()[0]:
                        return False
                    cur.execute("SELECT count(*) FROM omni_httpd.schema_migrations WHERE version = ANY(%s)",
                                (shipped,))
                    return cur.fetchone()[0] == len(shipped)
            self._wait("the daemon to install its schema", schema_ready, 60)
            self.schema_seconds = time.monotonic() - self.started_at
            conn.autocommit = False
            with conn.cursor() as cur:
                for workload in self.workloads:
                    if workload.route_sql:
                        cur.execute(workload.route_sql)
                        cur.execute("INSERT INTO omni_httpd.listeners(address, port) "
                                    "VALUES ('127.0.0.1', 0) RETURNING id")
                        self.listener_ids[workload.name] = cur.fetchone()[0]
                    else:
                        self.listener_ids[workload.name] = self._add_listener(cur, workload.handler)
                self.listener_ids["reload"] = self._add_listener(
                    cur, "SELECT omni_httpd.http_response('reload 0') FROM request")
                cur.execute("SELECT handler_id FROM omni_httpd.listeners_handlers WHERE listener_id = %s",
                            (self.listener_ids["reload"],))
                self.reload_handler_id = cur.fetchone()[0]
                for workload in self.workloads:
                    if workload.static_file is not None:     # W4: from disk, not its handler
                        cur.execute("INSERT INTO omni_httpd.static_files (listener_id, url_prefix, root) "
                                    "VALUES (%s, '/static', 'bench')", (self.listener_ids[workload.name],))
            conn.commit()
            conn.autocommit = True
            self._read_ports(conn)
        finally:
            conn.close()

    @staticmethod
    def _add_listener(cur, query: str) -> int:
        cur.execute("INSERT INTO omni_httpd.handlers(query) VALUES (%s) RETURNING id", (query,))
        handler_id = cur.fetchone()[0]
        cur.execute("INSERT INTO omni_httpd.listeners(address, port) VALUES ('127.0.0.1', 0) RETURNING id")
        listener_id = cur.fetchone()[0]
        cur.execute("INSERT INTO omni_httpd.listeners_handlers(listener_id, handler_id) VALUES (%s, %s)",
                    (listener_id, handler_id))
        return listener_id

    def _read_ports(self, conn) -> None:
        ids = list(self.listener_ids.values())

        def bound():
            with conn.cursor() as cur:
                cur.execute("SELECT id, effective_port FROM omni_httpd.listeners WHERE id = ANY(%s)", (ids,))
                rows = dict(cur.fetchall())
            if all(rows.get(i) for i in ids):
                for name, lid in self.listener_ids.items():
                    self.ports[name] = rows[lid]
                return True
            return False
        self._wait("effective_port of the new listeners", bound, 30)

    def port(self, protocol: str, workload: Workload) -> int:
        return self.ports[workload.name]

    def stop(self) -> None:
        # SIGTERM to the master only: it stops its workers itself (graceful shutdown).
        if self.proc is not None:
            self.exit_code = self.proc.stop(grace=20, group_first=False)
            self.stop_seconds = self.proc.stop_seconds

    # -- extra measurements ---------------------------------------------------------------
    def reload_latency(self, samples: int, timeout: float = 10.0) -> Dict[str, object]:
        """Commit of a handler change -> first response showing it (new connection per
        probe, ~2 ms apart)."""
        port = self.ports["reload"]
        conn = self._connect()
        conn.autocommit = False
        latencies, failures = [], 0
        try:
            for i in range(1, samples + 1):
                expected = ("reload %d" % i).encode()
                with conn.cursor() as cur:
                    cur.execute("UPDATE omni_httpd.handlers SET query = %s WHERE id = %s",
                                ("SELECT omni_httpd.http_response('reload %d') FROM request" % i,
                                 self.reload_handler_id))
                t0 = time.monotonic()
                conn.commit()
                deadline = t0 + timeout
                seen = None
                while time.monotonic() < deadline:
                    try:
                        status, _, body = httpcheck.http1(port, "GET", "/", timeout=2)
                        if status == 200 and body == expected:
                            seen = time.monotonic()
                            break
                    except OSError:
                        pass
                    time.sleep(0.002)
                if seen is None:
                    failures += 1
                else:
                    latencies.append((seen - t0) * 1000.0)
                time.sleep(0.2)
        finally:
            conn.close()
        return {"samples": samples, "failures": failures,
                "median_ms": statistics.median(latencies) if latencies else None,
                "max_ms": max(latencies) if latencies else None}

    def restart_time(self, workload: Workload, check, timeout: float = 60.0) -> Optional[float]:
        """Move the workload's listener to a fixed free port, stop the daemon, start it again
        and time start -> first correct response (schema and configuration already there)."""
        port = free_port()
        conn = self._connect()
        try:
            with conn.cursor() as cur:
                cur.execute("UPDATE omni_httpd.listeners SET port = %s WHERE id = %s",
                            (port, self.listener_ids[workload.name]))
        finally:
            conn.close()
        self.ports[workload.name] = port
        # wait until the running daemon serves on the new port, so the stop is clean
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and check(port) is not None:
            time.sleep(0.05)
        self.stop()
        last_reload = self._last_reload_id()
        self.proc = self._make_proc()
        t0 = time.monotonic()
        self.proc.start()
        served = None
        while time.monotonic() < t0 + timeout:
            if not self.proc.alive():
                raise ServerError("daemon exited on restart: %s" % self.proc.tail())
            if check(port) is None:
                served = time.monotonic() - t0
                break
            time.sleep(0.01)
        # the start-up is complete once it has recorded its first configuration as applied
        # (a configuration_reloads row); stopping earlier would measure an aborted start
        self.restart_ready_seconds = None
        while served is not None and time.monotonic() < t0 + timeout and self.proc.alive():
            if self._last_reload_id() > last_reload:
                self.restart_ready_seconds = time.monotonic() - t0
                break
            time.sleep(0.02)
        return served

    def _last_reload_id(self) -> int:
        conn = self._connect()
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT coalesce(max(id), 0) FROM omni_httpd.configuration_reloads")
                return cur.fetchone()[0]
        finally:
            conn.close()
