"""Fault tests against the real daemon under load ("make it stay fixed").

Each test starts `twistd -n omni_httpd` (tests/daemon_support.py), loads it from a few
client threads doing blocking HTTP/1.1 requests with http.client on 127.0.0.1, injects
one fault and checks what the clients saw:

- a worker killed with SIGKILL: a replacement serves within 2 s, the other worker is
  untouched, only requests in flight on the killed worker are lost;
- PostgreSQL stopped and started again: 503 at once while it is away, then 200 again
  without restarting anything, and the master follows configuration changes again;
- a configuration reload every second for 30 s: no failed request on a listener that
  did not change;
- two daemons on one database: both follow one change, both record it.

Every loop is bounded, every wait polls a condition with a deadline. Which worker
answered a request comes from the access log: each request has a unique path, and the
master relays each worker's line as ``[worker N pid P] ... "GET <path> HTTP/1.1" <status>``.
The measured figures are printed (``pytest -s`` shows them) and kept in the assertion
messages.
"""
from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import threading
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import psycopg2
import pytest

from daemon_support import Daemon, add_listener, effective_port, set_handler, sql, wait_until

ACCESS = re.compile(r'\[worker (\d+) pid (\d+)\] \S+ "GET (/\S*) HTTP/1\.1" (\d{3}) ')

#: hard cap on any load run, whatever happens to the test (a bounded loop)
LOAD_CAP_S = 180.0


# -- load generator -----------------------------------------------------------------------------
@dataclass
class Result:
    client: int
    conn: int          # the client's connection number (keep-alive connections are reused)
    conn_opened: float  # monotonic time the connection was made (before its first request)
    path: str
    t0: float
    t1: float
    status: Optional[int]  # None: the request failed (connection reset, closed, timeout)
    body: bytes
    error: Optional[str]

    @property
    def latency(self) -> float:
        return self.t1 - self.t0


class Load:
    """``clients`` threads, each sending GET /<tag>/<client>/<conn>/<seq> back to back on a
    keep-alive connection (a new one after ``reconnect_every`` requests or any failure),
    until stopped or ``LOAD_CAP_S`` has passed."""

    def __init__(self, port: int, clients: int, tag: str, timeout: float = 10.0, reconnect_every: int = 20):
        self.port, self.clients, self.tag = port, clients, tag
        self.timeout, self.reconnect_every = timeout, reconnect_every
        self.results: List[Result] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(n,), daemon=True) for n in range(clients)]

    def __enter__(self) -> "Load":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> List[Result]:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 10)
        assert not any(t.is_alive() for t in self._threads), "a load client did not stop"
        return self.snapshot()

    def snapshot(self) -> List[Result]:
        with self._lock:
            return list(self.results)

    def _client(self, client: int) -> None:
        cap = time.monotonic() + LOAD_CAP_S
        conn, conn_no, on_conn, opened, seq = None, 0, 0, 0.0, 0
        while not self._stop.is_set() and time.monotonic() < cap:
            if conn is None:
                conn_no += 1
                on_conn = 0
                opened = time.monotonic()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            seq += 1
            on_conn += 1
            path = "/%s/%d/%d/%d" % (self.tag, client, conn_no, seq)
            t0 = time.monotonic()
            status, body, error, close = None, b"", None, False
            try:
                conn.request("GET", path)
                response = conn.getresponse()
                body = response.read()
                status = response.status
                close = response.will_close
            except (OSError, http.client.HTTPException) as exc:
                error = "%s: %s" % (type(exc).__name__, exc)
                close = True
            result = Result(client, conn_no, opened, path, t0, time.monotonic(), status, body, error)
            with self._lock:
                self.results.append(result)
            if close or on_conn >= self.reconnect_every:
                conn.close()
                conn = None
        if conn is not None:
            conn.close()


# -- reading the daemon's log ---------------------------------------------------------------------
class AccessLog:
    """Incremental reader of the access-log lines a daemon printed: path -> (slot, pid, status)."""

    def __init__(self, daemon: Daemon):
        self.daemon = daemon
        self.position = 0
        self.by_path: Dict[str, Tuple[int, int, int]] = {}

    def update(self) -> Dict[str, Tuple[int, int, int]]:
        lines = self.daemon.lines[self.position:]  # list slicing: safe against the reader thread
        self.position += len(lines)
        for line in lines:
            match = ACCESS.search(line)
            if match:
                self.by_path[match.group(3)] = (int(match.group(1)), int(match.group(2)), int(match.group(4)))
        return self.by_path

    def count(self, pid: int, status: int) -> int:
        """How many answers with ``status`` ``pid`` logged."""
        self.update()
        return sum(1 for path, (_slot, p, s) in self.by_path.items() if p == pid and s == status)


def wait_reload_rows(dsn: str, n: int, timeout: float = 60.0) -> None:
    """CALL omni_httpd.wait_for_configuration_reloads(n), bounded by a statement_timeout."""
    connection = psycopg2.connect(dsn, options="-c statement_timeout=%d" % int(timeout * 1000))
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            cursor.execute("CALL omni_httpd.wait_for_configuration_reloads(%s)", (n,))
    except psycopg2.errors.QueryCanceled:
        raise AssertionError("fewer than %d configuration reload(s) recorded within %ss" % (n, timeout))
    finally:
        connection.close()


def fetch(port: int, path: str = "/", timeout: float = 10.0) -> Tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def report(name: str, **figures) -> str:
    text = "%s: %s" % (name, ", ".join("%s=%s" % (k, ("%.3f" % v) if isinstance(v, float) else v)
                                       for k, v in figures.items()))
    print("\n[faults] " + text)
    return text


def start_daemon(dsn: str, *args: str) -> Daemon:
    daemon = Daemon(dsn, "--no-init", "--admin", "none", *args)
    try:
        daemon.wait_ready(90)
    except BaseException:
        daemon.stop(signal.SIGKILL)
        raise
    return daemon


def serve(dsn: str, query: str, reloads: int = 1) -> int:
    """A new listener (port 0) with a handler; returns its effective port once applied."""
    listener = add_listener(dsn, query)
    wait_reload_rows(dsn, reloads)
    return effective_port(dsn, listener)


# -- a. a worker killed under load ----------------------------------------------------------------
CLIENTS_A = 8


def test_sigkilled_worker_is_replaced_quickly_and_its_sibling_is_untouched(dsn):
    daemon = start_daemon(dsn, "--http-workers", "2")
    try:
        wait_reload_rows(dsn, 1)
        port = serve(dsn, "SELECT omni_httpd.http_response('ok') FROM request")
        pids = daemon.worker_pids()
        assert len(pids) == 2, daemon.output[-3000:]
        victim, survivor = pids
        access = AccessLog(daemon)
        with Load(port, CLIENTS_A, "a") as load:
            # both workers are loaded (connections are spread by SO_REUSEPORT; clients reconnect often)
            wait_until(lambda: access.count(victim, 200) >= 100 and access.count(survivor, 200) >= 100,
                       timeout=60, what="both workers serving")
            mark = daemon.mark()
            killed_at = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            daemon.wait_for(r"worker 0 \(pid %d\) killed by signal 9; restarting" % victim, 30, start=mark)
            replacement = int(daemon.wait_for(r"worker 0 started \(pid (\d+)\)", 30, start=mark).group(1))
            assert replacement not in pids
            served_before = access.count(survivor, 200)
            # the replacement serves, and the survivor went on serving meanwhile
            wait_until(lambda: access.count(replacement, 200) >= 100
                       and access.count(survivor, 200) >= served_before + 100,
                       timeout=60, what="the replacement and the survivor serving")
            results = load.stop()
        answered = [r for r in results if r.status is not None]
        failed = [r for r in results if r.status is None]
        # every answer to a request sent since the kill reaches the log (relayed a moment later)
        wait_until(lambda: all(r.path in access.update() for r in answered if r.t0 >= killed_at),
                   timeout=30, what="the access log of every request sent since the kill")
        by_path = access.by_path
        # ...but the victim's last lines may be lost with it: a worker writes its log every
        # 50 ms (worker.StderrLog), SIGKILL loses what it had not written yet
        unlogged = [r for r in answered if r.path not in by_path]
        assert all(killed_at - 1.0 <= r.t0 < killed_at for r in unlogged), \
            [(r.path, r.t0 - killed_at, r.t1 - killed_at) for r in unlogged]

        def pid_of(result: Result) -> Optional[int]:
            entry = by_path.get(result.path)
            return entry[1] if entry else victim  # unlogged: answered by the victim before the kill

        assert all(r.status == 200 and r.body == b"ok" for r in answered), \
            sorted({(r.status, r.body[:60]) for r in answered})
        assert all(pid_of(r) in (victim, survivor, replacement) for r in answered)

        recovered_at = min(r.t1 for r in answered if pid_of(r) == replacement)
        recovery = recovered_at - killed_at
        # which worker each connection was on (from its answered requests)
        conn_pid = {}
        for r in answered:
            conn_pid.setdefault((r.client, r.conn), pid_of(r))
        survivor_during = [r for r in answered if pid_of(r) == survivor and killed_at <= r.t1 <= recovered_at]
        figures = report("worker SIGKILL", recovery_s=recovery, requests=len(results), failures=len(failed),
                         unlogged_answers_of_the_victim=len(unlogged),
                         clients=CLIENTS_A, victim=victim, replacement=replacement, survivor=survivor,
                         survivor_answers_during_recovery=len(survivor_during),
                         max_latency_s=max(r.latency for r in answered),
                         errors=sorted({r.error for r in failed}))

        assert recovery <= 2.0, figures
        # the survivor is the same process, and went on answering while the slot was down
        assert daemon.worker_pids() == [replacement, survivor], daemon.worker_pids()
        assert survivor_during, figures
        assert "worker 1 (pid %d)" % survivor not in daemon.output
        # only requests in flight on the killed worker were lost: at most one per client, on
        # connections opened before the kill that the survivor never answered on
        assert len(failed) <= CLIENTS_A, figures
        assert len({r.client for r in failed}) == len(failed), figures
        for r in failed:
            assert r.conn_opened < killed_at, (r, figures)
            assert conn_pid.get((r.client, r.conn)) in (None, victim), (r, figures)
    finally:
        assert daemon.stop() == 0, daemon.output[-3000:]


# -- b. PostgreSQL stopped and started under load --------------------------------------------------
CLIENTS_B = 4


def test_postgresql_restart_gives_quick_503s_then_recovers_without_restarting_workers(own_cluster):
    dsn = own_cluster.dsn
    daemon = start_daemon(dsn, "--http-workers", "2")
    try:
        wait_reload_rows(dsn, 1)
        listener = add_listener(dsn, "SELECT omni_httpd.http_response('ok') FROM request")
        wait_reload_rows(dsn, 1)
        port = effective_port(dsn, listener)
        pids = daemon.worker_pids()
        access = AccessLog(daemon)
        with Load(port, CLIENTS_B, "b") as load:
            wait_until(lambda: all(access.count(pid, 200) >= 50 for pid in pids), timeout=60,
                       what="both workers serving")
            stopping_at = time.monotonic()
            own_cluster.stop()
            down_at = time.monotonic()
            # both workers answer 503 while the database is away
            # ... and keep failing to reconnect for a while (backoff 0.1, 0.2, 0.4, 0.8 s, ...)
            def answered_while_down(pid):
                by_path = access.update()
                return sum(1 for r in load.snapshot() if r.t0 >= down_at and by_path.get(r.path, (0, 0))[1] == pid)

            def failed_reconnects(pid):
                return len(re.findall(r"\[worker \d pid %d\] reconnecting to the database failed" % pid,
                                      daemon.output))
            wait_until(lambda: all(answered_while_down(pid) >= 20 and failed_reconnects(pid) >= 4 for pid in pids),
                       timeout=30, interval=0.1, what="answers and reconnect attempts of both workers")
            starting_at = time.monotonic()
            own_cluster.start()
            back_at = time.monotonic()
            answered_before = {pid: access.count(pid, 200) for pid in pids}
            wait_until(lambda: all(access.count(pid, 200) >= answered_before[pid] + 50 for pid in pids),
                       timeout=60, what="both workers serving again")
            results = load.stop()

        failed = [r for r in results if r.status is None]
        statuses = sorted({r.status for r in results if r.status is not None})
        down = [r for r in results if r.t0 >= down_at and r.t1 <= starting_at]
        first_200 = min(r.t1 for r in results if r.status == 200 and r.t0 >= down_at)
        recovery = max(0.0, first_200 - back_at)
        figures = report("PostgreSQL restart", stop_s=down_at - stopping_at, down_s=starting_at - down_at,
                         start_s=back_at - starting_at, requests=len(results), failures=len(failed),
                         statuses=statuses, requests_while_down=len(down),
                         max_latency_while_down_s=max(r.latency for r in down),
                         max_latency_s=max(r.latency for r in results if r.status is not None),
                         first_200_after_back_s=recovery)
        # no request hangs or is dropped: every one is answered, 200 or 503
        assert not failed, (figures, failed[:5])
        assert statuses == [200, 503], figures
        # while the database is down: 503 at once
        assert down and all(r.status == 503 and r.body == b"Service unavailable" for r in down), figures
        assert max(r.latency for r in down) < 1.0, figures
        # back: the workers' reconnect backoff is capped at 5 s
        assert recovery < 8.0, figures
        assert daemon.proc.poll() is None
        assert daemon.worker_pids() == pids
        assert "restarting" not in daemon.output

        # the master reconnected too: it follows configuration changes again
        changed_at = time.monotonic()
        set_handler(dsn, listener, "SELECT omni_httpd.http_response('after restart') FROM request")
        wait_until(lambda: fetch(port) == (200, b"after restart"), timeout=60, interval=0.1,
                   what="a configuration change after the restart")
        report("PostgreSQL restart", first_change_followed_s=time.monotonic() - changed_at)
        # the operator reads what happened in one line each, not in tracebacks
        assert "Traceback" not in daemon.output and "Unhandled Error" not in daemon.output, \
            daemon.output[-3000:]
    finally:
        assert daemon.stop() == 0, daemon.output[-3000:]


def test_worker_dying_while_postgresql_is_down_serves_soon_after_it_is_back(own_cluster):
    """A replacement started while the database is away serves at once (503s: no slot is
    left without a process, so no new connection waits in a socket nobody reads) and
    connects by itself when PostgreSQL is back."""
    dsn = own_cluster.dsn
    daemon = start_daemon(dsn, "--http-workers", "2")
    try:
        wait_reload_rows(dsn, 1)
        port = serve(dsn, "SELECT omni_httpd.http_response('ok') FROM request")
        pids = daemon.worker_pids()
        mark = daemon.mark()
        own_cluster.stop()
        os.kill(pids[0], signal.SIGKILL)
        wait_until(lambda: daemon.worker_pids()[0] != pids[0], timeout=30, interval=0.05,
                   what="a replacement for worker 0")
        daemon.wait_for(r"worker 0 .*cannot connect to the database", start=mark)
        # Every new connection (the kernel spreads them over both slots) is answered at once.
        slowest = 0.0
        for i in range(20):
            began = time.monotonic()
            status, _ = fetch(port, "/down/%d" % i, timeout=10)
            slowest = max(slowest, time.monotonic() - began)
            assert status == 503
        assert slowest < 2.0, slowest
        replacement = daemon.worker_pids()[0]
        own_cluster.start()
        back_at = time.monotonic()
        access = AccessLog(daemon)

        def slot_0_serves():
            current = daemon.worker_pids()[0]
            # new connections: the kernel spreads them over both slots' sockets
            fetch(port, "/d/%f" % time.monotonic(), timeout=60)
            return current not in pids and access.count(current, 200) > 0
        wait_until(slot_0_serves, timeout=90, interval=0.05, what="worker 0 serving again")
        recovery = time.monotonic() - back_at
        figures = report("worker died while PostgreSQL was down", slowest_503_s=slowest,
                         slot_0_serving_after_back_s=recovery)
        assert recovery < 5.0, figures
        assert daemon.worker_pids()[0] == replacement      # it never had to exit
        assert daemon.worker_pids()[1] == pids[1]
    finally:
        assert daemon.stop() == 0, daemon.output[-3000:]


# -- c. reloads every second under load -----------------------------------------------------------
RELOADS_C = 30


def test_reload_every_second_for_30_s_fails_no_request_on_an_unchanged_listener(dsn):
    daemon = start_daemon(dsn, "--http-workers", "2")
    try:
        wait_reload_rows(dsn, 1)
        steady_port = serve(dsn, "SELECT omni_httpd.http_response('steady') FROM request")
        toggled = add_listener(dsn, "SELECT omni_httpd.http_response('toggle -1') FROM request")
        wait_reload_rows(dsn, 1)
        toggled_port = effective_port(dsn, toggled)
        pids = daemon.worker_pids()
        extra = None  # (listener id, port) of the listener added and removed
        kinds = {"handler": 0, "listener added": 0, "listener removed": 0}
        with Load(steady_port, 2, "c", reconnect_every=50) as load:
            started = time.monotonic()
            for i in range(RELOADS_C):
                # one change per second
                threading.Event().wait(max(0.0, started + i - time.monotonic()))
                if i % 2 == 0:
                    set_handler(dsn, toggled, "SELECT omni_httpd.http_response('toggle %d') FROM request" % i)
                    wait_reload_rows(dsn, 1)
                    assert fetch(toggled_port) == (200, b"toggle %d" % i)
                    kinds["handler"] += 1
                elif extra is None:
                    listener = add_listener(dsn, "SELECT omni_httpd.http_response('extra') FROM request")
                    wait_reload_rows(dsn, 1)
                    extra = (listener, effective_port(dsn, listener))
                    assert fetch(extra[1]) == (200, b"extra")
                    kinds["listener added"] += 1
                else:
                    sql(dsn, "DELETE FROM omni_httpd.listeners WHERE id = %s", (extra[0],))
                    wait_reload_rows(dsn, 1)
                    with pytest.raises(ConnectionRefusedError):
                        socket.create_connection(("127.0.0.1", extra[1]), timeout=5).close()
                    extra = None
                    kinds["listener removed"] += 1
            elapsed = time.monotonic() - started
            results = load.stop()

        bad = [r for r in results if r.status != 200 or r.body != b"steady"]
        during = [r for r in results if r.t0 >= started]
        gaps = [b.t1 - a.t1 for a, b in zip(sorted(results, key=lambda r: r.t1),
                                              sorted(results, key=lambda r: r.t1)[1:])]
        figures = report("reloads under load", reloads=sum(kinds.values()), seconds=elapsed,
                         requests=len(results), requests_during_reloads=len(during), failures=len(bad),
                         max_latency_s=max(r.latency for r in results), max_gap_s=max(gaps), **kinds)
        assert sum(kinds.values()) == RELOADS_C
        assert not bad, (figures, bad[:5])
        assert len(during) >= 100, figures
        # reloads never hold the unchanged listener up for long
        assert max(r.latency for r in results) < 2.0, figures
        assert daemon.worker_pids() == pids
        assert "restarting" not in daemon.output
    finally:
        assert daemon.stop() == 0, daemon.output[-3000:]


# -- d. two daemons on one database ---------------------------------------------------------------
def bound_port(daemon: Daemon, listener: int, start: int = 0) -> int:
    return int(daemon.wait_for(r"listener %d bound to http://127\.0\.0\.1:(\d+)" % listener, 30, start).group(1))


def test_two_daemons_on_one_database_both_follow_a_change_and_both_record_it(empty_dsn):
    # Started at once on an empty database: the schema migrations must not collide.
    first = Daemon(empty_dsn, "--no-init", "--admin", "none", "--http-workers", "1")
    second = Daemon(empty_dsn, "--no-init", "--admin", "none", "--http-workers", "1")
    daemons = [first, second]
    try:
        for daemon in daemons:
            daemon.wait_ready(90)
        wait_reload_rows(empty_dsn, 2)  # each daemon's first start
        assert sql(empty_dsn, "SELECT count(*) FROM omni_httpd.configuration_reloads", fetch=True)[0][0] == 0

        # A port-0 listener: every daemon binds its own port and logs it; effective_port holds
        # the port of whichever daemon wrote it last (see README, "Running many daemons").
        listener = add_listener(empty_dsn, "SELECT omni_httpd.http_response('v1') FROM request")
        wait_reload_rows(empty_dsn, 2)
        ports = [bound_port(daemon, listener) for daemon in daemons]
        assert ports[0] != ports[1]
        assert effective_port(empty_dsn, listener) in ports
        assert [fetch(p) for p in ports] == [(200, b"v1"), (200, b"v1")]

        marks = [daemon.mark() for daemon in daemons]
        changed_at = time.monotonic()
        set_handler(empty_dsn, listener, "SELECT omni_httpd.http_response('v2') FROM request")
        # one change, one row from each daemon (each logs the generation it recorded)
        wait_until(lambda: sql(empty_dsn, "SELECT count(*) FROM omni_httpd.configuration_reloads",
                               fetch=True)[0][0] >= 2, timeout=60, what="two reload rows")
        for daemon, mark in zip(daemons, marks):
            daemon.wait_for(r"configuration generation \d+ applied by all workers: listener %d " % listener,
                            30, start=mark)
        both_at = time.monotonic()
        assert [fetch(p) for p in ports] == [(200, b"v2"), (200, b"v2")]
        assert sql(empty_dsn, "SELECT count(*) FROM omni_httpd.configuration_reloads", fetch=True)[0][0] == 2
        wait_reload_rows(empty_dsn, 2)
        # a handler change reaches the workers without rebinding anything
        assert all(len(re.findall(r"listener %d bound to" % listener, d.output)) == 1 for d in daemons)
        report("two daemons", ports=ports, effective_port=effective_port(empty_dsn, listener),
               change_to_both_recorded_s=both_at - changed_at)
    finally:
        codes = [daemon.stop() for daemon in daemons]
        assert codes == [0, 0], "\n".join(d.output[-2000:] for d in daemons)
