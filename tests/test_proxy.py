"""proxy.forward against a real upstream (a twisted.web Site on 127.0.0.1)."""
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from omni_httpd import proxy
from omni_httpd.request import Request
from omni_httpd.settings import Settings


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


@pytest_twisted.ensureDeferred
async def test_x_forwarded_for_is_appended(upstream):
    request = make_request(headers=[("x-forwarded-for", "1.1.1.1")], peer="[::1]:4000")
    await proxy.forward(request, "http://127.0.0.1:%d/" % upstream.port, True, reactor, Settings())
    assert header_values(upstream.seen[0]["headers"], "x-forwarded-for") == ["1.1.1.1, ::1"]


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
                                 "http://bücher.example/"])
@pytest_twisted.ensureDeferred
async def test_unusable_url_is_502(url):
    result = await proxy.forward(make_request(), url, True, reactor, Settings())
    assert result.status == 502
