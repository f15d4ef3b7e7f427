"""From a handler's result row to a `Response`: the one place that applies SPEC 4.

`response_from_row` is pure: it turns an ``omni_httpd._handler_result`` row (or None for
"no rows") into a `Response`, `response.ABORT`, or a `ProxyOutcome`. `LocalExecutor`
runs a request on this worker's DB thread and applies it; the dispatcher calls it for
local requests and sibling workers call it for requests re-sent to them, so a request
runs the same way wherever it runs.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple, Union

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from omni_httpd import response
from omni_httpd.dbthread import DatabaseUnavailable, HandlerError
from omni_httpd.request import Request
from omni_httpd.response import Response
from omni_httpd.settings import Settings

log = Logger()

#: At most one "database unavailable" warning per this many seconds.
UNAVAILABLE_LOG_INTERVAL = 5.0

#: RFC 9110 field-name (token) characters.
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
#: Bytes that would split or end a header line (response splitting).
_BAD_VALUE = re.compile(r"[\r\n\x00]")


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
    """Turn a handler result row into what goes back to the client (SPEC 4).

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
    if status is None:
        status = 200
    if not 200 <= status <= 999:
        # A 1xx as the final answer would leave the client waiting for another one;
        # other values cannot be written on a status line at all.
        log.warn("handler returned HTTP status {status}, answering 500", status=status)
        return response.internal_error()
    # A NULL body stays None: HTTP/1 delimits it with content-length: 0, HTTP/2 by
    # ending the stream (docs/sql-api.md, "NULL body").
    if body is not None and not isinstance(body, bytes):
        body = bytes(body)
    headers: List[Tuple[str, str]] = []
    declared: Optional[str] = None
    for name, value in zip(names or (), values or ()):
        if name is None or value is None:
            continue
        if not _TOKEN.match(name) or _BAD_VALUE.search(value):
            log.warn("handler returned an invalid header {name!r}: dropped", name=name)
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


class LocalExecutor:
    """Runs requests on this worker's DB thread and turns the result into a `Response`.

    ``handler_for_listener(listener_id)`` gives the handler id attached to a listener
    (None: no handler, 404). Switch it to a new configuration at the moment you call
    ``dbthread.apply_configuration`` for it: requests submitted from then on run after
    the new handlers are installed, earlier ones before.
    """

    def __init__(self, dbthread, handler_for_listener: Callable[[int], Optional[int]],
                 reactor=None, settings: Optional[Settings] = None):
        if reactor is None:
            from twisted.internet import reactor
        self._db = dbthread
        self._handler_for_listener = handler_for_listener
        self._reactor = reactor
        self._settings = settings if settings is not None else Settings()
        self._unavailable_logged = float("-inf")
        self._unavailable_count = 0

    def execute(self, request: Request) -> Deferred:
        """Fires with the `Response` for ``request``; never fails, except with
        `CancelledError` when the caller cancels it (the client went away): a request
        still queued on the DB thread is then not run at all."""
        handler_id = self._handler_for_listener(request.listener_id)
        if handler_id is None:
            return succeed(Response(status=404, headers=[], body=b""))
        d = self._db.run(handler_id, request)
        d.addCallbacks(self._row_received, self._failed,
                       callbackArgs=(request,), errbackArgs=(request, handler_id))
        d.addErrback(self._bug, request)
        return d

    def _row_received(self, row, request: Request):
        outcome = response_from_row(row, request.method)
        if isinstance(outcome, ProxyOutcome):
            # Imported on first use: twisted.web.client costs a worker several MB.
            from omni_httpd import proxy

            return proxy.forward(request, outcome.url, outcome.preserve_host,
                                 self._reactor, self._settings)
        return outcome

    def _failed(self, failure: Failure, request: Request, handler_id: int) -> Response:
        if failure.check(CancelledError):
            return failure      # the caller cancelled: nobody to answer, nothing to log
        if failure.check(DatabaseUnavailable):
            # One line per outage burst, not one per request (the DB thread logs the
            # loss and the reconnection itself).
            now = self._reactor.seconds()
            self._unavailable_count += 1
            if now - self._unavailable_logged >= UNAVAILABLE_LOG_INTERVAL:
                log.warn("database unavailable, answered 503 to {count} request(s): {error}",
                         count=self._unavailable_count, error=failure.getErrorMessage())
                self._unavailable_logged = now
                self._unavailable_count = 0
            return response.error_response(503, "Service unavailable")
        if failure.check(HandlerError):
            log.warn("handler {handler_id} failed for {method} {path}: {error}",
                     handler_id=handler_id, method=request.method, path=request.path,
                     error=failure.getErrorMessage())
        else:
            log.failure("running handler {handler_id} for {method} {path}", failure,
                        handler_id=handler_id, method=request.method, path=request.path)
        return response.internal_error()

    def _bug(self, failure: Failure, request: Request) -> Response:
        if failure.check(CancelledError):
            return failure
        log.failure("building the response for {method} {path}", failure,
                    method=request.method, path=request.path)
        return response.internal_error()
