"""The worker's one DB thread and its one psycopg2 connection.

Everything that touches the connection runs on one thread of a one-thread
`ThreadPool`; the reactor never does. Work reaches that thread in batches: the reactor
appends jobs to a queue and, if no drain is running, starts one with
`deferToThreadPool`. The drain runs everything queued (including what arrives while it
runs) and hands all results back with one reactor wake-up, which fires every job's
Deferred. Under load that is one thread hand-off per batch instead of one per request,
the biggest single gain measured for this design (docs/architecture.md, "Request
batching").

The connection is in autocommit mode: each request is one statement
(``EXECUTE omni_httpd_h<id>(...)``), hence its own transaction, committed when the
handler succeeds and rolled back when it fails, in one round trip.

A broken connection makes the job that notices it, and every job after it, fail at once
with `DatabaseUnavailable` (the caller answers 503) while a reconnect runs on a separate
connector thread (so a slow TCP connect never holds up the queue), with backoff. The new
connection gets the current configuration installed before it serves anything.
"""
from __future__ import annotations

import collections
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

import psycopg2
import psycopg2.extensions
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from omni_httpd.request import Request

log = Logger()

#: A drain hands results back early once it holds this many...
FLUSH_COUNT = 64
#: ...or once its oldest undelivered result is this old (seconds): batching must not
#: hold a finished response behind a long queue.
FLUSH_AGE = 0.002

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
}
if psycopg2.extensions.libpq_version() >= 120000:
    # Data the server's kernel does not acknowledge within 10 s means a dead link; a
    # slow handler is not affected (the request itself is acknowledged at once).
    CONNECTION_DEFAULTS["tcp_user_timeout"] = "10000"

#: The prepared statement calls the handler function with these parameter types.
_PARAMETER_TYPES = "omni_http.http_method, text, text, bytea, text[], text[]"

HandlerRow = Tuple[str, Optional[int], Optional[List[str]], Optional[List[str]],
                   Optional[bytes], Optional[str], Optional[bool]]


class DatabaseUnavailable(Exception):
    """There is no working database connection right now: answer 503.

    The DB thread is already reconnecting by itself.
    """


class HandlerError(Exception):
    """The handler failed in PostgreSQL (or is not installed): answer 500.

    ``str()`` is the PostgreSQL error text for the log; ``sqlstate`` its code, if any.
    """

    def __init__(self, message: str, sqlstate: Optional[str] = None):
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate


def error_text(exc: psycopg2.Error) -> str:
    """PostgreSQL's message for ``exc``, with its DETAIL and HINT, on one line."""
    diag = exc.diag
    primary = diag.message_primary
    if not primary:
        return (exc.pgerror or str(exc)).strip() or exc.__class__.__name__
    text = primary
    if diag.message_detail:
        text += " DETAIL: " + diag.message_detail
    if diag.message_hint:
        text += " HINT: " + diag.message_hint
    return text


def _quote(value: Optional[str]) -> str:
    """An SQL literal for ``value``: an E'' string reads the same whatever
    standard_conforming_strings is (a handler may change it for the session)."""
    if value is None:
        return "NULL"
    if "\x00" in value:
        # PostgreSQL text cannot hold NUL; the HTTP parsers never produce it.
        raise HandlerError("request contains a NUL character")
    return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _arguments(request: Request) -> str:
    """The argument list of a handler call, as SQL literals.

    Built here rather than by psycopg2's parameter adaptation, which costs about a third
    of the DB thread's time per request (two lists of header strings to adapt one by
    one); the quoting is the same PostgreSQL escape-string syntax psycopg2 relies on.
    """
    headers = request.headers
    if headers:
        names = "ARRAY[%s]" % ",".join([_quote(name) for name, _ in headers])
        values = "ARRAY[%s]" % ",".join([_quote(value) for _, value in headers])
    else:
        names = values = "'{}'"
    return "(%s,%s,%s,E'\\\\x%s'::bytea,%s,%s)" % (
        _quote(request.method), _quote(request.path), _quote(request.query_string),
        request.body.hex(), names, values)


def function_name(handler_id: int, generation: int) -> str:
    return "omni_httpd_h%d_g%d" % (handler_id, generation)


def statement_name(handler_id: int) -> str:
    return "omni_httpd_h%d" % handler_id


class DBThread:
    """One database connection, one thread, batched hand-off (see the module docstring).

    Reactor-thread API: `start`, `stop`, `submit`, `run`, `apply_configuration`,
    `busy`, `on_busy_change`. All of them return at once; results come as Deferreds.
    """

    def __init__(self, dsn: str, reactor=None, handler_timeout: float = 0,
                 application_name: str = "omni_httpd worker",
                 reconnect_delays: Tuple[float, float] = (0.1, 5.0)):
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self._dsn = dsn
        self._handler_timeout = handler_timeout
        self._min_delay, self._max_delay = reconnect_delays
        given = psycopg2.extensions.parse_dsn(dsn)
        self._connect_args = {k: v for k, v in CONNECTION_DEFAULTS.items() if k not in given}
        if "application_name" not in given:
            self._connect_args["application_name"] = application_name

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
        self._reconnecting = False
        self._reconnect_call = None
        self._connecting: Optional[Deferred] = None
        self._delay = 0.0
        self._shutdown_trigger = None
        self._stopped: Optional[Deferred] = None

        # DB thread only (and the connector thread before a connection is adopted).
        self._conn = None
        self._cur = None
        self._statements: Dict[int, str] = {}    # handler id -> EXECUTE text
        self._functions: Dict[int, str] = {}     # handler id -> pg_temp function name
        self._broken: Dict[int, str] = {}        # handler id -> install error
        self._wanted: Optional[Tuple[int, Dict[int, Tuple[str, str]]]] = None

    # -- life cycle (reactor thread) ------------------------------------------------

    def start(self) -> Deferred:
        """Start the threads and connect; fires once the connection is ready.

        Fails with `DatabaseUnavailable` (and stops again) if the first connection
        cannot be made. The DB thread also stops before the reactor shuts down.
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
            if isinstance(outcome, Failure):
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
        results: list = []
        oldest = 0.0
        queue = self._queue
        lock = self._lock
        while True:
            with lock:
                if not queue:
                    self._draining = False
                    return results
                job, args, d = queue.popleft()
            if d.called:
                # Cancelled while queued (the client went away): skip the work.
                continue
            try:
                results.append((d, True, job(*args)))
            except (DatabaseUnavailable, HandlerError) as exc:
                results.append((d, False, exc))
            except BaseException:
                results.append((d, False, Failure()))
            now = time.monotonic()
            if len(results) == 1:
                oldest = now
            elif len(results) >= FLUSH_COUNT or now - oldest >= FLUSH_AGE:
                self._reactor.callFromThread(self._deliver, results)
                results = []

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

        Fires with the ``omni_httpd._handler_result`` row as a tuple (kind, status,
        header_names, header_values, body bytes, proxy_url, preserve_host), or None when
        the handler returned no rows. Fails with `HandlerError` (answer 500) or
        `DatabaseUnavailable` (answer 503).
        """
        return self.submit(self._run, handler_id, request)

    def apply_configuration(self, generation: int,
                            handlers: Dict[int, Tuple[str, str]]) -> Deferred:
        """Install ``handlers`` ({handler id: (query, role_name)}) as ``generation``.

        Queued like a request: requests queued before run with the old handlers, those
        queued after with the new ones. Fires with {handler id: error text} for the
        handlers that could not be installed (they answer 500 until the next
        configuration). Handlers absent from ``handlers`` are removed. Without a
        connection it fails with `DatabaseUnavailable`, but the configuration is kept
        and installed as soon as the connection is back.
        """
        handlers = {int(hid): (query, role) for hid, (query, role) in handlers.items()}
        return self.submit(self._apply, int(generation), handlers)

    @property
    def connection(self):
        """The psycopg2 connection (DB thread only; None while disconnected)."""
        return self._conn

    def _run(self, handler_id: int, request: Request) -> Optional[HandlerRow]:
        cur = self._cur
        if cur is None:
            raise DatabaseUnavailable("no database connection")
        statement = self._statements.get(handler_id)
        if statement is None:
            raise HandlerError(self._broken.get(handler_id)
                               or "handler %d is not installed" % handler_id)
        try:
            cur.execute(statement + _arguments(request))
            row = cur.fetchone()
        except psycopg2.Error as exc:
            self._check_connection(exc)
            raise HandlerError(error_text(exc), exc.pgcode) from None
        if row is None:
            return None
        body = row[4]
        if body is not None:
            row = row[:4] + (bytes(body),) + row[5:]
        return row

    def _apply(self, generation: int, handlers: Dict[int, Tuple[str, str]]) -> Dict[int, str]:
        self._wanted = (generation, handlers)
        if self._cur is None:
            raise DatabaseUnavailable("no database connection; configuration %d will be "
                                      "installed on reconnect" % generation)
        return self._install(generation, handlers)

    def _install(self, generation: int, handlers: Dict[int, Tuple[str, str]]) -> Dict[int, str]:
        errors: Dict[int, str] = {}
        for handler_id in [h for h in self._functions if h not in handlers]:
            self._uninstall(handler_id)
        for handler_id in [h for h in self._statements if h not in handlers]:
            self._uninstall(handler_id)
        self._broken = {h: e for h, e in self._broken.items() if h in handlers}
        for handler_id, (query, role_name) in sorted(handlers.items()):
            try:
                self._install_one(handler_id, generation, query, role_name)
            except psycopg2.Error as exc:
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
        cur = self._cur
        name = function_name(handler_id, generation)
        if self._functions.get(handler_id) == name:
            # Same generation applied again (e.g. after a reconnect): replace it.
            self._uninstall(handler_id)
        cur.execute("SELECT omni_httpd._install_handler(%s, %s, %s)", (name, query, role_name))
        old = self._functions.get(handler_id)
        self._functions[handler_id] = name
        self._deallocate(handler_id)
        cur.execute("PREPARE %s (%s) AS SELECT * FROM pg_temp.%s($1, $2, $3, $4, $5, $6)"
                    % (statement_name(handler_id), _PARAMETER_TYPES, name))
        self._statements[handler_id] = (
            "EXECUTE %s" % statement_name(handler_id))
        self._broken.pop(handler_id, None)
        if old is not None:
            self._quietly("DROP FUNCTION IF EXISTS pg_temp.%s" % old)

    def _deallocate(self, handler_id: int) -> None:
        if self._statements.pop(handler_id, None) is not None:
            self._quietly("DEALLOCATE %s" % statement_name(handler_id))

    def _uninstall(self, handler_id: int) -> None:
        self._deallocate(handler_id)
        name = self._functions.pop(handler_id, None)
        if name is not None:
            self._quietly("DROP FUNCTION IF EXISTS pg_temp.%s" % name)

    def _quietly(self, statement: str) -> None:
        """Run our own clean-up statement; only a lost connection is worth raising."""
        try:
            self._cur.execute(statement)
        except psycopg2.Error as exc:
            self._check_connection(exc)
            log.warn("{statement} failed: {error}", statement=statement, error=error_text(exc))

    # -- connection (DB thread, connector thread) -----------------------------------

    def _connect(self):
        """Connector thread: a new, configured connection not yet seen by anyone."""
        try:
            conn = psycopg2.connect(self._dsn, **self._connect_args)
        except psycopg2.Error as exc:
            raise DatabaseUnavailable(error_text(exc)) from None
        try:
            conn.autocommit = True
            if self._handler_timeout and self._handler_timeout > 0:
                with conn.cursor() as cur:
                    # Session level, once per connection: no extra round trip per request.
                    cur.execute("SET statement_timeout = %s",
                                (max(1, int(self._handler_timeout * 1000)),))
        except psycopg2.Error as exc:
            conn.close()
            raise DatabaseUnavailable(error_text(exc)) from None
        return conn

    def _adopt(self, conn) -> Dict[int, str]:
        """DB thread: make ``conn`` the connection, installing the current configuration."""
        if self._state != "running":
            conn.close()
            raise DatabaseUnavailable("the DB thread is stopping")
        if self._conn is not None:
            self._conn.close()
        self._conn = conn
        self._cur = conn.cursor()
        self._statements, self._functions, self._broken = {}, {}, {}
        if self._wanted is None:
            return {}
        return self._install(*self._wanted)

    def _check_connection(self, exc: psycopg2.Error) -> None:
        """After an error: if the connection is gone, drop it and raise DatabaseUnavailable."""
        if self._conn is not None and not self._conn.closed:
            return
        self._drop_connection()
        raise DatabaseUnavailable(error_text(exc)) from None

    def _drop_connection(self) -> None:
        conn, self._conn, self._cur = self._conn, None, None
        self._statements, self._functions, self._broken = {}, {}, {}
        if conn is not None:
            try:
                conn.close()
            except psycopg2.Error:
                pass
        self._reactor.callFromThread(self._connection_lost)

    def _close(self) -> None:
        conn, self._conn, self._cur = self._conn, None, None
        if conn is not None:
            conn.close()

    # -- reconnecting (reactor thread) ----------------------------------------------

    def _connection_lost(self) -> None:
        if self._state != "running" or self._reconnecting:
            return
        log.warn("database connection lost; reconnecting")
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


def _chain(d: Deferred) -> Deferred:
    """A new Deferred that fires with ``d``'s result, leaving ``d`` untouched."""
    result = Deferred()

    def relay(value):
        result.callback(value)
        return value

    d.addBoth(relay)
    return result
