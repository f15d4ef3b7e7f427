"""From a handler's result row to a `Response`: what an outcome means (docs/sql-api.md).

`response_from_row` is pure: it turns a handler's outcome row (handler_call.read_row; None for
"no rows") into a `Response`, `response.ABORT`, or a `ProxyOutcome`. The worker's
executor (worker/executor.py) applies it to what its DB thread returns, and the console's
try-a-request to what its own session returns, so a handler's result means the same
wherever it ran.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

from twisted.logger import Logger

from omni_httpd.common import response
from omni_httpd.common.response import Response

log = Logger()



@dataclass(frozen=True)
class ProxyOutcome:
    """The handler asked to forward the request to ``url`` (see proxy.py)."""

    url: str
    preserve_host: bool = True


Outcome = Union[Response, ProxyOutcome]


def no_content() -> Response:
    """Zero rows: 204 with an empty body."""
    return Response(status=204, headers=[], body=b"")


def response_from_row(row: Optional[tuple], request_method: str = "GET") -> Outcome:
    """Turn a handler result row into what goes back to the client (docs/sql-api.md).

    ``row`` is (kind, status, header_names, header_values, body, proxy_url,
    preserve_host) or None. ``request_method`` only makes log lines more useful: the
    body is kept for HEAD too, the protocol sends its length and not the body.
    """
    if row is None:
        return no_content()
    kind, status, names, values, body, proxy_url, preserve_host = row
    if kind == "response":
        return _response(status, names, values, body, request_method)
    if kind == "abort":
        return response.ABORT
    if kind == "proxy":
        if not proxy_url:
            log.warn("handler returned a proxy outcome without a URL ({method})",
                     method=request_method)
            return response.internal_error()
        return ProxyOutcome(proxy_url, True if preserve_host is None else bool(preserve_host))
    log.warn("handler returned an unknown outcome kind {kind!r}", kind=kind)
    return response.internal_error()


def _response(status: Optional[int], names: Optional[List[str]], values: Optional[List[str]],
              body, request_method: str) -> Response:
    """The handler's answer as it wrote it; what may go out is the exchange's to decide
    (common/exchange.py: status range, header names and values, lengths)."""
    if status is None:
        status = 200
    # A NULL body stays None: HTTP/1 delimits it with content-length: 0, HTTP/2 by
    # ending the stream (docs/sql-api.md, "NULL body").
    if body is not None and not isinstance(body, bytes):
        body = bytes(body)
    headers: List[Tuple[str, str]] = []
    declared: Optional[str] = None
    for name, value in zip(names or (), values or ()):
        if name is None or value is None:
            continue
        if name.lower() == "content-length":
            # The protocol writes Content-Length; the handler's only limits the body.
            if declared is None:
                declared = value
            continue
        headers.append((name, value))
    if declared is not None and body is not None:
        body = _apply_declared_length(declared, body, request_method)
    return Response(status=status, headers=headers, body=body)


def _apply_declared_length(declared: str, body: bytes, request_method: str) -> bytes:
    try:
        length = int(declared.strip())
        if length < 0:
            raise ValueError(declared)
    except ValueError:
        log.warn("handler set an invalid Content-Length {value!r}; sending the real "
                 "length {actual}", value=declared, actual=len(body))
        return body
    if length < len(body):
        return body[:length]
    if length > len(body):
        log.warn("handler set Content-Length {declared} larger than its {actual}-byte "
                 "body ({method}); sending the real length",
                 declared=length, actual=len(body), method=request_method)
    return body
