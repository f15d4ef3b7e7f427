"""Running the real daemon (`twistd -n omni_httpd`) as a subprocess in tests."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import List, Optional

import psycopg2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.exit(run())"]


def twistd_argv(*args: str, python: Optional[str] = None) -> List[str]:
    """twistd's command line; ``python``: another interpreter than ours."""
    return [python or TWISTD[0]] + TWISTD[1:] + ["-n", "--pidfile=", "omni_httpd"] + list(args)


class Daemon:
    """A daemon process whose output lines are collected and can be waited for."""

    def __init__(self, dsn: Optional[str], *args: str, env: Optional[dict] = None,
                 python: Optional[str] = None):
        argv = list(args)
        if "--metrics" not in argv:
            # Many daemons run at once in the tests: only the metrics tests serve it
            # (on a free port, tests/test_metrics.py).
            argv = ["--metrics", "none"] + argv
        if dsn is not None:
            argv = ["--dsn", dsn] + argv
        self.argv = twistd_argv(*argv, python=python)
        environment = dict(os.environ)
        environment.update(env or {})
        environment["PYTHONUNBUFFERED"] = "1"
        self.lines: List[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=environment, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 30.0, start: int = 0) -> re.Match:
        """Block until a line matching ``pattern`` appears (from line ``start`` on)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[start:]:
                    match = regex.search(line)
                    if match:
                        return match
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError("no line matching %r within %ss; output:\n%s"
                                         % (pattern, timeout, "\n".join(self.lines[-60:])))
                self._cond.wait(min(remaining, 0.2))

    def mark(self) -> int:
        with self._cond:
            return len(self.lines)

    def wait_ready(self, timeout: float = 60.0) -> None:
        self.wait_for(r"omni_httpd ready", timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError("daemon did not exit within %ss; output:\n%s" % (timeout, self.output[-4000:]))

    def worker_pids(self) -> List[int]:
        """Current worker pids, from the 'worker N started (pid P)' log lines (latest per slot)."""
        slots = {}
        for line in list(self.lines):
            match = re.search(r"worker (\d+) started \(pid (\d+)\)", line)
            if match:
                slots[int(match.group(1))] = int(match.group(2))
        return [slots[k] for k in sorted(slots)]


def sql(dsn: str, statement: str, params=None, fetch: bool = False):
    """Run one statement in autocommit mode; return its rows (None if it returns none).

    ``fetch`` is accepted for readability at call sites that want the rows.
    """
    connection = psycopg2.connect(dsn)
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            cursor.execute(statement, params)
            return cursor.fetchall() if cursor.description else None
    finally:
        connection.close()


def send_and_read(port: int, data: bytes, host: str = "127.0.0.1", timeout: float = 10.0) -> bytes:
    """Blocking: send ``data`` on a new connection, read until the server closes it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect((host, port))
        sock.sendall(data)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def running_handlers(dsn: str) -> int:
    """How many handler calls of any worker are running in the database right now."""
    return sql(dsn, "SELECT count(*) FROM pg_stat_activity WHERE state = 'active'"
                    " AND query LIKE 'SELECT * FROM pg_temp.\"omni_httpd_h%%'", fetch=True)[0][0]


def reload_count(dsn: str) -> int:
    return sql(dsn, "SELECT count(*) FROM omni_httpd.configuration_reloads", fetch=True)[0][0]


def wait_reloads(dsn: str, n: int = 1) -> None:
    sql(dsn, "CALL omni_httpd.wait_for_configuration_reloads(%s)", (n,))


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` until it returns a true value (returned) or the deadline passes."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("%s not reached within %ss" % (what, timeout))
        pause.wait(interval)


def reactor_wait_until(predicate, timeout: float = 20.0,
                       what: str = "condition"):
    """Fire with predicate()'s first true value, polling on the reactor (no sleeping)."""
    deadline = time.monotonic() + timeout
    from twisted.internet import defer, reactor

    result = defer.Deferred()

    def poll():
        try:
            value = predicate()
        except Exception:
            result.errback()
            return
        if value:
            result.callback(value)
        elif time.monotonic() > deadline:
            result.errback(AssertionError("timed out waiting for " + what))
        else:
            reactor.callLater(0.05, poll)
    poll()
    return result


def add_listener(dsn: str, query: Optional[str], address: str = "127.0.0.1", protocol: str = "http",
                 role_name: Optional[str] = None) -> int:
    """Create a listener on a free port, with a handler when ``query`` is given, in ONE
    transaction (so exactly one reload follows); returns the listener id."""
    if query is None:
        return sql(dsn, "INSERT INTO omni_httpd.listeners(address, port, protocol) VALUES (%s, 0, %s) RETURNING id",
                   (address, protocol), fetch=True)[0][0]
    return sql(dsn, """
        WITH l AS (INSERT INTO omni_httpd.listeners(address, port, protocol) VALUES (%s, 0, %s) RETURNING id),
             h AS (INSERT INTO omni_httpd.handlers(query, role_name) VALUES (%s, coalesce(%s, current_user)) RETURNING id),
             lh AS (INSERT INTO omni_httpd.listeners_handlers(listener_id, handler_id) SELECT l.id, h.id FROM l, h)
        SELECT l.id FROM l""", (address, protocol, query, role_name), fetch=True)[0][0]


def set_handler(dsn: str, listener_id: int, query: str) -> None:
    """Replace the query of the handler attached to ``listener_id`` (one transaction)."""
    sql(dsn, """UPDATE omni_httpd.handlers SET query = %s
                WHERE id = (SELECT min(handler_id) FROM omni_httpd.listeners_handlers WHERE listener_id = %s)""",
        (query, listener_id))


def effective_port(dsn: str, listener_id: int, timeout: float = 30.0) -> int:
    def port():
        rows = sql(dsn, "SELECT effective_port FROM omni_httpd.listeners WHERE id = %s", (listener_id,), fetch=True)
        return rows[0][0] if rows else None
    return wait_until(port, timeout, what="effective port of listener %s" % listener_id)
