"""The proxy outcome: forward the request to an upstream URL and relay its answer.

What is sent: the request's method, headers and body, to exactly the handler's URL.
The request's own path and query string are *not* appended: the handler builds the
target itself (``http_proxy('http://backend:9000' || request.path)``), as the reference
implementation's documentation shows; so one handler can map paths however it likes.

Headers: hop-by-hop headers (RFC 9110 7.6.1: the fixed list below plus any named in
``Connection``) are dropped both ways. ``Host`` is the incoming one when
``preserve_host``, else the upstream's (Agent derives it from the URL).
``X-Forwarded-For`` (the client address appended) and ``X-Forwarded-Proto`` are set,
as common reverse proxies (h2o, which the reference embeds) do.

The upstream's body is read completely (at most ``settings.max_body`` bytes) before
the answer is relayed. Upstream unreachable, too slow, too big or not speaking HTTP:
502 with a plain-text body and a warning in the log.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from omni_httpd.request import Request
from omni_httpd.response import Response, error_response
from omni_httpd.settings import Settings

log = Logger()

HOP_BY_HOP = frozenset([
    "connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
    "proxy-authorization", "proxy-connection",
])
#: Never copied from the request: Agent writes its own framing, and we answered any
#: ``Expect: 100-continue`` ourselves already.
_NOT_FORWARDED = HOP_BY_HOP | {"content-length", "expect", "host"}
#: Never relayed from the upstream: the protocol frames the body itself.
_NOT_RELAYED = HOP_BY_HOP | {"content-length"}
#: Methods whose empty body is still sent as ``Content-Length: 0``.
_BODY_METHODS = frozenset(["POST", "PUT", "PATCH"])

CONNECT_TIMEOUT = 10.0
#: The whole upstream exchange (connect, send, read the answer) must finish within this.
TIMEOUT = 60.0


class UpstreamBodyTooLarge(Exception):
    pass


def bad_gateway() -> Response:
    return error_response(502, "Bad gateway")


@implementer(IBodyProducer)
class _BytesProducer:
    """The request body, already complete in memory, written in one go."""

    def __init__(self, body: bytes):
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer) -> Deferred:
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _BodyCollector(Protocol):
    """Collects an upstream body, giving up (and closing) beyond ``limit`` bytes."""

    def __init__(self, limit: int, finished: Deferred):
        self._limit = limit
        self._finished = finished
        self._chunks: List[bytes] = []
        self._size = 0
        self._too_large = False

    def dataReceived(self, data: bytes) -> None:
        if self._too_large:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._too_large = True
            self._chunks = []
            self.abort()
            return
        self._chunks.append(data)

    def abort(self) -> None:
        if self.transport is not None:
            # Closes the upstream connection: it is not returned to the pool.
            self.transport.stopProducing()

    def connectionLost(self, reason: Failure) -> None:
        if self._finished.called:
            return
        if self._too_large:
            self._finished.errback(UpstreamBodyTooLarge(
                "upstream body larger than %d bytes" % self._limit))
        elif reason.check(ResponseDone, PotentialDataLoss):
            # PotentialDataLoss: no length given, the body ended with the connection
            # (HTTP/1.0 style); that is how such bodies end.
            self._finished.callback(b"".join(self._chunks))
        else:
            self._finished.errback(reason)


class Forwarder:
    """Forwards requests with one shared, persistent `HTTPConnectionPool`."""

    def __init__(self, reactor, settings: Settings, connect_timeout: float = CONNECT_TIMEOUT,
                 timeout: float = TIMEOUT):
        self._reactor = reactor
        self._settings = settings
        self._timeout = timeout
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 8
        self.pool.cachedConnectionTimeout = 60
        self._agent = Agent(reactor, connectTimeout=connect_timeout, pool=self.pool)

    def forward(self, request: Request, url: str, preserve_host: bool = True) -> Deferred:
        """Fires with the upstream's `Response`, or a 502 one; never fails."""
        try:
            target = _check_url(url)
        except ValueError as exc:
            log.warn("cannot proxy {method} {path} to {url!r}: {error}",
                     method=request.method, path=request.path, url=url, error=str(exc))
            return succeed(bad_gateway())
        producer = None
        if request.body or request.method in _BODY_METHODS:
            producer = _BytesProducer(request.body)
        d = self._agent.request(request.method.encode("ascii"), target,
                                outgoing_headers(request, preserve_host), producer)
        d.addCallback(self._relay, request.method)
        d.addTimeout(self._timeout, self._reactor)
        d.addErrback(self._failed, request, url)
        return d

    def close(self) -> Deferred:
        """Close the pooled upstream connections (tests, shutdown)."""
        return self.pool.closeCachedConnections()

    def _relay(self, upstream, method: str) -> Deferred:
        limit = self._settings.max_body
        finished = Deferred(lambda _: collector.abort())
        collector = _BodyCollector(limit, finished)
        if upstream.length is not UNKNOWN_LENGTH and upstream.length > limit:
            # Known to be too big: do not wait for it to arrive.
            collector._too_large = True
        upstream.deliverBody(collector)
        if collector._too_large:
            collector.abort()
        headers = relayed_headers(upstream.headers)
        status = upstream.code

        def build(body: bytes) -> Response:
            if method == "HEAD" or status in (204, 304) or status < 200:
                # No body, and no Content-Length we could vouch for.
                return Response(status=status, headers=headers, body=None)
            return Response(status=status, headers=headers, body=body)

        return finished.addCallback(build)

    def _failed(self, failure: Failure, request: Request, url: str) -> Response:
        log.warn("proxying {method} {path} to {url} failed: {error}",
                 method=request.method, path=request.path, url=url,
                 error=_describe(failure))
        return bad_gateway()


def _check_url(url: str) -> bytes:
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError("not an http(s) URL")
    try:
        return url.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError("URL is not ASCII (percent-encode it)") from None


def _describe(failure: Failure) -> str:
    reasons = getattr(failure.value, "reasons", None)   # ResponseFailed & co. wrap others
    if reasons:
        return "; ".join(r.getErrorMessage() for r in reasons)
    return "%s: %s" % (failure.type.__name__, failure.getErrorMessage())


def _connection_tokens(values) -> set:
    return {token.strip().lower() for value in values for token in value.split(",")}


def outgoing_headers(request: Request, preserve_host: bool) -> Headers:
    """The request's headers as sent upstream (see the module docstring)."""
    hop = _connection_tokens(v for n, v in request.headers if n == "connection")
    headers = Headers()
    forwarded_for: Optional[str] = None
    for name, value in request.headers:
        name = name.lower()
        if name in _NOT_FORWARDED or name in hop or name.startswith(":"):
            continue
        if name == "x-forwarded-for":
            forwarded_for = value if forwarded_for is None else forwarded_for + ", " + value
            continue
        if name == "x-forwarded-proto":
            continue
        headers.addRawHeader(name.encode("latin-1"), value.encode("latin-1"))
    if preserve_host:
        host = request.header("host")
        if host is not None:
            headers.addRawHeader(b"host", host.encode("latin-1"))
        # Without one (HTTP/1.0 request), Agent sends the upstream's.
    client = _client_address(request.peer)
    if client:
        forwarded_for = client if forwarded_for is None else forwarded_for + ", " + client
    if forwarded_for is not None:
        headers.addRawHeader(b"x-forwarded-for", forwarded_for.encode("latin-1"))
    headers.addRawHeader(b"x-forwarded-proto", request.scheme.encode("ascii"))
    return headers


def _client_address(peer: str) -> str:
    """"ip:port" or "[ipv6]:port" -> the address."""
    if not peer:
        return ""
    host = peer.rsplit(":", 1)[0] if peer.count(":") == 1 or peer.startswith("[") else peer
    return host.strip("[]")


def relayed_headers(upstream: Headers) -> List[Tuple[str, str]]:
    """The upstream's response headers as relayed to the client, names lower-cased."""
    raw: Dict[str, List[str]] = {}
    for name, values in upstream.getAllRawHeaders():
        raw[name.decode("latin-1").lower()] = [v.decode("latin-1") for v in values]
    hop = _connection_tokens(raw.get("connection", ()))
    return [(name, value) for name, values in raw.items()
            if name not in _NOT_RELAYED and name not in hop for value in values]


_forwarders: Dict[int, Forwarder] = {}


def forwarder(reactor, settings: Settings) -> Forwarder:
    """The shared `Forwarder` of ``reactor`` (one connection pool per worker)."""
    key = id(reactor)
    existing = _forwarders.get(key)
    if existing is None or existing._reactor is not reactor:
        existing = _forwarders[key] = Forwarder(reactor, settings)
    return existing


def forward(request: Request, url: str, preserve_host: bool, reactor,
            settings: Settings) -> Deferred:
    """Forward ``request`` to exactly ``url``; fires with the `Response` (502 on errors)."""
    return forwarder(reactor, settings).forward(request, url, preserve_host)


def close(reactor) -> Deferred:
    """Close ``reactor``'s pooled upstream connections."""
    existing = _forwarders.pop(id(reactor), None)
    if existing is None:
        return succeed(None)
    return existing.close()
