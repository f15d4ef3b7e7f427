"""Where every response leaves: the rules both HTTP protocols follow, written once.

HTTP/1 (`http1.py`) and HTTP/2 (`http2.py`) turn a `Response` (from a local handler, a
sibling worker, the proxy, or the server itself) into their own framing, but what goes
out is decided here, the same way for both:

- the status: a final answer is 200..999; anything else (a 1xx, which would leave the
  client waiting for another answer, or a value no status line can carry) becomes 500;
- the headers: a handler's header whose name is not a token, or whose value holds CR,
  LF or NUL (response splitting), is dropped with a warning; the headers the protocol
  writes itself or that mean nothing end to end (Content-Length, Transfer-Encoding,
  Connection and the other connection-specific ones) are dropped quietly; values lose
  surrounding blanks; ``date`` and ``server`` are added unless the handler set them;
- the length: none for 204 and 304; otherwise the body's, where a NULL body is
  ``content-length: 0`` when the protocol needs a length to delimit the message
  (HTTP/1) and no Content-Length when the end of the stream does (HTTP/2); HEAD sends the
  length of the body and not the body;
- the peer text of the access log and of the proxy's forwarding headers (an IPv6
  address in brackets), and the access-log line itself (namespace
  ``omni_httpd.access``);
- writing the bytes: straight to the socket when nothing is buffered (`send_now`).
- a file body (``Response.file``, static files): its ``length`` is the Content-Length;
  for HEAD, 204 and 304 it is closed here, otherwise `Outgoing.file` tells the protocol
  to stream it after the head.

It is pure (no I/O but the log): the worker's protocols frame what it returns, the
console's try-a-request shows it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

from twisted.internet import tcp
from twisted.logger import Logger

from omni_httpd.common.request import Request
from omni_httpd.common.response import Response, internal_error
from omni_httpd.common.httpdate import http_date

log = Logger()
access_log = Logger(namespace="omni_httpd.access")

#: Header names the protocols write themselves, or that are connection-specific (RFC 9110
#: 7.6.1; HTTP/2 forbids them outright): never taken from a handler.
CONNECTION_HEADERS = frozenset([
    "content-length", "transfer-encoding", "connection", "keep-alive", "upgrade",
    "proxy-connection", "te",
])
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+").fullmatch
_BAD_VALUE = re.compile(r"[\r\n\x00]").search
SERVER = "omni_httpd"
_NO_CONTENT = (204, 304)


@dataclass
class Outgoing:
    """A response as it goes out, before the protocol frames it."""

    status: int
    #: The handler's headers that may go out, in its order.
    headers: List[Tuple[str, str]]
    #: The Content-Length to send (after ``headers``), None for none.
    length: Optional[int]
    #: What follows the head (b"" for HEAD, 204, 304 and a NULL body).
    body: bytes
    #: Headers the server adds (date, server) unless the handler gave them; written last.
    added: List[Tuple[str, str]]
    #: A body to stream after ``body`` (Response.file), ``length`` bytes; None for none
    #: (and for HEAD, 204, 304: then it is closed here).
    file: Any = None


def finish(response: Response, head: bool, now: float, delimit_null: bool,
           label: str = "") -> Outgoing:
    """The rules above, applied to ``response`` (not an abort) for a request sent now."""
    status = response.status
    body = response.body
    if type(status) is not int or not 200 <= status <= 999:
        log.warn("{label}handler status {status!r} cannot be sent as a final answer; "
                 "answering 500", label=label, status=status)
        response = internal_error()
        status, body = 500, response.body
    if body is not None and type(body) is not bytes:
        body = bytes(body)      # memoryview / bytearray
    headers: List[Tuple[str, str]] = []
    add_date = add_server = True
    for name, value in response.headers:
        if type(name) is not str or not _TOKEN(name):
            log.warn("{label}dropping response header with invalid name {name!r}",
                     label=label, name=name)
            continue
        lname = name.lower()
        if lname in CONNECTION_HEADERS:
            continue
        if type(value) is not str:
            if value is None:
                log.warn("{label}dropping response header {name} with a NULL value",
                         label=label, name=name)
                continue
            value = str(value)
        if _BAD_VALUE(value):
            # Never let a handler split the response.
            log.warn("{label}dropping response header {name} with CR, LF or NUL in its value",
                     label=label, name=name)
            continue
        if lname == "date":
            add_date = False
        elif lname == "server":
            add_server = False
        headers.append((name, value.strip(" \t")))
    added = []
    if add_date:
        added.append(("date", http_date(now)))
    if add_server:
        added.append(("server", SERVER))
    source = response.file
    if source is not None:
        if status in _NO_CONTENT or head:
            source.close()
            return Outgoing(status, headers, None if status in _NO_CONTENT else source.length,
                            b"", added)
        return Outgoing(status, headers, source.length, b"", added, source)
    if status in _NO_CONTENT:
        return Outgoing(status, headers, None, b"", added)
    if body is None:
        return Outgoing(status, headers, 0 if delimit_null else None, b"", added)
    return Outgoing(status, headers, len(body), b"" if head else body, added)


def format_peer(address) -> str:
    """``host:port`` of a transport's peer, ``[v6]:port`` for IPv6, a UNIX socket's name."""
    host = getattr(address, "host", None)
    if host is None:
        name = getattr(address, "name", None)
        return name.decode("utf-8", "replace") if isinstance(name, bytes) else (name or "unix")
    if ":" in host:
        return "[%s]:%s" % (host, address.port)
    return "%s:%s" % (host, address.port)


def peer_of(transport) -> str:
    try:
        return format_peer(transport.getPeer())
    except Exception:
        return ""


_FORMAT = '{peer} "{method} {path} {protocol}" {status} {bytes} {duration_ms:.1f}ms worker={worker}'


def log_access(request: Optional[Request], method: str, path: str, status: int, bytes_sent: int,
               duration_s: float, worker_label: str, protocol: str) -> None:
    """The access-log line of one answered request (callers check settings.access_log).

    ``request`` may be None for answers the server generated before a request existed
    (400, 408, 431, ...); ``method`` and ``path`` are then whatever was known, or "-".
    ``path`` includes ``?query`` when there was one; ``protocol`` is e.g. ``HTTP/1.1``
    or ``HTTP/2``. ``bytes`` is the number of body bytes sent (0 for HEAD, 204, 304 and
    aborts). The text is formatted only by whichever observer writes the event out.
    """
    access_log.info(_FORMAT, peer=(request.peer if request is not None else "") or "-",
                    method=method or "-", path=path or "-", protocol=protocol, status=status,
                    bytes=bytes_sent, duration_ms=duration_s * 1000.0, worker=worker_label or "-")


def send_now(transport, data: bytes) -> None:
    """Write ``data``; straight to the socket when Twisted has nothing buffered for it.

    Saves a reactor turn and a write-event registration per response (measured +8 %,
    docs/performance.md).
    Only for plain TCP/UNIX transports (never TLS: the bytes must go through the TLS
    layer); anything unexpected falls back to ``transport.write``, which also takes over
    whatever the socket did not accept and reports socket errors the usual way.
    """
    try:
        if (isinstance(transport, tcp.Connection) and not transport.TLS and transport.connected
                and not transport.disconnecting and not transport._writeDisconnecting
                and not transport.dataBuffer and not transport._tempDataLen):
            sent = transport.socket.send(data)
            if sent >= len(data):
                return
            if sent > 0:
                data = data[sent:]
    except Exception:   # EAGAIN, EPIPE, a Twisted without these attributes: let write() cope
        pass
    transport.write(data)
