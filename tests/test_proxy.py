"""The proxy outcome: proxy.forward against a real upstream (a twisted.web Site on
127.0.0.1), then the real daemon (twistd, workers, admin console) against upstreams that
live in this process."""
import contextlib

import pytest
import pytest_twisted
import treq
from twisted.internet import protocol, reactor, threads
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from omni_httpd.worker import proxy
from omni_httpd.common.request import Request
from omni_httpd.common.settings import Settings
from conftest import _drop_database, create_database, dsn_for
from daemon_support import Daemon, add_listener, effective_port, send_and_read, sql, wait_reloads


class Upstream(Resource):
    isLeaf = True

    def __init__(self):
        super().__init__()
        self.seen = []
        self.body = b"upstream body"
        self.hang = False

    def render(self, request):
        self.seen.append({
            "method": request.method.decode(),
            "uri": request.uri.decode(),
            "headers": [(n.decode().lower(), v.decode())
                        for n, vs in request.requestHeaders.getAllRawHeaders() for v in vs],
            "body": request.content.read(),
        })
        if self.hang:
            return NOT_DONE_YET
        request.setResponseCode(201)
        request.responseHeaders.addRawHeader(b"x-upstream", b"one")
        request.responseHeaders.addRawHeader(b"x-upstream", b"two")
        request.responseHeaders.addRawHeader(b"keep-alive", b"timeout=5")
        request.responseHeaders.addRawHeader(b"trailer", b"x-nothing")
        return self.body


@pytest.fixture
def upstream():
    resource = Upstream()
    site = Site(resource)
    site.log = lambda request: None
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    resource.port = port.getHost().port
    yield resource
    pytest_twisted.blockon(proxy.close(reactor))
    pytest_twisted.blockon(port.stopListening())


def header_values(headers, name):
    return [v for n, v in headers if n == name]


def make_request(**kwargs):
    fields = dict(method="POST", path="/client/path", query_string="a=1",
                  headers=[("host", "public.example:8080"), ("content-type", "text/plain"),
                           ("x-custom", "1"), ("x-custom", "2"),
                           ("connection", "keep-alive, x-hop"), ("x-hop", "secret"),
                           ("keep-alive", "timeout=5"), ("te", "trailers"),
                           ("proxy-authorization", "Basic eA=="), ("content-length", "4")],
                  body=b"ping", peer="10.1.2.3:5555", scheme="https")
    fields.update(kwargs)
    return Request(**fields)


@pytest_twisted.ensureDeferred
async def test_forwards_method_headers_body_to_exactly_the_url(upstream):
    url = "http://127.0.0.1:%d/target?x=1" % upstream.port
    result = await proxy.forward(make_request(), url, True, reactor, Settings())

    (seen,) = upstream.seen
    assert seen["method"] == "POST"
    assert seen["uri"] == "/target?x=1"          # the client's path is not appended
    assert seen["body"] == b"ping"
    sent = seen["headers"]
    assert header_values(sent, "host") == ["public.example:8080"]
    assert header_values(sent, "x-custom") == ["1", "2"]
    assert header_values(sent, "content-type") == ["text/plain"]
    assert header_values(sent, "content-length") == ["4"]
    for hop in ("x-hop", "keep-alive", "te", "proxy-authorization"):
        assert header_values(sent, hop) == [], hop
    assert header_values(sent, "connection") in ([], ["close"])  # Agent's own, if any
    assert header_values(sent, "x-forwarded-for") == ["10.1.2.3"]
    assert header_values(sent, "x-forwarded-proto") == ["https"]

    assert result.status == 201
    assert result.body == b"upstream body"
    assert header_values(result.headers, "x-upstream") == ["one", "two"]
    for name in ("keep-alive", "trailer", "connection", "content-length", "transfer-encoding"):
        assert header_values(result.headers, name) == [], name


@pytest_twisted.ensureDeferred
async def test_host_of_the_upstream_unless_preserved(upstream):
    url = "http://127.0.0.1:%d/" % upstream.port
    await proxy.forward(make_request(method="GET", body=b""), url, False, reactor, Settings())
    assert header_values(upstream.seen[0]["headers"], "host") == ["127.0.0.1:%d" % upstream.port]
    assert upstream.seen[0]["method"] == "GET"
    assert upstream.seen[0]["body"] == b""


CLAIMS = [("x-forwarded-for", "1.1.1.1"), ("x-forwarded-proto", "https"),
          ("x-forwarded-host", "claimed.example"), ("forwarded", "for=1.1.1.1"),
          ("x-real-ip", "1.1.1.1"), ("host", "public.example")]


@pytest_twisted.ensureDeferred
async def test_client_forwarding_headers_are_replaced_by_default(upstream):
    request = make_request(headers=CLAIMS, peer="[::1]:4000", scheme="http")
    await proxy.forward(request, "http://127.0.0.1:%d/" % upstream.port, True, reactor, Settings())
    sent = upstream.seen[0]["headers"]
    assert header_values(sent, "x-forwarded-for") == ["::1"]        # no brackets
    assert header_values(sent, "x-forwarded-proto") == ["http"]
    assert header_values(sent, "x-forwarded-host") == ["public.example"]
    assert header_values(sent, "forwarded") == ['for="[::1]";proto=http;host=public.example']
    assert header_values(sent, "x-real-ip") == []


@pytest_twisted.ensureDeferred
async def test_client_forwarding_headers_are_appended_when_trusted(upstream):
    request = make_request(headers=CLAIMS, peer="[::1]:4000", scheme="http")
    await proxy.forward(request, "http://127.0.0.1:%d/" % upstream.port, True, reactor,
                        Settings(trust_forwarded=True))
    sent = upstream.seen[0]["headers"]
    assert header_values(sent, "x-forwarded-for") == ["1.1.1.1, ::1"]
    assert header_values(sent, "x-forwarded-proto") == ["https"]     # the front proxy knew
    assert header_values(sent, "x-forwarded-host") == ["claimed.example"]
    assert header_values(sent, "forwarded") == [
        'for=1.1.1.1, for="[::1]";proto=http;host=public.example']
    assert header_values(sent, "x-real-ip") == ["1.1.1.1"]


def test_forwarded_element_quotes_what_is_not_a_token():
    assert proxy.forwarded_element("10.0.0.1", "https", "a.example:8080") == \
        'for=10.0.0.1;proto=https;host="a.example:8080"'
    assert proxy.forwarded_element("2001:db8::1", "http", 'x"y\\') == \
        'for="[2001:db8::1]";proto=http;host="x\\"y\\\\"'
    assert proxy.forwarded_element(None, "http", None) == "for=unknown;proto=http"


@pytest.mark.parametrize("peer, address", [
    ("10.1.2.3:5555", "10.1.2.3"), ("[::1]:4000", "::1"), ("[::ffff:10.0.0.1]:1", "10.0.0.1"),
    ("/run/some.sock", None), ("", None)])
def test_client_address(peer, address):
    assert proxy.client_address(peer) == address


def test_upstream_connection_header_names_are_not_relayed():
    from twisted.web.http_headers import Headers
    headers = Headers({b"x-secret": [b"s"], b"x-kept": [b"k"], b"x-other": [b"o"]})
    assert proxy.relayed_headers(headers, [b"close, X-Secret", b"x-other"]) == [("x-kept", "k")]


@pytest_twisted.ensureDeferred
async def test_head_has_no_body(upstream):
    result = await proxy.forward(make_request(method="HEAD", body=b""),
                                 "http://127.0.0.1:%d/" % upstream.port, True, reactor, Settings())
    assert result.status == 201 and result.body is None


@pytest_twisted.ensureDeferred
async def test_connections_are_reused(upstream):
    url = "http://127.0.0.1:%d/" % upstream.port
    for _ in range(3):
        result = await proxy.forward(make_request(method="GET", body=b""), url, True, reactor, Settings())
        assert result.status == 201
    assert len(upstream.seen) == 3


@pytest_twisted.ensureDeferred
async def test_upstream_down_is_502():
    port = reactor.listenTCP(0, Site(Resource()), interface="127.0.0.1")
    number = port.getHost().port
    await port.stopListening()
    result = await proxy.forward(make_request(), "http://127.0.0.1:%d/" % number, True,
                                 reactor, Settings())
    await proxy.close(reactor)
    assert result.status == 502
    assert result.body == b"Bad gateway"
    assert ("content-type", "text/plain; charset=utf-8") in result.headers


@pytest_twisted.ensureDeferred
async def test_upstream_body_too_large_is_502(upstream):
    upstream.body = b"x" * 1000
    result = await proxy.forward(make_request(), "http://127.0.0.1:%d/" % upstream.port, True,
                                 reactor, Settings(max_body=999))
    assert result.status == 502


@pytest_twisted.ensureDeferred
async def test_upstream_timeout_is_502(upstream):
    upstream.hang = True
    forwarder = proxy.Forwarder(reactor, Settings(), timeout=0.3)
    result = await forwarder.forward(make_request(), "http://127.0.0.1:%d/" % upstream.port, True)
    await forwarder.close()
    assert result.status == 502
    assert len(upstream.seen) == 1


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/", "not a url", "http:///nohost",
                                 "http://bücher.example/", "unix:/run/omni_httpd/worker-0.sock",
                                 "http+unix://%2Frun%2Fomni_httpd%2Fworker-0.sock/",
                                 "file:///etc/passwd", "http://user:pw@127.0.0.1/",
                                 "http://127.0.0.1:99999/", "http://127.0.0.1:0/",
                                 "http://%2Frun%2Fx.sock/", "http://[not-v6]/"])
@pytest_twisted.ensureDeferred
async def test_unusable_url_is_502(url):
    result = await proxy.forward(make_request(), url, True, reactor, Settings())
    assert result.status == 502


def test_accepted_urls():
    for url in ["http://127.0.0.1:8000/x?y=1", "https://backend.example/", "http://[::1]:81/",
                "HTTP://Backend_1.internal./"]:
        assert proxy.check_url(url) == url.encode()


@pytest.mark.parametrize("allow, deny, address, allowed", [
    ("any", "", "127.0.0.1", True),
    ("any", "loopback", "127.0.0.1", False),
    ("any", "loopback", "::ffff:127.0.0.1", False),     # mapped: judged as IPv4
    ("any", "loopback", "0.0.0.0", False),              # reaches the local host too
    ("any", "loopback", "::", False),
    ("any", "loopback,link-local", "169.254.169.254", False),
    ("any", "loopback", "10.0.0.1", True),
    ("10.0.0.0/8", "", "10.9.9.9", True),
    ("10.0.0.0/8", "", "11.0.0.1", False),
    ("10.0.0.0/8,::1", "", "::1", True),
    ("private", "", "192.168.1.1", True),
    ("private", "", "127.0.0.1", False),
    ("private", "10.0.0.5", "10.0.0.5", False),
])
def test_address_policy(allow, deny, address, allowed):
    assert proxy.AddressPolicy(allow, deny).allows(address) is allowed


def test_address_rules_are_checked():
    assert proxy.parse_address_rules(" Loopback, 10.1.2.3 ,fe80::/10") == [
        "loopback", "10.1.2.3/32", "fe80::/10"]
    with pytest.raises(ValueError, match="neither an address"):
        proxy.parse_address_rules("localhost")


# --- the real daemon: twistd, its workers and console, an upstream in this process -------

ADMIN_PASSWORD = "proxy test password"


class RawUpstream(protocol.Protocol):
    """Reads one request (head, then a Content-Length body), answers ``factory.answer``
    exactly as given (no framework adding or removing headers), closes."""

    def connectionMade(self):
        self.buffer = b""

    def dataReceived(self, data):
        self.buffer += data
        head, sep, body = self.buffer.partition(b"\r\n\r\n")
        if not sep:
            return
        lines = head.decode("latin-1").split("\r\n")
        headers = [(n.strip().lower(), v.strip()) for n, _, v in
                   (line.partition(":") for line in lines[1:])]
        length = int(dict(headers).get("content-length", "0"))
        if len(body) < length:
            return
        self.factory.seen.append({"request_line": lines[0], "headers": headers})
        self.transport.write(self.factory.answer)
        self.transport.loseConnection()


def raw_upstream(interface="127.0.0.1", answer=b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"):
    factory = protocol.Factory.forProtocol(RawUpstream)
    factory.seen = []
    factory.answer = answer
    port = reactor.listenTCP(0, factory, interface=interface)
    factory.url = "http://%s:%d" % (interface, port.getHost().port)
    return factory, port


class Served:
    def __init__(self, dsn, daemon):
        self.dsn = dsn
        self.daemon = daemon
        self.admin_url = daemon.wait_for(
            r"admin console listening on (http://127\.0\.0\.1:\d+)/").group(1)

    def serve(self, query, address="127.0.0.1"):
        """A new listener serving ``query``; its base URL once every worker serves it."""
        listener_id = add_listener(self.dsn, query, address=address)
        wait_reloads(self.dsn, 1)
        host = "[%s]" % address if ":" in address else address
        return "http://%s:%d" % (host, effective_port(self.dsn, listener_id)), listener_id

    def proxy_to(self, url, address="127.0.0.1"):
        return self.serve("SELECT omni_httpd.http_proxy(%s) FROM request"
                          % sql_literal(url), address)[0]


def sql_literal(text):
    return "'" + text.replace("'", "''") + "'"


@contextlib.contextmanager
def running_daemon(pg_cluster, data_dir, *args):
    name = create_database(pg_cluster, "t_proxy")
    dsn = dsn_for(pg_cluster, name)
    daemon = Daemon(dsn, "--http-workers", "1", "--no-init", "--data-dir", str(data_dir),
                    "--admin", "tcp:0:interface=127.0.0.1", *args,
                    env={"OMNI_HTTPD_ADMIN_PASSWORD": ADMIN_PASSWORD})
    try:
        daemon.wait_ready()
        wait_reloads(dsn, 1)   # the start-up's own record
        yield Served(dsn, daemon)
    finally:
        code = daemon.stop()
        _drop_database(pg_cluster, name)
    assert code == 0, daemon.output[-3000:]


@pytest.fixture(scope="module")
def daemon(pg_cluster, tmp_path_factory):
    """Default settings: client forwarding headers not trusted, any target address."""
    with running_daemon(pg_cluster, tmp_path_factory.mktemp("proxy_default")) as served:
        yield served


@pytest.fixture(scope="module")
def trusting_daemon(pg_cluster, tmp_path_factory):
    with running_daemon(pg_cluster, tmp_path_factory.mktemp("proxy_trusting"),
                        "--trust-forwarded", "--proxy-allow", "127.0.0.1") as served:
        yield served


def raw_exchange(host, port, data: bytes, timeout=20.0) -> bytes:
    """Blocking: send ``data``, read until the server closes. Run it in a thread (the
    upstream lives on this process's reactor)."""
    return send_and_read(port, data, host=host, timeout=timeout)


def response_headers(reply: bytes):
    head = reply.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    return head[0], [(n.strip().lower(), v.strip()) for n, _, v in
                     (line.partition(":") for line in head[1:])]


def names(headers):
    return {name for name, _ in headers}


@pytest_twisted.ensureDeferred
async def test_headers_named_in_connection_are_dropped_both_ways(daemon):
    upstream, port = raw_upstream(answer=(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close, X-Secret\r\n"
        b"X-Secret: upstream-internal\r\nX-Kept: yes\r\n\r\nok"))
    try:
        base = daemon.proxy_to(upstream.url + "/up")
        listener_port = int(base.rsplit(":", 1)[1])
        reply = await threads.deferToThread(
            raw_exchange, "127.0.0.1", listener_port,
            b"GET /x HTTP/1.1\r\nHost: front.example\r\nConnection: close, X-Client-Hop\r\n"
            b"X-Client-Hop: client-internal\r\nX-Other: passed\r\n\r\n")
        status, headers = response_headers(reply)
        assert status == "HTTP/1.1 200 OK", reply
        assert reply.endswith(b"\r\n\r\nok")
        assert ("x-kept", "yes") in headers
        assert "x-secret" not in names(headers), headers
        (seen,) = upstream.seen
        assert ("x-other", "passed") in seen["headers"]
        assert "x-client-hop" not in names(seen["headers"]), seen["headers"]
    finally:
        await port.stopListening()


CLIENT_CLAIMS = (b"X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\n"
                 b"X-Forwarded-Host: claimed.example\r\nForwarded: for=6.6.6.6;proto=https\r\n"
                 b"X-Real-IP: 6.6.6.6\r\n")


async def claims_seen_upstream(served, address):
    upstream, port = raw_upstream()
    try:
        base = served.proxy_to(upstream.url + "/up", address=address)
        listener_port = int(base.rsplit(":", 1)[1])
        reply = await threads.deferToThread(
            raw_exchange, address, listener_port,
            b"GET / HTTP/1.1\r\nHost: front.example:8080\r\nConnection: close\r\n"
            + CLIENT_CLAIMS + b"\r\n")
        assert reply.startswith(b"HTTP/1.1 200"), reply
        (seen,) = upstream.seen
        return {name: [v for n, v in seen["headers"] if n == name] for name in
                ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded",
                 "x-real-ip")}
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_client_forwarding_claims_are_replaced_by_default(daemon):
    assert await claims_seen_upstream(daemon, "127.0.0.1") == {
        "x-forwarded-for": ["127.0.0.1"],
        "x-forwarded-proto": ["http"],
        "x-forwarded-host": ["front.example:8080"],
        "forwarded": ['for=127.0.0.1;proto=http;host="front.example:8080"'],
        "x-real-ip": [],
    }


@pytest_twisted.ensureDeferred
async def test_an_ipv6_client_is_written_as_the_formats_want(daemon):
    seen = await claims_seen_upstream(daemon, "::1")
    assert seen["x-forwarded-for"] == ["::1"]
    assert seen["forwarded"] == ['for="[::1]";proto=http;host="front.example:8080"']


@pytest_twisted.ensureDeferred
async def test_client_forwarding_claims_are_appended_when_trusted(trusting_daemon):
    assert await claims_seen_upstream(trusting_daemon, "127.0.0.1") == {
        "x-forwarded-for": ["6.6.6.6, 127.0.0.1"],
        "x-forwarded-proto": ["https"],
        "x-forwarded-host": ["claimed.example"],
        "forwarded": ['for=6.6.6.6;proto=https, for=127.0.0.1;proto=http;'
                      'host="front.example:8080"'],
        "x-real-ip": ["6.6.6.6"],
    }


@pytest_twisted.ensureDeferred
async def test_a_handler_cannot_proxy_to_the_daemons_own_console(daemon):
    mark = daemon.daemon.mark()
    base = daemon.proxy_to(daemon.admin_url + "/login")
    response = await treq.get(base + "/", persistent=False)
    body = (await treq.content(response)).decode()
    assert response.code == 403, body
    assert "proxied by this daemon's own handlers" in body
    assert "password" not in body.lower()
    daemon.daemon.wait_for(r"admin console: refused a request proxied by one of this "
                           r"daemon's handlers", start=mark)


@pytest_twisted.ensureDeferred
async def test_a_handler_proxying_to_its_own_listener_is_a_loop_not_a_storm(daemon):
    base, listener_id = daemon.serve("SELECT omni_httpd.http_response('placeholder') FROM request")
    mark = daemon.daemon.mark()
    sql(daemon.dsn, "UPDATE omni_httpd.handlers SET query = %s WHERE id = (SELECT handler_id "
        "FROM omni_httpd.listeners_handlers WHERE listener_id = %s)",
        ("SELECT omni_httpd.http_proxy('%s/again') FROM request" % base, listener_id))
    wait_reloads(daemon.dsn, 1)
    response = await treq.get(base + "/", persistent=False, timeout=15)
    assert response.code == 508
    assert await treq.content(response) == b"Loop detected"
    daemon.daemon.wait_for(r"already proxied the request .* a loop", start=mark)
    # exactly one hop was made: the first request forwarded once, the second refused
    log = daemon.daemon.output.splitlines()[mark:]
    assert len([line for line in log if "a loop" in line]) == 1


@pytest.mark.parametrize("url", ["unix:/tmp/omni.sock", "http+unix://%2Ftmp%2Fomni.sock/",
                                 "file:///etc/passwd", "http://%2Ftmp%2Fomni.sock/"])
@pytest_twisted.ensureDeferred
async def test_targets_that_are_not_http_to_a_tcp_host_are_refused(daemon, url):
    mark = daemon.daemon.mark()
    base = daemon.proxy_to(url)
    response = await treq.get(base + "/", persistent=False)
    assert response.code == 502
    assert await treq.content(response) == b"Bad gateway"
    daemon.daemon.wait_for(r"cannot proxy GET / to .*(only http:// and https://|not a host name)",
                           start=mark)


@pytest_twisted.ensureDeferred
async def test_proxy_allow_is_checked_on_the_address_connected_to(trusting_daemon):
    """--proxy-allow 127.0.0.1: 127.0.0.2 is refused although it listens; the name
    localhost is judged by what it resolves to (127.0.0.1 here), not by its spelling."""
    refused, refused_port = raw_upstream(interface="127.0.0.2")
    allowed, allowed_port = raw_upstream(interface="127.0.0.1")
    try:
        mark = trusting_daemon.daemon.mark()
        base = trusting_daemon.proxy_to(refused.url + "/")
        response = await treq.get(base + "/", persistent=False)
        assert response.code == 502
        assert refused.seen == []
        trusting_daemon.daemon.wait_for(
            r"127\.0\.0\.2 resolves only to addresses the proxy may not connect to "
            r"\(127\.0\.0\.2\); see --proxy-allow", start=mark)

        by_name = allowed.url.replace("127.0.0.1", "localhost")
        base = trusting_daemon.proxy_to(by_name + "/")
        response = await treq.get(base + "/", persistent=False)
        assert response.code == 200
        assert await treq.content(response) == b"ok"
        assert len(allowed.seen) == 1
    finally:
        await refused_port.stopListening()
        await allowed_port.stopListening()
