"""Re-dispatch of HTTP/2 streams to an idle sibling worker over a UNIX socket.

Every worker serves `SiblingServer` on ``<rundir>/worker-<slot>.sock``; a busy worker
sends a complete `Request` there with `SiblingClient.run` and gets the `Response` back.
One connection carries any number of requests at once; answers come back in whatever
order the sibling finishes them, matched by request id.

Wire format: frames of a 13-byte header, JSON metadata, raw body bytes::

    !B kind   !I request id   !I metadata length   !I body length
    <metadata: UTF-8 JSON object> <body>

kinds: 1 request, 2 response, 3 error (metadata ``{"error": text}``), 4 cancel (client
to server, empty: the client went away; a request still queued there is not run, a
running one finishes and its answer is dropped). Lengths are
checked against limits before anything is buffered beyond the header; a frame over the
limit (or unparsable) closes the connection, failing whatever was in flight.
"""
from __future__ import annotations

import itertools
import json
import struct
from typing import Callable, Dict, List, Optional, Tuple

from twisted.internet import defer
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from omni_httpd.common.request import Request
from omni_httpd.common.response import Response

log = Logger()

HEADER = struct.Struct("!BIII")
REQUEST, RESPONSE, ERROR, CANCEL = 1, 2, 3, 4
#: Metadata (method, path, headers, ...) is small; this bounds a corrupt length.
MAX_META = 4 * 1024 * 1024
#: PostgreSQL's own bytea limit; pass ``max_body=settings.max_body`` to the server.
MAX_BODY = 1024 * 1024 * 1024


class SiblingError(Exception):
    """A request sent to a sibling worker got no response (the dispatcher answers 502)."""


# -- encoding ------------------------------------------------------------------------------

def encode_request(request_id: int, request: Request) -> List[bytes]:
    meta = {
        "method": request.method, "path": request.path, "query_string": request.query_string,
        "headers": request.headers, "listener_id": request.listener_id,
        "http_version": request.http_version, "scheme": request.scheme, "peer": request.peer,
    }
    return _frame(REQUEST, request_id, meta, request.body)


def decode_request(meta: dict, body: bytes) -> Request:
    return Request(
        method=meta["method"], path=meta["path"], query_string=meta["query_string"],
        headers=[(name, value) for name, value in meta["headers"]], body=body,
        listener_id=meta["listener_id"], http_version=meta["http_version"],
        scheme=meta["scheme"], peer=meta["peer"],
    )


def encode_response(request_id: int, response: Response) -> List[bytes]:
    meta = {"status": response.status, "headers": response.headers, "abort": response.abort,
            "has_body": response.body is not None}
    return _frame(RESPONSE, request_id, meta, response.body or b"")


def decode_response(meta: dict, body: bytes) -> Response:
    return Response(status=meta["status"],
                    headers=[(name, value) for name, value in meta["headers"]],
                    body=body if meta["has_body"] else None, abort=meta["abort"])


def _frame(kind: int, request_id: int, meta: dict, body: bytes) -> List[bytes]:
    meta_bytes = json.dumps(meta, separators=(",", ":")).encode("utf-8")
    return [HEADER.pack(kind, request_id, len(meta_bytes), len(body)), meta_bytes, body]


class _FrameProtocol(Protocol):
    """Splits the byte stream into frames; subclasses handle them."""

    max_body = MAX_BODY

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._header: Optional[Tuple[int, int, int, int]] = None

    def dataReceived(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        while True:
            if self._header is None:
                if len(buffer) < HEADER.size:
                    return
                kind, request_id, meta_len, body_len = HEADER.unpack_from(buffer)
                if kind not in (REQUEST, RESPONSE, ERROR) or meta_len > MAX_META \
                        or body_len > self.max_body:
                    self._bad_frame("frame kind %d, metadata %d bytes, body %d bytes exceeds "
                                    "the limits" % (kind, meta_len, body_len))
                    return
                self._header = (kind, request_id, meta_len, body_len)
            kind, request_id, meta_len, body_len = self._header
            end = HEADER.size + meta_len + body_len
            if len(buffer) < end:
                return
            meta_end = HEADER.size + meta_len
            meta_bytes = bytes(buffer[HEADER.size:meta_end])
            body = bytes(buffer[meta_end:end])
            del buffer[:end]
            self._header = None
            try:
                meta = json.loads(meta_bytes)
            except ValueError:
                self._bad_frame("unparsable frame metadata")
                return
            try:
                self.frame_received(kind, request_id, meta, body)
            except (KeyError, TypeError, ValueError) as exc:
                self._bad_frame("malformed %d frame: %r" % (kind, exc))
                return
            if self.transport is None or getattr(self.transport, "disconnecting", False):
                return

    def frame_received(self, kind: int, request_id: int, meta: dict, body: bytes) -> None:
        raise NotImplementedError

    def send(self, parts: List[bytes]) -> None:
        self.transport.writeSequence(parts)

    def _bad_frame(self, why: str) -> None:
        log.error("sibling channel: {why}; closing it", why=why)
        self._buffer = bytearray()
        self.transport.abortConnection()


# -- the serving side ----------------------------------------------------------------------

class _ServerProtocol(_FrameProtocol):
    def __init__(self, server: "SiblingServer") -> None:
        super().__init__()
        self.server = server
        self.max_body = server.max_body
        self.connected_ = True
        self._running: Dict[int, defer.Deferred] = {}   # request id -> executor Deferred

    def connectionMade(self) -> None:
        self.server.connections.add(self)

    def connectionLost(self, reason=None) -> None:
        self.connected_ = False
        self.server.connections.discard(self)
        # The sending worker is gone: nobody waits for what is still queued here.
        running, self._running = self._running, {}
        for d in running.values():
            d.cancel()

    def frame_received(self, kind: int, request_id: int, meta: dict, body: bytes) -> None:
        if kind == CANCEL:
            d = self._running.pop(request_id, None)
            if d is not None:
                d.cancel()
            return
        if kind != REQUEST:
            raise ValueError("a sibling server only accepts requests and cancels")
        request = decode_request(meta, body)
        d = defer.maybeDeferred(self.server.execute, request)
        if not d.called:
            self._running[request_id] = d
        d.addCallbacks(self._answer, self._failed, callbackArgs=(request_id,),
                       errbackArgs=(request_id,))

    def _answer(self, response: Response, request_id: int) -> None:
        self._running.pop(request_id, None)
        if self.connected_:
            self.send(encode_response(request_id, response))

    def _failed(self, failure: Failure, request_id: int) -> None:
        self._running.pop(request_id, None)
        if failure.check(defer.CancelledError):
            return None     # cancelled by the client: it does not wait for an answer
        log.failure("running a request for a sibling worker failed", failure=failure)
        if self.connected_:
            self.send(_frame(ERROR, request_id, {"error": failure.getErrorMessage()}, b""))


class SiblingServer(Factory):
    """Serve requests from sibling workers: ``reactor.listenUNIX(path, SiblingServer(...))``.

    ``execute(request)`` returns a Deferred firing with the `Response` (the worker's
    local executor; forwarded requests are never forwarded again). ``max_body`` bounds
    incoming request bodies (pass ``settings.max_body``).
    """

    def __init__(self, execute: Callable[[Request], "defer.Deferred[Response]"],
                 max_body: int = MAX_BODY) -> None:
        self.execute = execute
        self.max_body = max_body
        self.connections: set = set()

    def buildProtocol(self, addr) -> _ServerProtocol:
        return _ServerProtocol(self)


# -- the sending side ----------------------------------------------------------------------

class _ClientProtocol(_FrameProtocol):
    def __init__(self, client: "SiblingClient") -> None:
        super().__init__()
        self.client = client
        self.max_body = client.max_body

    def connectionMade(self) -> None:
        self.client._connected(self)

    def connectionLost(self, reason=None) -> None:
        self.client._lost(self, reason)

    def frame_received(self, kind: int, request_id: int, meta: dict, body: bytes) -> None:
        if kind == RESPONSE:
            self.client._resolve(request_id, decode_response(meta, body))
        elif kind == ERROR:
            self.client._reject(request_id, SiblingError(
                "sibling worker at %s failed the request: %s"
                % (self.client.path, meta.get("error", "?"))))
        else:
            raise ValueError("a sibling client only accepts responses")


class _ConnectFactory(ClientFactory):
    def __init__(self, client: "SiblingClient") -> None:
        self.client = client

    def buildProtocol(self, addr) -> _ClientProtocol:
        return _ClientProtocol(self.client)

    def clientConnectionFailed(self, connector, reason: Failure) -> None:
        self.client._connect_failed(reason)


class SiblingClient:
    """Send requests to the sibling worker listening on ``path``.

    One persistent connection, opened on first use and again after it is lost; any
    number of requests in flight on it. If the sibling goes away, every pending
    Deferred fails with `SiblingError`.
    """

    def __init__(self, path: str, reactor=None, max_body: int = MAX_BODY,
                 connect_timeout: float = 5.0) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.path = path
        self.reactor = reactor
        self.max_body = max_body
        self.connect_timeout = connect_timeout
        self._ids = itertools.count(1)
        self._pending: Dict[int, defer.Deferred] = {}
        self._waiting: List[List[bytes]] = []   # frames queued while connecting
        self._protocol: Optional[_ClientProtocol] = None
        self._connecting = False
        self._closed = False

    def run(self, request: Request) -> "defer.Deferred[Response]":
        """Run ``request`` on the sibling; fires with its `Response`, or fails with
        `SiblingError`."""
        if self._closed:
            return defer.fail(SiblingError("sibling client for %s is closed" % self.path))
        request_id = next(self._ids) & 0xFFFFFFFF
        frame = encode_request(request_id, request)
        d: defer.Deferred = defer.Deferred(lambda _: self._cancel(request_id, frame))
        self._pending[request_id] = d
        if self._protocol is not None:
            self._protocol.send(frame)
        else:
            self._waiting.append(frame)
            if not self._connecting:
                self._connecting = True
                self.reactor.connectUNIX(self.path, _ConnectFactory(self),
                                         timeout=self.connect_timeout)
        return d

    def _cancel(self, request_id: int, frame: List[bytes]) -> None:
        """The caller cancelled: tell the sibling (or never send it), forget the answer."""
        self._pending.pop(request_id, None)
        if self._protocol is not None:
            self._protocol.send(_frame(CANCEL, request_id, {}, b""))
        elif frame in self._waiting:
            self._waiting.remove(frame)

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def close(self) -> None:
        """Drop the connection; pending requests fail."""
        self._closed = True
        if self._protocol is not None:
            self._protocol.transport.loseConnection()
        else:
            self._fail_all(SiblingError("sibling client for %s closed" % self.path))

    # -- called by the connection --------------------------------------------------------

    def _connected(self, protocol: _ClientProtocol) -> None:
        self._connecting = False
        self._protocol = protocol
        waiting, self._waiting = self._waiting, []
        for frame in waiting:
            protocol.send(frame)

    def _connect_failed(self, reason: Failure) -> None:
        self._connecting = False
        self._waiting = []
        self._fail_all(SiblingError("cannot connect to sibling worker at %s: %s"
                                    % (self.path, reason.getErrorMessage())))

    def _lost(self, protocol: _ClientProtocol, reason) -> None:
        if self._protocol is protocol:
            self._protocol = None
        count = len(self._pending)
        if count:
            self._fail_all(SiblingError(
                "sibling worker at %s went away with %d request(s) in flight"
                % (self.path, count)))

    def _resolve(self, request_id: int, response: Response) -> None:
        d = self._pending.pop(request_id, None)
        if d is not None:
            d.callback(response)

    def _reject(self, request_id: int, error: Exception) -> None:
        d = self._pending.pop(request_id, None)
        if d is not None:
            d.errback(error)

    def _fail_all(self, error: Exception) -> None:
        pending, self._pending = self._pending, {}
        for d in pending.values():
            d.errback(error)
