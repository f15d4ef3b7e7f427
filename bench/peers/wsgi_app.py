"""Peer: a plain WSGI app for gunicorn (sync workers), one psycopg2 connection per worker.

Statements are prepared server-side (PREPARE) on the worker's connection and run with
EXECUTE, one round trip per request. DSN from $BENCH_DSN.
"""
import os

import psycopg2

from common import W1_SQL, W1_TYPE, W2_SQL, W2_TYPE, W3_SQL, W3_TYPE

_conn = None


def _connection():
    global _conn
    if _conn is None or _conn.closed:
        conn = psycopg2.connect(os.environ["BENCH_DSN"])
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("PREPARE w1(text) AS " + W1_SQL)
            cur.execute("PREPARE w2(bytea) AS " + W2_SQL)
            cur.execute("PREPARE w3 AS " + W3_SQL)
        _conn = conn
    return _conn


def _fetch(statement, *args):
    with _connection().cursor() as cur:
        cur.execute(statement, args)
        return cur.fetchone()


def app(environ, start_response):
    method = environ["REQUEST_METHOD"]
    path = environ.get("PATH_INFO", "/")
    if method == "POST":
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length)
        row = _fetch("EXECUTE w2(%s)", psycopg2.Binary(body))
        content_type = W2_TYPE
    elif path == "/big":
        row = _fetch("EXECUTE w3")
        content_type = W3_TYPE
    else:
        row = _fetch("EXECUTE w1(%s)", path)
        content_type = W1_TYPE
    if row is None:
        start_response("404 Not Found", [("Content-Length", "0")])
        return [b""]
    payload = row[0].encode("utf-8")
    start_response("200 OK", [("Content-Type", content_type.decode()),
                              ("Content-Length", str(len(payload)))])
    return [payload]
