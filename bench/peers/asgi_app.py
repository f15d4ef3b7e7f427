"""Peer: a raw ASGI app (no framework) for uvicorn, with an asyncpg pool per worker.

asyncpg prepares each statement once per connection (its statement cache) and runs
it with one round trip. DSN from $BENCH_DSN (libpq keyword form is converted), pool
size per worker from $BENCH_POOL (default 2).
"""
import os

import asyncpg

from common import W1_SQL, W1_TYPE, W2_SQL, W2_TYPE, W3_SQL, W3_TYPE

_pool = None


def _connect_kwargs():
    params = dict(item.split("=", 1) for item in os.environ["BENCH_DSN"].split())
    return dict(host=params.get("host"), port=int(params.get("port", 5432)),
                user=params.get("user"), database=params.get("dbname"))


async def _lifespan(receive, send):
    global _pool
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            size = int(os.environ.get("BENCH_POOL", "2"))
            _pool = await asyncpg.create_pool(min_size=size, max_size=size, **_connect_kwargs())
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await _pool.close()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _read_body(receive):
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    if scope["method"] == "POST":
        body = await _read_body(receive)
        async with _pool.acquire() as con:
            value = await con.fetchval(W2_SQL, body)
        content_type = W2_TYPE
    elif scope["path"] == "/big":
        async with _pool.acquire() as con:
            value = await con.fetchval(W3_SQL)
        content_type = W3_TYPE
    else:
        async with _pool.acquire() as con:
            value = await con.fetchval(W1_SQL, scope["path"])
        content_type = W1_TYPE
    if value is None:
        await send({"type": "http.response.start", "status": 404,
                    "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})
        return
    payload = value.encode("utf-8")
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", content_type),
                            (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
