"""Fuzzing the real worker: HTTP/1 byte streams, HTTP/2 frames and header blocks.

Hypothesis builds request-like inputs from valid pieces and hostile ones (bad lengths,
chunk framing, duplicate or forbidden headers, control bytes, unknown frames, bad
stream ids, oversized windows, HPACK blocks with bad pseudo-headers) and sends each on
a new connection to a daemon with one worker, then half-closes. Every connection must
end, in time, with answers and/or a close; afterwards the worker is the same process, it
still serves, and its memory has not kept growing. A corpus of the malformed inputs
found so far runs first, every time.

Bounded: a few hundred inputs, each connection at most CONNECTION_DEADLINE seconds.
"""
from __future__ import annotations

import re
import socket
import struct
import time

import hpack
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from daemon_support import Daemon, add_listener, effective_port, wait_reloads

CONNECTION_DEADLINE = 10.0
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FUZZ = settings(max_examples=500, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def target(module_dsn):
    daemon = Daemon(module_dsn, "--http-workers", "1", "--no-init", "--admin", "none",
                    "--max-body", "64K", "--max-header-size", "8K", "--no-access-log")
    try:
        daemon.wait_ready()
        wait_reloads(module_dsn, 1)
        listener = add_listener(module_dsn, """
            SELECT omni_httpd.http_response(request.method || ' ' || request.path || ' '
                                            || length(request.body)) FROM request""")
        wait_reloads(module_dsn, 1)
        port = effective_port(module_dsn, listener)
        pid = daemon.worker_pids()[0]
        yield daemon, port, pid
    finally:
        code = daemon.stop()
    assert code == 0, daemon.output[-3000:]


def exchange(port: int, data: bytes) -> bytes:
    """Send ``data``, half-close, read until the server closes; fail past the deadline."""
    deadline = time.monotonic() + CONNECTION_DEADLINE
    sock = socket.create_connection(("127.0.0.1", port), timeout=CONNECTION_DEADLINE)
    received = []
    try:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            return b""          # the server closed first: an answer in itself
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError("connection still open after %ss for input %r" % (CONNECTION_DEADLINE, data[:300]))
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            except socket.timeout:
                raise AssertionError("connection still open after %ss for input %r" % (CONNECTION_DEADLINE, data[:300]))
            if not chunk:
                break
            received.append(chunk)
    finally:
        sock.close()
    return b"".join(received)


def worker_alive(target) -> None:
    daemon, port, pid = target
    assert daemon.worker_pids() == [pid], "the worker was restarted:\n" + daemon.output[-3000:]
    answer = exchange(port, b"GET /alive HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"GET /alive 0"), answer


def rss_kb(pid: int) -> int:
    with open("/proc/%d/status" % pid) as status:
        return int(re.search(r"VmRSS:\s+(\d+)", status.read()).group(1))


_STATUS_LINE = re.compile(rb"HTTP/1\.[01] [1-5]\d\d ")


def check_http1_answer(answer: bytes) -> None:
    """Whatever came back is HTTP/1 responses (or nothing: a close)."""
    if answer:
        assert _STATUS_LINE.match(answer), answer[:200]


# -- HTTP/1 -----------------------------------------------------------------------------

_TOKENS = st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"CONNECT", b"TRACE",
                           b"PATCH", b"PRI", b"BREW", b"get", b"G\x00T", b""])
_TARGETS = st.sampled_from([b"/", b"/a?b=c", b"*", b"http://h/x", b"h:80", b"/../../etc", b"/%00",
                            b"/\xff\xfe", b"/" + b"a" * 9000, b"", b"/a b", b"/\r"])
_VERSIONS = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.1x", b"http/1.1", b""])
_HEADER_NAMES = st.sampled_from([b"Host", b"Content-Length", b"Transfer-Encoding", b"Connection", b"Expect",
                                 b"Upgrade", b"HTTP2-Settings", b"X-A", b"x a", b"", b"X-\x00", b"Te"])
_HEADER_VALUES = st.one_of(
    st.sampled_from([b"x", b"0", b"5", b"-1", b"99999999999999999999", b"chunked", b"gzip, chunked",
                     b"close", b"keep-alive, Upgrade", b"100-continue", b"h2c", b"\x00", b"a\rb",
                     b" folded\r\n continued", b"1, 2", b"\xff"]),
    st.binary(max_size=40))
_BODIES = st.one_of(
    st.binary(max_size=200),
    st.sampled_from([b"0\r\n\r\n", b"5\r\nhello\r\n0\r\n\r\n", b"ffffffffffffffff\r\n", b"5;x=y\r\nhello\r\n0\r\n\r\n",
                     b"-1\r\n", b"3\r\nab", b"0\r\nTrailer: x\r\n\r\n", b"5\nhello\n0\n\n"]))


@st.composite
def http1_streams(draw):
    messages = []
    for _ in range(draw(st.integers(1, 3))):
        line = b" ".join([draw(_TOKENS), draw(_TARGETS), draw(_VERSIONS)])
        headers = [b"%s: %s" % (draw(_HEADER_NAMES), draw(_HEADER_VALUES))
                   for _ in range(draw(st.integers(0, 5)))]
        eol = draw(st.sampled_from([b"\r\n", b"\n", b"\r\n", b"\r\n"]))
        messages.append(line + eol + eol.join(headers) + (eol if headers else b"") + eol + draw(_BODIES))
    data = b"".join(messages)
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(data)))
        data = data[:cut]
    return data


HTTP1_CORPUS = [
    b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n",
    b"GET / HTTP/1.1\nHost: a\n\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 10000 + b"\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nab",
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",          # TLS on a cleartext port
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n" * 40,
    b"",
]


@pytest.mark.parametrize("data", HTTP1_CORPUS, ids=range(len(HTTP1_CORPUS)))
def test_http1_corpus(target, data):
    check_http1_answer(exchange(target[1], data))


@FUZZ
@given(http1_streams())
def test_http1_fuzz(target, data):
    check_http1_answer(exchange(target[1], data))


# -- HTTP/2 -----------------------------------------------------------------------------

def frame(kind: int, flags: int, stream: int, payload: bytes, length: int = None) -> bytes:
    size = len(payload) if length is None else length
    return struct.pack("!I", size)[1:] + bytes([kind & 0xFF, flags & 0xFF]) + struct.pack("!I", stream & 0xFFFFFFFF) + payload


def settings_frame(pairs) -> bytes:
    return frame(4, 0, 0, b"".join(struct.pack("!HI", k, v) for k, v in pairs))


_REQUEST_HEADERS = [(":method", "GET"), (":path", "/h2"), (":scheme", "http"), (":authority", "x")]
_HEADER_PARTS = st.sampled_from([
    (":method", "GET"), (":method", "POST"), (":method", "BREW"), (":path", "/"), (":path", ""),
    (":path", "*"), (":scheme", "http"), (":authority", "x"), (":status", "200"), (":protocol", "websocket"),
    ("connection", "keep-alive"), ("te", "trailers"), ("te", "gzip"), ("content-length", "5"),
    ("content-length", "-3"), ("Upper", "case"), ("x-a", "a\r\nb"), ("x-nul", "a\x00b"), ("host", "h"),
    ("transfer-encoding", "chunked"), ("", "empty"),
])


@st.composite
def h2_frames(draw):
    encoder = hpack.Encoder()
    frames = [settings_frame(draw(st.lists(st.tuples(st.integers(0, 10), st.integers(0, 2 ** 32 - 1)),
                                               max_size=3)))]
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["headers", "data", "rst", "window", "ping", "settings", "priority",
                                     "goaway", "continuation", "unknown", "push", "raw"]))
        stream = draw(st.sampled_from([0, 1, 1, 3, 5, 2, 2 ** 31 - 1, 7]))
        flags = draw(st.integers(0, 255))
        if kind == "headers":
            headers = list(_REQUEST_HEADERS) if draw(st.booleans()) else []
            headers += draw(st.lists(_HEADER_PARTS, max_size=4))
            block = encoder.encode(headers)
            if draw(st.booleans()):
                block = block[:draw(st.integers(0, len(block)))]
            frames.append(frame(1, draw(st.sampled_from([0x4, 0x5, 0x1, 0x0, 0x24, flags])), stream, block))
        elif kind == "data":
            frames.append(frame(0, draw(st.sampled_from([0, 1, 8, 9])), stream, draw(st.binary(max_size=64))))
        elif kind == "rst":
            frames.append(frame(3, 0, stream, struct.pack("!I", draw(st.integers(0, 20)))))
        elif kind == "window":
            frames.append(frame(8, 0, stream, struct.pack("!I", draw(st.sampled_from([0, 1, 2 ** 31 - 1, 2 ** 31, 65535])))))
        elif kind == "ping":
            frames.append(frame(6, draw(st.sampled_from([0, 1])), stream, draw(st.binary(min_size=0, max_size=10))))
        elif kind == "settings":
            frames.append(frame(4, draw(st.sampled_from([0, 1])), stream,
                                draw(st.binary(max_size=13))))
        elif kind == "priority":
            frames.append(frame(2, 0, stream, draw(st.binary(max_size=6))))
        elif kind == "goaway":
            frames.append(frame(7, 0, stream, struct.pack("!II", 0, draw(st.integers(0, 13)))))
        elif kind == "continuation":
            frames.append(frame(9, draw(st.sampled_from([0, 4])), stream, encoder.encode([("x-c", "1")])))
        elif kind == "push":
            frames.append(frame(5, 4, stream, struct.pack("!I", 2) + encoder.encode(_REQUEST_HEADERS)))
        elif kind == "unknown":
            frames.append(frame(draw(st.integers(10, 255)), flags, stream, draw(st.binary(max_size=32))))
        else:
            payload = draw(st.binary(max_size=32))
            frames.append(frame(draw(st.integers(0, 9)), flags, stream, payload,
                                length=draw(st.sampled_from([len(payload), 0, 2 ** 24 - 1, 16385]))))
    return PREFACE + b"".join(frames)


H2_CORPUS = [
    PREFACE + settings_frame([(4, 2 ** 31)]),                                # window too large
    PREFACE + settings_frame([]) + frame(1, 0x5, 0, hpack.Encoder().encode(_REQUEST_HEADERS)),  # HEADERS on stream 0
    PREFACE + settings_frame([]) + frame(9, 4, 1, b""),                      # CONTINUATION without HEADERS
    PREFACE + settings_frame([]) + frame(1, 0x1, 1, hpack.Encoder().encode(_REQUEST_HEADERS)),  # no END_HEADERS
    PREFACE + settings_frame([]) + frame(0, 1, 1, b"x" * 10),                # DATA on an idle stream
    PREFACE + settings_frame([]) + frame(1, 0x5, 2, hpack.Encoder().encode(_REQUEST_HEADERS)),  # even stream id
    PREFACE + settings_frame([]) + frame(8, 0, 0, struct.pack("!I", 0)),     # zero window increment
    PREFACE + settings_frame([]) + frame(6, 0, 0, b"1234567"),               # short PING
    PREFACE + settings_frame([]) + frame(1, 0x5, 1, b"\xff\xff\xff\xff"),    # HPACK garbage
    PREFACE + settings_frame([(5, 1)]),                                      # max frame size too small
    PREFACE + settings_frame([]) + frame(1, 0x5, 1, hpack.Encoder().encode(
        _REQUEST_HEADERS + [("content-length", "5")])) + frame(0, 1, 1, b"abc"),   # length mismatch
    # HEADERS without END_STREAM, then a half-close: the body can never come (found by
    # the fuzzer: the connection stayed open until the body timeout).
    PREFACE + settings_frame([]) + frame(1, 0x4, 1, hpack.Encoder().encode(_REQUEST_HEADERS)),
    PREFACE[:10],
    PREFACE + b"\x00" * 9,
]


@pytest.mark.parametrize("data", H2_CORPUS, ids=range(len(H2_CORPUS)))
def test_http2_corpus(target, data):
    exchange(target[1], data)


@FUZZ
@given(h2_frames())
def test_http2_fuzz(target, data):
    exchange(target[1], data)


# -- afterwards -------------------------------------------------------------------------

def test_after_fuzzing_the_worker_lives_and_its_memory_is_bounded(target):
    daemon, port, pid = target
    worker_alive(target)
    before = rss_kb(pid)
    for data in HTTP1_CORPUS + H2_CORPUS:
        exchange(port, data)
    for data in HTTP1_CORPUS + H2_CORPUS:
        exchange(port, data)
    worker_alive(target)
    grown = rss_kb(pid) - before
    assert grown < 20 * 1024, "the worker grew by %d KB over two rounds of the corpus" % grown
