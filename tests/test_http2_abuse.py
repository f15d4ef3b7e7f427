"""Hostile HTTP/2 clients against the real daemon (one worker, so every connection in a
test shares that worker's reactor and DB thread with the others).

What each test shows a user would see: work for streams the client gave up on is not
run, a flooding or greedy connection is ended or throttled while the worker keeps
answering everyone else, and its memory stays bounded.
"""
from __future__ import annotations

import hashlib
import os
import select
import socket
import struct
import time
from typing import List, Optional, Tuple

import h2.config
import h2.connection
import h2.events
import pytest
from h2.errors import ErrorCodes

from daemon_support import Daemon, add_listener, effective_port, sql, wait_reloads, wait_until
from h2_client import h2_exchange

MB = 1024 * 1024
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@pytest.fixture(scope="module")
def one_worker(module_dsn):
    daemon = Daemon(module_dsn, "--http-workers", "1", "--no-init", "--admin", "none",
                    "--no-access-log")
    try:
        daemon.wait_ready()
        wait_reloads(module_dsn, 1)
        wait_until(daemon.worker_pids, what="worker pid in the log")
        yield module_dsn, daemon
    finally:
        code = daemon.stop()
    assert code == 0, daemon.output[-3000:]


def serve(dsn: str, query: str) -> int:
    listener_id = add_listener(dsn, query)
    wait_reloads(dsn, 1)
    return effective_port(dsn, listener_id)


def count(dsn: str, table: str, where: str = "true") -> int:
    return sql(dsn, "SELECT count(*) FROM %s WHERE %s" % (table, where), fetch=True)[0][0]


def worker_pid(daemon) -> int:
    (pid,) = daemon.worker_pids()
    return pid


def _status_kb(pid: int, field: str) -> int:
    with open("/proc/%d/status" % pid) as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError("no %s in /proc/%d/status" % (field, pid))


class PeakRss:
    """The worker's peak resident memory over a block, from the kernel's own high-water
    mark (VmHWM, reset through clear_refs), so a short spike is not missed by polling."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        with open("/proc/%d/clear_refs" % pid, "w") as handle:
            handle.write("5")   # reset VmHWM to the current RSS
        self.start_kb = _status_kb(pid, "VmRSS")

    @property
    def growth_mb(self) -> float:
        return (_status_kb(self.pid, "VmHWM") - self.start_kb) / 1024.0


def timed_get(port: int, path: str = "/other") -> Tuple[float, int, bytes]:
    """One HTTP/2 request on a new connection: (seconds, status, body)."""
    started = time.monotonic()
    (result,) = h2_exchange(port, [("GET", path, b"")], timeout=60)
    return time.monotonic() - started, result.status, result.body


def read_frames(sock: socket.socket, deadline: float) -> Tuple[List[Tuple[int, int, bytes]], bool]:
    """The frames the server sends until it closes the connection or the deadline passes:
    ([(type, stream id, payload)], whether the server closed the connection)."""
    data = b""
    closed = False
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            chunk = sock.recv(1 << 20)
        except socket.timeout:
            break
        except ConnectionResetError:
            closed = True
            break
        if not chunk:
            closed = True
            break
        data += chunk
    frames = []
    offset = 0
    while len(data) - offset >= 9:
        length = int.from_bytes(data[offset:offset + 3], "big")
        end = offset + 9 + length
        if len(data) < end:
            break
        frames.append((data[offset + 3], int.from_bytes(data[offset + 5:offset + 9], "big") & 0x7FFFFFFF,
                       data[offset + 9:end]))
        offset = end
    return frames, closed


def goaway_code(frames) -> Optional[int]:
    for kind, _stream, payload in frames:
        if kind == 0x7:
            return struct.unpack("!II", payload[:8])[1]
    return None


def client_connection() -> h2.connection.H2Connection:
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                     header_encoding="utf-8"))
    connection.initiate_connection()
    return connection


def request_headers(port: int, path: str, method: str = "GET", extra=()) -> list:
    return [(":method", method), (":path", path), (":scheme", "http"),
            (":authority", "127.0.0.1:%d" % port)] + list(extra)


# -- 1. rapid reset (CVE-2023-44487) ---------------------------------------------------------------

def test_rapid_reset_runs_few_handlers_gets_enhance_your_calm_and_others_are_served(one_worker):
    dsn, daemon = one_worker
    mark = daemon.mark()
    sql(dsn, "CREATE TABLE rapid_runs(at timestamptz DEFAULT clock_timestamp())")
    # Each run costs the DB thread a millisecond or two: 5000 of them would hold every
    # other client of this worker up for seconds.
    port = serve(dsn, """WITH w AS (INSERT INTO rapid_runs SELECT FROM request
                                    WHERE request.path = '/attack' AND pg_sleep(0.001) IS NOT NULL)
                         SELECT omni_httpd.http_response('served ' || request.path) FROM request""")
    pairs = 5000
    connection = client_connection()
    for _ in range(pairs):
        stream_id = connection.get_next_available_stream_id()
        connection.send_headers(stream_id, request_headers(port, "/attack"), end_stream=True)
        connection.reset_stream(stream_id, ErrorCodes.CANCEL)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as attacker:
        try:
            attacker.sendall(connection.data_to_send())
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may hang up before it has read everything: that is the point
        # Another client, right behind the attack, on the same (only) worker.
        seconds, status, body = timed_get(port)
        frames, closed = read_frames(attacker, time.monotonic() + 15)
    ran = count(dsn, "rapid_runs")
    figures = "other client waited %.2fs; %d of %d reset streams ran their handler" % (seconds, ran, pairs)
    print(figures)   # shown with pytest -s
    assert (status, body) == (200, b"served /other")
    assert seconds < 3.0, figures
    assert ran <= 20, figures
    assert closed and goaway_code(frames) == ErrorCodes.ENHANCE_YOUR_CALM
    daemon.wait_for(r"rapid reset", start=mark)
    assert_quiet_log(daemon, mark)


def assert_quiet_log(daemon, mark: int) -> None:
    """Cancelled work is not an error: no traceback per abandoned stream in the log."""
    text = "\n".join(daemon.lines[mark:])
    assert "Traceback" not in text and "Unhandled error" not in text, text[-3000:]


# -- 4. work nobody waits for -------------------------------------------------------------------------

def test_closed_connection_cancels_its_queued_streams(one_worker):
    dsn, daemon = one_worker
    mark = daemon.mark()
    sql(dsn, "CREATE TABLE queued_runs(path text)")
    port = serve(dsn, """WITH w AS (INSERT INTO queued_runs SELECT request.path FROM request
                                    WHERE pg_sleep(CASE WHEN request.path = '/slow' THEN 1.5 ELSE 0 END)
                                          IS NOT NULL)
                         SELECT omni_httpd.http_response('ran ' || request.path) FROM request""")
    queued = 60
    connection = client_connection()
    for index in range(queued + 1):
        stream_id = connection.get_next_available_stream_id()
        path = "/slow" if index == 0 else "/queued/%d" % index
        connection.send_headers(stream_id, request_headers(port, path), end_stream=True)
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(connection.data_to_send())
    # The slow handler is running (so the others are queued behind it on the DB thread).
    wait_until(lambda: sql(dsn, "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'",
                           fetch=True)[0][0] == 1, what="the slow handler to be running")
    sock.close()
    # The running handler finishes (and commits); what was queued behind it must not run.
    wait_until(lambda: count(dsn, "queued_runs", "path = '/slow'") == 1, what="the slow handler to finish")
    # A later request is queued after everything that connection left behind: once it is
    # answered, the DB thread has been through all of it.
    seconds, status, body = timed_get(port, "/after")
    assert (status, body) == (200, b"ran /after")
    ran = count(dsn, "queued_runs", "path LIKE '/queued/%'")
    print("closed connection: %d of %d queued handlers ran" % (ran, queued))
    assert ran == 0
    assert seconds < 5.0
    assert_quiet_log(daemon, mark)


# -- 2. control-frame flood ---------------------------------------------------------------------------

def test_ping_flood_without_reading_keeps_the_worker_small_and_serving(one_worker):
    dsn, daemon = one_worker
    port = serve(dsn, "SELECT omni_httpd.http_response('served ' || request.path) FROM request")
    peak = PeakRss(worker_pid(daemon))
    ping = struct.pack("!I", 8)[1:] + b"\x06\x00" + b"\x00\x00\x00\x00" + b"12345678"
    burst = ping * 4096               # 68 KiB of PINGs per send
    flooder = socket.socket()
    flooder.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # it never reads anyway
    flooder.settimeout(30)
    flooder.connect(("127.0.0.1", port))
    flooder.sendall(PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    flooder.settimeout(1.0)
    sent = 0
    ended = False
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and sent < 400 * MB:
        try:
            flooder.sendall(burst)
        except socket.timeout:
            break          # the server stopped reading us
        except (BrokenPipeError, ConnectionResetError):
            ended = True   # ...or hung up
            break
        sent += len(burst)
    # The worker still answers another client while the flooder is connected.
    seconds, status, body = timed_get(port)
    assert (status, body) == (200, b"served /other")
    assert seconds < 3.0
    growth = peak.growth_mb
    frames, closed = read_frames(flooder, time.monotonic() + 15)
    flooder.close()
    print("PING flood: %d MB sent, worker grew by %.1f MB, GOAWAY %s" % (sent // MB, growth, goaway_code(frames)))
    assert growth < 40, "worker grew by %.0f MB after %d MB of PINGs" % (growth, sent // MB)
    # The flood ended the connection. Its GOAWAY is only readable if the kernel delivered
    # it before the reset that closing a socket with unread input causes.
    assert ended or closed, "the flooding connection was still open (%d MB sent, worker grew by %.0f MB)" % (
        sent // MB, growth)
    code = goaway_code(frames)
    assert code in (None, ErrorCodes.ENHANCE_YOUR_CALM)


# -- 3. request bodies --------------------------------------------------------------------------------

def upload_all(port: int, bodies: List[bytes], timeout: float = 120.0) -> List[Tuple[int, bytes]]:
    """POST every body at once on one connection, each on its own stream, sending as the
    flow-control windows allow and reading all along; [(status, response body)]."""
    connection = client_connection()
    connection.increment_flow_control_window(2 ** 30)
    pending = {}
    statuses, answers, ended = {}, {}, set()
    order = []
    for index, body in enumerate(bodies):
        stream_id = connection.get_next_available_stream_id()
        connection.send_headers(stream_id, request_headers(port, "/upload/%d" % index, "POST",
                                                           [("content-length", str(len(body)))]))
        pending[stream_id] = memoryview(body)
        statuses[stream_id], answers[stream_id] = None, b""
        order.append(stream_id)
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.setblocking(False)
        outgoing = b""
        while len(ended) < len(bodies):
            assert time.monotonic() < deadline, "uploads not answered in time"
            for stream_id in list(pending):
                data = pending[stream_id]
                while len(data) and len(outgoing) < (1 << 20):
                    size = min(connection.local_flow_control_window(stream_id),
                               connection.max_outbound_frame_size, len(data))
                    if size <= 0:
                        break
                    connection.send_data(stream_id, data[:size].tobytes(), end_stream=size == len(data))
                    data = data[size:]
                    outgoing += connection.data_to_send()
                if len(data):
                    pending[stream_id] = data
                else:
                    del pending[stream_id]
            outgoing += connection.data_to_send()
            readable, writable, _ = select.select([sock], [sock] if outgoing else [], [], 1.0)
            if writable:
                try:
                    outgoing = outgoing[sock.send(outgoing):]
                except BlockingIOError:
                    pass
            if readable:
                data = sock.recv(1 << 20)
                assert data, "the server closed the connection"
                for event in connection.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived):
                        statuses[event.stream_id] = int(dict(event.headers)[":status"])
                    elif isinstance(event, h2.events.DataReceived):
                        answers[event.stream_id] += event.data
                        connection.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                        ended.add(event.stream_id)
                        pending.pop(event.stream_id, None)
    return [(statuses[stream_id], answers[stream_id]) for stream_id in order]


def test_many_large_uploads_on_one_connection_stay_bounded_and_arrive_intact(one_worker):
    dsn, daemon = one_worker
    port = serve(dsn, """SELECT omni_httpd.http_response(length(request.body) || ' '
                                                         || encode(sha256(request.body), 'hex'))
                         FROM request""")
    streams, size = 40, 8 * MB
    block = os.urandom(size)
    bodies = [bytes([index]) + block[1:] for index in range(streams)]
    pid = worker_pid(daemon)
    # What one upload of this size costs the worker on its own (mostly the DB thread's
    # copies of the body while its handler runs)...
    alone = PeakRss(pid)
    assert upload_all(port, bodies[:1])[0][0] == 200
    one_mb = alone.growth_mb
    # ...and 40 of them at once on one connection: 320 MB sent as fast as the worker lets
    # the client, which must hold at most its per-connection budget (32 MiB by default)
    # more than that, not all of them.
    together = PeakRss(pid)
    results = upload_all(port, bodies)
    growth = together.growth_mb
    print("uploads: one %d MB upload grew the worker by %.1f MB, %d at once by %.1f MB"
          % (size // MB, one_mb, streams, growth))
    for body, (status, answer) in zip(bodies, results):
        assert status == 200, answer
        assert answer == ("%d %s" % (len(body), hashlib.sha256(body).hexdigest())).encode()
    assert growth < one_mb + 32 + 24, "one upload: %.0f MB; %d x %d MB at once: %.0f MB" % (
        one_mb, streams, size // MB, growth)


def test_declared_content_length_over_max_body_is_413_before_the_body(one_worker):
    dsn, _daemon = one_worker
    port = serve(dsn, "SELECT omni_httpd.http_response('ran') FROM request")
    connection = client_connection()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        stream_id = connection.get_next_available_stream_id()
        connection.send_headers(stream_id, request_headers(port, "/big", "POST",
                                                           [("content-length", str(17 * MB))]))
        sock.sendall(connection.data_to_send())
        status = None
        deadline = time.monotonic() + 15
        while status is None and time.monotonic() < deadline:
            for event in connection.receive_data(sock.recv(65536)):
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[":status"])
            sock.sendall(connection.data_to_send())
    assert status == 413


# -- NULL body ------------------------------------------------------------------------------------------

def test_null_body_response_ends_the_stream(one_worker):
    dsn, _daemon = one_worker
    port = serve(dsn, "SELECT omni_httpd.http_response(body => null, status => 202) FROM request")
    first, second = h2_exchange(port, [("GET", "/a", b""), ("POST", "/b", b"x" * 100)], timeout=15)
    for result in (first, second):
        assert result.ended and result.reset is None
        assert result.status == 202 and result.body == b""
        assert "content-length" not in dict(result.headers)
