"""HTTP/2: the protocol driven by h2 as the client (in memory), and real sockets
(an h2 client over TCP, curl --http2-prior-knowledge, HTTP/1 on the same port)."""
from __future__ import annotations

import hashlib
import os
import shutil
from typing import Dict, List, Optional

import pytest
import pytest_twisted
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    DataReceived,
    InformationalResponseReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
)
from hyperframe.frame import Frame, GoAwayFrame
from twisted.internet import defer, protocol, reactor
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import formatEvent, globalLogPublisher

from omni_httpd.worker.http.context import ListenerContext
from omni_httpd.worker.http.connection import PREFACE, ServerFactory
from omni_httpd.common.request import Request
from omni_httpd.common.response import ABORT, Response
from omni_httpd.common.settings import Settings

MB = 1024 * 1024


# -- a fake dispatcher ------------------------------------------------------------------------

class HeldDispatch:
    """Records every dispatched request; each answer waits until the test gives it."""

    def __init__(self) -> None:
        self.calls: List[tuple] = []

    def __call__(self, request: Request, allow_remote: bool) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.calls.append((request, allow_remote, d))
        return d

    def answer(self, index: int, response: Response) -> None:
        self.calls[index][2].callback(response)


def echo_dispatch(request: Request, allow_remote: bool) -> defer.Deferred:
    """Answers at once: the body echoed back, the request described in headers."""
    if request.path == "/abort":
        return defer.succeed(ABORT)
    if request.path.startswith("/size/"):
        size = int(request.path.rsplit("/", 1)[1])
        return defer.succeed(Response(200, [("content-type", "application/octet-stream")],
                                      _pattern(size)))
    headers = [("x-method", request.method), ("x-path", request.path),
               ("x-query", str(request.query_string)), ("x-remote", str(allow_remote)),
               ("x-version", request.http_version),
               ("x-body-sha256", hashlib.sha256(request.body).hexdigest())]
    return defer.succeed(Response(200, headers, request.body or b"hello"))


def _pattern(size: int) -> bytes:
    block = bytes(range(256)) * 4096
    return (block * (size // len(block) + 1))[:size]


# -- h2 as the client, over an in-memory transport ----------------------------------------------

class StreamResult:
    def __init__(self) -> None:
        self.headers: Optional[Dict[str, str]] = None
        self.header_list: List[tuple] = []
        self.informational: List[Dict[str, str]] = []
        self.body = bytearray()
        self.ended = False
        self.reset: Optional[int] = None

    @property
    def status(self) -> int:
        return int(self.headers[":status"])


class GoawayFilter:
    """Takes GOAWAY frames out of the server's byte stream before h2 sees them.

    h2 refuses every frame after a GOAWAY (its connection state becomes CLOSED), so a
    test client built on it could not read the responses a server still sends for
    streams below ``last_stream_id``; real clients (curl, browsers) do read them.
    """

    def __init__(self) -> None:
        self.buffer = b""
        self.frames: List[GoAwayFrame] = []

    def feed(self, data: bytes) -> bytes:
        self.buffer += data
        passed = []
        while len(self.buffer) >= 9:
            length = int.from_bytes(self.buffer[:3], "big")
            if len(self.buffer) < 9 + length:
                break
            frame_bytes, self.buffer = self.buffer[:9 + length], self.buffer[9 + length:]
            if frame_bytes[3] == 0x7:
                frame, _length = Frame.parse_frame_header(memoryview(frame_bytes[:9]))
                frame.parse_body(memoryview(frame_bytes[9:]))
                self.frames.append(frame)
            else:
                passed.append(frame_bytes)
        return b"".join(passed)


class MemoryClient:
    """An h2 client wired to a server connection through a StringTransport."""

    def __init__(self, factory: ServerFactory, window: int = 65535) -> None:
        # Headers go out exactly as a test gives them (h2 would reorder cookies).
        self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8",
                                               normalize_outbound_headers=False))
        self.h2.initiate_connection()
        self.transport = StringTransport()
        self.server = factory.buildProtocol(None)
        self.server.makeConnection(self.transport)
        self.results: Dict[int, StreamResult] = {}
        self.goaways = GoawayFilter()
        self.outgoing: Dict[int, memoryview] = {}   # request bodies still to send
        self.auto_ack = True
        self.pump()

    def request(self, method: str, path: str, headers=(), body: Optional[bytes] = None,
                end: bool = True, authority: Optional[str] = "example.test") -> int:
        stream_id = self.h2.get_next_available_stream_id()
        self.results[stream_id] = StreamResult()
        all_headers = [(":method", method), (":path", path), (":scheme", "http")]
        if authority is not None:
            all_headers.append((":authority", authority))
        all_headers += list(headers)
        self.h2.send_headers(stream_id, all_headers, end_stream=body is None and end)
        if body is not None:
            self.outgoing[stream_id] = memoryview(body)
            self._send_bodies()
        self.pump()
        return stream_id

    def _send_bodies(self) -> None:
        for stream_id, data in list(self.outgoing.items()):
            if self.results[stream_id].reset is not None:
                del self.outgoing[stream_id]
                continue
            while len(data):
                window = self.h2.local_flow_control_window(stream_id)
                size = min(window, self.h2.max_outbound_frame_size, len(data))
                if size <= 0:
                    break
                self.h2.send_data(stream_id, data[:size].tobytes(), end_stream=size == len(data))
                data = data[size:]
            if len(data):
                self.outgoing[stream_id] = data
            else:
                del self.outgoing[stream_id]

    def pump(self) -> None:
        """Exchange bytes until both sides are quiet."""
        clock = getattr(self.server.factory, "clock", None)
        for _ in range(100000):
            moved = False
            if isinstance(clock, Clock):
                clock.advance(0)  # answers are flushed at the end of the reactor turn
            data = self.h2.data_to_send()
            if data and not self.transport.disconnecting:
                self.server.dataReceived(data)
                moved = True
            out = self.transport.value()
            if out:
                self.transport.clear()
                for event in self.h2.receive_data(self.goaways.feed(out)):
                    self._event(event)
                self._send_bodies()
                moved = True
            if not moved:
                return
        raise AssertionError("connection never went quiet")

    def _event(self, event) -> None:
        if isinstance(event, InformationalResponseReceived):
            self.results[event.stream_id].informational.append(dict(event.headers))
        elif isinstance(event, ResponseReceived):
            result = self.results[event.stream_id]
            result.headers = dict(event.headers)
            result.header_list = list(event.headers)
        elif isinstance(event, DataReceived):
            self.results[event.stream_id].body += event.data
            if self.auto_ack:
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, StreamEnded):
            self.results[event.stream_id].ended = True
        elif isinstance(event, StreamReset):
            self.results[event.stream_id].reset = event.error_code

    @property
    def goaway(self) -> Optional[GoAwayFrame]:
        return self.goaways.frames[0] if self.goaways.frames else None


def make_factory(dispatch=echo_dispatch, clock=None, **settings) -> ServerFactory:
    return ServerFactory(ListenerContext(dispatch, Settings(**settings), listener_id=7, scheme="http",
                                         clock=clock or Clock()))


# -- in-memory tests -------------------------------------------------------------------------------

def test_request_fields_and_response_headers():
    dispatch = HeldDispatch()
    client = MemoryClient(make_factory(dispatch))
    stream_id = client.request("GET", "/a/./b/../c?x=1&y", headers=[
        ("accept", "text/plain"), ("cookie", "a=1"), ("x-custom", "v1"), ("cookie", "b=2")])
    [(request, allow_remote, _d)] = dispatch.calls
    assert allow_remote is True
    assert (request.method, request.path, request.query_string) == ("GET", "/a/c", "x=1&y")
    assert request.headers[:-1] == [("host", "example.test"), ("accept", "text/plain"),
                                    ("cookie", "a=1; b=2"), ("x-custom", "v1")]
    # The worker adds the client's address (docs/sql-api.md, "Client address").
    assert request.headers[-1][0] == "omnigres-connecting-ip"
    assert (request.http_version, request.scheme, request.listener_id) == ("2", "http", 7)
    assert request.body == b""
    dispatch.answer(0, Response(201, [("Content-Type", "text/plain"), ("Connection", "close"),
                                      ("Transfer-Encoding", "chunked"), ("Content-Length", "99"),
                                      ("X-Bad", "a\r\nInjected: yes"), ("X-Good", "ok")],
                                b"created"))
    client.pump()
    result = client.results[stream_id]
    assert result.status == 201 and result.ended and result.body == b"created"
    names = [name for name, _ in result.header_list]
    assert "connection" not in names and "transfer-encoding" not in names
    assert "x-bad" not in names and "injected" not in names
    assert result.headers["content-length"] == "7"
    assert names.count("content-length") == 1
    assert result.headers["content-type"] == "text/plain"
    assert result.headers["x-good"] == "ok"
    assert result.headers["date"].endswith(" GMT")


def test_host_header_without_authority():
    dispatch = HeldDispatch()
    client = MemoryClient(make_factory(dispatch))
    client.request("GET", "/", headers=[("accept", "*/*"), ("host", "given.test")],
                   authority=None)
    [(request, _r, _d)] = dispatch.calls
    assert request.headers[:-1] == [("accept", "*/*"), ("host", "given.test")]


def test_two_streams_are_dispatched_concurrently():
    dispatch = HeldDispatch()
    client = MemoryClient(make_factory(dispatch))
    first = client.request("GET", "/first")
    second = client.request("GET", "/second")
    # The first is still unanswered when the second reaches the dispatcher.
    assert [call[0].path for call in dispatch.calls] == ["/first", "/second"]
    dispatch.answer(1, Response(200, [], b"two"))
    client.pump()
    assert client.results[second].body == b"two" and not client.results[first].ended
    dispatch.answer(0, Response(200, [], b"one"))
    client.pump()
    assert client.results[first].body == b"one"


def test_head_has_content_length_but_no_data():
    dispatch = HeldDispatch()
    client = MemoryClient(make_factory(dispatch))
    stream_id = client.request("HEAD", "/")
    dispatch.answer(0, Response(200, [], b"x" * 1234))
    client.pump()
    result = client.results[stream_id]
    assert result.headers["content-length"] == "1234"
    assert result.body == b"" and result.ended


def test_null_body_has_no_content_length_and_empty_body_zero():
    dispatch = HeldDispatch()
    client = MemoryClient(make_factory(dispatch))
    none_id = client.request("GET", "/none")
    empty_id = client.request("GET", "/empty")
    no_content_id = client.request("GET", "/204")
    dispatch.answer(0, Response(200, [], None))
    dispatch.answer(1, Response(200, [], b""))
    dispatch.answer(2, Response(204, [], b""))
    client.pump()
    assert "content-length" not in client.results[none_id].headers
    assert client.results[empty_id].headers["content-length"] == "0"
    assert client.results[no_content_id].status == 204
    assert "content-length" not in client.results[no_content_id].headers
    assert all(client.results[s].ended for s in (none_id, empty_id, no_content_id))


def test_abort_resets_only_its_stream():
    client = MemoryClient(make_factory(echo_dispatch))
    aborted = client.request("GET", "/abort")
    fine = client.request("GET", "/fine")
    assert client.results[aborted].reset == ErrorCodes.CANCEL
    assert client.results[aborted].headers is None
    assert client.results[fine].status == 200 and client.results[fine].body == b"hello"
    assert not client.transport.disconnecting


def test_dispatch_failure_is_a_500_on_that_stream():
    dispatch = HeldDispatch()
    client = MemoryClient(make_factory(dispatch))
    stream_id = client.request("GET", "/")
    dispatch.calls[0][2].errback(RuntimeError("boom"))
    client.pump()
    assert client.results[stream_id].status == 500
    assert bytes(client.results[stream_id].body) == b"Internal server error"


def test_unusable_responses_do_not_break_the_connection():
    dispatch = HeldDispatch()
    client = MemoryClient(make_factory(dispatch))
    informational = client.request("GET", "/1xx")
    broken = client.request("GET", "/broken")
    dispatch.answer(0, Response(101, [], b""))
    dispatch.answer(1, Response(200, [("x-none", None)], b""))
    client.pump()
    assert client.results[informational].status == 500
    # A header without a value is dropped (with a warning), as over HTTP/1 (exchange.py).
    assert client.results[broken].status == 200 and client.results[broken].reset is None
    later = client.request("GET", "/later")
    dispatch.answer(2, Response(200, [], b"fine"))
    client.pump()
    assert client.results[later].body == b"fine"


def test_access_log_line():
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        dispatch = HeldDispatch()
        client = MemoryClient(make_factory(dispatch, access_log=True))
        client.request("GET", "/logged?x=1")
        dispatch.answer(0, Response(200, [], b"12345"))
        client.pump()
    finally:
        globalLogPublisher.removeObserver(events.append)
    [line] = [formatEvent(e) for e in events if e.get("log_namespace") == "omni_httpd.access"]
    assert '"GET /logged?x=1 HTTP/2" 200 5 ' in line


def test_large_bodies_both_ways_with_flow_control():
    client = MemoryClient(make_factory(echo_dispatch))
    body = os.urandom(10 * MB + 123)
    stream_id = client.request("POST", "/echo", body=body)
    result = client.results[stream_id]
    assert result.ended and result.status == 200
    assert result.headers["x-body-sha256"] == hashlib.sha256(body).hexdigest()
    assert bytes(result.body) == body


def test_response_waits_for_window_updates():
    client = MemoryClient(make_factory(echo_dispatch))
    client.auto_ack = False
    stream_id = client.request("GET", "/size/300000")
    result = client.results[stream_id]
    # Without WINDOW_UPDATEs the server stops at the client's initial 65535-byte window.
    assert len(result.body) == 65535 and not result.ended
    client.h2.acknowledge_received_data(len(result.body), stream_id)
    client.auto_ack = True
    client.pump()
    assert result.ended and bytes(result.body) == _pattern(300000)


def test_transport_backpressure_pauses_data():
    client = MemoryClient(make_factory(echo_dispatch))
    client.server.protocol.pauseProducing()
    stream_id = client.request("GET", "/size/100000")
    result = client.results[stream_id]
    assert result.status == 200 and len(result.body) == 0
    client.server.protocol.resumeProducing()
    client.pump()
    assert result.ended and len(result.body) == 100000


def test_declared_body_too_large_is_413():
    client = MemoryClient(make_factory(echo_dispatch, max_body=1000))
    stream_id = client.request("POST", "/", headers=[("content-length", "5000")], end=False)
    result = client.results[stream_id]
    assert result.status == 413 and result.ended


def test_streamed_body_too_large_is_413_and_stream_refused():
    dispatch = HeldDispatch()
    client = MemoryClient(make_factory(dispatch, max_body=100000))
    stream_id = client.request("POST", "/", end=False)
    for _ in range(10):   # 160 kB, the request not finished
        if client.results[stream_id].ended:
            break
        size = min(16000, client.h2.local_flow_control_window(stream_id))
        assert size > 0, "the client must be able to send until it gets its 413"
        client.h2.send_data(stream_id, b"x" * size)
        client.pump()   # the window beyond the first 64 KiB opens as the body is admitted
    result = client.results[stream_id]
    assert result.status == 413 and result.ended
    # ...and the client is asked to stop sending the rest.
    assert result.reset == ErrorCodes.NO_ERROR
    assert dispatch.calls == []
    # The connection still works.
    other = client.request("GET", "/ok")
    dispatch.answer(0, Response(200, [], b"fine"))
    client.pump()
    assert client.results[other].body == b"fine"


def test_oversized_headers_get_431():
    dispatch = HeldDispatch()
    client = MemoryClient(make_factory(dispatch, max_header_size=4096))
    stream_id = client.request("GET", "/", headers=[("x-big", "v" * 5000)])
    assert client.results[stream_id].status == 431
    assert dispatch.calls == []


def test_unknown_method_is_501_and_bad_target_400():
    dispatch = HeldDispatch()
    client = MemoryClient(make_factory(dispatch))
    method = client.request("BREW", "/")
    target = client.request("GET", "relative")
    assert client.results[method].status == 501
    assert client.results[target].status == 400
    assert dispatch.calls == []


def test_expect_100_continue():
    dispatch = HeldDispatch()
    client = MemoryClient(make_factory(dispatch))
    stream_id = client.request("POST", "/", headers=[("expect", "100-continue"),
                                                     ("content-length", "3")], end=False)
    assert client.results[stream_id].informational == [{":status": "100"}]
    client.h2.send_data(stream_id, b"abc", end_stream=True)
    client.pump()
    assert dispatch.calls[0][0].body == b"abc"


def test_trailers_are_ignored():
    dispatch = HeldDispatch()
    client = MemoryClient(make_factory(dispatch))
    stream_id = client.request("POST", "/", end=False)
    client.h2.send_data(stream_id, b"body")
    client.h2.send_headers(stream_id, [("x-trailer", "t")], end_stream=True)
    client.pump()
    [(request, _r, _d)] = dispatch.calls
    assert request.body == b"body"
    assert ("x-trailer", "t") not in request.headers


def test_client_reset_drops_the_late_response():
    dispatch = HeldDispatch()
    client = MemoryClient(make_factory(dispatch))
    stream_id = client.request("GET", "/")
    client.h2.reset_stream(stream_id, ErrorCodes.CANCEL)
    client.pump()
    dispatch.answer(0, Response(200, [], b"late"))
    client.pump()
    assert client.results[stream_id].headers is None
    assert not client.transport.disconnecting


def test_protocol_error_sends_goaway_and_closes():
    client = MemoryClient(make_factory(echo_dispatch))
    # A DATA frame on stream 0 is a connection error of type PROTOCOL_ERROR.
    client.server.dataReceived(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")
    client.pump()
    assert client.goaway is not None
    assert client.goaway.error_code == ErrorCodes.PROTOCOL_ERROR
    assert client.transport.disconnecting


def test_idle_timeout_sends_goaway_and_closes():
    clock = Clock()
    dispatch = HeldDispatch()
    client = MemoryClient(make_factory(dispatch, clock=clock, idle_timeout=30.0,
                                       body_timeout=10.0))
    stream_id = client.request("GET", "/")
    # A stream waiting for its handler is not idle, however long it takes.
    clock.advance(100)
    client.pump()
    assert not client.transport.disconnecting
    dispatch.answer(0, Response(200, [], b"ok"))
    client.pump()
    assert client.results[stream_id].body == b"ok"
    clock.advance(29)
    client.pump()
    assert not client.transport.disconnecting
    clock.advance(2)
    client.pump()
    assert client.goaway is not None and client.goaway.error_code == ErrorCodes.NO_ERROR
    assert client.transport.disconnecting


def test_stalled_request_body_times_out():
    clock = Clock()
    client = MemoryClient(make_factory(HeldDispatch(), clock=clock, idle_timeout=60.0,
                                       body_timeout=10.0))
    client.request("POST", "/", end=False)
    clock.advance(11)
    client.pump()
    assert client.transport.disconnecting


def test_graceful_close_finishes_in_flight_streams():
    dispatch = HeldDispatch()
    factory = make_factory(dispatch)
    client = MemoryClient(factory)
    first = client.request("GET", "/first")
    drained = factory.graceful_close()
    client.pump()
    assert client.goaway is not None
    assert client.goaway.error_code == ErrorCodes.NO_ERROR
    assert client.goaway.last_stream_id == first
    assert not client.transport.disconnecting
    dispatch.answer(0, Response(200, [], b"finished"))
    client.pump()
    assert client.results[first].body == b"finished" and client.results[first].ended
    assert client.transport.disconnecting
    assert not drained.called
    client.server.connectionLost(None)
    assert drained.called and factory.connections == set()


def test_streams_after_graceful_goaway_are_refused():
    dispatch = HeldDispatch()
    factory = make_factory(dispatch)
    client = MemoryClient(factory)
    first = client.request("GET", "/first")
    factory.graceful_close()
    # The client has not read the GOAWAY yet and opens another stream.
    later = client.h2.get_next_available_stream_id()
    client.results[later] = StreamResult()
    client.h2.send_headers(later, [(":method", "GET"), (":path", "/late"), (":scheme", "http"),
                                   (":authority", "x")], end_stream=True)
    client.server.dataReceived(client.h2.data_to_send())
    client.pump()
    assert client.results[later].reset == ErrorCodes.REFUSED_STREAM
    assert len(dispatch.calls) == 1
    dispatch.answer(0, Response(200, [], b"ok"))
    client.pump()
    assert client.results[first].body == b"ok"


# -- protocol selection -------------------------------------------------------------------------------

class RecordingHTTP1(protocol.Protocol):
    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class RecordingFactory(ServerFactory):
    def build_http1(self):
        return RecordingHTTP1()


def test_selection_waits_on_a_preface_prefix_then_picks_http2():
    factory = RecordingFactory(ListenerContext(HeldDispatch(), Settings(), 1, clock=Clock()))
    connection = factory.buildProtocol(None)
    transport = StringTransport()
    connection.makeConnection(transport)
    connection.dataReceived(PREFACE[:3])
    connection.dataReceived(PREFACE[3:10])
    assert connection.protocol is None
    connection.dataReceived(PREFACE[10:])
    assert type(connection.protocol).__name__ == "HTTP2Protocol"
    assert transport.value()  # the server's SETTINGS


@pytest.mark.parametrize("first", [b"GET / HTTP/1.1\r\n", b"P", b"POST / HTTP/1.1\r\n",
                                   b"PRI * HTTP/1.1\r\n"])
def test_selection_hands_http1_every_byte(first):
    factory = RecordingFactory(ListenerContext(HeldDispatch(), Settings(), 1, clock=Clock()))
    connection = factory.buildProtocol(None)
    connection.makeConnection(StringTransport())
    connection.dataReceived(first)
    if connection.protocol is None:   # "P" alone could still be the preface
        connection.dataReceived(b"UT / HTTP/1.1\r\n")
        first += b"UT / HTTP/1.1\r\n"
    connection.dataReceived(b"rest")
    assert isinstance(connection.protocol, RecordingHTTP1)
    assert connection.protocol.received == first + b"rest"


def test_silent_connection_is_dropped_after_header_timeout():
    clock = Clock()
    factory = RecordingFactory(ListenerContext(HeldDispatch(), Settings(header_timeout=5.0), 1, clock=clock))
    connection = factory.buildProtocol(None)
    transport = StringTransport()
    connection.makeConnection(transport)
    connection.dataReceived(PREFACE[:5])
    clock.advance(5)
    assert transport.disconnecting


# -- real sockets -------------------------------------------------------------------------------------

class H2SocketClient(protocol.Protocol):
    """A small asynchronous h2 client for tests over real sockets."""

    def __init__(self) -> None:
        self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
        self.results: Dict[int, StreamResult] = {}
        self.done: Dict[int, defer.Deferred] = {}
        self.outgoing: Dict[int, memoryview] = {}
        self.goaways = GoawayFilter()
        self.goaway_received: defer.Deferred = defer.Deferred()
        self.lost: defer.Deferred = defer.Deferred()
        self.negotiated = None

    def connectionMade(self) -> None:
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(16 * MB)
        self._flush()

    def request(self, method: str, path: str, body: Optional[bytes] = None) -> defer.Deferred:
        stream_id = self.h2.get_next_available_stream_id()
        self.results[stream_id] = StreamResult()
        self.done[stream_id] = defer.Deferred()
        self.h2.send_headers(stream_id, [(":method", method), (":path", path),
                                         (":scheme", "http"), (":authority", "localhost")],
                             end_stream=body is None)
        if body is not None:
            self.outgoing[stream_id] = memoryview(body)
            self._send_bodies()
        self._flush()
        return self.done[stream_id]

    def _send_bodies(self) -> None:
        for stream_id, data in list(self.outgoing.items()):
            while len(data):
                size = min(self.h2.local_flow_control_window(stream_id),
                           self.h2.max_outbound_frame_size, len(data))
                if size <= 0:
                    break
                self.h2.send_data(stream_id, data[:size].tobytes(), end_stream=size == len(data))
                data = data[size:]
            if len(data):
                self.outgoing[stream_id] = data
            else:
                del self.outgoing[stream_id]

    def dataReceived(self, data: bytes) -> None:
        data = self.goaways.feed(data)
        if self.goaways.frames and not self.goaway_received.called:
            self.goaway_received.callback(self.goaways.frames[0])
        for event in self.h2.receive_data(data):
            if isinstance(event, ResponseReceived):
                self.results[event.stream_id].headers = dict(event.headers)
            elif isinstance(event, DataReceived):
                self.results[event.stream_id].body += event.data
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, StreamEnded):
                self._finish(event.stream_id)
            elif isinstance(event, StreamReset):
                self.results[event.stream_id].reset = event.error_code
                self._finish(event.stream_id)
        self._send_bodies()
        self._flush()

    def _finish(self, stream_id: int) -> None:
        result = self.results[stream_id]
        result.ended = True
        d = self.done.pop(stream_id, None)
        if d is not None:
            d.callback(result)

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.transport.write(data)

    def connectionLost(self, reason=None) -> None:
        for d in list(self.done.values()):
            d.errback(reason)
        self.done.clear()
        self.lost.callback(None)


@pytest.fixture
def tcp_server():
    """Start a ServerFactory on 127.0.0.1:0; yields a function (dispatch, **settings)."""
    ports = []

    def start(dispatch=echo_dispatch, **settings):
        factory = ServerFactory(ListenerContext(dispatch, Settings(access_log=False, **settings), 3, "http",
                                                clock=reactor))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        ports.append((port, factory))
        return port.getHost().port, factory

    yield start
    for port, factory in ports:
        port.stopListening()
        factory.abort_all()


async def connect_h2(port: int) -> H2SocketClient:
    client = H2SocketClient()
    await protocol.ClientCreator(reactor, lambda: client).connectTCP("127.0.0.1", port)
    return client


async def within(d: defer.Deferred, seconds: float = 30.0):
    """Await ``d`` but fail the test rather than hang."""
    return await d.addTimeout(seconds, reactor)


@pytest_twisted.ensureDeferred
async def test_socket_streams_multiplex(tcp_server):
    dispatch = HeldDispatch()
    port, _factory = tcp_server(dispatch)
    client = await connect_h2(port)
    first = client.request("GET", "/first")
    second = client.request("GET", "/second")
    # The fake dispatcher holds the first until the second arrives.
    await within(_poll(lambda: len(dispatch.calls) == 2))
    dispatch.answer(1, Response(200, [], b"second"))
    result = await within(second)
    assert bytes(result.body) == b"second" and not first.called
    dispatch.answer(0, Response(200, [], b"first"))
    assert bytes((await within(first)).body) == b"first"
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_socket_large_bodies(tcp_server):
    port, _factory = tcp_server(echo_dispatch)
    client = await connect_h2(port)
    body = os.urandom(10 * MB)
    result = await within(client.request("POST", "/echo", body), 60)
    assert result.headers["x-body-sha256"] == hashlib.sha256(body).hexdigest()
    assert bytes(result.body) == body
    big = await within(client.request("GET", "/size/%d" % (12 * MB)), 60)
    assert len(big.body) == 12 * MB and bytes(big.body) == _pattern(12 * MB)
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_socket_abort_resets_only_its_stream(tcp_server):
    port, _factory = tcp_server(echo_dispatch)
    client = await connect_h2(port)
    aborted = client.request("GET", "/abort")
    fine = client.request("GET", "/fine")
    assert (await within(aborted)).reset == ErrorCodes.CANCEL
    assert (await within(fine)).body == b"hello"
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_socket_graceful_close(tcp_server):
    dispatch = HeldDispatch()
    port, factory = tcp_server(dispatch)
    client = await connect_h2(port)
    in_flight = client.request("GET", "/slow")
    await within(_poll(lambda: len(dispatch.calls) == 1))
    drained = factory.graceful_close()
    goaway = await within(client.goaway_received)
    assert goaway.error_code == ErrorCodes.NO_ERROR and goaway.last_stream_id == 1
    dispatch.answer(0, Response(200, [], b"done"))
    assert bytes((await within(in_flight)).body) == b"done"
    await within(client.lost)
    await within(drained)
    assert factory.connections == set()


def _poll(predicate, interval: float = 0.01) -> defer.Deferred:
    """Fires once ``predicate()`` is true (callers bound it with `within`)."""
    d: defer.Deferred = defer.Deferred()

    def check():
        if d.called:
            return
        if predicate():
            d.callback(None)
        else:
            reactor.callLater(interval, check)

    check()
    return d


async def curl(*args: str):
    out, err, code = await within(getProcessOutputAndValue(
        shutil.which("curl"), ["-sS", "--max-time", "60"] + list(args), env=os.environ), 90)
    return out, err, code


@pytest_twisted.ensureDeferred
async def test_curl_prior_knowledge(tcp_server, tmp_path):
    port, _factory = tcp_server(echo_dispatch)
    upload = tmp_path / "upload"
    upload.write_bytes(os.urandom(10 * MB))
    download = tmp_path / "download"
    out, err, code = await curl("--http2-prior-knowledge", "-o", str(download),
                                "-w", "%{http_version} %{response_code}",
                                "--data-binary", "@%s" % upload,
                                "http://127.0.0.1:%d/echo?q=1" % port)
    assert code == 0, err
    assert out == b"2 200"
    assert download.read_bytes() == upload.read_bytes()


@pytest_twisted.ensureDeferred
async def test_http1_on_the_same_port(tcp_server):
    port, _factory = tcp_server(echo_dispatch)
    out, err, code = await curl("--http1.1", "-w", " %{http_version}",
                                "http://127.0.0.1:%d/plain" % port)
    assert code == 0, err
    assert out == b"hello 1.1"
    out, err, code = await curl("-i", "--http1.1", "http://127.0.0.1:%d/x" % port)
    assert b"x-remote: false" in out.lower()


# -- hostile clients (in memory; the daemon-level versions are in test_http2_abuse.py) -------------

def test_rapid_reset_cancels_queued_work_and_ends_the_connection():
    from omni_httpd.worker.http.http2 import RESET_BURST

    dispatch = HeldDispatch()
    client = MemoryClient(make_factory(dispatch))
    for _ in range(RESET_BURST + 50):
        if client.transport.disconnecting:
            break
        # Each pair in its own read, so each request reaches the dispatcher first.
        stream_id = client.request("GET", "/attack")
        client.h2.reset_stream(stream_id, ErrorCodes.CANCEL)
        client.pump()
    assert client.goaway is not None
    assert client.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert client.transport.disconnecting
    # Every dispatched request was cancelled: queued work for it would be skipped.
    assert len(dispatch.calls) == RESET_BURST + 1
    assert all(d.called for _request, _remote, d in dispatch.calls)


def test_requests_reset_in_the_same_read_are_never_dispatched():
    dispatch = HeldDispatch()
    client = MemoryClient(make_factory(dispatch))
    for _ in range(50):
        stream_id = client.h2.get_next_available_stream_id()
        client.results[stream_id] = StreamResult()
        client.h2.send_headers(stream_id, [(":method", "GET"), (":path", "/x"), (":scheme", "http"),
                                           (":authority", "a")], end_stream=True)
        client.h2.reset_stream(stream_id, ErrorCodes.CANCEL)
    kept = client.request("GET", "/kept")   # sent in the same read as the 50 pairs
    assert [call[0].path for call in dispatch.calls] == ["/kept"]
    dispatch.answer(0, Response(200, [], b"kept"))
    client.pump()
    assert client.results[kept].body == b"kept" and not client.transport.disconnecting


def test_a_client_cancelling_its_streams_now_and_then_is_not_cut_off():
    clock = Clock()
    dispatch = HeldDispatch()
    client = MemoryClient(make_factory(dispatch, clock=clock))
    for _round in range(3):
        # A browser navigating away: every open stream cancelled at once.
        streams = [client.request("GET", "/page/%d" % index) for index in range(100)]
        for stream_id in streams:
            client.h2.reset_stream(stream_id, ErrorCodes.CANCEL)
        client.pump()
        for index in range(100):   # the next page is answered
            stream_id = client.request("GET", "/next/%d" % index)
            dispatch.calls[-1][2].callback(Response(200, [], b"ok"))
            client.pump()
            assert client.results[stream_id].body == b"ok"
        clock.advance(1)
    assert client.goaway is None and not client.transport.disconnecting


def test_closing_the_connection_cancels_its_dispatched_streams():
    dispatch = HeldDispatch()
    client = MemoryClient(make_factory(dispatch))
    for index in range(10):
        client.request("GET", "/queued/%d" % index)
    assert len(dispatch.calls) == 10
    client.server.connectionLost(None)
    assert all(d.called for _request, _remote, d in dispatch.calls)
    # The late results (of work that had already started) go nowhere, quietly.
    dispatch.answer(0, Response(200, [], b"late"))


def test_ping_flood_ends_the_connection_with_enhance_your_calm():
    from omni_httpd.worker.http.http2 import CONTROL_BURST

    client = MemoryClient(make_factory(echo_dispatch))
    for index in range(CONTROL_BURST + 10):
        client.h2.ping(index.to_bytes(8, "big"))
    client.pump()
    assert client.goaway is not None
    assert client.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert client.transport.disconnecting


def test_reading_stops_while_the_client_does_not_read():
    client = MemoryClient(make_factory(echo_dispatch))
    client.server.protocol.pauseProducing()      # the transport's buffer is full
    assert client.transport.producerState == "paused"
    client.server.protocol.resumeProducing()     # ...and drained again
    assert client.transport.producerState == "producing"
    stream_id = client.request("GET", "/after")
    assert client.results[stream_id].status == 200


def test_body_window_opens_only_within_the_connection_budget():
    dispatch = HeldDispatch()
    client = MemoryClient(make_factory(dispatch, max_body=MB, max_connection_body_buffer=MB + 1,
                                       max_worker_body_buffer=64 * MB))
    client.h2.increment_flow_control_window(64 * MB)
    first = client.request("POST", "/first", headers=[("content-length", str(MB))], body=b"a" * MB)
    second = client.request("POST", "/second", headers=[("content-length", str(MB))],
                            body=b"b" * MB)
    # The first body was admitted and arrived; the second only got its first window and
    # waits, without a WINDOW_UPDATE, until the first one's memory is given back.
    assert [call[0].path for call in dispatch.calls] == ["/first"]
    assert client.h2.local_flow_control_window(second) == 0
    assert len(client.outgoing[second]) == MB - 65535
    dispatch.answer(0, Response(200, [], b"one"))
    client.pump()
    assert [call[0].path for call in dispatch.calls] == ["/first", "/second"]
    assert dispatch.calls[1][0].body == b"b" * MB
    dispatch.answer(1, Response(200, [], b"two"))
    client.pump()
    assert client.results[first].body == b"one" and client.results[second].body == b"two"


def test_many_uploads_on_one_connection_all_complete_intact():
    bodies = [os.urandom(300 * 1024 + index) for index in range(30)]
    client = MemoryClient(make_factory(echo_dispatch, max_body=MB, max_connection_body_buffer=MB,
                                       max_worker_body_buffer=2 * MB))
    client.h2.increment_flow_control_window(64 * MB)
    streams = [client.request("POST", "/u/%d" % index, body=body,
                              headers=[] if index % 2 else [("content-length", str(len(body)))])
               for index, body in enumerate(bodies)]
    client.pump()
    for stream_id, body in zip(streams, bodies):
        result = client.results[stream_id]
        assert result.ended and result.status == 200
        assert bytes(result.body) == body
    protocol = client.server.protocol
    assert protocol._body_reserved == 0 and protocol.body_budget.used == 0


def test_body_budget_options_must_hold_the_largest_body():
    from omni_httpd.master.tap import Options

    def parse(*argv):
        options = Options(environ={})
        options.parseOptions(list(argv))
        return options.settings

    settings = parse()
    assert (settings.max_connection_body_buffer, settings.max_worker_body_buffer) == (32 * MB, 128 * MB)
    settings = parse("--max-body", "64M")
    assert (settings.max_connection_body_buffer, settings.max_worker_body_buffer) == (64 * MB, 128 * MB)
    settings = parse("--max-connection-body-buffer", "20M", "--max-worker-body-buffer", "40M")
    assert (settings.max_connection_body_buffer, settings.max_worker_body_buffer) == (20 * MB, 40 * MB)
    with pytest.raises(SystemExit):
        parse("--max-connection-body-buffer", "1M")     # smaller than --max-body (16M)
    with pytest.raises(SystemExit):
        parse("--max-worker-body-buffer", "20M")        # smaller than the connection's 32M
