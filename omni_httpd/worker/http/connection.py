"""Accepted connections: choose HTTP/1 or HTTP/2, and keep a registry for shutdown.

`ServerFactory` is what a listener's port serves (wrapped in `TLSMemoryBIOFactory` for
``https``). Each connection starts as a `ServerConnection`, which picks the protocol:

- cleartext: by the first bytes. The HTTP/2 prior-knowledge preface means HTTP/2, any
  other byte sequence HTTP/1; a prefix of the preface waits for more bytes.
- TLS: by ALPN (``h2`` -> HTTP/2, ``http/1.1`` -> HTTP/1); a client that offered no ALPN
  is sniffed like cleartext.

The chosen protocol then receives the bytes read so far and, from then on, the
transport's ``dataReceived`` calls go straight to it.
"""
from __future__ import annotations

from typing import List, Optional, Set

from twisted.internet import defer
from twisted.internet.interfaces import IHalfCloseableProtocol, IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from omni_httpd.worker.http.context import ListenerContext
from omni_httpd.worker.http.http2 import HTTP2Protocol

log = Logger()

#: What an HTTP/2 client with prior knowledge sends first (RFC 9113 section 3.4).
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _no_delay(transport) -> None:
    """TCP_NODELAY on an HTTP/2 connection's socket (below TLS, if any).

    HTTP/2 writes once per reactor turn and connection, and several writes are often
    unacknowledged at a time: with Nagle's algorithm a small one (a WINDOW_UPDATE, a
    short answer) waited for the client's delayed ACK, 40 ms (h2c W2: 2.8k -> 3.8k
    req/s). HTTP/1 keeps Nagle: W1 measured a third faster with it (13.1-13.6k
    against 8.9-9.9k req/s, same run).
    """
    for _depth in range(3):
        if transport is None:
            return
        set_no_delay = getattr(transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            try:
                set_no_delay(True)
            except OSError:
                pass      # not a TCP socket after all
            return
        transport = getattr(transport, "transport", None)


@implementer(IHandshakeListener, IHalfCloseableProtocol)
class ServerConnection(Protocol):
    """One accepted connection until (and after) it knows which protocol it speaks.

    ``protocol`` is the chosen `HTTP1Protocol` / `HTTP2Protocol`, or None while
    undecided. ``transport`` is the real transport (TLS included).
    """

    def __init__(self, factory: "ServerFactory") -> None:
        self.factory = factory
        self.protocol: Optional[Protocol] = None
        self._buffer = b""
        self._tls = factory.scheme == "https"
        self._timer = None
        self._lost = False

    def connectionMade(self) -> None:
        self.factory.connections.add(self)
        if self.factory.closing:
            self.transport.loseConnection()
            return
        # A client that never sends its first bytes (or never finishes the TLS
        # handshake) must not hold the connection forever.
        self._timer = self.factory.clock.callLater(
            self.factory.settings.header_timeout, self._selection_timed_out)

    def handshakeCompleted(self) -> None:
        """TLS only: ALPN is known now, so choose before any application data."""
        if self.protocol is None and not self._lost:
            negotiated = getattr(self.transport, "negotiatedProtocol", None)
            if negotiated == b"h2":
                self._become(self.factory.build_http2(), b"")
            elif negotiated is not None:
                self._become(self.factory.build_http1(), b"")

    def dataReceived(self, data: bytes) -> None:
        # Only reached while undecided: _become rebinds dataReceived.
        if self._tls and self.protocol is None:
            self.handshakeCompleted()
            if self.protocol is not None:
                self.protocol.dataReceived(data)
                return
        data = self._buffer + data
        if data[: len(PREFACE)] == PREFACE[: len(data)]:
            if len(data) < len(PREFACE):
                self._buffer = data
                return
            self._become(self.factory.build_http2(), data)
        else:
            self._become(self.factory.build_http1(), data)

    def _become(self, protocol: Protocol, data: bytes) -> None:
        self._cancel_timer()
        self._buffer = b""
        self.protocol = protocol
        # Further reads skip this object entirely.
        self.dataReceived = protocol.dataReceived
        if isinstance(protocol, HTTP2Protocol):
            _no_delay(self.transport)
        protocol.makeConnection(self.transport)
        if data and not self._lost:
            protocol.dataReceived(data)
        if self.factory.closing and not self._lost:
            self.graceful_close()

    def connectionLost(self, reason=None) -> None:
        self._lost = True
        self._cancel_timer()
        self.factory._connection_lost(self)
        if self.protocol is not None:
            self.protocol.connectionLost(reason)

    def readConnectionLost(self) -> None:
        """The client half-closed (plain TCP only): the chosen protocol answers what it
        has and closes; undecided, there is nothing to answer."""
        handler = getattr(self.protocol, "readConnectionLost", None)
        if handler is not None:
            handler()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        handler = getattr(self.protocol, "writeConnectionLost", None)
        if handler is not None:
            handler()

    def graceful_close(self) -> None:
        """HTTP/2: GOAWAY and finish in-flight streams; HTTP/1: answer the requests
        already received, then close; undecided: close now."""
        if self._lost:
            return
        protocol = self.protocol
        if protocol is None:
            self.transport.loseConnection()
        elif isinstance(protocol, HTTP2Protocol):
            protocol.graceful_close()
        else:
            protocol.stop_accepting_keepalive()

    def _selection_timed_out(self) -> None:
        self._timer = None
        if self.protocol is None and not self._lost:
            abort = getattr(self.transport, "abortConnection", None)
            (abort or self.transport.loseConnection)()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None


class ServerFactory(Factory):
    """Serves one listener (one per worker and listener).

    ``dispatch(request, allow_remote)`` returns a Deferred firing with the `Response`;
    HTTP/1 always passes ``allow_remote=False``, HTTP/2 streams ``True``.
    ``connections`` holds every live connection; `graceful_close` winds them down.
    """

    def __init__(self, context: ListenerContext) -> None:
        self.context = context
        self.dispatch = context.dispatch
        self.settings = context.settings
        self.listener_id = context.listener_id
        self.scheme = context.scheme
        self.clock = context.clock
        self.worker_label = context.worker_label
        self.connections: Set[ServerConnection] = set()
        self.closing = False
        self._drained: List[defer.Deferred] = []

    def buildProtocol(self, addr) -> ServerConnection:
        connection = ServerConnection(self)
        connection.factory = self
        return connection

    def build_http1(self) -> Protocol:
        from omni_httpd.worker.http.http1 import HTTP1Protocol

        return HTTP1Protocol(self.context)

    def build_http2(self) -> HTTP2Protocol:
        return HTTP2Protocol(self.context)

    def graceful_close(self) -> "defer.Deferred[None]":
        """Wind every connection down (GOAWAY / close after the current response) and
        refuse new ones. The Deferred fires once no connection is left; bound the wait
        yourself and then `abort_all`."""
        self.closing = True
        for connection in list(self.connections):
            connection.graceful_close()
        return self.when_drained()

    def when_drained(self) -> "defer.Deferred[None]":
        """A Deferred that fires when ``connections`` is empty."""
        if not self.connections:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._drained.append(d)
        return d

    def abort_all(self) -> None:
        """Drop every remaining connection now."""
        for connection in list(self.connections):
            transport = connection.transport
            abort = getattr(transport, "abortConnection", None)
            (abort or transport.loseConnection)()

    def _connection_lost(self, connection: ServerConnection) -> None:
        self.connections.discard(connection)
        if not self.connections and self._drained:
            waiting, self._drained = self._drained, []
            for d in waiting:
                d.callback(None)
