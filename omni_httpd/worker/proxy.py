"""The proxy outcome: forward the request to an upstream URL and relay its answer.

What is sent: the request's method, headers and body, to exactly the handler's URL.
The request's own path and query string are *not* appended: the handler builds the
target itself (``http_proxy('http://backend:9000' || request.path)``), as the reference
implementation's documentation shows; so one handler can map paths however it likes.

Targets: only ``http``/``https`` URLs naming a TCP host (DNS name or IP literal), no
user-info. Every address the name resolves to is checked against ``--proxy-allow`` /
``--proxy-deny`` *at connect time* (the resolved address is the one connected to, so a
name cannot be re-pointed between check and use); a refused target answers 502. The
daemon's own sockets: control and sibling sockets are UNIX sockets, which no accepted
URL can name; a request this daemon proxied (recognised by its ``Via`` pseudonym) is
never proxied again (508, a loop through our own listeners) and the admin console
refuses it (console.py).

Headers: hop-by-hop headers (RFC 9110 7.6.1: the fixed list below plus any named in
``Connection``) are dropped both ways. ``Host`` is the incoming one when
``preserve_host``, else the upstream's (Agent derives it from the URL). Forwarding
headers (``X-Forwarded-For/-Proto/-Host``, ``Forwarded``): with ``--trust-forwarded`` (or a peer in ``--trusted-proxies``)
the client's are kept and ours appended; without it (the default) the client's are
dropped, since anyone can send them, and only what we know ourselves is sent (peer
address, scheme, Host). ``Via`` (RFC 9110 7.6.3) is appended.

The upstream's body is read completely (at most ``settings.max_body`` bytes) before
the answer is relayed. Upstream unreachable, too slow, too big or not speaking HTTP:
502 with a plain-text body and a warning in the log.
"""
from __future__ import annotations

import ipaddress
import re
from typing import Dict, List, Optional, Tuple
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import DNSLookupError
from twisted.internet.interfaces import (IHostnameResolver, IReactorPluggableNameResolver,
                                         IResolutionReceiver)
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import HTTP11ClientProtocol
from twisted.web.client import (Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool,
                                ResponseDone, _HTTP11ClientFactory)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgentEndpointFactory, IBodyProducer
from zope.interface import implementer

from omni_httpd.common.client_address import forwarding_trust, peer_address as client_address
from omni_httpd.common.request import Request
from omni_httpd.common.response import Response, error_response
from omni_httpd.common.proxy_rules import (AddressPolicy, parse_address_rules,  # noqa: F401
                                           proxied_by_us, via_pseudonym)
from omni_httpd.common.settings import Settings

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
#: Headers in which a client (or the proxies before us) claims who it is and how it came
#: in. Without ``--trust-forwarded`` none of them is passed on: an upstream that believes
#: them would take any client's word for its address.
_FORWARDING = frozenset(["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
                         "x-forwarded-port", "x-real-ip", "forwarded"])

CONNECT_TIMEOUT = 10.0
#: The whole upstream exchange (connect, send, read the answer) must finish within this.
TIMEOUT = 60.0


#: At most this many host names' refused addresses are kept for the log line.
_REFUSED_KEPT = 256


@implementer(IResolutionReceiver)
class _CheckedReceiver:
    """Passes on only the resolved addresses the policy allows; notes the others in
    ``refused[host]`` (read by the failure's log line)."""

    def __init__(self, receiver, policy: AddressPolicy, host: str, refused: Dict[str, List[str]]):
        self._receiver = receiver
        self._policy = policy
        self._host = host
        self._refused = refused
        self._addresses: List[str] = []

    def resolutionBegan(self, resolution) -> None:
        self._receiver.resolutionBegan(resolution)

    def addressResolved(self, address) -> None:
        if self._policy.allows(address.host):
            self._receiver.addressResolved(address)
        else:
            self._addresses.append(address.host)

    def resolutionComplete(self) -> None:
        self._refused.pop(self._host, None)
        if self._addresses:
            if len(self._refused) >= _REFUSED_KEPT:
                self._refused.clear()        # handler-chosen names must not pile up
            self._refused[self._host] = self._addresses
        self._receiver.resolutionComplete()


@implementer(IHostnameResolver)
class _CheckedResolver:
    def __init__(self, resolver, policy: AddressPolicy, refused: Dict[str, List[str]]):
        self._resolver = resolver
        self._policy = policy
        self._refused = refused

    def resolveHostName(self, resolutionReceiver, hostName, portNumber=0, addressTypes=None,
                        transportSemantics="TCP"):
        return self._resolver.resolveHostName(
            _CheckedReceiver(resolutionReceiver, self._policy, hostName.lower(), self._refused),
            hostName, portNumber, addressTypes, transportSemantics)


@implementer(IReactorPluggableNameResolver)
class _CheckedReactor:
    """The reactor, but names resolve through the policy check (for HostnameEndpoint)."""

    def __init__(self, reactor, resolver):
        self._reactor = reactor
        self.nameResolver = resolver

    def installNameResolver(self, resolver):
        raise NotImplementedError("the proxy's resolver is fixed")

    def __getattr__(self, name):
        return getattr(self._reactor, name)


@implementer(IAgentEndpointFactory)
class _EndpointFactory:
    """TCP (TLS for https) to the checked addresses of the URL's host."""

    def __init__(self, reactor, connect_timeout: float):
        self._reactor = reactor
        self._timeout = connect_timeout
        self._tls = BrowserLikePolicyForHTTPS()

    def endpointForURI(self, uri):
        host = uri.host.decode("ascii")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        endpoint = HostnameEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
        if uri.scheme == b"https":
            return wrapClientTLS(self._tls.creatorForNetloc(host.encode("ascii"), uri.port),
                                 endpoint)
        return endpoint


# -- the upstream's connection-control headers ----------------------------------------

class _ClientProtocol(HTTP11ClientProtocol):
    """Keeps the upstream response's ``Connection`` header for us.

    twisted.web's client files ``Connection`` (and the other connection-control headers)
    away from ``response.headers``, so without this the names it lists could not be
    dropped and would reach the client.
    """

    def request(self, request):
        d = super().request(request)
        parser = self._parser
        if parser is not None:
            def remember(response):
                response.omni_connection = parser.connHeaders.getRawHeaders(b"connection", [])
                return response
            d.addCallback(remember)
        return d


class _ClientFactory(_HTTP11ClientFactory):
    def buildProtocol(self, addr):
        return _ClientProtocol(self._quiescentCallback)


class _Pool(HTTPConnectionPool):
    _factory = _ClientFactory


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


class TargetRefused(Exception):
    """The URL is not one a proxy outcome may use (str(): why, for the log)."""


def loop_detected() -> Response:
    return error_response(508, "Loop detected")


class Forwarder:
    """Forwards requests with one shared, persistent `HTTPConnectionPool`."""

    def __init__(self, reactor, settings: Settings, connect_timeout: float = CONNECT_TIMEOUT,
                 timeout: float = TIMEOUT):
        self._reactor = reactor
        self._settings = settings
        self._timeout = timeout
        self.policy = AddressPolicy(settings.proxy_allow, settings.proxy_deny)
        #: host name -> the addresses it resolved to that the policy refused (last lookup)
        self._refused: Dict[str, List[str]] = {}
        checked = _CheckedReactor(reactor, _CheckedResolver(reactor.nameResolver, self.policy,
                                                            self._refused))
        self.pool = _Pool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 8
        self.pool.cachedConnectionTimeout = 60
        self._agent = Agent.usingEndpointFactory(
            reactor, _EndpointFactory(checked, connect_timeout), pool=self.pool)

    def forward(self, request: Request, url: str, preserve_host: bool = True) -> Deferred:
        """Fires with the upstream's `Response`, or a 502 one; never fails."""
        try:
            target = check_url(url)
        except TargetRefused as exc:
            log.warn("cannot proxy {method} {path} to {url!r}: {error}",
                     method=request.method, path=request.path, url=url, error=str(exc))
            return succeed(bad_gateway())
        if proxied_by_us(request.headers, self._settings):
            log.warn("not proxying {method} {path} to {url}: this daemon already proxied the "
                     "request (its Via header says so), so this is a loop",
                     method=request.method, path=request.path, url=url)
            return succeed(loop_detected())
        producer = None
        if request.body or request.method in _BODY_METHODS:
            producer = _BytesProducer(request.body)
        headers = outgoing_headers(request, preserve_host, self._settings)
        d = self._agent.request(request.method.encode("ascii"), target, headers, producer)
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
        headers = relayed_headers(upstream.headers, getattr(upstream, "omni_connection", ()))
        status = upstream.code

        def build(body: bytes) -> Response:
            if method == "HEAD" or status in (204, 304) or status < 200:
                # No body, and no Content-Length we could vouch for.
                return Response(status=status, headers=headers, body=None)
            return Response(status=status, headers=headers, body=body)

        return finished.addCallback(build)

    def _failed(self, failure: Failure, request: Request, url: str) -> Response:
        error = _describe(failure)
        if failure.check(DNSLookupError):
            host = (urlsplit(url).hostname or "").lower()
            refused = self._refused.pop(host, None)
            if refused:
                error = ("%s resolves only to addresses the proxy may not connect to (%s); "
                         "see --proxy-allow / --proxy-deny" % (host, ", ".join(refused)))
        log.warn("proxying {method} {path} to {url} failed: {error}",
                 method=request.method, path=request.path, url=url, error=error)
        return bad_gateway()


#: A host as a URL may name it for the proxy: a DNS name (letters, digits, ``-``, ``_``,
#: dots) or an IP literal; anything else (``%2F``-encoded paths, spaces) is refused.
_HOST_NAME = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?"
                        r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?)*\.?$")


def check_url(url: str) -> bytes:
    """The URL as Agent takes it, or TargetRefused saying why it is not a usable target.

    Only http(s) to a TCP host: no ``unix:``, ``http+unix:``, ``file:`` or other scheme
    can reach a socket by path, which is where the daemon's control, sibling and
    embedded-PostgreSQL sockets live.
    """
    try:
        url.encode("ascii")
    except UnicodeEncodeError:
        raise TargetRefused("URL is not ASCII (percent-encode it, use punycode for names)") from None
    try:
        parts = urlsplit(url)
    except ValueError as exc:       # e.g. a bracketed host that is not IPv6
        raise TargetRefused("not a valid URL (%s)" % exc) from None
    if parts.scheme.lower() not in ("http", "https"):
        raise TargetRefused("only http:// and https:// URLs can be proxied to")
    if "@" in parts.netloc:
        raise TargetRefused("user-info (user@host) in a proxy URL is not supported")
    host = parts.hostname
    if not host:
        raise TargetRefused("the URL names no host")
    try:
        port = parts.port
    except ValueError:
        raise TargetRefused("the URL's port is not a number between 0 and 65535") from None
    if port == 0:
        raise TargetRefused("port 0 cannot be connected to")
    if parts.netloc.startswith("["):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise TargetRefused("%r is not an IPv6 address" % host) from None
    elif not _HOST_NAME.match(host):
        raise TargetRefused("%r is not a host name or IP address" % host)
    return url.encode("ascii")


def _describe(failure: Failure) -> str:
    reasons = getattr(failure.value, "reasons", None)   # ResponseFailed & co. wrap others
    if reasons:
        return "; ".join(r.getErrorMessage() for r in reasons)
    return "%s: %s" % (failure.type.__name__, failure.getErrorMessage())


def _connection_tokens(values) -> set:
    return {token.strip().lower() for value in values for token in value.split(",")}


_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def _forwarded_value(value: str) -> str:
    """A value in ``Forwarded`` (RFC 7239 4): a token as is, else a quoted-string."""
    if _TOKEN.match(value):
        return value
    return '"%s"' % value.replace("\\", "\\\\").replace('"', '\\"')


def forwarded_element(client: Optional[str], scheme: str, host: Optional[str]) -> str:
    """Our ``Forwarded`` element: ``for=...;proto=...;host=...`` (IPv6 ``for="[...]"``)."""
    if client is None:
        node = "unknown"
    elif ":" in client:
        node = '"[%s]"' % client                 # RFC 7239 6: brackets, so quoted
    else:
        node = client
    parts = ["for=" + node, "proto=" + _forwarded_value(scheme)]
    if host:
        parts.append("host=" + _forwarded_value(host))
    return ";".join(parts)


def outgoing_headers(request: Request, preserve_host: bool,
                     settings: Optional[Settings] = None) -> Headers:
    """The request's headers as sent upstream (see the module docstring)."""
    if settings is None:
        settings = Settings()
    trust = forwarding_trust(settings).trusts(client_address(request.peer))
    hop = _connection_tokens(v for n, v in request.headers if n.lower() == "connection")
    headers = Headers()
    claimed: Dict[str, List[str]] = {}          # forwarding headers the client sent
    vias: List[str] = []
    for name, value in request.headers:
        name = name.lower()
        if name in _NOT_FORWARDED or name in hop or name.startswith(":"):
            continue
        if name in _FORWARDING:
            claimed.setdefault(name, []).append(value)
            continue
        if name == "via":
            vias.append(value)
            continue
        headers.addRawHeader(name.encode("latin-1"), value.encode("latin-1"))
    if not trust:
        claimed = {}
    host = request.header("host")
    if preserve_host and host is not None:
        headers.addRawHeader(b"host", host.encode("latin-1"))
        # Without one (HTTP/1.0 request), Agent sends the upstream's.
    client = client_address(request.peer)

    def send(name: str, value: str) -> None:
        headers.addRawHeader(name.encode("latin-1"), value.encode("latin-1"))

    # X-Forwarded-For: a comma-separated list of bare addresses (no brackets, no port),
    # the nearest proxy's peer last.
    chain = [", ".join(claimed["x-forwarded-for"])] if "x-forwarded-for" in claimed else []
    if client:
        chain.append(client)
    if chain:
        send("x-forwarded-for", ", ".join(chain))
    # Proto and Host describe the original request: a trusted front proxy knows it
    # better than we do (it may have terminated TLS), so its first value is kept.
    send("x-forwarded-proto", claimed.get("x-forwarded-proto", [request.scheme])[0])
    forwarded_host = claimed.get("x-forwarded-host", [host])[0]
    if forwarded_host:
        send("x-forwarded-host", forwarded_host)
    for name in ("x-forwarded-port", "x-real-ip"):
        for value in claimed.get(name, ()):
            send(name, value)
    send("forwarded", ", ".join(claimed.get("forwarded", [])
                                + [forwarded_element(client, request.scheme, host)]))
    # Via (RFC 9110 7.6.3): also how a request we proxied is recognised when it comes
    # back to us (a loop, or the admin console).
    version = "2" if request.http_version == "2" else request.http_version or "1.1"
    send("via", ", ".join(vias + ["%s %s" % (version, via_pseudonym(settings))]))
    return headers


def relayed_headers(upstream: Headers, connection=()) -> List[Tuple[str, str]]:
    """The upstream's response headers as relayed to the client, names lower-cased.

    ``connection``: the values of the upstream's ``Connection`` header (twisted.web keeps
    them apart from ``upstream``); every header they name is hop-by-hop too.
    """
    raw: Dict[str, List[str]] = {}
    for name, values in upstream.getAllRawHeaders():
        raw.setdefault(name.decode("latin-1").lower(), []).extend(
            v.decode("latin-1") for v in values)
    listed = [v.decode("latin-1") if isinstance(v, bytes) else v for v in connection]
    hop = _connection_tokens(list(raw.get("connection", ())) + listed)
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
