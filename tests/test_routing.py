"""Route matching (common/routing.py) and the client address (common/client_address.py),
without a daemon: what a worker decides before anything reaches PostgreSQL."""
from __future__ import annotations

from omni_httpd.common.client_address import ForwardingTrust, connecting_ip, with_connecting_ip
from omni_httpd.common.request import Request
from omni_httpd.common.routing import Route, RouteTable
from omni_httpd.common.settings import Settings
from omni_httpd.master.tap import Options


def route(route_id, method=None, **pattern):
    return Route(route_id, "r", 1, "()", {k: str(v) for k, v in pattern.items()}, method, 1,
                 "f%d()" % route_id, 0)


def request(path, method="GET", host="example.com", query=None, scheme="http"):
    return Request(method, path, query, [("host", host)], scheme=scheme)


def test_patterns_methods_hosts_and_ports_in_order():
    table = RouteTable([route(1, "GET", pathname="/users/:id"), route(2, pathname="/users/:id(\\d+)"),
                        route(3, hostname="api.example.com"), route(4, port=8080, pathname="/p"),
                        route(5, pathname="/s", search="a=:v"), route(6, pathname="/docs{/:section}?")])
    ids = lambda req, port=80: [r.id for r in table.match(req, port)]
    assert ids(request("/users/42")) == [1, 2]
    assert ids(request("/users/bob")) == [1]
    assert ids(request("/users/42", method="POST")) == [2]
    assert ids(request("/x", host="API.example.com:8443")) == [3]
    assert ids(request("/p"), 8080) == [4] and ids(request("/p"), 8081) == []
    assert ids(request("/s", query="a=1")) == [5] and ids(request("/s")) == []
    assert ids(request("/docs")) == [6] and ids(request("/docs/intro")) == [6]


def test_a_pattern_the_library_refuses_is_skipped_not_fatal():
    table = RouteTable([route(1, pathname="/ok"), route(2, pathname="/bad/(")])
    assert [r.id for r in table.routes] == [1] and 2 in table.refused


def test_connecting_ip_replaces_what_the_client_sent():
    headers = with_connecting_ip([("omnigres-connecting-ip", "6.6.6.6"), ("x-forwarded-for", "7.7.7.7")],
                                 "192.0.2.1:5000", ForwardingTrust(False, ""))
    assert [v for n, v in headers if n == "omnigres-connecting-ip"] == ["192.0.2.1"]
    assert connecting_ip([], "[2001:db8::5]:443", ForwardingTrust(False, "")) == "2001:db8::5"


def test_trusted_proxies_name_the_client_they_report():
    trust = ForwardingTrust(False, "10.0.0.0/8")
    xff = [("x-forwarded-for", "6.6.6.6, 198.51.100.7, 10.0.0.9")]
    # From a trusted proxy: the nearest address that is not one of them.
    assert connecting_ip(xff, "10.0.0.1:1", trust) == "198.51.100.7"
    # From anyone else, the header is not believed.
    assert connecting_ip(xff, "203.0.113.3:1", trust) == "203.0.113.3"
    assert connecting_ip([("forwarded", 'for="[2001:db8::1]:80";proto=https')], "10.1.1.1:5", trust) == "2001:db8::1"
    # Garbage in the chain: nothing before it is believed.
    assert connecting_ip([("x-forwarded-for", "6.6.6.6, junk")], "10.0.0.1:1", trust) == "10.0.0.1"
    # --trust-forwarded trusts every peer.
    assert connecting_ip([("x-forwarded-for", "198.51.100.7")], "203.0.113.3:1", ForwardingTrust(True, "")) == "198.51.100.7"


def test_trusted_proxies_option():
    options = Options(environ={})
    options.parseOptions(["--trusted-proxies", "10.0.0.0/8, loopback"])
    assert options.settings.trusted_proxies == "10.0.0.0/8,loopback"
    assert Settings().trusted_proxies == ""


def test_remembered_matches_stay_right_and_bounded(monkeypatch):
    from omni_httpd.common import routing

    monkeypatch.setattr(routing, "MATCH_CACHE_SIZE", 3)
    table = RouteTable([route(1, pathname="/a/:x"), route(2, hostname="b.test")])
    for _ in range(2):
        for n in range(10):
            assert [r.id for r in table.match(request("/a/%d" % n), 80)] == [1]
            assert [r.id for r in table.match(request("/a/%d" % n, host="b.test"), 80)] == [1, 2]
            assert [r.id for r in table.match(request("/z", method="POST", host="b.test"), 80)] == [2]
    assert len(table._cache) <= 3
