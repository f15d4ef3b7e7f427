"""The admin console's database access: its own psycopg2 connections on a small thread pool.

Every operation is one transaction on a console thread (never on the reactor, never on a
worker's connection). The database validates everything the operator submits; its errors
come back as `DatabaseProblem` so the page can show them next to the form.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, List, Optional

import psycopg
import psycopg2
from twisted.internet import defer, threads
from twisted.python.threadpool import ThreadPool

#: Bound on anything the console runs, the tried handlers included.
STATEMENT_TIMEOUT_MS = 15000
#: A connection unused for this long (seconds) is checked before it is used.
IDLE_CHECK = 30.0


@dataclass
class DatabaseProblem(Exception):
    """A PostgreSQL error as the operator should see it."""

    message: str
    detail: Optional[str] = None
    hint: Optional[str] = None
    constraint: Optional[str] = None
    sqlstate: Optional[str] = None

    def __str__(self) -> str:
        text = self.message
        if self.detail:
            text += " (DETAIL: %s)" % self.detail
        return text

    @classmethod
    def from_psycopg(cls, error: psycopg2.Error) -> "DatabaseProblem":
        diag = getattr(error, "diag", None)
        message = (diag and diag.message_primary) or str(error).strip() or type(error).__name__
        return cls(message=message,
                   detail=diag and diag.message_detail,
                   hint=diag and diag.message_hint,
                   constraint=diag and diag.constraint_name,
                   sqlstate=getattr(error, "pgcode", None) or getattr(error, "sqlstate", None))


class ConsoleDatabase:
    """Runs console operations in transactions on a pool of ``threads`` threads."""

    def __init__(self, dsn: str, reactor, threads_: int = 2):
        self._dsn = dsn
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=0, maxthreads=threads_, name="omni_httpd-admin-db")
        self._local = threading.local()
        self._connections: List[Any] = []
        self._lock = threading.Lock()
        self._started = False
        self._shutdown_trigger = None
        self.idle_check = IDLE_CHECK

    def _start(self) -> None:
        if not self._started:
            self._started = True
            self._pool.start()
            self._shutdown_trigger = self._reactor.addSystemEventTrigger(
                "during", "shutdown", self.close)

    def close(self) -> None:
        """Stop the threads and close the connections (idempotent)."""
        if self._started:
            self._started = False
            self._pool.stop()
            if self._shutdown_trigger is not None:
                try:
                    self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
                except (ValueError, KeyError):
                    pass   # we are being called by that very trigger
                self._shutdown_trigger = None
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            try:
                conn.close()
            except psycopg2.Error:
                pass

    def try_request(self, *args) -> defer.Deferred:
        """`try_handler` on the console's threads, with `DatabaseProblem` for errors."""
        self._start()

        def blocking():
            try:
                return try_handler(self._dsn, *args)
            except psycopg.Error as e:
                raise DatabaseProblem.from_psycopg(e) from None

        return threads.deferToThreadPool(self._reactor, self._pool, blocking)

    def try_route(self, *args) -> defer.Deferred:
        """`try_route` on the console's threads, with `DatabaseProblem` for errors."""
        self._start()

        def blocking():
            try:
                return try_route(self._dsn, *args)
            except psycopg.Error as e:
                raise DatabaseProblem.from_psycopg(e) from None

        return threads.deferToThreadPool(self._reactor, self._pool, blocking)

    def run(self, operation: Callable, *args, rollback: bool = False) -> defer.Deferred:
        """Run ``operation(cursor, *args)`` in one transaction; committed unless ``rollback``.

        Fails with `DatabaseProblem` on any PostgreSQL error, including one raised at
        commit (deferred constraint triggers validate handlers then).
        """
        self._start()
        return threads.deferToThreadPool(self._reactor, self._pool, self._transaction,
                                         operation, args, rollback)

    def _connection(self):
        conn = getattr(self._local, "conn", None)
        if conn is not None and not conn.closed and time.monotonic() - self._local.used > self.idle_check:
            # An idle connection may have been cut (server restart, idle timeouts): find
            # out now rather than show the operator an error for it.
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT 1")
                conn.rollback()
            except psycopg2.Error:
                conn.close()
        if conn is None or conn.closed:
            conn = psycopg2.connect(self._dsn, connect_timeout=10,
                                    application_name="omni_httpd admin console")
            with conn.cursor() as cur:
                # Set here, not as connect options, to keep any options the DSN has.
                cur.execute("SET statement_timeout = %s", (STATEMENT_TIMEOUT_MS,))
            conn.commit()
            self._local.conn = conn
            with self._lock:
                self._connections = [c for c in self._connections if not c.closed] + [conn]
        self._local.used = time.monotonic()
        return conn

    def _transaction(self, operation, args, rollback):
        try:
            conn = self._connection()
        except psycopg2.Error as e:
            raise DatabaseProblem.from_psycopg(e) from None
        try:
            with conn.cursor() as cur:
                result = operation(cur, *args)
            if rollback:
                conn.rollback()
            else:
                conn.commit()
            return result
        except psycopg2.Error as e:
            problem = DatabaseProblem.from_psycopg(e)
            if conn.closed:
                self._local.conn = None
            else:
                try:
                    conn.rollback()
                except psycopg2.Error:
                    conn.close()
                    self._local.conn = None
            raise problem from None


# --- operations: each takes a cursor first -------------------------------------------

def database_info(cur) -> dict:
    cur.execute("SELECT current_database(), current_setting('server_version'), current_user,"
                " (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)")
    name, version, user, superuser = cur.fetchone()
    return {"name": name, "version": version, "user": user, "superuser": bool(superuser)}


def reload_configuration(cur) -> bool:
    cur.execute("SELECT omni_httpd.reload_configuration()")
    return cur.fetchone()[0]


_LISTENER_COLUMNS = """
    l.id, host(l.address), l.port, l.effective_port, l.protocol::text,
    ARRAY(SELECT lh.handler_id FROM omni_httpd.listeners_handlers lh
          WHERE lh.listener_id = l.id ORDER BY lh.handler_id)
"""


def _listener(row) -> dict:
    return dict(zip(("id", "address", "port", "effective_port", "protocol", "handler_ids"), row))


def listeners(cur) -> List[dict]:
    cur.execute("SELECT %s FROM omni_httpd.listeners l ORDER BY l.id" % _LISTENER_COLUMNS)
    return [_listener(row) for row in cur.fetchall()]


def listener(cur, listener_id: int) -> Optional[dict]:
    cur.execute("SELECT %s FROM omni_httpd.listeners l WHERE l.id = %%s" % _LISTENER_COLUMNS,
                (listener_id,))
    row = cur.fetchone()
    return _listener(row) if row else None


def protocols(cur) -> List[str]:
    cur.execute("SELECT unnest(enum_range(NULL::omni_httpd.http_protocol))::text")
    return [row[0] for row in cur.fetchall()]


def _value_or_default(value: str) -> str:
    # An empty field means "the column's default", so the table keeps deciding it.
    return "DEFAULT" if value == "" else "%s"


def create_listener(cur, address: str, port: str, protocol: str,
                    handler_id: Optional[int]) -> int:
    values = [v for v in (address, port, protocol) if v != ""]
    cur.execute("INSERT INTO omni_httpd.listeners (address, port, protocol) VALUES (%s, %s, %s)"
                " RETURNING id" % tuple(_value_or_default(v) for v in (address, port, protocol)),
                values)
    listener_id = cur.fetchone()[0]
    if handler_id is not None:
        attach(cur, listener_id, handler_id)
    return listener_id


def update_listener(cur, listener_id: int, address: str, port: str, protocol: str) -> bool:
    values = [v for v in (address, port, protocol) if v != ""]
    cur.execute("UPDATE omni_httpd.listeners SET address = %s, port = %s, protocol = %s"
                " WHERE id = %%s" % tuple(_value_or_default(v) for v in (address, port, protocol)),
                values + [listener_id])
    return cur.rowcount == 1


def delete_listener(cur, listener_id: int) -> bool:
    cur.execute("DELETE FROM omni_httpd.listeners_handlers WHERE listener_id = %s", (listener_id,))
    cur.execute("DELETE FROM omni_httpd.listeners WHERE id = %s", (listener_id,))
    return cur.rowcount == 1


def attach(cur, listener_id: int, handler_id: int) -> None:
    cur.execute("INSERT INTO omni_httpd.listeners_handlers (listener_id, handler_id)"
                " SELECT %s, %s WHERE NOT EXISTS (SELECT FROM omni_httpd.listeners_handlers"
                " WHERE listener_id = %s AND handler_id = %s)",
                (listener_id, handler_id, listener_id, handler_id))


def detach(cur, listener_id: int, handler_id: int) -> None:
    cur.execute("DELETE FROM omni_httpd.listeners_handlers"
                " WHERE listener_id = %s AND handler_id = %s", (listener_id, handler_id))


_HANDLER_COLUMNS = """
    h.id, h.query, h.role_name::text,
    ARRAY(SELECT lh.listener_id FROM omni_httpd.listeners_handlers lh
          WHERE lh.handler_id = h.id ORDER BY lh.listener_id)
"""


def _handler(row) -> dict:
    return dict(zip(("id", "query", "role_name", "listener_ids"), row))


def handlers(cur) -> List[dict]:
    cur.execute("SELECT %s FROM omni_httpd.handlers h ORDER BY h.id" % _HANDLER_COLUMNS)
    return [_handler(row) for row in cur.fetchall()]


def handler(cur, handler_id: int) -> Optional[dict]:
    cur.execute("SELECT %s FROM omni_httpd.handlers h WHERE h.id = %%s" % _HANDLER_COLUMNS,
                (handler_id,))
    row = cur.fetchone()
    return _handler(row) if row else None


def roles(cur) -> List[str]:
    """Roles the console's user may give a handler: all for a superuser, else its memberships.

    PostgreSQL's built-in ``pg_*`` roles are left out: they are not meant to own code.
    """
    cur.execute("SELECT r.rolname::text FROM pg_roles r"
                " WHERE r.rolname !~ '^pg_'"
                " AND ((SELECT rolsuper FROM pg_roles WHERE rolname = current_user)"
                "      OR pg_has_role(current_user, r.oid, 'MEMBER'))"
                " ORDER BY r.rolname = current_user DESC, r.rolname")
    return [row[0] for row in cur.fetchall()]


def create_handler(cur, query: str, role_name: str) -> int:
    cur.execute("INSERT INTO omni_httpd.handlers (query, role_name) VALUES (%%s, %s) RETURNING id"
                % _value_or_default(role_name), [query] + ([role_name] if role_name else []))
    return cur.fetchone()[0]


def update_handler(cur, handler_id: int, query: str, role_name: str) -> bool:
    cur.execute("UPDATE omni_httpd.handlers SET query = %%s, role_name = %s WHERE id = %%s"
                % _value_or_default(role_name),
                [query] + ([role_name] if role_name else []) + [handler_id])
    return cur.rowcount == 1


def delete_handler(cur, handler_id: int) -> bool:
    cur.execute("DELETE FROM omni_httpd.listeners_handlers WHERE handler_id = %s", (handler_id,))
    cur.execute("DELETE FROM omni_httpd.handlers WHERE id = %s", (handler_id,))
    return cur.rowcount == 1


def try_handler(dsn: str, query: str, role_name: str, method: str, path: str,
               query_string: Optional[str], body: bytes,
               header_names: List[str], header_values: List[str]) -> Optional[tuple]:
    """Install ``query`` as a temporary handler and run it on one request, as a worker would.

    Blocking; call through `ConsoleDatabase.try_request`. It uses a session of its own
    (never the console's shared connections): the handler is installed and called the
    way the worker does it (handler_call.py: described without running, run as its role,
    values as protocol parameters), inside one transaction that is rolled back, and the
    session is closed afterwards, so nothing the handler did or left outlives the try.
    Returns the outcome as handler_call.read_row gives it (None: no outcome), ready
    for `omni_httpd.outcome.response_from_row`.
    """
    from omni_httpd.common import handler_call
    from omni_httpd.common.request import Request

    request = Request(method=method, path=path, query_string=query_string,
                      headers=list(zip(header_names, header_values)), body=body)
    with psycopg.connect(dsn, connect_timeout=10, autocommit=False,
                         options="-c statement_timeout=%d" % STATEMENT_TIMEOUT_MS) as conn:
        conn.prepare_threshold = None
        try:
            installed = handler_call.install(conn, 0, 0, query, role_name or None)
            return handler_call.call(conn, installed, request, own_objects=1, clean_after_failure=False)
        except handler_call.HandlerError as error:
            raise DatabaseProblem(message=error.message, sqlstate=error.sqlstate) from None
        finally:
            if not conn.broken:
                conn.rollback()


# --- routes ---------------------------------------------------------------------------

def routes(cur) -> dict:
    """Every route as the daemon loads it, and the routers it cannot read."""
    from omni_httpd.master import config, queries

    cur.execute(queries.LOAD_ROUTES)
    found, problems = config.routes_from_rows(cur.fetchall())
    return {"routes": found, "problems": problems}


def try_route(dsn: str, listener_id: int, method: str, path: str, query_string: Optional[str],
              body: bytes, header_names: List[str], header_values: List[str]) -> dict:
    """Run ``listener_id``'s routes on one request, as a worker would (match with the
    urlpattern package, install each matching route as its role, run the chain), in a
    session of its own and one transaction that is rolled back. Returns ``row`` (as
    `try_handler`), ``answered_by`` (description of the route whose outcome it is, or
    None), ``handled`` and ``matched`` (descriptions of the matching routes)."""
    from omni_httpd.common import handler_call
    from omni_httpd.common.request import Request
    from omni_httpd.common.routing import RouteTable

    request = Request(method=method, path=path, query_string=query_string,
                      headers=list(zip(header_names, header_values)), body=body,
                      listener_id=listener_id)
    with psycopg.connect(dsn, connect_timeout=10, autocommit=False,
                         options="-c statement_timeout=%d" % STATEMENT_TIMEOUT_MS) as conn:
        conn.prepare_threshold = None
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT effective_port FROM omni_httpd.listeners WHERE id = %s", (listener_id,))
                row = cur.fetchone()
                if row is None:
                    raise DatabaseProblem(message="There is no listener %d." % listener_id)
                port = row[0]
                loaded = routes(cur)
            table = RouteTable(loaded["routes"])
            chain = table.match(request, port)
            steps, refused = [], []
            for route in chain:
                try:
                    conn.execute("SAVEPOINT omni_httpd_try")
                    steps.append((handler_call.install_route(conn, route.id, 0, route.handler_oid,
                                                             route.router_oid), route))
                    conn.execute("RELEASE SAVEPOINT omni_httpd_try")
                except psycopg.Error as error:
                    conn.execute("ROLLBACK TO SAVEPOINT omni_httpd_try")
                    refused.append("%s: %s" % (route.describe(), handler_call.error_text(error)))
            own = sum(1 for installed, _ in steps if installed.function)
            result = handler_call.run_chain(conn, steps, request, own, clean_after_failure=False)
            return {"row": result.row, "handled": result.handled,
                    "answered_by": result.answered_by.describe() if result.answered_by else None,
                    "matched": [route.describe() for route in chain], "refused": refused}
        except handler_call.HandlerError as error:
            raise DatabaseProblem(message=error.message, sqlstate=error.sqlstate) from None
        finally:
            if not conn.broken:
                conn.rollback()
