"""The three workloads: what is requested, what every target must answer, the SQL behind it."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, Optional

W1_HANDLER = (
    "SELECT omni_httpd.http_response("
    "headers => array[omni_http.http_header('content-type', 'text/html')], "
    "body => 'Hello, <b>' || users.name || '</b>!') "
    "FROM request INNER JOIN users "
    "ON string_to_array(request.path, '/', '') = array[NULL, 'users', users.handle]"
)
# W1 written as a route (docs/sql-api.md, "Routes"): the same request and answer, served
# by a function a urlpattern_router row names, on a listener without a handler. PL/pgSQL,
# as the daemon runs handler queries: it keeps the statement's plan for the session,
# where PostgreSQL before 18 plans a LANGUAGE sql function's query (one with a FROM, which
# it cannot inline) again on every call (measured: twice the PostgreSQL time per request).
W1_ROUTE = """
CREATE OR REPLACE FUNCTION public.bench_w1(request omni_httpd.http_request)
RETURNS omni_httpd.http_outcome LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT omni_httpd.http_response(
                headers => array[omni_http.http_header('content-type', 'text/html')],
                body => 'Hello, <b>' || users.name || '</b>!')
            FROM users WHERE users.handle = split_part(request.path, '/', 3));
END
$$;
DELETE FROM omni_httpd.urlpattern_router WHERE handler = 'public.bench_w1(omni_httpd.http_request)'::regprocedure;
INSERT INTO omni_httpd.urlpattern_router (match, handler)
VALUES (omni_httpd.urlpattern('/users/:handle', method => 'GET'), 'public.bench_w1(omni_httpd.http_request)');
"""
W2_HANDLER = "SELECT omni_httpd.http_response(convert_from(request.body, 'UTF8')::jsonb) FROM request"
W3_HANDLER = "SELECT omni_httpd.http_response(repeat('x', 262144)) FROM request"

W3_SIZE = 262144
W4_SIZE = 16384
#: W4 is served from this file by the daemon's static files (--static-root bench=DIR,
#: an omni_httpd.static_files row for /static) and by nginx's static module: no SQL.
W4_NAME = "style.css"


def w4_file() -> bytes:
    """A deterministic 16 KiB stylesheet."""
    rule = b".c%04d { color: #%06x; margin: 0 auto; }\n"
    out = b"".join(rule % (i, (i * 2654435761) & 0xFFFFFF) for i in range(W4_SIZE // 30 + 1))
    return out[:W4_SIZE - 1] + b"\n"


def w2_payload() -> bytes:
    """A deterministic JSON document of exactly 4096 bytes (no quote, backslash or dollar
    characters inside strings, so it can also be written into an nginx `return`)."""
    items = [{"id": i, "name": "item-%03d" % i, "tags": ["alpha", "beta", "gamma"],
              "price": round(1.25 * i, 2), "active": i % 2 == 0} for i in range(30)]
    doc = {"order": 12345, "customer": {"id": 7, "name": "John Doe"}, "items": items, "pad": ""}
    base = len(json.dumps(doc, separators=(",", ":")).encode())
    if base > 4096:
        raise AssertionError("W2 payload base exceeds 4 KiB")
    doc["pad"] = "p" * (4096 - base)
    data = json.dumps(doc, separators=(",", ":")).encode()
    assert len(data) == 4096
    return data


@dataclass
class Workload:
    name: str
    title: str
    method: str
    path: str  # the path peers and nginx route on; the daemon serves each workload on its own listener
    body: Optional[bytes]
    request_content_type: Optional[str]
    handler: str
    response_type: str  # expected media type (before any ';')
    check_body: Callable[[bytes], Optional[str]]
    #: the daemon serves it through routes: this SQL makes them (handler: the same work as
    #: a handler query, for pgbench and the peers)
    route_sql: Optional[str] = None

    def check(self, status: int, content_type: Optional[str], body: bytes) -> Optional[str]:
        """None when the response is right, else a one-line reason."""
        if status != 200:
            return "status %d (expected 200), body %r" % (status, body[:120])
        media = (content_type or "").split(";")[0].strip().lower()
        if media != self.response_type:
            return "content type %r (expected %s)" % (content_type, self.response_type)
        return self.check_body(body)

    @property
    def static_file(self) -> Optional[bytes]:
        """The file a static-file workload serves (from disk, no SQL: only the daemon
        and nginx serve it), else None."""
        return w4_file() if self.name == "W4" else None


def _check_w1(body: bytes) -> Optional[str]:
    expected = b"Hello, <b>John</b>!"
    return None if body == expected else "body %r (expected %r)" % (body[:120], expected)


def _check_w2(body: bytes) -> Optional[str]:
    try:
        got = json.loads(body)
    except ValueError:
        return "body is not JSON: %r" % body[:120]
    return None if got == json.loads(w2_payload()) else "JSON body differs from the posted document"


def _check_w3(body: bytes) -> Optional[str]:
    if len(body) != W3_SIZE:
        return "body of %d bytes (expected %d)" % (len(body), W3_SIZE)
    return None if body == b"x" * W3_SIZE else "body content differs"


def _check_w4(body: bytes) -> Optional[str]:
    return None if body == w4_file() else "body of %d bytes differs from the %d-byte file" % (len(body), W4_SIZE)


WORKLOADS = {
    "W1": Workload("W1", "GET /users/johndoe (users join, HTML)", "GET", "/users/johndoe", None, None,
                   W1_HANDLER, "text/html", _check_w1),
    "W1route": Workload("W1route", "W1 served by a route (urlpattern_router -> SQL function)", "GET",
                        "/users/johndoe", None, None, W1_HANDLER, "text/html", _check_w1, W1_ROUTE),
    "W2": Workload("W2", "POST 4 KiB JSON, echoed as jsonb", "POST", "/echo", w2_payload(),
                   "application/json", W2_HANDLER, "application/json", _check_w2),
    "W3": Workload("W3", "GET 256 KiB body", "GET", "/big", None, None,
                   W3_HANDLER, "text/plain", _check_w3),
    "W4": Workload("W4", "GET a 16 KiB static file", "GET", "/static/" + W4_NAME, None, None,
                   W3_HANDLER, "text/css", _check_w4),
}


def pgbench_sql(workload: Workload) -> str:
    """The handler as one plain statement, `request` given as a CTE with this workload's request."""
    body = workload.body or b""
    request = ("WITH request AS (SELECT %s::omni_http.http_method AS method, %s::text AS path, "
               "NULL::text AS query_string, '\\x%s'::bytea AS body, "
               "array[]::omni_http.http_header[] AS headers) "
               % (_quote(workload.method), _quote(workload.path), body.hex()))
    return request + workload.handler


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def peer_sql(workload: Workload) -> str:
    """The statement the peers run for this workload, its parameter inlined."""
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers"))
    import common
    if workload.name in ("W1", "W1route"):
        return common.W1_SQL.replace("$1", _quote(workload.path))
    if workload.name == "W2":
        return common.W2_SQL.replace("$1", "'\\x%s'" % (workload.body or b"").hex())
    return common.W3_SQL
