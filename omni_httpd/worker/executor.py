"""Runs a request on this worker's DB thread and turns the result into a `Response`.

The dispatcher calls it for local requests and sibling workers call it for requests
re-sent to them, so a request runs the same way wherever it runs. The row -> Response
mapping itself is common/outcome.py.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from omni_httpd.common import response
from omni_httpd.common.handler_call import DatabaseUnavailable, HandlerError
from omni_httpd.common.outcome import ProxyOutcome, response_from_row
from omni_httpd.common.request import Request
from omni_httpd.common.response import Response
from omni_httpd.common.routing import RouteTable
from omni_httpd.common.settings import Settings

log = Logger()

#: At most one "database unavailable" warning per this many seconds.
UNAVAILABLE_LOG_INTERVAL = 5.0


class LocalExecutor:
    """Runs requests on this worker's DB thread and turns the result into a `Response`.

    ``handler_for_listener(listener_id)`` gives the handler id attached to a listener
    (None: the listener is served by the routes, `set_routes`; no route: 404). Switch
    both to a new configuration at the moment you call ``dbthread.apply_configuration``
    for it: requests submitted from then on run after the new handlers and routes are
    installed, earlier ones before.
    """

    def __init__(self, dbthread, handler_for_listener: Callable[[int], Optional[int]],
                 reactor=None, settings: Optional[Settings] = None):
        if reactor is None:
            from twisted.internet import reactor
        self._db = dbthread
        # metrics (worker/main.py sets them with --metrics): handlers that failed (500),
        # requests answered 503 because the database is away
        self.count_handler_error: Callable[[], object] = _nothing
        self.count_unavailable: Callable[[], object] = _nothing
        self._handler_for_listener = handler_for_listener
        self._reactor = reactor
        self._settings = settings if settings is not None else Settings()
        self._unavailable_logged = float("-inf")
        self._unavailable_count = 0
        self._routes = RouteTable()
        self._ports: Dict[int, int] = {}

    def set_routes(self, routes: RouteTable, ports: Dict[int, int]) -> None:
        """The routes of the configuration, and each listener's bound port (routes
        naming a port match the port of the listener a request arrived on)."""
        self._routes = routes
        self._ports = dict(ports)

    def execute(self, request: Request) -> Deferred:
        """Fires with the `Response` for ``request``; never fails, except with
        `CancelledError` when the caller cancels it (the client went away): a request
        still queued on the DB thread is then not run at all."""
        handler_id = self._handler_for_listener(request.listener_id)
        if handler_id is None:
            return self._route(request)
        d = self._db.run(handler_id, request)
        d.addCallbacks(self._row_received, self._failed,
                       callbackArgs=(request,), errbackArgs=(request, handler_id))
        d.addErrback(self._bug, request)
        return d

    def _route(self, request: Request) -> Deferred:
        chain = self._routes.match(request, self._ports.get(request.listener_id, 0))
        if not chain:
            return succeed(Response(status=404, headers=[], body=b""))
        d = self._db.run_routes(chain, request)
        d.addCallbacks(self._chain_done, self._failed, callbackArgs=(request,),
                       errbackArgs=(request, None))
        d.addErrback(self._bug, request)
        return d

    def _chain_done(self, result, request: Request):
        if result.row is None and not result.handled:
            return Response(status=404, headers=[], body=b"")
        return self._row_received(result.row, request)

    def _row_received(self, row, request: Request):
        outcome = response_from_row(row, request.method)
        if isinstance(outcome, ProxyOutcome):
            # Imported on first use: twisted.web.client costs a worker several MB.
            from omni_httpd.worker import proxy

            return proxy.forward(request, outcome.url, outcome.preserve_host,
                                 self._reactor, self._settings)
        return outcome

    def _failed(self, failure: Failure, request: Request, handler_id) -> Response:
        if failure.check(CancelledError):
            return failure      # the caller cancelled: nobody to answer, nothing to log
        if failure.check(DatabaseUnavailable):
            self.count_unavailable()
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
        if failure.check(HandlerError) and handler_id is None:
            route = getattr(failure.value, "route", None)
            log.warn("route {route} failed for {method} {path}: {error}",
                     route=route.describe() if route is not None else "?", method=request.method,
                     path=request.path, error=failure.getErrorMessage())
        elif failure.check(HandlerError):
            log.warn("handler {handler_id} failed for {method} {path}: {error}",
                     handler_id=handler_id, method=request.method, path=request.path,
                     error=failure.getErrorMessage())
        else:
            log.failure("running handler {handler_id} for {method} {path}", failure,
                        handler_id=handler_id, method=request.method, path=request.path)
        self.count_handler_error()
        return response.internal_error()

    def _bug(self, failure: Failure, request: Request) -> Response:
        if failure.check(CancelledError):
            return failure
        log.failure("building the response for {method} {path}", failure,
                    method=request.method, path=request.path)
        return response.internal_error()


def _nothing() -> None:
    pass
