"""Hostile and careless HTTP/1 clients against the real daemon (one worker, real PostgreSQL).

Each test is about what such a client, or the operator, sees: every answer is delimited
(no client left waiting), memory of a worker stays bounded whatever a client pipelines,
work queued for a client that has gone is not run, and requests RFC 9112 forbids never
reach a handler. Raw sockets, so the bytes on the wire are exactly what the test wrote.
"""
from __future__ import annotations

import re
import socket
import subprocess
import threading
from typing import List, Tuple

import pytest

from h2_client import h2_exchange
from daemon_support import Daemon, add_listener, effective_port, running_handlers, sql, wait_reloads, wait_until

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def daemon(module_dsn):
    # One worker: every connection lands on the worker whose memory / queue is observed.
    daemon = Daemon(module_dsn, "--http-workers", "1", "--no-init", "--admin", "none")
    try:
        daemon.wait_ready()
        wait_reloads(module_dsn, 1)
        daemon.dsn = module_dsn
        yield daemon
    finally:
        code = daemon.stop()
    assert code == 0, daemon.output[-3000:]


def serve(daemon, query: str) -> int:
    """A new listener with ``query`` as its handler; returns its port once served."""
    listener_id = add_listener(daemon.dsn, query)
    wait_reloads(daemon.dsn, 1)
    return effective_port(daemon.dsn, listener_id)


class Reader:
    """Reads delimited HTTP/1.1 responses off a socket; a response that is not delimited
    (no Content-Length, no close) makes it time out instead of hanging the test."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buffer = b""

    def _fill(self) -> bool:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            return False
        self.buffer += chunk
        return True

    def response(self, head_request: bool = False) -> Tuple[int, dict, bytes]:
        while b"\r\n\r\n" not in self.buffer:
            if not self._fill():
                raise AssertionError("connection closed before a response head: %r" % self.buffer)
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, value = line.split(":", 1)
            headers.setdefault(name.strip().lower(), value.strip())
        if head_request or status in (204, 304) or 100 <= status < 200:
            return status, headers, b""
        if "content-length" in headers:
            length = int(headers["content-length"])
            while len(self.buffer) < length:
                if not self._fill():
                    raise AssertionError("connection closed inside a body")
            body, self.buffer = self.buffer[:length], self.buffer[length:]
            return status, headers, body
        # Not delimited by length: only the close of the connection can end it.
        while self._fill():
            pass
        body, self.buffer = self.buffer, b""
        return status, headers, body

    def closed(self) -> bool:
        return not self.buffer and not self._fill()


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


# -- 1. every response is delimited -------------------------------------------------------------

NULL_BODY = """SELECT omni_httpd.http_response(body => null,
                   status => coalesce(nullif(substr(request.path, 2), '')::int, 200)) FROM request"""


def test_null_body_is_delimited_http11_keep_alive(daemon):
    port = serve(daemon, NULL_BODY)
    with connect(port, timeout=5) as sock:
        reader = Reader(sock)
        for path in (b"/", b"/201", b"/404", b"/"):
            sock.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: t\r\n\r\n")
            status, headers, body = reader.response()
            assert status == (int(path[1:]) if path != b"/" else 200)
            assert headers.get("content-length") == "0" and body == b""
            assert "connection" not in headers and "content-type" not in headers
        # HEAD: the length the GET would have, still on the same connection.
        sock.sendall(b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\nGET / HTTP/1.1\r\nHost: t\r\n\r\n")
        assert reader.response(head_request=True)[1].get("content-length") == "0"
        assert reader.response()[0] == 200


@pytest.mark.parametrize("status", [204, 304])
def test_null_body_no_content_statuses_have_no_length_and_keep_the_connection(daemon, status):
    port = serve(daemon, NULL_BODY)
    with connect(port, timeout=5) as sock:
        reader = Reader(sock)
        sock.sendall(b"GET /%d HTTP/1.1\r\nHost: t\r\n\r\nGET / HTTP/1.1\r\nHost: t\r\n\r\n" % status)
        got, headers, _ = reader.response()
        assert got == status and "content-length" not in headers
        assert reader.response()[0] == 200      # the next request on the connection is answered


def test_null_body_http10(daemon):
    port = serve(daemon, NULL_BODY)
    with connect(port, timeout=5) as sock:       # HTTP/1.0 keep-alive: a length is needed
        reader = Reader(sock)
        sock.sendall(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        status, headers, body = reader.response()
        assert (status, headers.get("content-length"), headers.get("connection")) == (200, "0", "keep-alive")
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        status, headers, body = reader.response()
        assert (status, headers.get("content-length"), headers.get("connection")) == (200, "0", "close")
        assert reader.closed()


def test_null_body_http2(daemon):
    port = serve(daemon, NULL_BODY)
    # curl: one URL per run (this curl fails reusing a prior-knowledge connection).
    result = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "--max-time", "10", "-D", "-",
                             "-o", "/dev/null", "http://127.0.0.1:%d/" % port],
                            capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().lower().splitlines()
    # HTTP/2 delimits by ending the stream: no Content-Length for a NULL body (docs/sql-api.md).
    assert lines[0].strip() == "http/2 200" and not any(l.startswith("content-length") for l in lines)
    # Several streams on one connection, one of them HEAD.
    answers = h2_exchange(port, [("GET", "/", b""), ("HEAD", "/", b""), ("GET", "/204", b"")], timeout=10)
    assert [(a.status, a.body, a.reset) for a in answers] == [(200, b"", None), (200, b"", None), (204, b"", None)]
    lengths = [dict(a.headers).get("content-length") for a in answers]
    assert lengths == [None, None, None]


# -- 2. pipelined bodies: the worker's memory stays bounded --------------------------------------

def vm_rss(pid: int) -> int:
    with open("/proc/%d/status" % pid) as handle:
        match = re.search(r"^VmRSS:\s+(\d+) kB", handle.read(), re.M)
    return int(match.group(1)) * 1024


class RssSampler(threading.Thread):
    """Highest VmRSS of ``pid`` seen until stopped (sampled every 10 ms)."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = vm_rss(pid)
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(0.01):
            self.peak = max(self.peak, vm_rss(self.pid))

    def stop(self) -> int:
        self.halt.set()
        self.join(10)
        return self.peak


BODY_LENGTH = "SELECT omni_httpd.http_response(length(request.body)::text) FROM request"


def pipeline_bodies(port: int, sizes: List[int], chunked: bool = False) -> List[Tuple[int, bytes]]:
    """Send one request per size without waiting (from a thread), read every answer."""
    blob = memoryview(b"b" * max(sizes))
    errors: List[BaseException] = []

    def send(sock):
        try:
            for size in sizes:
                if chunked:
                    sock.sendall(b"POST /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
                    for offset in range(0, size, MiB):
                        piece = blob[offset:min(size, offset + MiB)]
                        sock.sendall(b"%x\r\n" % len(piece))
                        sock.sendall(piece)
                        sock.sendall(b"\r\n")
                    sock.sendall(b"0\r\n\r\n")
                else:
                    sock.sendall(b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % size)
                    sock.sendall(blob[:size])
        except BaseException as exc:     # reported by the reading side
            errors.append(exc)

    with connect(port, timeout=60) as sock:
        sender = threading.Thread(target=send, args=(sock,), daemon=True)
        sender.start()
        reader = Reader(sock)
        answers = [reader.response()[::2] for _ in sizes]
        sender.join(60)
    assert not errors, errors
    return answers


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_pipelined_large_bodies_keep_worker_memory_bounded(daemon, chunked):
    port = serve(daemon, BODY_LENGTH)
    [pid] = daemon.worker_pids()
    # Reference: the worker's peak while serving full-size requests one at a time (the
    # body, its SQL literal on the DB thread, allocator arenas).
    sampler = RssSampler(pid)
    sampler.start()
    try:
        for _ in range(2):
            assert pipeline_bodies(port, [16 * MiB], chunked) == [(200, b"%d" % (16 * MiB))]
    finally:
        one_at_a_time = sampler.stop()
    sampler = RssSampler(pid)
    sampler.start()
    try:
        sizes = [16 * MiB - i for i in range(24)]   # 384 MiB pipelined on one connection
        answers = pipeline_bodies(port, sizes, chunked)
    finally:
        pipelined = sampler.stop()
    assert answers == [(200, b"%d" % size) for size in sizes]
    print("worker peak RSS: one at a time %d MiB, 24 pipelined %d MiB"
          % (one_at_a_time // MiB, pipelined // MiB))
    # What one connection may hold while its requests wait is --max-pipeline-bytes (1M)
    # beyond the request being handled, not what the client sent (384 MiB).
    assert pipelined - one_at_a_time < 48 * MiB, \
        "pipelining grew the worker by %d MiB" % ((pipelined - one_at_a_time) // MiB)


# -- 3. work nobody waits for is not run ---------------------------------------------------------

def test_queued_requests_of_a_closed_connection_do_not_run(daemon):
    sql(daemon.dsn, "CREATE TABLE IF NOT EXISTS runs (id serial PRIMARY KEY, path text)")
    port = serve(daemon, """WITH ran AS (INSERT INTO runs(path) SELECT request.path FROM request RETURNING 1)
                            SELECT omni_httpd.http_response('ran') FROM ran, (SELECT pg_sleep(0.4)) s""")
    probe = serve(daemon, "SELECT omni_httpd.http_response('probe') FROM request")
    count = 12
    sock = connect(port)
    sock.sendall(b"".join(b"GET /%d HTTP/1.1\r\nHost: t\r\n\r\n" % i for i in range(count)))
    # The first request is running (so all of them have been read and queued) ...
    wait_until(lambda: running_handlers(daemon.dsn), timeout=10, what="the first handler running")
    sock.close()    # ... and the client goes away without reading anything.
    # The probe queues behind whatever the worker still has queued: once it is answered,
    # everything queued before it has run or been dropped.
    with connect(probe) as other:
        other.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        assert Reader(other).response()[::2] == (200, b"probe")
    ran = sql(daemon.dsn, "SELECT path FROM runs ORDER BY id", fetch=True)
    # The one running when the client left finishes (and commits); the worker notices the
    # client is gone when it writes that answer, by which time at most two more have
    # started. The rest are never run.
    assert 1 <= len(ran) <= 3, ran
    assert [path for (path,) in ran] == ["/%d" % i for i in range(len(ran))]
    assert "Traceback" not in daemon.output


# -- 4. RFC 9112 framing and target rules -------------------------------------------------------

def exchange(port: int, data: bytes) -> List[Tuple[int, dict, bytes]]:
    """Send ``data``, read responses until the server closes (or 5 s of silence)."""
    out = []
    with connect(port, timeout=5) as sock:
        sock.sendall(data)
        reader = Reader(sock)
        while True:
            try:
                if reader.closed():
                    return out
            except (socket.timeout, ConnectionResetError):
                return out
            out.append(reader.response())


@pytest.fixture(scope="module")
def counting_port(daemon):
    """A handler that records every request reaching it."""
    sql(daemon.dsn, "CREATE TABLE IF NOT EXISTS reached (id serial PRIMARY KEY, method text, path text)")
    return serve(daemon, """WITH r AS (INSERT INTO reached(method, path)
                                       SELECT request.method::text, request.path FROM request RETURNING 1)
                            SELECT omni_httpd.http_response('handled') FROM r""")


def reached(daemon) -> int:
    return sql(daemon.dsn, "SELECT count(*) FROM reached", fetch=True)[0][0]


@pytest.mark.parametrize("request_bytes", [
    b"GET / HTTP/1.1\r\n\r\n",                                         # no Host
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",                   # two Host lines
    b"GET / HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n",                   # ... in any version
    b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",                            # not a host
    b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n",
    b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
    b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET * HTTP/1.1\r\nHost: a\r\n\r\n",
], ids=["no-host", "two-hosts", "two-hosts-1.0", "host-space", "host-slash", "chunked-1.0",
        "cl-then-te", "te-then-cl", "asterisk-get"])
def test_refused_with_400_and_never_reach_the_handler(daemon, counting_port, request_bytes):
    before = reached(daemon)
    answers = exchange(counting_port, request_bytes)
    assert [status for status, _, _ in answers] == [400], answers
    assert answers[0][1].get("connection") == "close"
    assert reached(daemon) == before


def test_http10_without_host_is_served(daemon, counting_port):
    before = reached(daemon)
    assert [a[0] for a in exchange(counting_port, b"GET /old HTTP/1.0\r\n\r\n")] == [200]
    assert reached(daemon) == before + 1


def test_connect_is_501_and_closes(daemon, counting_port):
    before = reached(daemon)
    answers = exchange(counting_port, b"CONNECT example.org:443 HTTP/1.1\r\nHost: example.org:443\r\n\r\n"
                                      b"\x16\x03\x01 tunnel bytes")
    assert [(status, headers.get("connection")) for status, headers, _ in answers] == [(501, "close")]
    assert reached(daemon) == before


def test_options_asterisk_answered_by_the_server(daemon, counting_port):
    before = reached(daemon)
    answers = exchange(counting_port, b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n"
                                      b"GET /after HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    (status, headers, body), after = answers
    assert (status, body, headers.get("content-length")) == (200, b"", "0")
    assert set(headers["allow"].split(", ")) >= {"GET", "HEAD", "POST", "OPTIONS"}
    assert "CONNECT" not in headers["allow"]
    assert after[::2] == (200, b"handled")     # the connection stays usable
    assert reached(daemon) == before + 1       # only GET /after reached the handler


def test_max_pipeline_bytes_option():
    from omni_httpd.master.tap import Options

    options = Options(environ={})
    options.parseOptions([])
    assert options.settings.max_pipeline_bytes == MiB
    options = Options(environ={})
    options.parseOptions(["--max-pipeline-bytes", "256K"])
    assert options.settings.max_pipeline_bytes == 256 * 1024
    options = Options(environ={"OMNI_HTTPD_MAX_PIPELINE_BYTES": "2M"})
    options.parseOptions([])
    assert options.settings.max_pipeline_bytes == 2 * MiB
