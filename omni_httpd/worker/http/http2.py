"""HTTP/2 server side of one connection (h2c prior knowledge or TLS with ALPN "h2").

The h2 library is the state machine (bytes in, events and bytes out); this module turns
its events into `Request`s for the dispatcher and writes `Response`s back, one stream at
a time, respecting flow control in both directions. Every stream is dispatched with
``allow_remote=True``: the dispatcher may run it on an idle sibling worker.

Decisions worth knowing:

- Request bodies are budgeted (see `BodyBudget`): a stream may send its first
  ``STREAM_WINDOW`` bytes at once; a longer body is *admitted* first, reserving its
  declared Content-Length (``settings.max_body`` + 1 without one) from the connection's
  budget (``settings.max_connection_body_buffer``) and the worker's
  (``settings.max_worker_body_buffer``), in arrival order, and only then gets the flow
  control window to send the rest. The reservation lasts until the stream's response is
  sent (its body is in memory until then). So a worker never holds more body bytes than
  its budget plus ``STREAM_WINDOW`` per open stream, and an admitted stream can always
  finish (no dead lock between half-received bodies). More than ``settings.max_body``
  (declared or sent) gets a 413 and the rest of the stream is refused with
  RST_STREAM(NO_ERROR), as RFC 9113 section 8.1 allows.
- Work nobody waits for is not done: a stream the client resets, and every stream of a
  connection that closes, has its dispatch cancelled, so a request still queued for the
  DB thread is skipped (a handler already running finishes and commits; its response is
  dropped). Requests that complete and are reset within one read are never dispatched.
- Rapid reset (CVE-2023-44487): each reset of a stream we have not answered costs a
  token; a connection has ``RESET_BURST`` of them, gets one back per answered stream and
  ``RESET_RATE`` per second. Out of tokens: GOAWAY(ENHANCE_YOUR_CALM) and close.
- Control-frame floods: every PING or SETTINGS frame makes h2 queue an answer. They are
  budgeted the same way (``CONTROL_BURST``, ``CONTROL_RATE`` per second); and while the
  transport's write buffer is full (the client does not read), we stop reading the
  client, so answers cannot pile up.
- A header list over ``settings.max_header_size`` gets a 431 on its stream. The hpack
  decoder's own hard limit is set well above it, so only absurd header blocks cost the
  connection (GOAWAY ENHANCE_YOUR_CALM, from h2).
- h2 refuses to send anything once a GOAWAY went through its state machine, so a
  graceful GOAWAY is written by hand (`_send_graceful_goaway`): in-flight streams still
  finish, streams the client opens afterwards are refused with REFUSED_STREAM.
- A client GOAWAY closes the connection: h2 allows no more responses after it.
- Any h2 `ProtocolError` (h2 has already queued the GOAWAY with the right code) closes
  the connection; nothing escapes into the reactor.
- A response whose body is a file (``Response.file``, static files) is read `FILE_CHUNK`
  bytes at a time as flow control and the transport take it, so a stream holds one
  chunk in memory; a file that cannot be read to its announced length resets its stream.
"""
from __future__ import annotations

import collections
from typing import Callable, Deque, Dict, List, Optional, Tuple

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingReceived,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import H2Error, ProtocolError
from h2.settings import SettingCodes, Settings as H2Settings
from hyperframe.frame import GoAwayFrame
from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from omni_httpd.common.client_address import forwarding_trust, with_connecting_ip
from omni_httpd.common.exchange import finish, log_access, peer_of, send_now
from omni_httpd.common.request import METHODS, Request, header_text, split_target
from omni_httpd.common.response import Response, error_response, internal_error
from omni_httpd.worker.http.context import ListenerContext

log = Logger()

Dispatch = Callable[[Request, bool], "defer.Deferred[Response]"]

#: How many streams a client may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS).
MAX_CONCURRENT_STREAMS = 100
#: Per-stream receive window we advertise: what a stream may send before its body has
#: been admitted to the body budget. Small bodies (most requests) fit and never wait;
#: an open stream holds at most this much unbudgeted.
STREAM_WINDOW = 65535
#: Connection-level receive window, handed back as data arrives: the per-stream windows
#: are what bound buffered bodies, this only has to never be the bottleneck.
CONNECTION_WINDOW = 16 * 1024 * 1024
#: Window we let run down before handing it back in one WINDOW_UPDATE.
WINDOW_SLACK = 16384
#: Resets of streams we have not answered yet: a burst (twice the stream limit: a
#: client abandoning everything it has open, twice) ...
RESET_BURST = 2 * MAX_CONCURRENT_STREAMS
#: ...refilled by one per stream we answer and this many per second.
RESET_RATE = 10.0
#: PING and SETTINGS frames (each one makes us queue an answer): a burst, and the refill
#: per second. Keep-alive and RTT probes are far below this.
CONTROL_BURST = 1000
CONTROL_RATE = 100.0
#: After a GOAWAY the peer gets this long to read what is buffered before we drop it.
CLOSE_GRACE = 5.0
#: Bytes of a streamed file body (Response.file) read at a time ...
FILE_CHUNK = 64 * 1024
#: ... and chunks one stream reads in one go before letting the reactor serve others
#: (a fast client with a large window would otherwise take the whole file in one turn).
FILE_CHUNKS_PER_TURN = 8

# Inbound normalisation would only move split Cookie fields to the end; _on_request
# joins them where the first one arrived instead. Outbound headers are checked (and
# lower-cased, trimmed) by _send_response itself, so h2's per-header checks, which
# cost a fifth of a small response, are off.
_H2_CONFIG = H2Configuration(client_side=False, header_encoding=None,
                             normalize_inbound_headers=False,
                             validate_outbound_headers=False,
                             normalize_outbound_headers=False)



class BodyBudget:
    """Request-body bytes reserved by the HTTP/2 connections of one worker.

    One per worker process (`worker_body_budget`). A stream that cannot be admitted
    waits here, first come first served; `release` admits waiters as room comes back.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiting: Deque[Tuple["HTTP2Protocol", "_Stream"]] = collections.deque()

    def reserve(self, protocol: "HTTP2Protocol", stream: "_Stream") -> bool:
        """Reserve ``stream.reserved`` bytes now (True), or queue the stream (False)."""
        if not self._waiting and self.used + stream.reserved <= self.limit:
            self.used += stream.reserved
            return True
        self._waiting.append((protocol, stream))
        return False

    def release(self, size: int) -> None:
        self.used -= size
        waiting = self._waiting
        while waiting:
            protocol, stream = waiting[0]
            if stream.budget != _Stream.WAIT_WORKER or protocol.disconnected:
                waiting.popleft()   # gone or no longer needs it (released lazily)
                continue
            if self.used + stream.reserved > self.limit:
                return
            waiting.popleft()
            self.used += stream.reserved
            protocol._admitted(stream)


_worker_budgets: Dict[int, BodyBudget] = {}


def worker_body_budget(limit: int) -> BodyBudget:
    """This process's budget (a worker process runs one configuration's settings)."""
    budget = _worker_budgets.get(limit)
    if budget is None:
        budget = _worker_budgets[limit] = BodyBudget(limit)
    return budget


class _Stream:
    """What we know about one request stream."""

    __slots__ = ("stream_id", "method", "target", "headers", "chunks", "size",
                 "state", "head", "data", "offset", "status", "started", "request", "sent", "early",
                 "pending", "budget", "reserved", "window", "source")

    RECEIVING = 0      # request headers in, body arriving
    DISPATCHED = 1     # request complete, waiting for the dispatcher
    SENDING = 2        # response headers sent, body going out under flow control
    REJECTED = 3       # answered early (413, 431, ...); the rest of the request is ignored

    # budget: where the stream's body stands with the body budget
    UNBUDGETED = 0     # within its first window (or done receiving): nothing reserved
    WAIT_CONNECTION = 1  # waiting for room in the connection's budget
    WAIT_WORKER = 2    # connection share reserved, waiting for the worker's
    ADMITTED = 3       # ``reserved`` bytes held in both budgets until the stream is forgotten

    def __init__(self, stream_id: int, started: float) -> None:
        self.stream_id = stream_id
        self.method = ""
        self.target = ""
        self.headers: List[Tuple[str, str]] = []
        self.chunks: List[bytes] = []
        self.size = 0
        self.state = _Stream.RECEIVING
        self.head = False
        self.data: Optional[memoryview] = None
        self.offset = 0
        self.status = 0
        self.started = started
        self.request: Optional[Request] = None
        self.sent = 0
        #: answered before the request was complete (413, 431, ...)
        self.early = False
        #: the dispatcher's Deferred while we wait for it
        self.pending: Optional[defer.Deferred] = None
        self.budget = _Stream.UNBUDGETED
        self.reserved = 0
        #: receive window the client has left on this stream
        self.window = STREAM_WINDOW
        #: the rest of a file body (Response.file) after ``data``
        self.source = None


@implementer(IPushProducer)
class HTTP2Protocol(Protocol):
    """One HTTP/2 connection, server side.

    Built like ``HTTP1Protocol``: ``HTTP2Protocol(context)`` (worker/http/context.py),
    then ``makeConnection(transport)`` and ``dataReceived(bytes already read)``.
    """

    def __init__(self, context: ListenerContext, body_budget: Optional[BodyBudget] = None) -> None:
        settings = context.settings
        self.dispatch = context.dispatch
        self.settings = context.settings
        self.forwarding_trust = forwarding_trust(settings)
        self.listener_id = context.listener_id
        self.scheme = context.scheme
        self.clock = context.clock
        self.worker_label = context.worker_label
        self._record = context.record_h2
        self.peer = ""
        self.h2 = H2Connection(config=_H2_CONFIG)
        self.streams: Dict[int, _Stream] = {}
        self.disconnected = False
        #: GOAWAY sent: no new streams, close when the last one finishes.
        self.closing = False
        self._goaway_last_stream_id: Optional[int] = None
        self._paused = False
        self._last_progress = 0.0
        self._timer = None
        self._abort_timer = None
        self._flush_call = None
        #: _close() ran: nothing more is read or answered.
        self._dead = False
        #: we asked the transport to stop reading (the client does not read our output)
        self._reading_paused = False
        #: streams complete in the current read, dispatched once it is processed
        self._ready: List[_Stream] = []
        # Raised to the largest reservation when smaller (tap.py refuses that on the
        # command line), so that any one body can always be admitted.
        self._body_limit = max(settings.max_connection_body_buffer, settings.max_body + 1)
        self.body_budget = (body_budget if body_budget is not None else worker_body_budget(
            max(settings.max_worker_body_buffer, self._body_limit)))
        self._body_reserved = 0
        self._body_waiting: Deque[_Stream] = collections.deque()
        self._unacked = 0          # connection-level bytes not handed back yet
        self._reset_tokens = float(RESET_BURST)
        self._reset_stamp = 0.0
        self._control_tokens = float(CONTROL_BURST)
        self._control_stamp = 0.0

    # -- connection life cycle -------------------------------------------------------

    def connectionMade(self) -> None:
        self.peer = peer_of(self.transport)
        self._last_progress = self._reset_stamp = self._control_stamp = self.clock.seconds()
        limit = self.settings.max_header_size
        self.h2.local_settings = H2Settings(client=False, initial_values={
            SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
            SettingCodes.MAX_HEADER_LIST_SIZE: limit,
            SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
        })
        # Between the advertised limit and this one a request gets a 431 on its own
        # stream; only beyond it does hpack give up on the whole connection.
        self.h2.decoder.max_header_list_size = max(2 * limit, limit + 16384)
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.transport.registerProducer(self, True)
        self._flush()
        self._arm_timer()

    def dataReceived(self, data: bytes) -> None:
        if self.disconnected or self._dead:
            return
        self._last_progress = self.clock.seconds()
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as exc:
            # h2 has queued a GOAWAY with the matching error code.
            log.info("{label}HTTP/2 protocol error from {peer}: {exc}",
                     label=self._label(), peer=self.peer, exc=exc)
            self._flush()
            self._close()
            return
        try:
            for event in events:
                handler = self._handlers.get(type(event))
                if handler is not None:
                    handler(self, event)
                if self.disconnected or self._dead:
                    return
            if self._ready:
                self._dispatch_ready()
        except Exception:
            # A state we did not expect (it would be our bug): end this connection
            # cleanly rather than leave it half-understood or raise into the reactor.
            log.failure("{label}HTTP/2 connection from {peer} failed",
                        label=self._label(), peer=self.peer)
            self._fail_connection(ErrorCodes.INTERNAL_ERROR)
            return
        self._flush()
        self._timer_sooner()

    def connectionLost(self, reason=None) -> None:
        self.disconnected = True
        self._drop_streams()
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        for timer in (self._timer, self._abort_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._timer = self._abort_timer = None

    # -- IPushProducer: the transport tells us when its buffer is full -----------------

    def pauseProducing(self) -> None:
        self._paused = True
        # The client is not reading what we send. Stop reading what it sends until it
        # does: frames such as PING or SETTINGS make h2 queue answers, which would
        # otherwise pile up in the transport's buffer without bound.
        if not self._reading_paused and not self.disconnected:
            self._reading_paused = True
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        self._last_progress = self.clock.seconds()
        if self._reading_paused:
            self._reading_paused = False
            if not self.disconnected and not self._dead:
                self.transport.resumeProducing()
        if not self.disconnected:
            self._send_all_pending()
            self._flush()

    def stopProducing(self) -> None:
        self._paused = True

    # -- graceful close (ServerFactory.graceful_close) ---------------------------------

    def graceful_close(self) -> None:
        """Send GOAWAY, finish the streams already received, then close."""
        if self.disconnected or self.closing:
            return
        self._send_graceful_goaway()
        self._close_if_done()

    def readConnectionLost(self) -> None:
        """The client half-closed: finish the streams we have, then close.

        A request still arriving can never complete now: its stream is reset and dropped
        (it would otherwise hold the connection until the body timeout).
        """
        self.closing = True
        self._goaway_last_stream_id = self.h2.highest_inbound_stream_id
        for stream in [s for s in self.streams.values() if s.state == _Stream.RECEIVING]:
            self._reset(stream.stream_id, ErrorCodes.CANCEL)
            self._forget(stream)
        self._flush()
        self._close_if_done()

    @property
    def idle(self) -> bool:
        """No stream in progress."""
        return not self.streams

    # -- h2 events ---------------------------------------------------------------------

    def _on_request(self, event: RequestReceived) -> None:
        stream_id = event.stream_id
        if self.closing and stream_id > (self._goaway_last_stream_id or 0):
            self._reset(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        stream = _Stream(stream_id, self.clock.seconds())
        self.streams[stream_id] = stream
        pseudo: Dict[bytes, bytes] = {}
        headers: List[Tuple[str, str]] = []
        cookies: List[str] = []
        cookie_at = -1
        size = 0
        expect_continue = False
        declared_length: Optional[int] = None
        for name, value in event.headers:
            size += len(name) + len(value) + 32
            if name.startswith(b":"):
                pseudo[name] = value
                continue
            if name == b"cookie":
                # HTTP/2 lets clients split Cookie; handlers see it as HTTP/1 sends it.
                if cookie_at < 0:
                    cookie_at = len(headers)
                    headers.append(("cookie", ""))
                cookies.append(header_text(value))
                continue
            if name == b"content-length":
                try:
                    declared_length = int(value)
                except ValueError:
                    declared_length = None
            elif name == b"expect" and value.lower() == b"100-continue":
                expect_continue = True
            headers.append((header_text(name), header_text(value)))
        if cookie_at >= 0:
            headers[cookie_at] = ("cookie", "; ".join(cookies))
        authority = pseudo.get(b":authority")
        if authority is not None and not any(name == "host" for name, _ in headers):
            headers.insert(0, ("host", header_text(authority)))
        stream.headers = headers
        stream.method = header_text(pseudo.get(b":method", b""))
        stream.head = stream.method == "HEAD"
        stream.target = header_text(pseudo.get(b":path", b""))

        if size > self.settings.max_header_size:
            self._reject(stream, 431, "Request header fields too large")
        elif declared_length is not None and declared_length > self.settings.max_body:
            self._reject(stream, 413, "Request body too large")
        elif stream.method.encode("latin-1", "replace") not in METHODS:
            self._reject(stream, 501, "Method not implemented")
        elif not (stream.target.startswith("/") or
                  (stream.target == "*" and stream.method == "OPTIONS")):
            self._reject(stream, 400, "Bad request target")
        else:
            if (declared_length is not None and declared_length > STREAM_WINDOW
                    and not event.stream_ended):
                # Reserve a declared length now, so the window opens without waiting for
                # the first one to run out. An undeclared one waits for that (_on_data).
                self._request_budget(stream, declared_length)
            if expect_continue and not event.stream_ended:
                self.h2.send_headers(stream_id, [(b":status", b"100")])

    def _on_data(self, event: DataReceived) -> None:
        # The connection window goes back at once whatever becomes of the bytes (the
        # stream windows are what bound memory); a stream's own window only as the
        # body budget allows (_request_budget, _admitted).
        length = event.flow_controlled_length
        unacked = self._unacked + length
        if unacked >= WINDOW_SLACK:
            self.h2.increment_flow_control_window(unacked)
            unacked = 0
        self._unacked = unacked
        stream = self.streams.get(event.stream_id)
        if stream is None or stream.state != _Stream.RECEIVING:
            return
        data = event.data
        size = stream.size + len(data)
        if size > self.settings.max_body:
            stream.chunks = []
            self._reject(stream, 413, "Request body too large")
            return
        stream.size = size
        stream.chunks.append(data)
        window = stream.window - length
        stream.window = window
        if event.stream_ended is None and window < WINDOW_SLACK:
            if stream.budget == _Stream.ADMITTED:
                # Only padding makes the reserved window fall short of the body.
                self._open_window(stream)
            elif stream.budget == _Stream.UNBUDGETED:
                # Longer than its first window and no Content-Length: reserve the most a
                # body may be, plus one byte, so that a body over the limit can show it
                # (and get its 413) instead of waiting for a window that never opens.
                # Released down to its real size when it ends.
                self._request_budget(stream, self.settings.max_body + 1)

    def _on_stream_ended(self, event: StreamEnded) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None or stream.state != _Stream.RECEIVING:
            return
        stream.state = _Stream.DISPATCHED
        if stream.budget != _Stream.UNBUDGETED:
            self._body_complete(stream)
        path, query = split_target(stream.target)
        body = b"".join(stream.chunks)
        stream.chunks = []
        request = Request(method=stream.method, path=path, query_string=query,
                          headers=with_connecting_ip(stream.headers, self.peer, self.forwarding_trust),
                          body=body,
                          listener_id=self.listener_id, http_version="2",
                          scheme=self.scheme, peer=self.peer)
        stream.request = request
        # Dispatched once the whole read is processed (_dispatch_ready): a request the
        # same read also resets (rapid reset sends HEADERS and RST_STREAM together) is
        # then never handed to the DB thread at all.
        self._ready.append(stream)

    def _dispatch_ready(self) -> None:
        ready, self._ready = self._ready, []
        for stream in ready:
            if self.streams.get(stream.stream_id) is not stream:
                continue   # reset (or the connection ended) in the same read
            d = defer.maybeDeferred(self.dispatch, stream.request, True)
            if not d.called:
                stream.pending = d
            d.addCallbacks(self._respond, self._dispatch_failed,
                           callbackArgs=(stream,), errbackArgs=(stream,))
            if self._dead:
                return

    def _on_stream_reset(self, event: StreamReset) -> None:
        stream = self.streams.pop(event.stream_id, None)
        if stream is None:
            return   # already answered: nothing was wasted
        # The client gave up on it: skip its work if it has not started.
        _abandon(stream)
        _close_source(stream)
        self._release_budget(stream)
        if not self._take_token("_reset_tokens", "_reset_stamp", RESET_BURST, RESET_RATE):
            log.info("{label}HTTP/2 client {peer} resets streams faster than they are "
                     "served (rapid reset); closing with ENHANCE_YOUR_CALM",
                     label=self._label(), peer=self.peer)
            self._fail_connection(ErrorCodes.ENHANCE_YOUR_CALM)
            return
        self._close_if_done()

    def _on_ping(self, event: PingReceived) -> None:
        self._control_frame()

    def _on_window_updated(self, event: WindowUpdated) -> None:
        if event.stream_id == 0:
            self._send_all_pending()
        else:
            stream = self.streams.get(event.stream_id)
            if stream is not None and stream.state == _Stream.SENDING:
                self._send_pending(stream)

    def _on_settings_changed(self, event: RemoteSettingsChanged) -> None:
        if not self._control_frame():
            return
        if SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
            self._send_all_pending()

    def _control_frame(self) -> bool:
        """Count a frame h2 answers by itself (PING, SETTINGS); False if that ended
        the connection."""
        if self._take_token("_control_tokens", "_control_stamp", CONTROL_BURST, CONTROL_RATE):
            return True
        log.info("{label}HTTP/2 client {peer} floods control frames; closing with "
                 "ENHANCE_YOUR_CALM", label=self._label(), peer=self.peer)
        self._fail_connection(ErrorCodes.ENHANCE_YOUR_CALM)
        return False

    def _take_token(self, tokens_name: str, stamp_name: str, burst: float, rate: float) -> bool:
        """Token bucket: take one from ``self.<tokens_name>``, refilled at ``rate`` per
        second up to ``burst``; False when there is none."""
        now = self.clock.seconds()
        tokens = getattr(self, tokens_name) + (now - getattr(self, stamp_name)) * rate
        if tokens > burst:
            tokens = burst
        setattr(self, stamp_name, now)
        if tokens < 1:
            setattr(self, tokens_name, tokens)
            return False
        setattr(self, tokens_name, tokens - 1)
        return True

    def _on_connection_terminated(self, event: ConnectionTerminated) -> None:
        if event.error_code != ErrorCodes.NO_ERROR:
            log.info("{label}HTTP/2 client {peer} sent GOAWAY {code}",
                     label=self._label(), peer=self.peer, code=event.error_code)
        self._close()

    _handlers = {
        RequestReceived: _on_request,
        DataReceived: _on_data,
        PingReceived: _on_ping,
        StreamEnded: _on_stream_ended,
        StreamReset: _on_stream_reset,
        WindowUpdated: _on_window_updated,
        RemoteSettingsChanged: _on_settings_changed,
        ConnectionTerminated: _on_connection_terminated,
    }

    # -- the body budget ---------------------------------------------------------------

    def _request_budget(self, stream: _Stream, need: int) -> None:
        """Ask to admit ``need`` body bytes for ``stream`` (its window opens once they are
        reserved in the connection's and the worker's budget)."""
        stream.reserved = need   # <= max_body + 1 <= both limits (see __init__)
        if self._body_waiting or self._body_reserved + need > self._body_limit:
            stream.budget = _Stream.WAIT_CONNECTION
            self._body_waiting.append(stream)
        else:
            self._reserve_in_worker(stream)

    def _reserve_in_worker(self, stream: _Stream) -> None:
        self._body_reserved += stream.reserved
        stream.budget = _Stream.WAIT_WORKER
        if self.body_budget.reserve(self, stream):
            self._admitted(stream)

    def _admitted(self, stream: _Stream) -> None:
        """Both budgets hold ``stream.reserved`` for it: let the client send its body."""
        stream.budget = _Stream.ADMITTED
        self._last_progress = self.clock.seconds()
        self._open_window(stream)
        self._flush_soon()   # we may be called from another connection's release

    def _open_window(self, stream: _Stream) -> None:
        increment = stream.reserved - stream.size - stream.window
        if increment > 0:
            try:
                self.h2.increment_flow_control_window(increment, stream.stream_id)
            except H2Error:
                return   # the stream is already closed on h2's side
            stream.window += increment

    def _body_complete(self, stream: _Stream) -> None:
        """The whole body is in: keep only what it holds reserved."""
        if stream.budget != _Stream.ADMITTED:
            self._release_budget(stream)   # it fitted in its first window after all
            return
        excess = stream.reserved - stream.size
        if excess > 0:
            stream.reserved = stream.size
            self._body_reserved -= excess
            self.body_budget.release(excess)
            self._admit_waiting()

    def _release_budget(self, stream: _Stream) -> None:
        budget = stream.budget
        if budget == _Stream.UNBUDGETED:
            return
        stream.budget = _Stream.UNBUDGETED
        if budget == _Stream.WAIT_CONNECTION:
            try:
                self._body_waiting.remove(stream)
            except ValueError:
                pass
        else:
            self._body_reserved -= stream.reserved
            if budget == _Stream.ADMITTED:
                self.body_budget.release(stream.reserved)
            # WAIT_WORKER: the worker's queue skips it when it gets there.
        stream.reserved = 0
        if not self._dead:
            self._admit_waiting()

    def _admit_waiting(self) -> None:
        waiting = self._body_waiting
        while waiting:
            stream = waiting[0]
            if self._body_reserved + stream.reserved > self._body_limit:
                return
            waiting.popleft()
            self._reserve_in_worker(stream)

    def _drop_streams(self) -> None:
        """The connection is ending: cancel every stream's work, give back its budget."""
        streams = list(self.streams.values())
        self.streams.clear()
        self._ready = []
        released = 0
        for stream in streams:
            _abandon(stream)
            _close_source(stream)
            if stream.budget == _Stream.ADMITTED:
                released += stream.reserved
            stream.budget = _Stream.UNBUDGETED
        self._body_waiting.clear()
        self._body_reserved = 0
        if released:
            self.body_budget.release(released)

    # -- responses ---------------------------------------------------------------------

    def _dispatch_failed(self, failure: Failure, stream: _Stream) -> None:
        log.failure("{label}dispatching HTTP/2 stream {stream_id} failed", failure=failure,
                    label=self._label(), stream_id=stream.stream_id)
        self._respond(internal_error(), stream)

    def _respond(self, response: Response, stream: _Stream) -> None:
        """Send ``response`` on ``stream`` (unless the stream or connection is gone)."""
        stream.pending = None
        if self.disconnected or self.streams.get(stream.stream_id) is not stream:
            return
        try:
            self._send_response(stream, response)
        except Exception:
            log.failure("{label}could not send the response on stream {stream_id}",
                        label=self._label(), stream_id=stream.stream_id)
            self._reset(stream.stream_id, ErrorCodes.INTERNAL_ERROR)
            self._forget(stream)
        self._flush_soon()

    def _send_response(self, stream: _Stream, response: Response) -> None:
        stream_id = stream.stream_id
        if response.abort:
            self._reset(stream_id, ErrorCodes.CANCEL)
            self._log_access(stream)
            self._forget(stream)
            return
        out = finish(response, stream.head, self.clock.seconds(), False, self._label())
        status = out.status
        headers = [(b":status", str(status).encode("ascii"))]
        for name, value in out.headers:
            headers.append((name.lower().encode("utf-8", "replace"), value.encode("utf-8", "replace")))
        if out.length is not None:
            headers.append((b"content-length", str(out.length).encode("ascii")))
        for name, value in out.added:
            headers.append((name.encode("ascii"), value.encode("ascii")))
        stream.status = status
        body = out.body
        if out.file is not None:
            stream.source = out.file
            try:
                body = out.file.read(FILE_CHUNK)
            except Exception:
                _close_source(stream)
                raise
        send_body = bool(body)
        self.h2.send_headers(stream_id, headers, end_stream=not send_body)
        if send_body:
            stream.state = _Stream.SENDING
            stream.data = memoryview(body)
            stream.offset = 0
            self._send_pending(stream)
        else:
            self._stream_done(stream)

    def _reject(self, stream: _Stream, status: int, message: str) -> None:
        """Answer a request we will not run, before it is complete."""
        response = error_response(status, message)
        stream.state = _Stream.REJECTED
        stream.early = True
        self._send_response(stream, response)

    def _send_pending(self, stream: _Stream) -> None:
        """Send as much of the body as flow control and the transport allow."""
        data = stream.data
        stream_id = stream.stream_id
        total = len(data)
        reads = 0
        while stream.offset < total and not self._paused:
            window = self.h2.local_flow_control_window(stream_id)
            if window <= 0:
                return
            size = min(window, self.h2.max_outbound_frame_size, total - stream.offset)
            end = stream.offset + size
            last = end == total
            if last and stream.source is not None:
                last = stream.source.remaining <= 0
            self.h2.send_data(stream_id, data[stream.offset:end], end_stream=last)
            stream.offset = end
            if end == total and not last:
                # The next chunk of the file; the loop goes on while windows allow.
                try:
                    data = stream.data = memoryview(stream.source.read(FILE_CHUNK))
                except Exception as exc:
                    log.warn("{label}file body on stream {stream_id} failed: {error}",
                             label=self._label(), stream_id=stream_id, error=str(exc))
                    self._reset(stream_id, ErrorCodes.INTERNAL_ERROR)
                    self._forget(stream)
                    return
                total = len(data)
                stream.offset = end = 0
                reads += 1
                if reads >= FILE_CHUNKS_PER_TURN:
                    stream.sent += size
                    self._flush()
                    self.clock.callLater(0, self._continue_file, stream)
                    return
            stream.sent += size
            if end < total:
                # Write frame by frame so the transport can pause us when its buffer
                # fills; a body that fits in one frame goes out with the next flush.
                self._flush()
            if self.disconnected:
                return
        if stream.offset >= total:
            stream.data = None
            self._stream_done(stream)

    def _continue_file(self, stream: _Stream) -> None:
        """The next part of a file body, a reactor turn later (FILE_CHUNKS_PER_TURN)."""
        if (self.disconnected or self.streams.get(stream.stream_id) is not stream
                or stream.state != _Stream.SENDING or stream.data is None):
            return
        self._send_pending(stream)
        self._flush()

    def _send_all_pending(self) -> None:
        for stream in sorted(self.streams.values(), key=lambda s: s.stream_id):
            if self._paused or self.disconnected:
                return
            if stream.state == _Stream.SENDING and stream.data is not None:
                self._send_pending(stream)

    def _stream_done(self, stream: _Stream) -> None:
        """Our side of the stream is complete."""
        self._log_access(stream)
        if self._reset_tokens < RESET_BURST:
            self._reset_tokens += 1   # an answered stream earns back a reset
        if stream.early:
            # We answered before the request was complete: ask the client to stop
            # sending the rest (RFC 9113 section 8.1).
            h2_stream = self.h2.streams.get(stream.stream_id)
            if h2_stream is not None and h2_stream.open:
                self._reset(stream.stream_id, ErrorCodes.NO_ERROR)
        self._forget(stream)

    def _forget(self, stream: _Stream) -> None:
        _close_source(stream)
        if self.streams.get(stream.stream_id) is stream:
            del self.streams[stream.stream_id]
        if stream.budget != _Stream.UNBUDGETED:
            self._release_budget(stream)
        self._last_progress = self.clock.seconds()
        self._close_if_done()

    def _log_access(self, stream: _Stream) -> None:
        duration = self.clock.seconds() - stream.started
        self._record(stream.status, duration)
        if not self.settings.access_log:
            return
        log_access(stream.request, stream.method, stream.target, stream.status,
                    stream.sent, duration, self.worker_label, "HTTP/2")

    def in_flight(self) -> int:
        """Streams of this connection not answered yet (metrics)."""
        return len(self.streams)

    # -- writing, closing, timers ------------------------------------------------------

    def _reset(self, stream_id: int, code: ErrorCodes) -> None:
        try:
            self.h2.reset_stream(stream_id, error_code=code)
        except H2Error:
            pass  # already closed on h2's side: nothing to reset

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.disconnected:
            self._last_progress = self.clock.seconds()
            send_now(self.transport, data)

    def _flush_soon(self) -> None:
        """Flush once the current reactor turn is over.

        The DB thread hands back a batch of results in one turn; answers to several
        streams of this connection then leave in one write instead of one each.
        """
        if self._flush_call is None and not self.disconnected:
            self._flush_call = self.clock.callLater(0, self._flush_later)

    def _flush_later(self) -> None:
        self._flush_call = None
        self._flush()

    def _send_graceful_goaway(self) -> None:
        self.closing = True
        self._goaway_last_stream_id = self.h2.highest_inbound_stream_id
        frame = GoAwayFrame(0, last_stream_id=self._goaway_last_stream_id,
                            error_code=ErrorCodes.NO_ERROR)
        self._flush()
        self.transport.write(frame.serialize())

    def _close_if_done(self) -> None:
        if self.closing and not self.streams and not self.disconnected:
            self._close()

    def _fail_connection(self, code: ErrorCodes) -> None:
        try:
            self.h2.close_connection(error_code=code)
        except H2Error:
            pass
        self._flush()
        self._close()

    def _close(self) -> None:
        """Let the transport write what is buffered, then close; drop it if it cannot."""
        if self.disconnected:
            return
        self.closing = True
        self._dead = True
        self._drop_streams()
        self.transport.loseConnection()
        if self._abort_timer is None:
            self._abort_timer = self.clock.callLater(CLOSE_GRACE, self._abort)

    def _abort(self) -> None:
        self._abort_timer = None
        if not self.disconnected:
            abort = getattr(self.transport, "abortConnection", None)
            if abort is not None:
                abort()

    def _timeout(self) -> Optional[float]:
        """The limit that applies now, or None while every stream waits on a handler."""
        if not self.streams:
            return self.settings.idle_timeout
        if all(s.state == _Stream.DISPATCHED or s.budget == _Stream.WAIT_CONNECTION
               or s.budget == _Stream.WAIT_WORKER for s in self.streams.values()):
            return None   # waiting on us (a handler, the body budget), not on the client
        return self.settings.body_timeout

    def _arm_timer(self) -> None:
        self._timer = self.clock.callLater(self._check_delay(), self._on_timer)

    def _timer_sooner(self) -> None:
        """Bring the timer forward when a shorter limit now applies (a new stream)."""
        timer = self._timer
        if timer is not None and timer.active():
            delay = self._check_delay()
            if timer.getTime() > self.clock.seconds() + delay:
                timer.reset(delay)

    def _check_delay(self) -> float:
        limit = self._timeout()
        if limit is None:
            return max(1.0, self.settings.body_timeout)
        return max(0.0, self._last_progress + limit - self.clock.seconds())

    def _on_timer(self) -> None:
        # One timer per connection, re-armed lazily: activity only stamps the time.
        self._timer = None
        if self.disconnected or self._abort_timer is not None:
            return
        limit = self._timeout()
        if limit is not None and self.clock.seconds() - self._last_progress >= limit:
            if self.streams:
                log.info("{label}HTTP/2 client {peer} stalled; closing",
                         label=self._label(), peer=self.peer)
            self._fail_connection(ErrorCodes.NO_ERROR)
            return
        self._arm_timer()

    def _label(self) -> str:
        return "[%s] " % self.worker_label if self.worker_label else ""


def _close_source(stream: _Stream) -> None:
    source, stream.source = stream.source, None
    if source is not None:
        source.close()


def _abandon(stream: _Stream) -> None:
    """Nobody waits for ``stream``'s response any more: skip its work if not started.

    The dispatcher's own errbacks would take a CancelledError for a failure (the local
    executor logs a traceback; the sibling client closes its channel, failing every
    other request on it), so the Deferred is paused first and its chain never runs.
    cancel() still marks it called, which is what makes the DB thread skip a queued job,
    and makes the Deferred swallow the result of a job that was already running.
    A request re-sent to a sibling worker is cancelled there the same way (siblings.py's
    cancel frame).
    """
    d = stream.pending
    if d is not None:
        stream.pending = None
        d.pause()
        d.cancel()
