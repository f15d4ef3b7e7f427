"""HTTP/1.x protocol (omni_httpd.http1), without a database.

The protocol is driven with in-memory transports and a `Clock`; ``dispatch`` is a stand-in
for the database (what a handler would answer). Assertions are about what a client sees
on the wire. The tests at the end run over real sockets (treq, raw clients).
"""
from __future__ import annotations

import socket
from typing import List, Optional, Tuple

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, protocol, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web.client import HTTPConnectionPool

from omni_httpd.worker.http import http1
from omni_httpd.worker.http.context import ListenerContext
from omni_httpd.worker.http.http1 import HTTP1Protocol
from omni_httpd.common.httpdate import format_http_date, http_date
from omni_httpd.common.request import Request
from omni_httpd.common.response import ABORT, Response
from omni_httpd.common.settings import Settings
from daemon_support import reactor_wait_until

PEER = IPv4Address("TCP", "10.1.2.3", 40000)


def make_settings(**overrides) -> Settings:
    values = dict(max_body=1000, max_header_size=2000, header_timeout=5.0, idle_timeout=10.0,
                  body_timeout=7.0, access_log=False, data_dir="/nonexistent")
    values.update(overrides)
    return Settings(**values)


class FakeDispatch:
    """Records requests; answers at once with ``answer(request)`` unless ``manual``."""

    def __init__(self, answer=None, manual=False):
        self.requests: List[Request] = []
        self.deferreds: List[defer.Deferred] = []
        self.cancelled: List[str] = []      # paths whose Deferred was cancelled
        self.answer = answer or (lambda request: Response(200, [("content-type", "text/plain")],
                                                          b"hello " + request.path.encode()))
        self.manual = manual

    def __call__(self, request: Request, allow_remote: bool = False) -> defer.Deferred:
        self.requests.append(request)
        # No canceller, like the DB thread's: a result arriving after a cancel is ignored.
        d = defer.Deferred()
        d.addErrback(self._saw_cancel, request.path)
        self.deferreds.append(d)
        if not self.manual:
            d.callback(self.answer(request))
        return d

    def _saw_cancel(self, failure, path):
        if failure.check(defer.CancelledError):
            self.cancelled.append(path)
        return failure


class Conn:
    def __init__(self, dispatch=None, clock=None, transport=None, **settings):
        self.dispatch = dispatch or FakeDispatch()
        self.clock = clock or Clock()
        self.clock.advance(1_000_000)
        self.transport = transport or StringTransport(peerAddress=PEER)
        self.proto = HTTP1Protocol(ListenerContext(self.dispatch, make_settings(**settings), 7, scheme="http",
                                                   clock=self.clock, worker_label="w3"))
        self.proto.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.proto.dataReceived(data)

    def responses(self, head_requests: int = 0) -> List["Resp"]:
        return parse_responses(self.transport.value(), head_requests)

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)


class Resp:
    def __init__(self, status: int, reason: str, headers: List[Tuple[str, str]], body: Optional[bytes]):
        self.status, self.reason, self.headers, self.body = status, reason, headers, body

    def header(self, name: str) -> Optional[str]:
        values = [v for k, v in self.headers if k == name]
        assert len(values) <= 1, (name, values)
        return values[0] if values else None

    def names(self) -> List[str]:
        return [k for k, _ in self.headers]


def parse_responses(data: bytes, head_requests: int = 0) -> List[Resp]:
    """A strict client-side reader: Content-Length framing only (what the server uses)."""
    out = []
    while data:
        head, sep, data = data.partition(b"\r\n\r\n")
        assert sep, "incomplete response head: %r" % head
        lines = head.decode("latin-1").split("\r\n")
        version, status, reason = lines[0].split(" ", 2)
        assert version == "HTTP/1.1"
        headers = []
        for line in lines[1:]:
            name, value = line.split(":", 1)
            assert name.strip() == name and name
            headers.append((name.lower(), value.strip()))
        resp = Resp(int(status), reason, headers, None)
        length = resp.header("content-length")
        if resp.status >= 200 and head_requests > 0:
            head_requests -= 1
        elif length is not None:
            resp.body = data[:int(length)]
            assert len(resp.body) == int(length), "truncated body"
            data = data[int(length):]
        out.append(resp)
    return out


# -- requests as the handler sees them ------------------------------------------------------------

def test_simple_get():
    c = Conn()
    c.send(b"GET /users/john HTTP/1.1\r\nHost: example\r\n\r\n")
    [req] = c.dispatch.requests
    assert (req.method, req.path, req.query_string, req.body) == ("GET", "/users/john", None, b"")
    assert (req.http_version, req.listener_id, req.scheme, req.peer) == ("1.1", 7, "http", "10.1.2.3:40000")
    # The worker adds the client's address (docs/sql-api.md, "Client address").
    assert req.headers == [("host", "example"), ("omnigres-connecting-ip", "10.1.2.3")]
    [resp] = c.responses()
    assert (resp.status, resp.reason, resp.body) == (200, "OK", b"hello /users/john")
    assert resp.header("content-type") == "text/plain"
    assert resp.header("content-length") == "17"
    assert resp.header("server") == "omni_httpd"
    assert resp.header("date") == http_date(c.clock.seconds())
    assert resp.header("connection") is None
    assert not c.closed


@pytest.mark.parametrize("target, path, query", [
    ("/p?a=1&b=%20x", "/p", "a=1&b=%20x"),
    ("/p?", "/p", ""),
    ("/p", "/p", None),
    ("/a/./b/../c", "/a/c", None),
    ("/a/b/..?x=/../", "/a/", "x=/../"),
    ("/../../etc/passwd", "/etc/passwd", None),
    ("/%2e%2e/x", "/%2e%2e/x", None),
    ("http://example.org/a/../b?q", "/b", "q"),
])
def test_target_split_and_normalised(target, path, query):
    c = Conn()
    c.send(b"GET " + target.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    [req] = c.dispatch.requests
    assert (req.path, req.query_string) == (path, query)


def test_headers_lower_cased_in_arrival_order():
    c = Conn()
    c.send(b"GET / HTTP/1.1\r\nX-B: 2\r\nHost: h\r\nx-b: 1\r\nAccept:  text/html \r\n"
           b"X-Latin: caf\xe9\r\n\r\n")
    [req] = c.dispatch.requests
    assert req.headers[:-1] == [("x-b", "2"), ("host", "h"), ("x-b", "1"), ("accept", "text/html"),
                                ("x-latin", "caf\xe9")]
    assert req.headers[-1][0] == "omnigres-connecting-ip"


def test_header_values_are_utf8_when_valid_else_latin1_as_over_http2():
    c = Conn()
    c.send(b"GET / HTTP/1.1\r\nHost: h\r\nX-U: \xc3\xbcn\xc3\xaf \xe2\x9c\x93\r\nX-L: caf\xe9\r\n\r\n")
    [req] = c.dispatch.requests
    assert req.headers[1:3] == [("x-u", "\u00fcn\u00ef \u2713"), ("x-l", "caf\u00e9")]


def test_a_client_sent_connecting_ip_is_replaced_by_the_peer_address():
    c = Conn()
    c.send(b"GET / HTTP/1.1\r\nHost: h\r\nOmnigres-Connecting-IP: 6.6.6.6\r\n"
           b"omnigres-connecting-ip: 7.7.7.7\r\nX-Forwarded-For: 8.8.8.8\r\n\r\n")
    [req] = c.dispatch.requests
    assert [v for n, v in req.headers if n == "omnigres-connecting-ip"] == ["10.1.2.3"]


def test_post_body_content_length_in_pieces():
    c = Conn()
    c.send(b"POST /submit HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nhello")
    assert c.dispatch.requests == []
    c.send(b" world")
    [req] = c.dispatch.requests
    assert (req.method, req.body) == ("POST", b"hello world")
    assert c.responses()[0].status == 200


def test_chunked_body():
    c = Conn()
    c.send(b"PUT /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    c.send(b"6\r\n worl")
    c.send(b"d\r\n0\r\nX-Trailer: t\r\n\r\n")
    [req] = c.dispatch.requests
    assert req.body == b"hello world"
    assert c.responses()[0].status == 200


def test_upgrade_request_served_as_plain_http1_with_body():
    c = Conn()
    c.send(b"POST /u HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
           b"HTTP2-Settings: AAMAAABkAAQAAP__\r\nContent-Length: 5\r\n\r\nab")
    c.send(b"cdeGET /next HTTP/1.1\r\nHost: x\r\n\r\n")
    assert [(r.path, r.body) for r in c.dispatch.requests] == [("/u", b"abcde"), ("/next", b"")]
    assert [r.status for r in c.responses()] == [200, 200]
    assert c.responses()[0].header("upgrade") is None


def test_upgrade_request_with_chunked_body():
    c = Conn()
    c.send(b"POST /u HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET /n HTTP/1.1\r\nHost: x\r\n\r\n")
    assert [(r.path, r.body) for r in c.dispatch.requests] == [("/u", b"abc"), ("/n", b"")]


@pytest.mark.parametrize("target", [b"example.org:443", b"/"])
def test_connect_is_501_and_closes_never_dispatched(target):
    c = Conn()
    c.send(b"GET /before HTTP/1.1\r\nHost: x\r\n\r\nCONNECT " + target +
           b" HTTP/1.1\r\nHost: example.org:443\r\n\r\n\x16\x03\x01tunnel GET /after HTTP/1.1\r\n\r\n")
    assert [r.path for r in c.dispatch.requests] == ["/before"]
    before, connect = c.responses()
    assert (before.status, connect.status, connect.header("connection")) == (200, 501, "close")
    assert c.closed


def test_options_asterisk_answered_here_connection_kept():
    c = Conn()
    c.send(b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\nGET /next HTTP/1.1\r\nHost: x\r\n\r\n")
    assert [r.path for r in c.dispatch.requests] == ["/next"]
    options, following = c.responses()
    assert (options.status, options.body, options.header("content-length")) == (200, b"", "0")
    assert options.header("allow") == "DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT, TRACE"
    assert following.body == b"hello /next" and not c.closed


@pytest.mark.parametrize("raw", [
    b"GET * HTTP/1.1\r\nHost: x\r\n\r\n",                        # asterisk-form is for OPTIONS only
    b"GET / HTTP/1.1\r\n\r\n",                                     # HTTP/1.1 without Host
    b"GET / HTTP/1.1\r\nHost: a\r\nX: y\r\nhost: a\r\n\r\n",         # two Host lines
    b"GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n",                # ... whatever the version
    b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",                        # not a host[:port]
    b"GET / HTTP/1.1\r\nHost: user@a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n",
    b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
], ids=["asterisk-get", "no-host", "two-hosts", "two-hosts-1.0", "host-space", "host-userinfo",
        "host-slash", "chunked-1.0"])
def test_rfc9112_violations_are_400_never_dispatched(raw):
    c = Conn()
    c.send(raw)
    resp = assert_error_and_closed(c, 400)
    assert resp.body.startswith(b"Bad request")
    assert c.dispatch.requests == []


@pytest.mark.parametrize("host", [b"", b"example.org", b"example.org:8080", b"[::1]:80", b"10.0.0.1",
                                  b"xn--bcher-kva.example", b"a%2eb"])
def test_valid_hosts_accepted(host):
    c = Conn()
    c.send(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    assert len(c.dispatch.requests) == 1 and c.responses()[0].status == 200


def test_http10_without_host_is_fine():
    c = Conn()
    c.send(b"GET /old HTTP/1.0\r\n\r\n")
    assert c.responses()[0].status == 200


def test_unknown_method_501_connection_kept():
    c = Conn()
    c.send(b"PROPFIND /x HTTP/1.1\r\nHost: x\r\n\r\nGET /y HTTP/1.1\r\nHost: x\r\n\r\n")
    assert [r.path for r in c.dispatch.requests] == ["/y"]
    first, second = c.responses()
    assert first.status == 501 and second.status == 200
    assert not c.closed


def test_http_version_other_than_1x_is_505():
    c = Conn()
    c.send(b"GET / HTTP/2.0\r\n\r\n")
    [resp] = c.responses()
    assert resp.status == 505 and resp.header("connection") == "close"
    assert c.closed and c.dispatch.requests == []


# -- connection management -------------------------------------------------------------------------

def test_http11_keep_alive_by_default_and_connection_close():
    c = Conn()
    c.send(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert not c.closed
    c.send(b"GET /2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\nGET /3 HTTP/1.1\r\nHost: x\r\n\r\n")
    first, second = c.responses()
    assert first.header("connection") is None
    assert second.header("connection") == "close"
    assert [r.path for r in c.dispatch.requests] == ["/1", "/2"]
    assert c.closed


def test_http10_closes_unless_keep_alive():
    c = Conn()
    c.send(b"GET /a HTTP/1.0\r\n\r\n")
    [resp] = c.responses()
    assert resp.header("connection") == "close" and c.closed
    c = Conn()
    c.send(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    [resp] = c.responses()
    assert resp.header("connection") == "keep-alive" and not c.closed
    assert c.dispatch.requests[0].http_version == "1.0"


def test_pipelined_responses_in_request_order():
    d = FakeDispatch(manual=True)
    c = Conn(d)
    c.send(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\nGET /3 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert [r.path for r in d.requests] == ["/1", "/2", "/3"]
    d.deferreds[2].callback(Response(200, [], b"three"))
    assert c.transport.value() == b""
    d.deferreds[0].callback(Response(200, [], b"one"))
    assert [r.body for r in c.responses()] == [b"one"]
    d.deferreds[1].callback(Response(201, [], b"two"))
    assert [(r.status, r.body) for r in c.responses()] == [(200, b"one"), (201, b"two"), (200, b"three")]


def test_pipeline_cap_pauses_reading_until_drained():
    d = FakeDispatch(manual=True)
    c = Conn(d)
    c.send(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n" * (http1.MAX_PIPELINE - 1))
    assert c.transport.producerState == "producing"
    c.send(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
    assert c.transport.producerState == "paused"
    for deferred in d.deferreds[:http1.MAX_PIPELINE - http1.RESUME_PIPELINE - 1]:
        deferred.callback(Response(200, [], b""))
    assert c.transport.producerState == "paused"
    d.deferreds[http1.MAX_PIPELINE - http1.RESUME_PIPELINE - 1].callback(Response(200, [], b""))
    assert c.transport.producerState == "producing"


def answer_all(d: FakeDispatch, limit: int = 10_000) -> None:
    """Answer every dispatched request, including those dispatched meanwhile."""
    answered = 0
    while answered < len(d.deferreds) and answered < limit:
        d.deferreds[answered].callback(Response(200, [], d.requests[answered].path.encode()))
        answered += 1


def test_pipeline_cap_holds_within_one_read():
    """A single read full of tiny requests does not become hundreds of queued requests:
    parsing stops once the pipeline is full and the rest of the read waits unparsed."""
    d = FakeDispatch(manual=True)
    c = Conn(d)
    one = b"GET /%03d HTTP/1.1\r\nHost: x\r\n\r\n"
    c.send(b"".join(one % i for i in range(300)))        # ~9 KB, one dataReceived
    per_slice = http1.FEED_SLICE // len(one % 0) + 1
    assert http1.MAX_PIPELINE <= len(d.requests) <= http1.MAX_PIPELINE + per_slice
    assert c.transport.producerState == "paused"
    answer_all(d)
    assert [r.body for r in c.responses()] == [b"/%03d" % i for i in range(300)]
    assert c.transport.producerState == "producing" and not c.closed


def test_half_close_after_held_requests_answers_them_all():
    d = FakeDispatch(manual=True)
    c = Conn(d)
    c.send(b"".join(b"GET /%03d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(200)))
    c.proto.readConnectionLost()
    assert not c.closed
    answer_all(d)
    resps = c.responses()
    assert [r.body for r in resps] == [b"/%03d" % i for i in range(200)]
    assert resps[-1].header("connection") == "close" and c.closed


def post(body: bytes, path: bytes = b"/up") -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (path, len(body), body)


def test_pipeline_byte_budget_pauses_reading_until_answers_go_out():
    d = FakeDispatch(manual=True)
    c = Conn(d, max_body=1000, max_pipeline_bytes=1000)
    c.send(post(b"a" * 900))            # alone on the connection: bounded by max_body only
    c.send(post(b"b" * 50))             # 950 waiting: under the budget
    assert c.transport.producerState == "producing"
    c.send(post(b"c" * 100)[:-40])      # 950 waiting + 60 arriving: over it
    assert c.transport.producerState == "paused"
    d.deferreds[0].callback(Response(200, [], b"A"))   # 900 bytes answered and released
    assert c.transport.producerState == "producing"
    c.send(b"c" * 40)
    assert [len(r.body) for r in d.requests] == [900, 50, 100]
    for deferred in d.deferreds[1:]:
        deferred.callback(Response(200, [], b"."))
    assert [r.body for r in c.responses()] == [b"A", b".", b"."]
    assert c.proto._queued_bytes == 0


def test_pipeline_byte_budget_does_not_block_a_lone_large_body():
    d = FakeDispatch(manual=True)
    c = Conn(d, max_body=10_000, max_pipeline_bytes=100)
    c.send(post(b"x" * 5000))
    assert c.transport.producerState == "producing" and len(d.requests) == 1


def test_connection_lost_cancels_queued_dispatches():
    """A client that is gone gets nothing: what it queued is cancelled, so the DB thread
    skips whatever has not started (DBThread.submit)."""
    d = FakeDispatch(manual=True)
    c = Conn(d)
    c.send(b"".join(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in (1, 2, 3)))
    d.deferreds[1].callback(Response(200, [], b"done, waiting for /1"))
    c.proto.connectionLost(None)
    assert d.cancelled == ["/1", "/3"]      # /2 was answered already
    assert c.transport.value() == b""


def test_abort_outcome_cancels_the_requests_queued_behind_it():
    d = FakeDispatch(manual=True)
    c = Conn(d)
    c.send(b"".join(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in (1, 2, 3)))
    d.deferreds[0].callback(ABORT)
    assert d.cancelled == ["/2", "/3"] and c.transport.value() == b""


def test_write_backpressure_pauses_reading():
    c = Conn()
    assert c.transport.producer is c.proto
    c.proto.pauseProducing()        # what the transport does when its buffer is full
    assert c.transport.producerState == "paused"
    c.proto.resumeProducing()
    assert c.transport.producerState == "producing"


def test_head_has_content_length_but_no_body():
    c = Conn()
    c.send(b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\nGET /g HTTP/1.1\r\nHost: x\r\n\r\n")
    head, get = c.responses(head_requests=1)
    assert head.header("content-length") == str(len(b"hello /h")) and head.body is None
    assert get.body == b"hello /g"


@pytest.mark.parametrize("status", [204, 304])
def test_no_body_statuses(status):
    c = Conn(FakeDispatch(lambda r: Response(status, [("etag", '"x"')], b"ignored")))
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /again HTTP/1.1\r\nHost: x\r\n\r\n")
    assert c.transport.value().count(b"ignored") == 0
    first, second = parse_responses(c.transport.value(), head_requests=2)
    assert first.status == status and first.header("content-length") is None
    assert first.header("etag") == '"x"'
    assert c.transport.value().startswith(b"HTTP/1.1 %d " % status)


def test_null_body_is_delimited_by_content_length_zero():
    """A body-less Response is still a delimited message: keep-alive clients get their
    answer and the next one on the same connection (no hang waiting for a close)."""
    statuses = {"/null": 200, "/e404": 404, "/n204": 204, "/n304": 304}
    c = Conn(FakeDispatch(lambda r: Response(statuses[r.path], [], None)))
    c.send(b"".join(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % p.encode() for p in statuses))
    c.send(b"GET /null HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    resps = parse_responses(c.transport.value(), head_requests=0)
    assert [(r.status, r.header("content-length")) for r in resps] == [
        (200, "0"), (404, "0"), (204, None), (304, None), (200, "0")]
    assert resps[-1].header("connection") == "keep-alive"
    assert not c.closed


def test_handler_headers_kept_framing_headers_dropped_injection_refused():
    headers = [("X-A", "1"), ("Content-Length", "999"), ("Transfer-Encoding", "chunked"),
               ("Connection", "keep-alive"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"),
               ("X-Evil", "v\r\nSet-Cookie: pwned=1"), ("X-Evil2", "v\nx: y"),
               ("Bad Name", "v"), ("X:Y", "v"), ("X-Null", None), ("Server", "custom")]
    c = Conn(FakeDispatch(lambda r: Response(200, headers, b"ok")))
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    [resp] = c.responses()
    assert b"pwned" not in c.transport.value()
    assert resp.names() == ["x-a", "set-cookie", "set-cookie", "server", "content-length", "date"]
    assert resp.header("content-length") == "2" and resp.header("server") == "custom"
    assert resp.body == b"ok"


def test_memoryview_body_from_the_database():
    c = Conn(FakeDispatch(lambda r: Response(200, [], memoryview(b"bytea"))))
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert c.responses()[0].body == b"bytea"


def test_abort_closes_without_bytes():
    c = Conn(FakeDispatch(lambda r: ABORT))
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert c.transport.value() == b""
    assert c.transport.disconnected


def test_abort_after_earlier_pipelined_answer_keeps_that_answer():
    d = FakeDispatch(manual=True)
    c = Conn(d)
    c.send(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
    d.deferreds[1].callback(ABORT)
    d.deferreds[0].callback(Response(200, [], b"one"))
    assert [r.body for r in c.responses()] == [b"one"]
    assert c.closed and not c.transport.disconnected


def test_dispatch_errback_is_500():
    d = FakeDispatch(manual=True)
    c = Conn(d)
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    d.deferreds[0].errback(RuntimeError("bug in the dispatcher"))
    [resp] = c.responses()
    assert (resp.status, resp.body) == (500, b"Internal server error")
    assert not c.closed


def test_dispatch_raising_is_500():
    def boom(request):
        raise RuntimeError("boom")
    c = Conn(boom)
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert c.responses()[0].status == 500


def test_dispatch_returning_a_non_deferred_is_500():
    c = Conn(lambda request: Response(200, [], b"not a deferred"))
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert [r.status for r in c.responses()] == [500, 500]


def test_invalid_status_from_handler_is_500():
    c = Conn(FakeDispatch(lambda r: Response(42, [], b"x")))
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert c.responses()[0].status == 500


def test_connection_lost_while_handling_drops_the_response():
    d = FakeDispatch(manual=True)
    c = Conn(d)
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    c.proto.connectionLost(None)
    d.deferreds[0].callback(Response(200, [], b"late"))
    assert c.transport.value() == b""
    assert c.clock.getDelayedCalls() == []


def test_half_close_after_request_still_answered():
    d = FakeDispatch(manual=True)
    c = Conn(d)
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    c.proto.readConnectionLost()
    assert not c.closed
    d.deferreds[0].callback(Response(200, [], b"x"))
    [resp] = c.responses()
    assert resp.header("connection") == "close" and c.closed


# -- limits and malformed input ------------------------------------------------------------------

def assert_error_and_closed(c: Conn, status: int) -> Resp:
    resps = c.responses()
    resp = resps[-1]
    assert resp.status == status
    assert resp.header("connection") == "close"
    assert resp.header("content-type") == "text/plain; charset=utf-8"
    assert c.closed
    return resp


@pytest.mark.parametrize("raw", [
    b"GARBAGE\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nA: b\x00c\r\n\r\n",
    b"GET /a\x01b HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n",
])
def test_malformed_is_400_and_close(raw):
    c = Conn()
    c.send(raw)
    resp = assert_error_and_closed(c, 400)
    assert resp.body.startswith(b"Bad request")
    assert c.dispatch.requests == []
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")      # ignored: the connection is finished
    assert len(c.responses()) == 1


def test_error_after_pipelined_request_comes_after_its_answer():
    d = FakeDispatch(manual=True)
    c = Conn(d)
    c.send(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\nGARBAGE\r\n\r\n")
    assert c.transport.value() == b""
    d.deferreds[0].callback(Response(200, [], b"fine"))
    ok, bad = c.responses()
    assert (ok.status, ok.body, bad.status) == (200, b"fine", 400)
    assert c.closed


def test_declared_body_too_large_413_before_reading():
    c = Conn(max_body=10)
    c.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n")
    assert_error_and_closed(c, 413)
    assert c.dispatch.requests == []


def test_chunked_body_growing_too_large_413():
    c = Conn(max_body=10)
    c.send(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nabcdef\r\n")
    assert c.transport.value() == b""
    c.send(b"5\r\nghijk\r\n")
    assert_error_and_closed(c, 413)
    assert c.dispatch.requests == []


def test_body_exactly_max_body_accepted():
    c = Conn(max_body=10)
    c.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n0123456789")
    assert c.dispatch.requests[0].body == b"0123456789"


def test_url_too_long_414():
    c = Conn(max_header_size=100_000)
    c.send(b"GET /" + b"a" * http1.MAX_URL + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert_error_and_closed(c, 414)


def test_headers_too_large_431():
    c = Conn(max_header_size=200)
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 20) for i in range(10)) + b"\r\n")
    assert_error_and_closed(c, 431)
    assert c.dispatch.requests == []


def test_headers_just_under_limit_accepted():
    head = b"GET / HTTP/1.1\r\nHost: x\r\nX-A: " + b"v" * 150 + b"\r\n\r\n"
    c = Conn(max_header_size=len(head))
    c.send(head)
    assert len(c.dispatch.requests) == 1


def test_unterminated_header_dripped_431():
    c = Conn(max_header_size=200)
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: ")
    for _ in range(20):
        c.send(b"v" * 20)
        if c.closed:
            break
    assert_error_and_closed(c, 431)


def test_expect_100_continue():
    c = Conn()
    c.send(b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
    assert c.transport.value() == b"HTTP/1.1 100 Continue\r\n\r\n"
    c.transport.clear()
    c.send(b"data")
    [resp] = c.responses()
    assert resp.status == 200 and c.dispatch.requests[0].body == b"data"


def test_expect_100_continue_waits_for_earlier_pipelined_answer():
    d = FakeDispatch(manual=True)
    c = Conn(d)
    c.send(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n"
           b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
    assert c.transport.value() == b""
    d.deferreds[0].callback(Response(200, [], b"1"))
    assert c.transport.value().endswith(b"\r\n\r\n1HTTP/1.1 100 Continue\r\n\r\n")


def test_expect_100_continue_too_large_413_without_continue():
    c = Conn(max_body=10)
    c.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\nExpect: 100-continue\r\n\r\n")
    assert b"100 Continue" not in c.transport.value()
    assert_error_and_closed(c, 413)


# -- timeouts ----------------------------------------------------------------------------------------

def test_header_timeout_408():
    c = Conn()                                   # header_timeout=5
    c.clock.advance(3)                           # idle before the request: not counted
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n")
    c.clock.advance(4.9)
    c.send(b"X-Slow: 1\r\n")                     # dripping headers does not extend it
    assert not c.closed
    c.clock.advance(0.1)
    assert_error_and_closed(c, 408)


def test_idle_keepalive_timeout_closes_silently():
    c = Conn()                                   # idle_timeout=10
    c.clock.advance(6)
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    c.transport.clear()
    c.clock.advance(9.9)
    assert not c.closed
    c.clock.advance(0.1)
    assert c.closed and c.transport.value() == b""


def test_a_client_that_does_not_read_its_answers_is_dropped_after_the_idle_timeout():
    c = Conn()                                   # idle_timeout=10
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    c.proto.pauseProducing()                     # our write buffer is full: the client is not reading
    c.clock.advance(9.9)
    assert not c.closed
    c.clock.advance(0.2)
    assert c.closed
    # A client that reads again in time is kept.
    d = Conn()
    d.proto.pauseProducing()
    d.clock.advance(9)
    d.proto.resumeProducing()
    d.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    d.clock.advance(2)
    assert not d.closed and [r.status for r in d.responses()] == [200]


def test_new_connection_without_request_idles_out():
    c = Conn()
    c.clock.advance(10)
    assert c.closed and c.transport.value() == b""


def test_body_timeout_408_resets_on_progress():
    c = Conn()                                   # body_timeout=7
    c.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n12345")
    c.clock.advance(6)
    c.send(b"67")
    c.clock.advance(6.9)
    assert not c.closed
    c.clock.advance(0.1)
    assert_error_and_closed(c, 408)


def test_slow_handler_is_not_a_client_timeout():
    d = FakeDispatch(manual=True)
    c = Conn(d)
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    c.clock.advance(100)
    assert not c.closed
    d.deferreds[0].callback(Response(200, [], b"x"))
    assert c.responses()[0].status == 200


def test_timers_gone_after_close():
    c = Conn()
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    c.proto.connectionLost(None)
    assert c.clock.getDelayedCalls() == []


# -- hand-off, shutdown, logging, dates -------------------------------------------------------------

def test_bytes_delivered_before_handoff():
    """The HTTP/2 detector read the first bytes, then hands the connection over."""
    dispatch = FakeDispatch()
    transport = StringTransport(peerAddress=PEER)
    clock = Clock()
    proto = HTTP1Protocol(ListenerContext(dispatch, make_settings(), 1, clock=clock))
    proto.makeConnection(transport)
    proto.dataReceived(b"GET /handed-over HTTP/1.1\r\nHo")
    proto.dataReceived(b"st: h\r\n\r\n")
    assert dispatch.requests[0].path == "/handed-over"
    assert parse_responses(transport.value())[0].status == 200


def test_stop_accepting_keepalive():
    idle = Conn()
    idle.proto.stop_accepting_keepalive()
    assert idle.closed and idle.transport.value() == b""

    d = FakeDispatch(manual=True)
    busy = Conn(d)
    busy.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    closed = busy.proto.notify_closed()
    busy.proto.stop_accepting_keepalive()
    assert not busy.closed
    d.deferreds[0].callback(Response(200, [], b"x"))
    [resp] = busy.responses()
    assert resp.header("connection") == "close" and busy.closed
    busy.proto.connectionLost(None)
    assert closed.called


def test_access_log_line():
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        c = Conn(access_log=True)
        c.send(b"GET /users/john?x=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        c.send(b"NOPE\r\n\r\n")
        quiet = Conn(access_log=False)
        quiet.send(b"GET /quiet HTTP/1.1\r\nHost: x\r\n\r\n")
    finally:
        globalLogPublisher.removeObserver(events.append)
    access = [e for e in events if e.get("log_namespace") == "omni_httpd.access"]
    assert len(access) == 2
    ok, bad = access
    assert (ok["method"], ok["path"], ok["status"], ok["bytes"], ok["worker"]) == \
        ("GET", "/users/john?x=1", 200, len(b"hello /users/john"), "w3")
    assert formatEvent(ok) == '10.1.2.3:40000 "GET /users/john?x=1 HTTP/1.1" 200 17 0.0ms worker=w3'
    assert (bad["method"], bad["status"]) == ("-", 400)


def test_http_date_cached_per_second():
    assert format_http_date(784111777) == "Sun, 06 Nov 1994 08:49:37 GMT"
    assert http_date(784111777.2) == http_date(784111777.9) == "Sun, 06 Nov 1994 08:49:37 GMT"
    assert http_date(784111778.0) == "Sun, 06 Nov 1994 08:49:38 GMT"


# -- over a real socket ------------------------------------------------------------------------------

class _Factory(protocol.Factory):
    def __init__(self, dispatch, **settings):
        self.dispatch = dispatch
        self.settings = make_settings(**settings)
        self.connections = set()

    def buildProtocol(self, addr):
        return _Tracked(ListenerContext(self.dispatch, self.settings, 5, worker_label="w0"), self.connections)


class _Tracked(HTTP1Protocol):
    """The protocol, with the test's own record of live connections."""

    def __init__(self, context, connections):
        super().__init__(context)
        self._connections = connections

    def connectionMade(self):
        self._connections.add(self)
        super().connectionMade()

    def connectionLost(self, reason=None):
        self._connections.discard(self)
        super().connectionLost(reason)


@pytest_twisted.inlineCallbacks
def test_real_tcp_with_treq():
    def answer(request):
        return Response(200, [("content-type", "text/plain")],
                        b"%s %s %s" % (request.method.encode(), request.path.encode(), request.body))

    dispatch = FakeDispatch(answer)
    factory = _Factory(dispatch, max_body=1 << 20)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    pool = HTTPConnectionPool(reactor, persistent=True)
    try:
        url = "http://127.0.0.1:%d" % port.getHost().port
        resp = yield treq.get(url + "/a/../b?q=1", pool=pool)
        assert resp.code == 200
        assert resp.headers.getRawHeaders("server") == ["omni_httpd"]
        assert (yield resp.content()) == b"GET /b "
        big = b"x" * 300_000
        resp = yield treq.post(url + "/upload", data=big, pool=pool)
        assert (yield resp.content()) == b"POST /upload " + big
        assert len(factory.connections) == 1          # the same keep-alive connection
        assert dispatch.requests[0].query_string == "q=1"
    finally:
        yield pool.closeCachedConnections()
        yield port.stopListening()


class _RawClient(protocol.Protocol):
    def __init__(self, payload):
        self.payload = payload
        self.received = b""
        self.done = defer.Deferred()

    def connectionMade(self):
        self.transport.write(self.payload)

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.done.callback(None)


@pytest_twisted.inlineCallbacks
def test_real_tcp_413_reaches_client_still_sending():
    """The lingering close: the answer arrives even though the body was not read."""
    factory = _Factory(FakeDispatch(), max_body=1000)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        client = _RawClient(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3000000\r\n\r\n" + b"z" * 3_000_000)
        yield protocol.ClientCreator(reactor, lambda: client).connectTCP("127.0.0.1", port.getHost().port)
        yield client.done
        [resp] = parse_responses(client.received)
        assert resp.status == 413
    finally:
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_real_tcp_pipelined_burst():
    factory = _Factory(FakeDispatch())
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        payload = b"".join(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(100))
        client = _RawClient(payload + b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        yield protocol.ClientCreator(reactor, lambda: client).connectTCP("127.0.0.1", port.getHost().port)
        yield client.done
        bodies = [r.body for r in parse_responses(client.received)]
        assert bodies == [b"hello /%d" % i for i in range(100)] + [b"hello /last"]
    finally:
        yield port.stopListening()


class _HalfClosingClient(_RawClient):
    def connectionMade(self):
        self.transport.write(self.payload)
        self.transport.loseWriteConnection()


@pytest_twisted.inlineCallbacks
def test_real_tcp_client_half_closes_after_request():
    """`printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc host port` style clients get their answer."""
    dispatch = FakeDispatch(manual=True)
    factory = _Factory(dispatch)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        client = _HalfClosingClient(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n")
        yield protocol.ClientCreator(reactor, lambda: client).connectTCP("127.0.0.1", port.getHost().port)
        # both requests dispatched and the client's half-close seen by the server
        yield reactor_wait_until(lambda: len(dispatch.deferreds) == 2 and factory.connections
                                 and not any(c.accepting for c in factory.connections),
                                 timeout=10, what="two requests and the half-close")
        dispatch.deferreds[1].callback(Response(200, [], b"B"))
        dispatch.deferreds[0].callback(Response(200, [], b"A"))
        yield client.done
        first, second = parse_responses(client.received)
        assert (first.body, second.body) == (b"A", b"B")
        assert second.header("connection") == "close"
    finally:
        yield port.stopListening()


def test_send_now_direct_then_buffered_rest():
    """Direct socket send when nothing is buffered; what the kernel refuses goes to write()."""
    from twisted.internet import tcp
    from twisted.internet.testing import MemoryReactor

    ours, peer = socket.socketpair()
    try:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        fake_reactor = MemoryReactor()
        conn = tcp.Connection(ours, protocol.Protocol(), fake_reactor)
        conn.connected = True
        data = bytes(range(256)) * 4096                  # 1 MiB: more than the socket takes
        http1.send_now(conn, data)
        buffered = b"".join(conn._tempDataBuffer)
        assert 0 < len(buffered) < len(data)              # part went straight out
        assert conn in fake_reactor.writers                # Twisted sends the rest later
        peer.setblocking(False)
        received = b""
        while True:
            try:
                chunk = peer.recv(1 << 20)
            except BlockingIOError:
                break
            received += chunk
        assert received + buffered == data
        http1.send_now(conn, b"more")                     # buffer not empty: no overtaking
        assert conn._tempDataBuffer[-1] == b"more"
    finally:
        ours.close()
        peer.close()
