"""The worker's one DB thread and its one PostgreSQL connection (psycopg 3).

Everything that touches the connection runs on one thread of a one-thread
`ThreadPool`; the reactor never does. Work reaches that thread in batches: the reactor
appends jobs to a queue and, if no drain is running, starts one with
`deferToThreadPool`. The drain runs everything queued (including what arrives while it
runs) and hands all results back with one reactor wake-up, which fires every job's
Deferred. Under load that is one thread hand-off per batch instead of one per request,
the biggest single gain measured for this design (docs/architecture.md, "Request
batching").

The connection is in autocommit mode: each request is one prepared statement whose
values travel as binary protocol parameters (handler_call.py), hence its own
transaction, committed when the handler succeeds and rolled back when it fails, in one
round trip. What a request may leave in the session is undone after it, and a session
that a request changed in a way that cannot be undone in place (temporary objects, a
handler function altered by its role) is reset and its handlers reinstalled before the
next request runs.

A broken connection makes the job that notices it, and every job after it, fail at once
with `DatabaseUnavailable` (the caller answers 503) while a reconnect runs on a separate
connector thread (so a slow TCP connect never holds up the queue), with backoff. The new
connection gets the current configuration installed before it serves anything.
"""
from __future__ import annotations

import collections
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import psycopg
from psycopg import conninfo, pq
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from omni_httpd.common import handler_call
from omni_httpd.common.handler_call import (DatabaseUnavailable, HandlerError, HandlerRow, Installed,
                                     SessionDirty, error_text, function_name, statement_name)
from omni_httpd.common.request import Request
from omni_httpd.common.routing import Route

__all__ = ["DBThread", "DatabaseUnavailable", "HandlerError", "HandlerRow", "error_text",
           "function_name", "statement_name", "CONNECTION_DEFAULTS"]

log = Logger()

#: A drain hands results back early once it holds this many...
FLUSH_COUNT = 64
#: ...or once its oldest undelivered result is this old (seconds): batching must not
#: hold a finished response behind a long queue.
FLUSH_AGE = 0.002

#: Requests taken from the queue for one pipeline at most (each still its own statement
#: and transaction; see handler_call.call_pipelined), as long as their bodies and headers
#: add up to at most PIPELINE_BYTES...
PIPELINE_BATCH = 32
PIPELINE_BYTES = 64 * 1024
#: ...of which at most this many are sent before their results are in...
PIPELINE_MAX = 8
#: ...and only behind calls whose handler has lately answered within this (seconds).
#: Nothing is sent behind a call that may run long: a request whose client leaves
#: meanwhile is then never started.
QUICK_CALL = 0.002

#: libpq settings that make a dead server or network noticed in seconds rather than
#: after the kernel's TCP timeouts (minutes); used unless the DSN sets them itself.
CONNECTION_DEFAULTS = {
    "connect_timeout": "5",
    # A silent peer is declared dead after 5 + 3 * 2 s, even while we wait for a
    # long-running handler (keepalives flow while the server computes).
    "keepalives": "1",
    "keepalives_idle": "5",
    "keepalives_interval": "2",
    "keepalives_count": "3",
    # Data the server's kernel does not acknowledge within 10 s means a dead link; a
    # slow handler is not affected (the request itself is acknowledged at once).
    "tcp_user_timeout": "10000",
}
if pq.version() < 120000:
    del CONNECTION_DEFAULTS["tcp_user_timeout"]


def session_options(handler_timeout: float, lock_timeout: float, given: Optional[str]) -> str:
    """The startup ``options`` of the worker's session.

    Settings made at connection time are the session's defaults: the RESET ALL that
    follows every request restores them, whatever a handler SET. The encoding and
    string syntax are pinned because the daemon relies on them; the timeouts bound
    every handler. Options in the DSN come after ours (and so win).
    """
    settings = ["-c client_encoding=UTF8", "-c standard_conforming_strings=on",
                "-c statement_timeout=%d" % max(0, int(handler_timeout * 1000)),
                "-c lock_timeout=%d" % max(0, int(lock_timeout * 1000))]
    if given:
        settings.append(given)
    return " ".join(settings)


class DBThread:
    """One database connection, one thread, batched hand-off (see the module docstring).

    Reactor-thread API: `start`, `stop`, `submit`, `run`, `apply_configuration`,
    `busy`, `on_busy_change`. All of them return at once; results come as Deferreds.
    """

    def __init__(self, dsn: str, reactor=None, handler_timeout: float = 0,
                 lock_timeout: float = 0,
                 application_name: str = "omni_httpd worker",
                 reconnect_delays: Tuple[float, float] = (0.1, 5.0),
                 pipeline_max: int = PIPELINE_MAX):
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self._dsn = dsn
        self._min_delay, self._max_delay = reconnect_delays
        self._pipeline_max = pipeline_max
        given = conninfo.conninfo_to_dict(dsn)
        connect_args = {k: v for k, v in CONNECTION_DEFAULTS.items() if k not in given}
        if "application_name" not in given:
            connect_args["application_name"] = application_name
        connect_args["options"] = session_options(handler_timeout, lock_timeout, given.get("options"))
        self._conninfo = conninfo.make_conninfo(dsn, **connect_args)

        self._pool = ThreadPool(1, 1, name="omni_httpd-db")
        # Connecting happens beside the DB thread, so jobs keep failing fast meanwhile.
        self._connect_pool = ThreadPool(0, 1, name="omni_httpd-db-connect")

        # Shared between the reactor and the DB thread, under _lock.
        self._lock = threading.Lock()
        self._queue: collections.deque = collections.deque()
        self._draining = False

        # Reactor thread only.
        self._state = "new"          # new -> running -> stopping -> stopped
        self._busy = False
        self._busy_hooks: List[Callable[[bool], object]] = []
        #: metrics: called with True when a connection is ready, False when it is lost
        self.on_connection_change: Callable[[bool], object] = lambda connected: None
        self._reconnecting = False
        self._reconnect_call = None
        self._connecting: Optional[Deferred] = None
        self._delay = 0.0
        self._shutdown_trigger = None
        self._stopped: Optional[Deferred] = None

        # DB thread only (and the connector thread before a connection is adopted).
        self._conn: Optional[psycopg.Connection] = None
        self._installed: Dict[int, Installed] = {}   # handler id -> function and statement
        self._broken: Dict[int, str] = {}        # handler id -> install error
        self._speed: Dict[bytes, float] = {}     # statement -> its calls' recent seconds
        self._routes: Dict[int, Installed] = {}    # route id -> function and statement
        self._routes_broken: Dict[int, str] = {}   # route id -> why it is not installed
        self._wanted: Optional[Tuple[int, Dict[int, Tuple[str, str]], List[Route]]] = None

    # -- life cycle (reactor thread) ------------------------------------------------

    def start(self, keep_trying: bool = False) -> Deferred:
        """Start the threads and connect; fires once the connection is ready.

        If the first connection cannot be made: with ``keep_trying`` it fires anyway and
        goes on reconnecting with backoff (requests fail with `DatabaseUnavailable`
        meanwhile, and a configuration applied meanwhile is installed on connecting);
        otherwise it fails with `DatabaseUnavailable` and stops again. The DB thread also
        stops before the reactor shuts down.
        """
        if self._state != "new":
            raise RuntimeError("DBThread.start() called twice")
        self._state = "running"
        self._pool.start()
        self._connect_pool.start()
        self._shutdown_trigger = self._reactor.addSystemEventTrigger(
            "before", "shutdown", self._stop_at_shutdown)
        connected = deferToThreadPool(self._reactor, self._connect_pool, self._connect)
        connected.addCallback(lambda conn: self._submit(self._adopt, conn))
        self._connecting = connected
        result = Deferred()

        def done(outcome):
            self._connecting = None
            self.on_connection_change(not isinstance(outcome, Failure))
            if isinstance(outcome, Failure) and keep_trying and self._state == "running":
                log.warn("cannot connect to the database ({error}); answering 503 and "
                         "reconnecting", error=" ".join(outcome.getErrorMessage().split()))
                self._reconnecting = True
                self._delay = 0.0
                self._try_reconnect()
                result.callback(None)
            elif isinstance(outcome, Failure):
                self.stop().addBoth(lambda _: result.errback(outcome))
            else:
                result.callback(None)
            # Nothing below us waits for stop(): a stop() already running may be
            # waiting for this very Deferred.
            return None

        connected.addBoth(done)
        return result

    def stop(self) -> Deferred:
        """Finish the jobs already queued, close the connection, stop the threads.

        Jobs submitted after this fail with `DatabaseUnavailable`. Idempotent.
        """
        if self._stopped is not None:
            return _chain(self._stopped)
        self._stopped = Deferred()
        if self._shutdown_trigger is not None:
            self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
            self._shutdown_trigger = None
        return self._stop_now()

    def _stop_at_shutdown(self) -> Deferred:
        self._shutdown_trigger = None
        return self.stop()

    def _stop_now(self) -> Deferred:
        if self._state == "new":
            self._state = "stopped"
            self._stopped.callback(None)
            return _chain(self._stopped)
        self._state = "stopping"
        if self._reconnect_call is not None and self._reconnect_call.active():
            self._reconnect_call.cancel()
        self._reconnect_call = None
        d = succeed(None)
        if self._connecting is not None:
            # A connect in flight ends by adopting (and, since we are stopping, closing)
            # its connection on the DB thread; wait for that before stopping the pools.
            waiter = Deferred()
            self._connecting.addBoth(lambda result: (waiter.callback(None), result)[1])
            d = waiter
        d.addCallback(lambda _: self._submit(self._close))
        d.addErrback(lambda f: log.failure("closing the database connection", f))

        def stop_pools(_):
            # Both threads are idle now: the last drain has returned its results.
            self._pool.stop()
            self._connect_pool.stop()
            self._state = "stopped"
            self._stopped.callback(None)

        d.addCallback(stop_pools)
        return _chain(self._stopped)

    def cancel_running(self) -> Deferred:
        """Ask PostgreSQL to cancel the statement running now, if any.

        For the end of a shutdown grace period: the handler then fails (and its
        transaction rolls back) instead of committing after the worker is gone.
        Queued jobs are not affected. Fires when the cancel request has been sent.
        """
        conn = self._conn
        if conn is None or self._state not in ("running", "stopping"):
            return succeed(None)
        d = deferToThreadPool(self._reactor, self._connect_pool, conn.cancel)
        d.addErrback(lambda f: log.warn("cancelling the running statement failed: {error}",
                                        error=f.getErrorMessage()))
        return d

    # -- busy flag (reactor thread) -------------------------------------------------

    @property
    def busy(self) -> bool:
        """True while a drain runs or jobs are queued (a plain attribute read)."""
        return self._busy

    def on_busy_change(self, hook: Callable[[bool], object]) -> None:
        """Call ``hook(busy)`` in the reactor thread whenever `busy` changes."""
        self._busy_hooks.append(hook)

    def _set_busy(self, busy: bool) -> None:
        self._busy = busy
        for hook in self._busy_hooks:
            try:
                hook(busy)
            except Exception:
                log.failure("busy hook failed")

    # -- queue and drain ------------------------------------------------------------

    def submit(self, job: Callable, *args) -> Deferred:
        """Run ``job(*args)`` on the DB thread after everything queued before it.

        The job may use the connection through `connection` (DB thread only). Fails
        with `DatabaseUnavailable` once `stop` has been called. Cancelling the Deferred
        before the job has started skips the job.
        """
        if self._state not in ("new", "running"):
            return fail(DatabaseUnavailable("the DB thread is stopped"))
        return self._submit(job, *args)

    def _submit(self, job: Callable, *args) -> Deferred:
        d = Deferred()
        with self._lock:
            self._queue.append((job, args, d))
            start = not self._draining
            if start:
                self._draining = True
        if start:
            drain = deferToThreadPool(self._reactor, self._pool, self._drain)
            drain.addCallbacks(self._drain_done, self._drain_failed)
        if not self._busy:
            self._set_busy(True)
        return d

    def _drain(self) -> list:
        """DB thread: run queued jobs until the queue is empty; return their results.

        ``_draining`` goes back to False under the lock in the same step that finds the
        queue empty, so a job appended after that check starts a new drain, and a job
        appended before it is run by this one: none is stranded.
        """
        pending = {"results": [], "oldest": 0.0}
        queue = self._queue
        lock = self._lock

        def add(result: tuple) -> None:
            results = pending["results"]
            now = time.monotonic()
            if not results:
                pending["oldest"] = now
            results.append(result)
            if len(results) >= FLUSH_COUNT or now - pending["oldest"] >= FLUSH_AGE:
                self._reactor.callFromThread(self._deliver, results)
                pending["results"] = []

        while True:
            with lock:
                if not queue:
                    self._draining = False
                    return pending["results"]
                job, args, d = queue.popleft()
            if d.called:
                # Cancelled while queued (the client went away): skip the work.
                continue
            if self._pipelinable(job, args):
                batch = self._take_requests(job, args, d)
                try:
                    self._run_pipelined(batch, add)
                except BaseException:
                    failure = Failure()
                    for _job, _args, waiting in batch:
                        if not waiting.called:
                            add((waiting, False, failure))
                continue
            try:
                add((d, True, job(*args)))
            except (DatabaseUnavailable, HandlerError) as exc:
                add((d, False, exc))
            except BaseException:
                add((d, False, Failure()))

    def _take_requests(self, job: Callable, args: tuple, d: Deferred) -> List[Tuple[Callable, tuple, Deferred]]:
        """DB thread: this job and the requests queued right behind it, for one pipeline.

        Requests are handler runs and route chains of one handler (`_pipelinable`). As
        many as `PIPELINE_BATCH`, as long as their bodies and headers add up to at most
        `PIPELINE_BYTES` (sent before any result is read, they must fit the socket
        buffers); any other job ends the batch, so it still runs between the requests
        queued before it and those queued after it.
        """
        batch = [(job, args, d)]
        size = _request_size(args[1])
        queue = self._queue
        with self._lock:
            while queue and len(batch) < PIPELINE_BATCH:
                next_job, next_args, next_d = queue[0]
                if not self._pipelinable(next_job, next_args):
                    break
                size += _request_size(next_args[1])
                if size > PIPELINE_BYTES:
                    break
                queue.popleft()
                if not next_d.called:
                    batch.append((next_job, next_args, next_d))
        return batch

    def _pipelinable(self, job: Callable, args: tuple) -> bool:
        if self._pipeline_max < 1:
            return False
        if job == self._run:
            return True
        return job == self._run_routes and self._single_handler(args[0]) is not None

    def _single_handler(self, routes: List[Route]) -> Optional[Tuple[Installed, Route]]:
        """The one installed step of a route chain when it is a handler run in one
        statement (no middleware, not a transaction-controlling procedure); else None."""
        steps = [(self._routes[route.id], route) for route in routes if route.id in self._routes]
        if len(steps) != 1:
            return None
        installed, route = steps[0]
        if installed.kind != "handler" or installed.nonatomic:
            return None
        return installed, route

    def _pipeline_call(self, job: Callable, args: tuple, own_objects: int):
        """A request's (statement, parameters, finish): what `_run` / `_run_routes` would
        execute, and what makes their result of the handler row. Raises `HandlerError`
        for a request that cannot run at all."""
        if job == self._run:
            handler_id, request = args
            installed = self._installed.get(handler_id)
            if installed is None:
                raise HandlerError(self._broken.get(handler_id)
                                   or "handler %d is not installed" % handler_id)
            return installed.statement, handler_call.parameters(request, own_objects), None
        routes, request = args
        installed, route = self._single_handler(routes)
        parameters = handler_call.route_parameters(request, route.row, None, own_objects,
                                                     installed.header_type)
        return installed.statement, parameters, route

    def _run_pipelined(self, batch: List[Tuple[Callable, tuple, Deferred]],
                       add: Callable[[tuple], None]) -> None:
        """DB thread: run a batch of requests through one pipeline, handing each result
        (d, ok, value) to ``add`` as it comes.

        The same outcomes as running the jobs one by one: a request whose client left
        before its turn is not sent; one that found the session dirty (nothing of it ran)
        runs again after the reset.
        """
        conn = self._conn
        if conn is None:
            gone = DatabaseUnavailable("no database connection")
            for _job, _args, d in batch:
                add((d, False, gone))
            return
        calls, waiting = [], []
        own_objects = self._own_objects()
        speed = self._speed
        for job, args, d in batch:
            try:
                statement, parameters, route = self._pipeline_call(job, args, own_objects)
            except HandlerError as exc:
                add((d, False, exc))
                continue
            calls.append((statement, parameters, speed.get(statement, QUICK_CALL) < QUICK_CALL))
            waiting.append((job, args, d, route))
        again = []
        failed = lost = False
        outcomes = handler_call.call_pipelined(conn, calls, lambda index: not waiting[index][2].called,
                                               self._pipeline_max)
        for index, outcome, seconds in outcomes:
            if outcome is handler_call.SKIPPED:
                continue
            job, args, d, route = waiting[index]
            if isinstance(outcome, SessionDirty):
                again.append((job, args, d, str(outcome)))
                continue
            statement = calls[index][0]
            last = speed.get(statement)
            speed[statement] = seconds if last is None else (last + seconds) / 2
            if isinstance(outcome, DatabaseUnavailable):
                lost = True
                add((d, False, outcome))
            elif isinstance(outcome, HandlerError):
                failed = failed or outcome.sqlstate is not None
                if route is not None:
                    outcome.route = route     # as run_chain does, for the log
                add((d, False, outcome))
            elif route is not None:
                add((d, True, handler_call.ChainResult(outcome, route, True)))
            else:
                add((d, True, outcome))
        reset_reason = again[0][3] if again else None
        if failed and not lost:
            # The handler function already cleaned up; this only guards against what
            # could escape it (as after a failure outside a pipeline).
            try:
                handler_call.after_failure(conn)
            except SessionDirty as exc:
                reset_reason = reset_reason or str(exc)
            except DatabaseUnavailable:
                lost = True
        if lost:
            self._drop_connection()
            gone = DatabaseUnavailable("the database connection ended")
            for _job, _args, d, _reason in again:
                add((d, False, gone))
            return
        if reset_reason is not None:
            try:
                self._reset(reset_reason)
            except (DatabaseUnavailable, HandlerError) as exc:
                for _job, _args, d, _reason in again:
                    add((d, False, exc))
                return
        for job, args, d, _reason in again:
            try:
                add((d, True, job(*args)))
            except (DatabaseUnavailable, HandlerError) as exc:
                add((d, False, exc))

    def _deliver(self, results: list) -> None:
        for d, ok, value in results:
            try:
                if ok:
                    d.callback(value)
                else:
                    d.errback(value)
            except Exception:
                # One job's Deferred (e.g. already fired by someone else) must not
                # keep the rest of the batch from being delivered.
                log.failure("delivering a DB thread result")

    def _drain_done(self, results: list) -> None:
        # Idle before the callbacks run: they see an idle DB thread (and may queue
        # more work, which makes it busy again).
        with self._lock:
            idle = not self._draining
        if idle and self._busy:
            self._set_busy(False)
        self._deliver(results)

    def _drain_failed(self, failure: Failure) -> None:
        # _drain catches every job's exception; getting here is a bug.
        log.failure("DB thread drain failed", failure)

    # -- requests and configuration (reactor thread API, DB thread work) ------------

    def run(self, handler_id: int, request: Request) -> Deferred:
        """Run handler ``handler_id`` for ``request``: one ``EXECUTE``, one round trip.

        Fires with the outcome (``handler_call.read_row``) as a tuple (kind, status,
        header_names, header_values, body bytes, proxy_url, preserve_host), or None when
        the handler returned no rows. Fails with `HandlerError` (answer 500) or
        `DatabaseUnavailable` (answer 503).
        """
        return self.submit(self._run, handler_id, request)

    def run_routes(self, routes: List[Route], request: Request) -> Deferred:
        """Run the route chain ``routes`` (matching ``request``, in order) in one job.

        Fires with a `handler_call.ChainResult`; fails as `run`. A route that is not
        installed (refused, logged when the configuration was applied) is skipped.
        """
        return self.submit(self._run_routes, routes, request)

    def apply_configuration(self, generation: int,
                            handlers: Dict[int, Tuple[str, str]],
                            routes: Sequence[Route] = ()) -> Deferred:
        """Install ``handlers`` ({handler id: (query, role_name)}) and ``routes`` as ``generation``.

        Queued like a request: requests queued before run with the old handlers, those
        queued after with the new ones. Fires with {handler id: error text} for the
        handlers that could not be installed (they answer 500 until the next
        configuration; a route that cannot be installed is logged and not served). Handlers
        absent from ``handlers`` are removed. Without a connection it fails with
        `DatabaseUnavailable`, but the configuration is kept and installed as soon as
        the connection is back.
        """
        handlers = {int(hid): (query, role) for hid, (query, role) in handlers.items()}
        return self.submit(self._apply, int(generation), handlers, list(routes))

    @property
    def connection(self) -> Optional[psycopg.Connection]:
        """The psycopg connection (DB thread only; None while disconnected)."""
        return self._conn

    def _run(self, handler_id: int, request: Request) -> Optional[HandlerRow]:
        conn = self._conn
        if conn is None:
            raise DatabaseUnavailable("no database connection")

        def attempt():
            installed = self._installed.get(handler_id)
            if installed is None:
                raise HandlerError(self._broken.get(handler_id)
                                   or "handler %d is not installed" % handler_id)
            return handler_call.call(conn, installed, request, self._own_objects())

        return self._once_more_if_dirty(attempt)

    def _once_more_if_dirty(self, attempt: Callable[[], object]):
        """DB thread: ``attempt()``, and once more after a session reset if it found the
        session dirty (nothing of it ran then); its errors as the callers answer them."""
        try:
            try:
                return attempt()
            except SessionDirty as exc:
                self._reset(str(exc))
                return attempt()
        except SessionDirty as exc:
            self._reset(str(exc))
            raise HandlerError(str(exc)) from None
        except DatabaseUnavailable:
            self._drop_connection()
            raise
        except psycopg.Error as exc:
            self._check_connection(exc)
            raise HandlerError(error_text(exc), exc.sqlstate) from None

    def _own_objects(self) -> int:
        return len(self._installed) + self._route_objects

    @property
    def _route_objects(self) -> int:
        # Non-atomic routes create nothing in the session.
        return sum(1 for installed in self._routes.values() if installed.function)

    def _run_routes(self, routes: List[Route], request: Request) -> handler_call.ChainResult:
        conn = self._conn
        if conn is None:
            raise DatabaseUnavailable("no database connection")

        def attempt():
            # Run again after a reset (raised before a route's body ran), earlier
            # middleware of this chain may have run and committed: running the chain
            # again repeats them, as a client's retry would.
            steps = [(self._routes[route.id], route) for route in routes if route.id in self._routes]
            return handler_call.run_chain(conn, steps, request, self._own_objects())

        return self._once_more_if_dirty(attempt)

    def _reset(self, reason: str) -> None:
        """DB thread: drop everything the session holds; reinstall the configuration."""
        log.warn("resetting the database session ({reason}); reinstalling {count} handlers "
                 "and {routes} routes", reason=reason, count=len(self._installed), routes=len(self._routes))
        try:
            handler_call.reset_session(self._conn)
        except psycopg.Error as exc:
            self._check_connection(exc)
            raise HandlerError(error_text(exc), exc.sqlstate) from None
        self._installed, self._broken = {}, {}
        self._routes, self._routes_broken = {}, {}
        if self._wanted is not None:
            self._install(*self._wanted)

    def _apply(self, generation: int, handlers: Dict[int, Tuple[str, str]],
               routes: List[Route]) -> Dict[int, str]:
        self._wanted = (generation, handlers, routes)
        self._speed.clear()     # a new generation's handlers are judged afresh
        if self._conn is None:
            raise DatabaseUnavailable("no database connection; configuration %d will be "
                                      "installed on reconnect" % generation)
        try:
            clean = handler_call.temporary_objects(self._conn) == self._own_objects()
        except psycopg.Error as exc:
            self._check_connection(exc)
            clean = False
        if not clean:
            # Describing and creating handlers must not see what a request left behind.
            self._reset("a request left temporary objects in the session")
            return self._errors()
        return self._install(generation, handlers, routes)

    def _errors(self) -> Dict[int, str]:
        # Refused routes are logged where they are refused, with their description.
        return dict(self._broken)

    def _install(self, generation: int, handlers: Dict[int, Tuple[str, str]],
                 routes: Sequence[Route] = ()) -> dict:
        self._install_handlers(generation, handlers)
        self._install_routes(generation, routes)
        return self._errors()

    def _install_routes(self, generation: int, routes: Sequence[Route]) -> None:
        # Routes are few and cheap to create: every generation replaces them all (a
        # route's id is its place in the configuration, not a lasting identity).
        for route_id in list(self._routes):
            installed = self._routes.pop(route_id)
            self._quietly(handler_call.deallocate, self._conn, installed.statement)
            self._quietly(handler_call.drop_function, self._conn, installed.function)
        self._routes_broken = {}
        for route in routes:
            try:
                self._routes[route.id] = handler_call.install_route(
                    self._conn, route.id, generation, route.handler_oid, route.router_oid)
            except psycopg.Error as exc:
                self._check_connection(exc)
                message = error_text(exc)
                self._routes_broken[route.id] = message
                log.warn("route {route} refused: {error}", route=route.describe(), error=message)

    def _install_handlers(self, generation: int, handlers: Dict[int, Tuple[str, str]]) -> Dict[int, str]:
        errors: Dict[int, str] = {}
        for handler_id in [h for h in self._installed if h not in handlers]:
            self._uninstall(handler_id)
        self._broken = {h: e for h, e in self._broken.items() if h in handlers}
        for handler_id, (query, role_name) in sorted(handlers.items()):
            try:
                self._install_one(handler_id, generation, query, role_name)
            except psycopg.Error as exc:
                self._check_connection(exc)
                message = error_text(exc)
                errors[handler_id] = message
                self._broken[handler_id] = message
                log.warn("handler {handler_id} could not be installed: {error}",
                         handler_id=handler_id, error=message)
                # A broken handler must not keep answering with its previous version.
                self._uninstall(handler_id)
        return errors

    def _install_one(self, handler_id: int, generation: int, query: str, role_name: str) -> None:
        conn = self._conn
        old = self._installed.pop(handler_id, None)
        if old is not None:
            self._quietly(handler_call.deallocate, conn, old.statement)
            if old.function == function_name(handler_id, generation):
                # Same generation applied again (e.g. after a reconnect): replace it.
                self._quietly(handler_call.drop_function, conn, old.function)
                old = None
        self._installed[handler_id] = handler_call.install(conn, handler_id, generation, query, role_name)
        self._broken.pop(handler_id, None)
        if old is not None:
            self._quietly(handler_call.drop_function, conn, old.function)

    def _uninstall(self, handler_id: int) -> None:
        installed = self._installed.pop(handler_id, None)
        if installed is not None:
            self._quietly(handler_call.deallocate, self._conn, installed.statement)
            self._quietly(handler_call.drop_function, self._conn, installed.function)

    def _quietly(self, statement: Callable, *args) -> None:
        """Run our own clean-up statement; only a lost connection is worth raising."""
        try:
            statement(*args)
        except psycopg.Error as exc:
            self._check_connection(exc)
            log.warn("{statement} failed: {error}", statement=statement.__name__, error=error_text(exc))

    # -- connection (DB thread, connector thread) -----------------------------------

    def _connect(self) -> psycopg.Connection:
        """Connector thread: a new, configured connection not yet seen by anyone."""
        try:
            conn = psycopg.connect(self._conninfo, autocommit=True)
        except psycopg.Error as exc:
            raise DatabaseUnavailable(error_text(exc)) from None
        # psycopg must not prepare statements of its own: a session reset drops them.
        conn.prepare_threshold = None
        try:
            handler_call.prepare_session(conn)
        except psycopg.Error as exc:
            conn.close()
            raise DatabaseUnavailable(error_text(exc)) from None
        return conn

    def _adopt(self, conn: psycopg.Connection) -> Dict[int, str]:
        """DB thread: make ``conn`` the connection, installing the current configuration."""
        if self._state != "running":
            conn.close()
            raise DatabaseUnavailable("the DB thread is stopping")
        if self._conn is not None:
            self._conn.close()
        self._conn = conn
        self._installed, self._broken = {}, {}
        self._routes, self._routes_broken = {}, {}
        if self._wanted is None:
            return {}
        return self._install(*self._wanted)

    def _check_connection(self, exc: psycopg.Error) -> None:
        """After an error: if the connection is gone, drop it and raise DatabaseUnavailable."""
        conn = self._conn
        if conn is not None and not conn.broken and conn.pgconn.status == pq.ConnStatus.OK:
            return
        self._drop_connection()
        raise DatabaseUnavailable(error_text(exc)) from None

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        self._installed, self._broken = {}, {}
        self._routes, self._routes_broken = {}, {}
        if conn is not None:
            try:
                conn.close()
            except psycopg.Error:
                pass
        self._reactor.callFromThread(self._connection_lost)

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    # -- reconnecting (reactor thread) ----------------------------------------------

    def _connection_lost(self) -> None:
        if self._state != "running" or self._reconnecting:
            return
        log.warn("database connection lost; reconnecting")
        self.on_connection_change(False)
        self._reconnecting = True
        self._delay = 0.0
        self._try_reconnect()

    def _try_reconnect(self) -> None:
        self._reconnect_call = None
        d = deferToThreadPool(self._reactor, self._connect_pool, self._connect)
        d.addCallback(lambda conn: self._submit(self._adopt, conn))
        d.addCallbacks(self._reconnected, self._reconnect_failed)
        self._connecting = d

    def _reconnected(self, errors: Dict[int, str]) -> None:
        self._connecting = None
        self._reconnecting = False
        self.on_connection_change(True)
        log.info("database connection re-established ({count} handler install errors)",
                 count=len(errors))

    def _reconnect_failed(self, failure: Failure) -> None:
        self._connecting = None
        if self._state != "running":
            self._reconnecting = False
            return
        self._delay = min(max(self._delay * 2, self._min_delay), self._max_delay)
        log.warn("reconnecting to the database failed ({error}); next attempt in {delay}s",
                 error=failure.getErrorMessage(), delay=self._delay)
        self._reconnect_call = self._reactor.callLater(self._delay, self._try_reconnect)


def _request_size(request: Request) -> int:
    return len(request.body) + sum(len(n) + len(v) for n, v in request.headers) + len(request.path) + 64


def _chain(d: Deferred) -> Deferred:
    """A new Deferred that fires with ``d``'s result, leaving ``d`` untouched."""
    result = Deferred()

    def relay(value):
        result.callback(value)
        return value

    d.addBoth(relay)
    return result
