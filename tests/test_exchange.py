"""Every response leaves through common/exchange.py: the rules, and HTTP/1 vs HTTP/2.

The same handler outcome must reach an HTTP/1.1 client and an HTTP/2 client with the
same status, the same headers (but for each protocol's own framing) and the same body,
whatever it holds: a 1xx status, an invalid header, a NULL body, HEAD; and both
protocols must see an IPv6 peer the same way.
"""
from __future__ import annotations

import socket

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, threads

from h2_client import h2_exchange
from omni_httpd.common import response
from omni_httpd.common.exchange import finish, format_peer
from omni_httpd.common.outcome import response_from_row
from omni_httpd.common.response import Response
from omni_httpd.common.settings import Settings
from omni_httpd.worker.http.connection import ServerFactory
from omni_httpd.worker.http.context import ListenerContext

NOW = 1_700_000_000.0


def row(status=200, names=None, values=None, body=None):
    return ("response", status, names, values, body, None, None)


# -- the rules ---------------------------------------------------------------------------

def test_header_injection_is_dropped(warnings):
    out = finish(response_from_row(
        row(names=["x-ok", "x-bad", "bad name", "x-nul"],
            values=["fine", "a\r\nSet-Cookie: x=1", "v", "a\x00b"], body=b""), "GET"), False, NOW, True)
    assert out.headers == [("x-ok", "fine")]
    assert len(warnings) == 3


@pytest.mark.parametrize("status", [0, 99, 100, 101, 199, 1000, -1, "200"])
def test_unusable_status_is_500(status, warnings):
    out = finish(Response(status, [], b"x"), False, NOW, True)
    assert (out.status, out.body) == (500, response.internal_error().body)
    assert len(warnings) == 1


def test_lengths():
    assert finish(Response(200, [], b"abc"), False, NOW, True).length == 3
    head = finish(Response(200, [], b"abc"), True, NOW, True)
    assert (head.length, head.body) == (3, b"")
    assert finish(Response(200, [], None), False, NOW, True).length == 0      # HTTP/1: delimited
    assert finish(Response(200, [], None), False, NOW, False).length is None  # HTTP/2: end of stream
    for status in (204, 304):
        out = finish(Response(status, [], b"ignored"), False, NOW, True)
        assert (out.length, out.body) == (None, b"")


def test_framing_headers_are_the_protocols_and_date_and_server_are_added_unless_given():
    out = finish(Response(200, [("Content-Length", "9"), ("Connection", "close"), ("TE", "x"),
                                ("Keep-Alive", "1"), ("X-A", " spaced \t")], b""), False, NOW, True)
    assert out.headers == [("X-A", "spaced")]
    assert [name for name, _ in out.added] == ["date", "server"]
    own = finish(Response(200, [("Date", "then"), ("Server", "mine")], b""), False, NOW, True)
    assert own.added == [] and own.headers == [("Date", "then"), ("Server", "mine")]


def test_peer_text():
    class Address:
        def __init__(self, host, port):
            self.host, self.port = host, port

    assert format_peer(Address("127.0.0.1", 80)) == "127.0.0.1:80"
    assert format_peer(Address("::1", 80)) == "[::1]:80"


# -- the same answer over HTTP/1.1 and HTTP/2 ------------------------------------------

ANSWERS = {
    "/plain": Response(201, [("X-One", "a"), ("x-two", "b")], b"hello"),
    "/informational": Response(101, [("x-a", "1")], b"ignored"),
    "/invalid-header": Response(200, [("x-ok", "fine"), ("x-bad", "a\r\nSet-Cookie: x=1"),
                                      ("bad name", "v"), ("x-null", None)], b"body"),
    "/framing": Response(200, [("Connection", "close"), ("Transfer-Encoding", "chunked"),
                               ("Content-Length", "99")], b"four"),
    "/null": Response(200, [("x-a", "1")], None),
    "/no-content": Response(204, [], b"dropped"),
    "/own-date": Response(200, [("Date", "Mon, 01 Jan 2024 00:00:00 GMT"), ("Server", "x")], b""),
}
PEERS = []


def dispatch(request, allow_remote=False):
    PEERS.append(request.peer)
    return defer.succeed(ANSWERS[request.path])


def http1_get(host, port, method, path):
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(("%s %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % (method, path)).encode())
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = [tuple(part.strip() for part in line.split(":", 1)) for line in lines[1:]]
    return status, [(n.lower(), v) for n, v in headers], body


def comparable(headers, null_body):
    """The headers a handler's outcome decides: without each protocol's own framing."""
    own = {"date", "connection"} | ({"content-length"} if null_body else set())
    return [(n, v) for n, v in headers if n not in own]


@pytest.fixture
def servers():
    factory = ServerFactory(ListenerContext(dispatch, Settings(access_log=False), 1, "http", clock=reactor))
    ports = [reactor.listenTCP(0, factory, interface="127.0.0.1"),
             reactor.listenTCP(0, factory, interface="::1")]
    yield {"127.0.0.1": ports[0].getHost().port, "::1": ports[1].getHost().port}
    for port in ports:
        port.stopListening()
    factory.abort_all()


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("path", sorted(ANSWERS))
@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_http1_and_http2_send_the_same_answer(servers, path, method):
    port = servers["127.0.0.1"]
    status1, headers1, body1 = await threads.deferToThread(http1_get, "127.0.0.1", port, method, path)
    [answer2] = await threads.deferToThread(h2_exchange, port, [(method, path, b"")], False, None, 10)
    headers2 = [(n.lower(), v) for n, v in answer2.headers if not n.startswith(":")]
    null_body = ANSWERS[path].body is None
    assert status1 == answer2.status
    assert comparable(headers1, null_body) == comparable(headers2, null_body)
    assert body1 == answer2.body
    if path == "/informational":
        assert status1 == 500                 # a 1xx is no final answer: refused on both
    if path == "/invalid-header":
        assert ("x-ok", "fine") in headers1 and not any(n in ("x-bad", "x-null", "set-cookie")
                                                        for n, _ in headers1 + headers2)


@pytest_twisted.ensureDeferred
async def test_both_protocols_see_an_ipv6_peer_in_brackets(servers):
    port = servers["::1"]
    del PEERS[:]
    await threads.deferToThread(http1_get, "::1", port, "GET", "/plain")
    await threads.deferToThread(h2_exchange, port, [("GET", "/plain", b"")], False, None, 10, "::1")
    assert len(PEERS) == 2
    for peer in PEERS:
        assert peer.startswith("[::1]:") and peer.rsplit(":", 1)[1].isdigit(), PEERS
