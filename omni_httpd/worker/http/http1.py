"""HTTP/1.0 and HTTP/1.1 server side of a worker connection: bytes -> Request -> bytes.

One `HTTP1Protocol` per connection. The httptools (llhttp) parser calls back into the
protocol; each complete message becomes one `Request` handed to ``dispatch``; responses
go out strictly in request order, each (with any other responses ready at that moment)
in a single transport write: a thin Protocol over the C parser and one write per
response is most of the HTTP-side speed (docs/performance.md).

Decisions a caller or operator may want to know:

- Methods outside `request.METHODS` (which llhttp may still parse, e.g. PROPFIND) are
  answered ``501 Not Implemented`` (RFC 9110 15.6.2: the server does not support the
  method at all, for any resource). The connection stays usable. A request line that
  llhttp cannot parse at all (including an unknown method token) is a 400.
- Only HTTP/1.0 and HTTP/1.1 are served; other versions (0.9, 2.0 in a request line)
  get 505 and the connection is closed. Responses always say ``HTTP/1.1``.
- ``Upgrade`` requests are served as ordinary requests (the upgrade is ignored; HTTP/2
  over cleartext is prior knowledge only).
- Absolute-form targets (``GET http://host/p``) are reduced to their path.
- Never reach a handler (RFC 9112): ``CONNECT`` (any target) is ``501`` and the
  connection is closed (no tunnels; what follows the head would be tunnel bytes);
  ``OPTIONS *`` is answered here, ``200`` with ``allow`` listing the methods handlers
  get, connection kept; ``*`` with any other method is ``400``. An HTTP/1.1 request
  without ``Host``, any request with more than one ``Host`` or a ``Host`` that is not
  host[:port], and ``Transfer-Encoding`` in an HTTP/1.0 request are ``400`` (and close).
  llhttp itself refuses Content-Length together with Transfer-Encoding, duplicate
  Content-Length, and a Transfer-Encoding whose last coding is not chunked (``400``).
- A response without a body (``Response.body`` None) still says ``content-length: 0``
  unless its status is 1xx, 204 or 304: every message is delimited.
- A handler's own ``Date`` and ``Server`` headers replace the ones the server adds.
- Error answers generated here close the connection; when the peer may still be
  sending (413 before the body was read, ...) the write side is shut first and unread
  input is discarded for up to `LINGER_SECONDS`, so the client reads the answer instead
  of a connection reset.
- Pipelining: requests are parsed ahead and dispatched in arrival order; at most
  `MAX_PIPELINE` may wait for their responses before reading from the connection
  pauses, and reading also pauses while the bodies of waiting requests plus the one
  being read exceed ``Settings.max_pipeline_bytes`` (``--max-pipeline-bytes``; a request
  alone on its connection is bounded by ``--max-body`` instead). Input is parsed
  `FEED_SLICE` bytes at a time so that a single read cannot overshoot these limits by
  more than a slice; the rest of the read waits unparsed. Reading also pauses while the
  transport's write buffer is full (the protocol is the transport's streaming
  producer), so a client that sends but never reads cannot make the worker buffer
  without bound.
- A response whose body is a file (``Response.file``, static files) is streamed: the
  head goes out, then `FILE_CHUNK` bytes at a time while the transport accepts them
  (the protocol is the transport's producer: a full write buffer pauses the stream, its
  draining resumes it). Later pipelined answers wait for it; a file that cannot be read
  to its announced length aborts the connection (the message cannot be completed).
- A client that goes away (connection lost or aborted) has its waiting requests
  cancelled: those the DB thread has not started are never run; the one running
  finishes (and commits, a handler's transaction is not tied to the client) and its
  answer is dropped. A client that only half-closes is still answered. A client that
  closes right after sending looks like a half-close until the first answer is refused,
  so the request running then and the next one or two may still run.

Graceful shutdown: the listener's factory (connection.py) keeps every connection;
`stop_accepting_keepalive()` lets the connection finish what it has received and
close after the last response; `notify_closed()` tells when it is gone.
"""
from __future__ import annotations

import re
from collections import deque
from typing import Deque, List, Optional, Tuple

import httptools
from twisted.internet import defer, tcp
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from omni_httpd.common.client_address import forwarding_trust, with_connecting_ip
from omni_httpd.common.exchange import finish, format_peer, log_access, send_now
from omni_httpd.common.request import METHODS, Request, header_text, split_target
from omni_httpd.common.response import REASONS, Response, error_response, internal_error
from omni_httpd.worker.http.context import ListenerContext

log = Logger()

#: Requests parsed but not yet answered before reading from the connection pauses.
MAX_PIPELINE = 32
#: ... and reading resumes once the backlog is down to this.
RESUME_PIPELINE = 16
# (The bytes those requests hold are bounded too: Settings.max_pipeline_bytes.)
#: Input is parsed at most this much at a time, so that once the pipeline is full the
#: rest of a read waits unparsed (`_held`) instead of becoming hundreds more requests
#: (one 64 KiB read holds ~2400 minimal GETs); a slice holds at most ~75 of them.
FEED_SLICE = 2048
#: Longest request target accepted (414 above).
MAX_URL = 8 * 1024
#: How long unread input is discarded after an error answer before closing for good.
LINGER_SECONDS = 2.0
#: Bytes of a streamed file body (Response.file) read and written at a time.
FILE_CHUNK = 64 * 1024

# Parser states of the message being received.
_IDLE, _HEAD, _BODY = 0, 1, 2


# Where the connection is in its life (HTTP1Protocol._conn): one value that only ever
# moves forward (`_advance`), so every "may I still ..." is one comparison. Plain ints:
# an enum's comparisons cost a microsecond per request here.
_OPEN = 0        # new messages may begin
_DRAINING = 1    # no new message may begin; the current one is still read
_IGNORING = 2    # all further input is ignored; queued answers still go out
_CLOSING = 3     # closing after the queued answers (or at once)
_LINGERING = 4   # an error answer is out: unread input is discarded, then close
_LOST = 5        # the transport is gone


# Why reading is paused (bit flags).
_PAUSE_PIPELINE, _PAUSE_BACKPRESSURE, _PAUSE_BYTES = 1, 2, 4

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_STATUS_LINES = {code: "HTTP/1.1 %d %s\r\n" % (code, reason) for code, reason in REASONS.items()}
_ABSOLUTE_FORM = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^/?#]*").match
# RFC 9112 3.2: Host is uri-host [":" port]; anything else (spaces, "/", "@", ...) is a 400.
# Deliberately loose about the exact grammar: it only keeps what is not a host away from
# handlers that route on it.
_HOST = re.compile(rb"[A-Za-z0-9\-._~%!$&'()*+,;=:\[\]]*").fullmatch
# OPTIONS * (RFC 9110 9.3.7) asks about the server as a whole; the methods a handler can get.
_ALLOW = ", ".join(sorted(m.decode() for m in METHODS if m != b"CONNECT"))


class _Stop(Exception):
    """Raised from a parser callback to stop parsing on purpose (already answered)."""


class _Pending:
    """One request (or server-generated error) waiting for its turn to be answered."""

    __slots__ = ("request", "method", "target", "version", "keep_alive", "head", "started",
                 "response", "linger", "deferred", "size")

    def __init__(self, request: Request, method: str, target: str, version: str,
                 keep_alive: bool, started: float) -> None:
        self.request = request
        self.method = method
        self.target = target            # path?query, for the access log
        self.version = version
        self.keep_alive = keep_alive
        self.head = method == "HEAD"
        self.started = started
        self.response: Optional[Response] = None
        self.linger = False
        # What dispatch returned, to cancel it when the client goes away first.
        self.deferred: Optional[defer.Deferred] = None
        self.size = len(request.body)       # counted in HTTP1Protocol._queued_bytes


def _plain_tcp(transport) -> bool:
    return isinstance(transport, tcp.Connection) and not getattr(transport, "TLS", True)


def _split(url: str) -> Tuple[str, Optional[str]]:
    """(path, query) of a request target in any of the four forms of RFC 9112 3.2."""
    if url[:1] != "/":
        match = _ABSOLUTE_FORM(url)
        if match is None:
            return url, None        # authority-form (CONNECT host:port) or asterisk-form
        url = url[match.end():]
        if url[:1] != "/":
            url = "/" + url
    return split_target(url)


@implementer(IPushProducer, IHalfCloseableProtocol)
class HTTP1Protocol(Protocol):
    """One HTTP/1.x connection.

    ``dispatch(request) -> Deferred[Response]`` runs a request; an errback (a bug) is
    answered 500 and logged. May be connected to a transport that already delivered
    bytes to someone else: ``makeConnection(transport)`` then ``dataReceived(bytes)``.
    A wrapping protocol (the HTTP/2 detector) should forward ``readConnectionLost``
    too; without it a client that half-closes after its request loses its answer.
    """

    def __init__(self, context: ListenerContext) -> None:
        settings = context.settings
        self._context = context
        self._forwarding_trust = forwarding_trust(settings)
        self._listener_id = context.listener_id
        self._scheme = context.scheme
        self._clock = context.clock
        self._worker_label = context.worker_label
        self._max_body = settings.max_body
        self._max_head = settings.max_header_size
        self._max_buffered = settings.max_pipeline_bytes
        self._access_log = settings.access_log
        self._record = context.record_h1
        self._header_timeout = settings.header_timeout or 0
        self._body_timeout = settings.body_timeout or 0
        self._idle_timeout = settings.idle_timeout or 0
        enabled = [t for t in (self._header_timeout, self._body_timeout, self._idle_timeout) if t > 0]
        # The one timer ticks at least this often, so a state change never needs to move
        # it sooner (see _tick); no per-request callLater/cancel.
        self._tick_every = min(enabled) if enabled else 0

        self._parser = httptools.HttpRequestParser(self)
        self._peer = ""
        self._queue: Deque[_Pending] = deque()
        self._queued_bytes = 0          # request bodies held by the entries in _queue
        self._state = _IDLE
        self._conn = _OPEN         # the connection's state: only ever moves forward
        self._paused = 0                # why reading is paused (_PAUSE_* bits)
        self._stalled_since = 0.0       # when the client stopped reading our answers
        self._transport_paused = False  # did we pause the transport (pauseProducing)?
        self._held = b""                # received, not parsed yet: waits for _resume_reading
        self._eof_held = False          # the peer half-closed after the held input
        self._timer = None
        self._linger_call = None
        self._closed_waiters: List[defer.Deferred] = []
        self._idle_since = 0.0
        self._reset_message()
        self._started = 0.0
        self._head_since = 0.0
        self._progress = 0.0
        self._synthetic = False
        self._stash = None
        # A file body being streamed: (entry, file, close after it, linger); answers
        # behind it wait.
        self._streaming: Optional[tuple] = None

    def _reset_message(self) -> None:
        self._url = b""
        self._headers: List[Tuple[str, str]] = []
        self._body: List[bytes] = []
        self._body_len = 0
        self._head_size = 0
        self._head_wire = 0
        self._content_length = -1
        self._chunked = False
        self._expect_continue = False
        self._continue_pending = False
        self._wants_body = False
        self._upgrade_framing: Optional[bytes] = None
        self._method = b""
        self._version = "1.1"
        self._keep_alive = True
        self._hosts = 0
        self._host = b""
        self._answer: Optional[Response] = None     # answered here, never dispatched

    def _advance(self, state: int) -> None:
        if state > self._conn:
            self._conn = state

    @property
    def accepting(self) -> bool:
        """May a new request still begin on this connection?"""
        return self._conn == _OPEN

    # -- connection life cycle -----------------------------------------------------------------
    def connectionMade(self) -> None:
        transport = self.transport
        try:
            self._peer = format_peer(transport.getPeer())
        except Exception:
            self._peer = ""
        try:
            transport.registerProducer(self, True)
        except Exception:   # a producer is already registered by a wrapper: no backpressure then
            pass
        self._idle_since = self._clock.seconds()
        self._arm_timer(self._tick_every)

    def connectionLost(self, reason: Failure = None) -> None:
        self._conn = _LOST
        self._held = b""
        self._stop_streaming()
        self._drop_queue()
        for call in (self._timer, self._linger_call):
            if call is not None and call.active():
                call.cancel()
        self._timer = self._linger_call = None
        waiters, self._closed_waiters = self._closed_waiters, []
        for d in waiters:
            d.callback(None)

    def _drop_queue(self) -> None:
        """Nobody will read the answers: cancel what was dispatched and not yet answered.

        A request still queued on the DB thread is then skipped (DBThread.submit); the one
        running now finishes (and commits) and its answer is discarded. Front to back, so
        the next job the DB thread would take is the first one cancelled.
        """
        queue = self._queue
        while queue:
            entry = queue.popleft()
            deferred = entry.deferred
            if entry.response is None and deferred is not None:
                entry.deferred = None
                deferred.cancel()
        self._queued_bytes = 0

    def readConnectionLost(self) -> None:
        """The peer will send nothing more (it half-closed): answer what came, then close."""
        if self._held and self._conn < _CLOSING:
            self._eof_held = True   # requests it sent are still held: after them (_resume_reading)
            return
        self._advance(_DRAINING)
        if self._conn >= _CLOSING:
            self.transport.loseConnection()
            return
        if self._state != _IDLE:
            # An incomplete request can never complete now.
            self._state = _IDLE
            self._advance(_IGNORING)
        if not self._queue and self._streaming is None:
            self._close()

    def writeConnectionLost(self) -> None:
        """Our write side was shut (lingering close); keep discarding input."""

    def stop_accepting_keepalive(self) -> None:
        """Graceful shutdown: answer the requests already (being) received, then close.

        Idle connections close at once; a request whose first bytes have arrived is still
        read and answered (with ``connection: close``), bounded by the usual timeouts.
        """
        if self._conn >= _CLOSING:
            return
        self._advance(_DRAINING)
        if not self._queue and self._state == _IDLE and self._streaming is None:
            self._close()

    def notify_closed(self) -> defer.Deferred:
        """A Deferred that fires (with None) once the connection is lost."""
        if self._conn == _LOST:
            return defer.succeed(None)
        d = defer.Deferred()
        self._closed_waiters.append(d)
        return d

    # -- input -----------------------------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        if self._conn >= _IGNORING:
            return
        if self._held:
            self._held += data      # earlier input still waits to be parsed: keep the order
            return
        if len(data) > FEED_SLICE:
            self._feed_slices(data)
            return
        if self._state == _HEAD:
            # Bytes of a head that began in an earlier read: bounds what llhttp buffers for
            # a header line that never ends (completed lines are counted in on_header).
            self._head_wire += len(data)
        try:
            while True:
                try:
                    self._parser.feed_data(data)
                    break
                except httptools.HttpParserUpgrade as exc:
                    # llhttp stops after an Upgrade (or CONNECT) request's head; we serve
                    # it as an ordinary request and go on parsing HTTP/1.
                    data = data[exc.args[0]:]
                    if self._conn >= _IGNORING:
                        return
                    if self._upgrade_framing is not None:
                        self._read_upgrade_body()
                    if not data:
                        break
        except httptools.HttpParserError as exc:
            if self._conn < _IGNORING:
                self._parse_error(exc)
            return
        except Exception:
            log.failure("HTTP/1 connection from {peer}: unexpected error", peer=self._peer)
            self._abort()
            return
        if self._state == _HEAD and self._head_wire > self._max_head:
            self._fail(431, "Request header fields too large")

    def _feed_slices(self, data: bytes) -> None:
        """Parse ``data`` a slice at a time; what is left when reading pauses is held.

        Each slice goes through dataReceived (``_held`` is empty while this runs), which
        parses a read of at most FEED_SLICE bytes in one call, the common case.
        """
        end = len(data)
        pos = 0
        while pos < end:
            if self._paused:
                self._held = data[pos:]
                return
            HTTP1Protocol.dataReceived(self, data[pos:pos + FEED_SLICE])
            if self._conn >= _IGNORING:
                return
            pos += FEED_SLICE

    def _parse_error(self, exc: Exception) -> None:
        if isinstance(exc, httptools.HttpParserCallbackError):
            # A bug in a callback: the request it was building may never be answered, so
            # an error answer queued behind it could wait forever. Drop the connection.
            cause = exc.__context__ or exc
            log.failure("HTTP/1 connection from {peer}: error while parsing",
                        Failure(cause, type(cause), cause.__traceback__), peer=self._peer)
            self._abort()
            return
        reason = str(exc.args[0]) if exc.args else ""
        self._fail(400, "Bad request: %s" % reason if reason else "Bad request")

    def _read_upgrade_body(self) -> None:
        """Read the body of an Upgrade request llhttp skipped, with a fresh parser fed a
        stand-in head carrying the same framing (Content-Length or chunked)."""
        framing, self._upgrade_framing = self._upgrade_framing, None
        self._parser = httptools.HttpRequestParser(self)
        self._synthetic = True
        try:
            self._parser.feed_data(b"PUT / HTTP/1.1\r\n" + framing + b"\r\n")
        finally:
            self._synthetic = False

    # httptools callbacks. Raising _Stop (after answering) stops the parser for good.
    def on_message_begin(self) -> None:
        if self._synthetic:
            self._stash = (self._url, self._headers, self._head_size)
            self._url, self._headers = b"", []
            return
        if self._conn != _OPEN:
            self._advance(_IGNORING)
            raise _Stop()
        self._reset_message()
        self._state = _HEAD
        self._started = self._head_since = self._clock.seconds()

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_size += len(url)
        if len(self._url) > MAX_URL:
            self._fail(414, "URI too long")
            raise _Stop()

    def on_header(self, name: bytes, value: bytes) -> None:
        size = self._head_size = self._head_size + len(name) + len(value) + 4
        if size > self._max_head:
            self._fail(431, "Request header fields too large")
            raise _Stop()
        lname = name.lower()
        # llhttp drops leading whitespace only; trailing whitespace is not part of the value.
        value = value.rstrip(b" \t")
        if lname == b"host":
            self._hosts += 1
            self._host = value
        elif lname == b"content-length":
            self._content_length = int(value)      # llhttp accepted it: digits only
        elif lname == b"transfer-encoding":
            self._chunked = True                   # llhttp insists chunked comes last
        elif lname == b"expect":
            self._expect_continue = value.strip().lower() == b"100-continue"
        self._headers.append((lname.decode("latin-1"), header_text(value)))

    def on_headers_complete(self) -> None:
        if self._synthetic:
            self._url, self._headers, self._head_size = self._stash
            self._stash = None
            return
        parser = self._parser
        self._method = parser.get_method()
        version = self._version = parser.get_http_version()
        self._keep_alive = parser.should_keep_alive()
        # request line: method SP target SP HTTP/x.y CRLF, then the terminating CRLF
        if self._head_size + len(self._method) + 13 > self._max_head:
            self._fail(431, "Request header fields too large")
            raise _Stop()
        if version != "1.1" and version != "1.0":
            self._fail(505, "HTTP version not supported")
            raise _Stop()
        # RFC 9112 3.2: exactly one valid Host in HTTP/1.1, at most one in HTTP/1.0.
        if self._hosts != 1:
            if self._hosts or version == "1.1":
                self._fail(400, "Bad request: more than one Host header" if self._hosts
                           else "Bad request: missing Host header")
                raise _Stop()
        elif not _HOST(self._host):
            self._fail(400, "Bad request: invalid Host header")
            raise _Stop()
        if self._chunked and version == "1.0":
            # RFC 9112 6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing
            # (an HTTP/1.0 intermediary may not have understood it either).
            self._fail(400, "Bad request: Transfer-Encoding in an HTTP/1.0 request")
            raise _Stop()
        method = self._method
        if method == b"CONNECT":
            # No tunnels here; whatever follows the head would be tunnel bytes, so close.
            self._fail(501, "CONNECT is not supported")
            raise _Stop()
        if self._url == b"*":
            # asterisk-form: the server itself is asked, no resource (RFC 9112 3.2.4).
            if method != b"OPTIONS":
                self._fail(400, "Bad request: * is a target for OPTIONS only")
                raise _Stop()
            self._answer = Response(200, [("allow", _ALLOW)], b"")
        elif method not in METHODS:
            self._answer = error_response(501, "Not implemented")
        self._state = _BODY
        if self._content_length > 0 or self._chunked:
            if self._content_length > self._max_body:
                # Before reading it (and without 100 Continue): the client is told at once.
                self._fail(413, "Content too large")
                raise _Stop()
            self._wants_body = True
            self._progress = self._clock.seconds()
            if parser.should_upgrade():
                # httptools makes llhttp skip the body of an Upgrade request; it is read
                # through a fresh parser once llhttp hands the connection back.
                self._upgrade_framing = (b"transfer-encoding: chunked\r\n" if self._chunked
                                         else b"content-length: %d\r\n" % self._content_length)
            if self._expect_continue and version == "1.1":
                if self._queue:
                    # Earlier responses must go out first; sent from _flush.
                    self._continue_pending = True
                else:
                    send_now(self.transport, _CONTINUE)

    def on_body(self, body: bytes) -> None:
        size = self._body_len = self._body_len + len(body)
        if size > self._max_body:
            self._fail(413, "Content too large")
            raise _Stop()
        if self._queue and self._queued_bytes + size > self._max_buffered:
            # Bodies waiting for their turn plus this one are over the budget: stop
            # reading until answers go out (_flush). A request alone on its connection is
            # bounded by max_body instead, so the budget never blocks the only request.
            self._pause_reading(_PAUSE_BYTES)
        self._body.append(body)
        self._continue_pending = False    # the client did not wait for 100 Continue
        self._progress = self._clock.seconds()

    def on_message_complete(self) -> None:
        if self._upgrade_framing is not None:
            return      # the body follows; see _read_upgrade_body
        chunks = self._body
        if chunks:
            body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            self._body = []     # not held twice while the request waits
            self._body_len = 0
            self._queued_bytes += len(body)
        else:
            body = b""
        url = self._url.decode("latin-1")      # llhttp accepts ASCII targets only
        path, query = _split(url)
        method = self._method.decode("latin-1")
        version = self._version
        request = Request(method, path, query,
                          with_connecting_ip(self._headers, self._peer, self._forwarding_trust),
                          body, self._listener_id, version, self._scheme, self._peer)
        entry = _Pending(request, method, url, version, self._keep_alive, self._started)
        self._state = _IDLE
        if not entry.keep_alive:
            self._advance(_DRAINING)
        queue = self._queue
        queue.append(entry)
        if len(queue) >= MAX_PIPELINE:
            self._pause_reading(_PAUSE_PIPELINE)
        if self._answer is not None:
            self._on_response(self._answer, entry)
            return
        try:
            # HTTP/1 requests never leave their worker: they must be answered in order.
            d = entry.deferred = self._context.dispatch(request, False)
            d.addCallbacks(self._on_response, self._on_dispatch_error, (entry,), None, (entry,))
        except Exception:
            log.failure("dispatching {method} {path} failed", method=method, path=path)
            if entry.response is None:
                self._on_response(internal_error(), entry)

    # -- output ----------------------------------------------------------------------------------
    def _on_dispatch_error(self, failure: Failure, entry: _Pending) -> None:
        if self._conn >= _CLOSING and failure.check(defer.CancelledError):
            return None     # cancelled by _drop_queue: the client is gone
        log.failure("request {method} {path} failed", failure,
                    method=entry.method, path=entry.request.path)
        self._on_response(internal_error(), entry)

    def _on_response(self, response: Response, entry: _Pending) -> None:
        if self._conn >= _CLOSING:
            return None     # connection lost or being closed: nobody to answer
        try:
            if not isinstance(response, Response):
                log.error("dispatch returned {value!r} instead of a Response", value=response)
                response = internal_error()
            entry.response = response
            if self._queue and self._queue[0] is entry:
                self._flush()
        except Exception:
            log.failure("HTTP/1 connection from {peer}: writing a response failed", peer=self._peer)
            self._abort()
        return None

    def _flush(self) -> None:
        """Write every response that is next in line, in one write."""
        if self._streaming is not None:
            return      # a file body is going out; _stream_file flushes after it
        queue = self._queue
        out: List[bytes] = []
        while queue:
            entry = queue[0]
            response = entry.response
            if response is None:
                break
            queue.popleft()
            self._queued_bytes -= entry.size
            entry.deferred = None
            if response.abort:
                self._log(entry, 0, 0)
                if out:
                    self._write(out)
                    self._close()       # let the earlier answers out first
                else:
                    self._abort()
                return
            close = (not entry.keep_alive
                     or (self._conn != _OPEN and not queue and self._state == _IDLE))
            data, status, sent, close = self._serialize(entry, response, close)
            out.append(data)
            if self._stream_source is not None:
                # The head (and what was ready before it) now, the file as it is taken.
                self._write(out)
                self._streaming = (entry, self._stream_source, close, entry.linger, status)
                self._stream_source = None
                self._stream_file()
                return
            self._log(entry, status, sent)
            if close:
                self._write(out)
                self._close(entry.linger)
                return
        if out:
            self._write(out)
        if not queue:
            if self._state == _IDLE:
                if self._conn != _OPEN:
                    self._close()
                    return
                self._idle_since = self._clock.seconds()
            elif self._continue_pending:
                self._continue_pending = False
                self._progress = self._clock.seconds()
                send_now(self.transport, _CONTINUE)
        paused = self._paused
        if paused:
            if paused & _PAUSE_PIPELINE and len(queue) <= RESUME_PIPELINE:
                self._resume_reading(_PAUSE_PIPELINE)
            if paused & _PAUSE_BYTES and (
                    not queue or self._queued_bytes + self._body_len <= self._max_buffered):
                self._resume_reading(_PAUSE_BYTES)

    def _write(self, out: List[bytes]) -> None:
        send_now(self.transport, out[0] if len(out) == 1 else b"".join(out))

    def _serialize(self, entry: _Pending, response: Response,
                   close: bool) -> Tuple[bytes, int, int, bool]:
        """(bytes on the wire, status, body bytes sent, close after it) for one response.

        What goes out is exchange.finish's; this only writes it as HTTP/1.1 (a NULL body
        needs content-length: 0 here, to delimit the message).
        """
        out = finish(response, entry.head, self._clock.seconds(), True)
        self._stream_source = out.file
        status = out.status
        parts = [_STATUS_LINES.get(status) or "HTTP/1.1 %d \r\n" % status]
        for name, value in out.headers:
            parts.append("%s: %s\r\n" % (name, value))
        if out.length is not None:
            parts.append("content-length: %d\r\n" % out.length)
        for name, value in out.added:
            parts.append("%s: %s\r\n" % (name, value))
        if close:
            parts.append("connection: close\r\n\r\n")
        elif entry.version == "1.0":
            parts.append("connection: keep-alive\r\n\r\n")
        else:
            parts.append("\r\n")
        head = "".join(parts)
        try:
            data = head.encode("latin-1")
        except UnicodeEncodeError:
            data = head.encode("utf-8")
        body = out.body
        if body:
            return data + body, status, len(body), close
        return data, status, 0, close

    _stream_source = None   # set by _serialize: the file body of the head it made

    def _stream_file(self) -> None:
        """Write the streamed file while the transport takes it; after the last byte,
        carry on with the answers behind it."""
        entry, source, close, linger, status = self._streaming
        transport = self.transport
        try:
            while not self._paused & _PAUSE_BACKPRESSURE:
                chunk = source.read(FILE_CHUNK)
                if not chunk:
                    break
                transport.write(chunk)
                if self._streaming is None:
                    return      # the write failed and the connection is gone
        except Exception as exc:
            log.warn("HTTP/1 connection from {peer}: file body of {path} failed: {error}",
                     peer=self._peer, path=entry.request.path, error=str(exc))
            self._abort()
            return
        if self._streaming is None or source.remaining > 0:
            return      # paused: resumeProducing goes on
        self._streaming = None
        self._log(entry, status, source.length)
        if close:
            self._close(linger)
            return
        self._flush()       # the answers behind it; starts the idle clock when none

    def _stop_streaming(self) -> None:
        streaming, self._streaming = self._streaming, None
        if streaming is not None:
            streaming[1].close()

    def _log(self, entry: _Pending, status: int, sent: int) -> None:
        duration = self._clock.seconds() - entry.started
        self._record(status, duration)
        if self._access_log:
            log_access(entry.request, entry.method, entry.target, status, sent,
                        duration, self._worker_label, "HTTP/" + entry.version)

    def in_flight(self) -> int:
        """Requests received on this connection and not answered yet (metrics)."""
        return len(self._queue)

    # -- errors and closing --------------------------------------------------------------------------
    def _fail(self, status: int, message: str) -> None:
        """Answer with a server-generated error after what is pending, then close."""
        if self._conn >= _CLOSING:
            return
        self._advance(_IGNORING)
        now = self._clock.seconds()
        partial = self._state != _IDLE
        self._state = _IDLE
        method = self._method.decode("latin-1") if partial and self._method else "-"
        target = self._url[:200].decode("latin-1") if partial and self._url else "-"
        request = Request(method, target, None, peer=self._peer)
        entry = _Pending(request, method, target, "1.1", False, self._started if partial else now)
        entry.response = error_response(status, message)
        entry.linger = True
        self._queue.append(entry)
        self._flush()

    def _close(self, linger: bool = False) -> None:
        if self._conn >= _CLOSING:
            return
        self._advance(_CLOSING)
        transport = self.transport
        self._held = b""
        self._stop_streaming()
        try:
            transport.unregisterProducer()  # a paused producer would keep the connection open
        except Exception:
            pass
        if linger and _plain_tcp(transport):
            self._advance(_LINGERING)
            transport.loseWriteConnection()
            if self._transport_paused:
                self._transport_paused = False
                transport.resumeProducing()  # read and discard, so the peer's FIN is seen
            self._linger_call = self._clock.callLater(LINGER_SECONDS, transport.loseConnection)
        else:
            transport.loseConnection()

    def _abort(self) -> None:
        if self._conn == _LOST:
            return
        self._advance(_CLOSING)
        self._drop_queue()
        self._stop_streaming()
        self.transport.abortConnection()

    # -- flow control ------------------------------------------------------------------------------
    def _pause_reading(self, reason: int) -> None:
        if not self._transport_paused and self._conn < _CLOSING:
            self._transport_paused = True
            self.transport.pauseProducing()
        self._paused |= reason

    def _resume_reading(self, reason: int) -> None:
        if self._paused & reason:
            self._paused &= ~reason
            if not self._paused and self._conn < _CLOSING:
                # Time spent paused by us does not count against the client.
                self._head_since = self._progress = self._clock.seconds()
                if self._held:
                    # Parse what was held back first; it may pause reading again. (Never
                    # re-entered from a parser callback: input is only held between reads.)
                    held, self._held = self._held, b""
                    self._feed_slices(held)
                    if self._paused or self._conn >= _CLOSING:
                        return
                if self._eof_held:
                    self._eof_held = False
                    self.readConnectionLost()
                    return
                if self._transport_paused:
                    self._transport_paused = False
                    self.transport.resumeProducing()

    # IPushProducer, for the transport: its write buffer is full / has drained.
    def pauseProducing(self) -> None:
        if not self._paused & _PAUSE_BACKPRESSURE:
            self._stalled_since = self._clock.seconds()
        self._pause_reading(_PAUSE_BACKPRESSURE)

    def resumeProducing(self) -> None:
        self._resume_reading(_PAUSE_BACKPRESSURE)
        if self._streaming is not None and not self._paused & _PAUSE_BACKPRESSURE:
            self._stream_file()

    def stopProducing(self) -> None:
        pass

    # -- timeouts --------------------------------------------------------------------------------------
    def _arm_timer(self, delay: float) -> None:
        if delay > 0:
            self._timer = self._clock.callLater(delay, self._tick)

    def _tick(self) -> None:
        """The connection's one timer: enforce the deadline of the current state.

        Whatever the state, the timer is re-armed no later than ``_tick_every`` from
        now; every deadline a later state change can set lies at least that far ahead,
        so it never has to be moved sooner.
        """
        self._timer = None
        if self._conn >= _CLOSING:
            return
        now = self._clock.seconds()
        deadline = None
        state = self._state
        if self._paused & _PAUSE_BACKPRESSURE:
            # The client does not read our answers: after the idle timeout it is dropped
            # (what we hold for it cannot be delivered anyway).
            if self._idle_timeout > 0:
                deadline = self._stalled_since + self._idle_timeout
                if now >= deadline:
                    self._abort()
                    return
        elif self._paused or self._streaming is not None:
            pass
        elif state == _HEAD:
            if self._header_timeout > 0:
                deadline = self._head_since + self._header_timeout
                if now >= deadline:
                    self._fail(408, "Request timeout")
                    return
        elif state == _BODY:
            if self._wants_body and not self._continue_pending and self._body_timeout > 0:
                deadline = self._progress + self._body_timeout
                if now >= deadline:
                    self._fail(408, "Request timeout")
                    return
        elif not self._queue and self._idle_timeout > 0:
            deadline = self._idle_since + self._idle_timeout
            if now >= deadline:
                self._close()       # idle keep-alive connection: close silently
                return
        delay = self._tick_every
        if deadline is not None and deadline - now < delay:
            delay = deadline - now
        self._arm_timer(delay)
