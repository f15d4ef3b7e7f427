"""Helpers for the SQL API tests (tests/test_sql_*.py, tests/test_migrations.py)."""
from __future__ import annotations

import select
import time
from typing import List, NamedTuple, Optional, Tuple

import psycopg2
from daemon_support import wait_until


def one(connection, sql: str, params=None):
    """The single value of a one-row, one-column query."""
    with connection.cursor() as cur:
        cur.execute(sql, params)
        row = cur.fetchone()
    return row[0]


def rows(connection, sql: str, params=None) -> list:
    with connection.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchall()


def execute(connection, sql: str, params=None) -> None:
    with connection.cursor() as cur:
        cur.execute(sql, params)


class Response(NamedTuple):
    body: Optional[bytes]
    status: int
    headers: List[Tuple[str, str]]


def response_of(connection, expression: str, params=None) -> Response:
    """The response field of the http_outcome that ``expression`` evaluates to."""
    sql = ("SELECT (r).body, (r).status,"
           " ARRAY(SELECT h.name FROM unnest((r).headers) WITH ORDINALITY h(name, value, n) ORDER BY n),"
           " ARRAY(SELECT h.value FROM unnest((r).headers) WITH ORDINALITY h(name, value, n) ORDER BY n)"
           " FROM (SELECT (%s).response AS r) s" % expression)
    with connection.cursor() as cur:
        cur.execute(sql, params)
        body, status, names, values = cur.fetchone()
    return Response(bytes(body) if body is not None else None, status, list(zip(names, values)))


class HandlerRow(NamedTuple):
    kind: str
    status: Optional[int]
    header_names: Optional[List[str]]
    header_values: Optional[List[str]]
    body: Optional[bytes]
    proxy_url: Optional[str]
    preserve_host: Optional[bool]


def install(connection, query: str, role_name: Optional[str] = None, name: str = "handler") -> None:
    execute(connection, "SELECT omni_httpd._install_handler(%s, %s, %s)", (name, query, role_name))


def call(connection, name: str = "handler", method: str = "GET", path: str = "/",
         query_string: Optional[str] = None, body: bytes = b"",
         headers: List[Tuple[str, str]] = ()) -> Optional[HandlerRow]:
    """Call an installed handler function as the worker does; None when it has no outcome."""
    with connection.cursor() as cur:
        cur.execute("SELECT r.kind, r.status,"
                    " CASE WHEN r.headers IS NOT NULL THEN ARRAY(SELECT (h).name FROM unnest(r.headers) h) END,"
                    " CASE WHEN r.headers IS NOT NULL THEN ARRAY(SELECT (h).value FROM unnest(r.headers) h) END,"
                    " r.body, r.proxy_url, r.preserve_host"
                    " FROM pg_temp.%s(%%s::omni_http.http_method, %%s, %%s, %%s, %%s::text[], %%s::text[]) r"
                    " WHERE r.kind IS NOT NULL"
                    % name, (method, path, query_string, psycopg2.Binary(body),
                             [n for n, _ in headers], [v for _, v in headers]))
        row = cur.fetchone()
    if row is None:
        return None
    row = list(row)
    if row[4] is not None:
        row[4] = bytes(row[4])
    return HandlerRow(*row)


def notifications(connection, until_payload: str, timeout: float = 10.0) -> List[str]:
    """Payloads received on ``connection`` up to and including ``until_payload``."""
    deadline = time.monotonic() + timeout
    received: List[str] = []
    while True:
        connection.poll()
        while connection.notifies:
            notify = connection.notifies.pop(0)
            received.append(notify.payload)
            if notify.payload == until_payload:
                return received
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError("no notification %r within %.0f s (got %r)" % (until_payload, timeout, received))
        select.select([connection], [], [], remaining)


def poll_until(predicate, timeout: float = 10.0, interval: float = 0.01):
    """Call ``predicate`` until it returns something true; fail after ``timeout`` seconds."""
    return wait_until(predicate, timeout, interval)
