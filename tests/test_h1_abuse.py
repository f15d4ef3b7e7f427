"""Hostile and careless HTTP/1 clients against the real daemon (one worker, real PostgreSQL).

Each test is about what such a client, or the operator, sees: every answer is delimited
(no client left waiting), memory of a worker stays bounded whatever a client pipelines,
work queued for a client that has gone is not run, and requests RFC 9112 forbids never
reach a handler. Raw sockets, so the bytes on the wire are exactly what the test wrote.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import threading
import time
from typing import List, Optional, Tuple

import pytest

from h2_client import h2_exchange
from daemon_support import Daemon, add_listener, effective_port, sql, wait_reloads, wait_until

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
    assert lines[0].strip() == "http/2 200" and "content-length: 0" in lines
    # Several streams on one connection, one of them HEAD.
    answers = h2_exchange(port, [("GET", "/", b""), ("HEAD", "/", b""), ("GET", "/204", b"")], timeout=10)
    assert [(a.status, a.body, a.reset) for a in answers] == [(200, b"", None), (200, b"", None), (204, b"", None)]
    lengths = [dict(a.headers).get("content-length") for a in answers]
    assert lengths == ["0", "0", None]
