"""How the daemon installs and calls a handler function (psycopg 3, libpq directly).

Used by the worker's DB thread and by the console's try-a-request, so both run a
handler exactly the same way (docs/architecture.md, "Executing a handler"):

- `install` learns the query's column types from the protocol's Parse/Describe, run
  under the handler's role and search_path. PostgreSQL refuses more than one statement
  in a Parse and executes nothing, so no text of the handler runs with the daemon's
  privileges. Then ``omni_httpd._install_handler`` creates the SECURITY DEFINER function
  and the call is prepared.
- `call` sends the request's values as binary protocol parameters (never as SQL text)
  and reads the one binary result row. The statement checks, before the handler
  function runs, that the function is still the one installed and that no earlier
  request left temporary objects (SQLSTATE OH002/OH003: `SessionDirty`).
- `after_failure` undoes what a failed request may leave in the session (session
  advisory locks, SQL prepared statements, sequence caches); after a success the
  handler function itself did that.
"""
from __future__ import annotations

import collections
import functools
import select
import struct
import time
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import psycopg
from psycopg import pq, sql

from omni_httpd.common.request import Request

#: (kind, status, header_names, header_values, body, proxy_url, preserve_host)
HandlerRow = Tuple[str, Optional[int], Optional[List[str]], Optional[List[str]],
                   Optional[bytes], Optional[str], Optional[bool]]

#: The columns a handler query is described with: `request` as the function sees it.
_PROBE_REQUEST = ("SELECT NULL::omni_http.http_method AS method, NULL::pg_catalog.text AS path, "
                  "NULL::pg_catalog.text AS query_string, NULL::pg_catalog.bytea AS body, "
                  "NULL::omni_http.http_header[] AS headers")

_INT4 = struct.Struct("!i")
_ARRAY_HEADER = struct.Struct("!iiIii")       # ndim, has nulls, element type, length, lower bound
_EMPTY_TEXT_ARRAY = struct.pack("!iiI", 0, 0, 25)
_ARRAY_EMPTY = struct.Struct("!iiI")
#: an http_header element: its length, the record's field count, the name's type and length
_HEADER_ELEMENT = struct.Struct("!iiIi")
_TEXT_FIELD = struct.Struct("!Ii")
_AFTER_FAILURE = b"omni_httpd_after_request"

#: Our SQLSTATEs from omni_httpd._before_request: handler function changed / temporary
#: objects left in the session. Nothing of the handler has run.
DIRTY_STATES = frozenset([b"OH002", b"OH003"])


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


class SessionDirty(Exception):
    """The session must be reset (DISCARD ALL, handlers reinstalled) before it serves."""


@dataclass(frozen=True)
class Installed:
    """A handler function installed in the session, and its prepared call."""

    function: str
    statement: bytes
    #: routes only: 'handler' or 'middleware'
    kind: str = "handler"
    #: routes only: a procedure run non-atomic (a top-level CALL under SET ROLE ``role``;
    #: ``function`` is empty: nothing was created in the session)
    nonatomic: bool = False
    role: Optional[str] = None
    #: routes only: the oid of omni_http.http_header (the request's headers are passed
    #: as one omni_http.http_header[] parameter)
    header_type: int = 0


def error_text(exc: psycopg.Error) -> str:
    """PostgreSQL's message for ``exc``, with its DETAIL and HINT, on one line."""
    diag = exc.diag
    primary = diag.message_primary
    if not primary:
        return str(exc).strip() or exc.__class__.__name__
    return _join(primary, diag.message_detail, diag.message_hint)


def result_error_text(res: pq.abc.PGresult) -> str:
    field = pq.DiagnosticField
    primary = res.error_field(field.MESSAGE_PRIMARY)
    if not primary:
        return (res.error_message or b"").decode("utf-8", "replace").strip() or "unknown error"

    def text(value):
        return value.decode("utf-8", "replace") if value else None

    return _join(text(primary), text(res.error_field(field.MESSAGE_DETAIL)),
                 text(res.error_field(field.MESSAGE_HINT)))


def _join(primary: str, detail: Optional[str], hint: Optional[str]) -> str:
    text = primary
    if detail:
        text += " DETAIL: " + detail
    if hint:
        text += " HINT: " + hint
    return text


def function_name(handler_id: int, generation: int) -> str:
    return "omni_httpd_h%d_g%d" % (handler_id, generation)


def statement_name(handler_id: int) -> bytes:
    return b"omni_httpd_h%d" % handler_id


# -- installing (blocking; one connection, one thread) ----------------------------------

def column_types(conn: psycopg.Connection, query: str, role_name: Optional[str]) -> List[int]:
    """The type oids of what ``query`` returns with `request` in scope, running nothing.

    Raises psycopg errors as PostgreSQL reports them (more than one statement, an
    invalid query, a role the daemon cannot become).
    """
    wrapped, returns_rows = conn.execute(
        "SELECT w.wrapped, w.returns_rows FROM omni_httpd._wrap_handler_query(%s, %s, NULL) w",
        (query, _PROBE_REQUEST)).fetchone()
    text = wrapped + ("SELECT * FROM omni_httpd_handler" if returns_rows else "SELECT")
    conn.execute("SELECT pg_catalog.set_config('search_path', omni_httpd._handler_search_path(), false)")
    try:
        if role_name is not None:
            conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role_name)))
        pgconn = conn.pgconn
        _check(conn, pgconn.prepare(b"", text.encode("utf-8")))
        described = _check(conn, pgconn.describe_prepared(b""))
        return [described.ftype(i) for i in range(described.nfields)]
    finally:
        if not conn.broken:
            conn.execute("RESET ROLE; RESET search_path")


def install(conn: psycopg.Connection, handler_id: int, generation: int, query: str,
            role_name: Optional[str]) -> Installed:
    """Create handler ``handler_id``'s function for ``generation`` and prepare its call.

    The caller deallocates a previous statement of the same handler first.
    """
    name = function_name(handler_id, generation)
    types = column_types(conn, query, role_name)
    oid, xmin = conn.execute(
        "SELECT i.function_oid::pg_catalog.int8, i.function_xmin::pg_catalog.text "
        "FROM omni_httpd._install_handler(%s, %s, %s, %s::pg_catalog.oid[]::pg_catalog.regtype[]) i",
        (name, query, role_name, types)).fetchone()
    statement = statement_name(handler_id)
    call_text = sql.SQL(
        "SELECT * FROM pg_temp.{}(omni_httpd._before_request($1, {}::pg_catalog.oid, {}::pg_catalog.xid, $7), "
        "$2, $3, $4, $5, $6) WITH ORDINALITY").format(sql.Identifier(name), sql.Literal(int(oid)),
                                                      sql.Literal(str(int(xmin))))
    try:
        _check(conn, conn.pgconn.prepare(statement, call_text.as_bytes(conn)))
    except psycopg.Error:
        # No function of ours may stay behind uncounted (see _before_request).
        if not conn.broken:
            drop_function(conn, name)
        raise
    return Installed(name, statement)


def route_function_name(route_id: int, generation: int) -> str:
    return "omni_httpd_r%d_g%d" % (route_id, generation)


def route_statement_name(route_id: int) -> bytes:
    return b"omni_httpd_r%d" % route_id


def install_route(conn: psycopg.Connection, route_id: int, generation: int, handler_oid: int,
                  router_oid: int) -> Installed:
    """Create route ``route_id``'s function for ``generation`` and prepare its call.

    ``omni_httpd._install_route`` refuses (raises) a route that must not run: see it in
    sql/009_routes.sql. The caller deallocates a previous statement of the same route.
    """
    name = route_function_name(route_id, generation)
    oid, xmin, kind, role, call_statement, method_type, header_type = conn.execute(
        "SELECT i.function_oid::pg_catalog.int8, i.function_xmin::pg_catalog.text, i.kind, "
        "i.role_name::pg_catalog.text, i.call_statement, "
        "'omni_http.http_method'::pg_catalog.regtype::pg_catalog.oid::pg_catalog.int8, "
        "'omni_http.http_header'::pg_catalog.regtype::pg_catalog.oid::pg_catalog.int8 "
        "FROM omni_httpd._install_route(%s, %s::pg_catalog.oid::pg_catalog.regprocedure, "
        "%s::pg_catalog.oid::pg_catalog.regclass) i",
        (name, handler_oid, router_oid)).fetchone()
    statement = route_statement_name(route_id)
    if kind == "nonatomic":
        # The CALL names every parameter's type: it need not use all fifteen.
        types = [23, int(method_type), 25, 25, 17, int(header_array_type(conn, header_type)), 1009, 25, 25, 23,
                 1009, 1009, 17, 25, 16]
        # Parsed as the role it runs as: the daemon's own role may not even see its schema.
        conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
        try:
            _check(conn, conn.pgconn.prepare(statement, call_statement.encode("utf-8"), types))
        finally:
            if not conn.broken:
                conn.execute("RESET ROLE")
        signature = conn.execute("SELECT s.kind FROM omni_httpd._route_signature("
                                 "%s::pg_catalog.oid::pg_catalog.regprocedure, "
                                 "%s::pg_catalog.oid::pg_catalog.regclass) s",
                                 (handler_oid, router_oid)).fetchone()[0]
        return Installed("", statement, signature, nonatomic=True, role=role, header_type=int(header_type))
    call_text = sql.SQL(
        "SELECT * FROM pg_temp.{}($1, omni_httpd._before_request($2, {}::pg_catalog.oid, {}::pg_catalog.xid, $16), "
        "$3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) WITH ORDINALITY").format(
            sql.Identifier(name), sql.Literal(int(oid)), sql.Literal(str(int(xmin))))
    try:
        _check(conn, conn.pgconn.prepare(statement, call_text.as_bytes(conn)))
    except psycopg.Error:
        if not conn.broken:
            drop_function(conn, name)
        raise
    return Installed(name, statement, kind, header_type=int(header_type))


def header_array_type(conn: psycopg.Connection, header_type: int) -> int:
    """The oid of the array type of omni_http.http_header."""
    return conn.execute("SELECT t.typarray::pg_catalog.int8 FROM pg_catalog.pg_type t "
                        "WHERE t.oid OPERATOR(pg_catalog.=) %s::pg_catalog.oid", (header_type,)).fetchone()[0]


def drop_function(conn: psycopg.Connection, name: str) -> None:
    if not name:
        return      # a non-atomic route: nothing was created
    conn.execute(sql.SQL("DROP FUNCTION IF EXISTS pg_temp.{}").format(sql.Identifier(name)))


def deallocate(conn: psycopg.Connection, statement: bytes) -> None:
    conn.execute(sql.SQL("DEALLOCATE {}").format(sql.Identifier(statement.decode())))


def prepare_session(conn: psycopg.Connection) -> None:
    """Prepare the daemon's own per-session statements (after connecting or a reset)."""
    _check(conn, conn.pgconn.prepare(_AFTER_FAILURE, b"SELECT omni_httpd._after_request()"))


def temporary_objects(conn: psycopg.Connection) -> int:
    """How many objects the session's temporary schema holds."""
    return conn.execute(
        "SELECT pg_catalog.count(*)::pg_catalog.int4 FROM pg_catalog.pg_depend d "
        "WHERE d.refclassid = 'pg_catalog.pg_namespace'::pg_catalog.regclass "
        "AND d.refobjid = pg_catalog.pg_my_temp_schema() AND d.refobjsubid = 0").fetchone()[0]


def reset_session(conn: psycopg.Connection) -> None:
    """Everything a session can hold, dropped: ours is reinstalled by the caller."""
    conn.execute("DISCARD ALL")
    prepare_session(conn)


def _check(conn: psycopg.Connection, res: pq.abc.PGresult) -> pq.abc.PGresult:
    if res.status in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK):
        return res
    if conn.pgconn.status == pq.ConnStatus.BAD:
        raise psycopg.OperationalError(result_error_text(res))
    sqlstate = (res.error_field(pq.DiagnosticField.SQLSTATE) or b"XX000").decode()
    try:
        error_class = psycopg.errors.lookup(sqlstate)
    except KeyError:
        error_class = psycopg.DatabaseError
    raise error_class(result_error_text(res), info=res)


# -- calling (the per-request hot path) -------------------------------------------------

def text_array(values: Sequence[str]) -> bytes:
    """A text[] in PostgreSQL's binary array format."""
    if not values:
        return _EMPTY_TEXT_ARRAY
    parts = [_ARRAY_HEADER.pack(1, 0, 25, len(values), 1)]
    pack = _INT4.pack
    for value in values:
        data = value.encode("utf-8")
        parts.append(pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def _text(value: Optional[str]) -> Optional[bytes]:
    if value is None:
        return None
    if "\x00" in value:
        # PostgreSQL text cannot hold NUL; the HTTP parsers never produce it.
        raise HandlerError("request contains a NUL character")
    return value.encode("utf-8")


def parameters(request: Request, own_objects: int) -> List[Optional[bytes]]:
    """The call's seven binary parameters for ``request``."""
    headers = request.headers
    names = [name for name, _ in headers]
    values = [value for _, value in headers]
    for value in values:
        if "\x00" in value:
            raise HandlerError("request contains a NUL character")
    return [_text(request.method), _text(request.path), _text(request.query_string), request.body,
            text_array(names), text_array(values), _INT4.pack(own_objects)]


def read_row(res: pq.abc.PGresult) -> Optional[HandlerRow]:
    """The outcome of a successful call (one binary ``omni_httpd._handler_outcome`` row),
    or None for no outcome (no row, or a NULL kind)."""
    if res.ntuples == 0:
        return None
    value = res.get_value
    kind = value(0, 0)
    if kind is None:
        return None
    status = value(0, 1)
    proxy_url = value(0, 4)
    preserve_host = value(0, 5)
    body = value(0, 3)
    names, values = read_header_array(value(0, 2))
    return (kind.decode("utf-8"),
            _INT4.unpack(status)[0] if status is not None else None,
            names, values,
            bytes(body) if body is not None else None,
            proxy_url.decode("utf-8") if proxy_url is not None else None,
            preserve_host == b"\x01" if preserve_host is not None else None)


def read_header_array(data: Optional[bytes]) -> Tuple[Optional[List[str]], Optional[List[str]]]:
    """Names and values of a one-dimensional omni_http.http_header[] in PostgreSQL's
    binary format (each element a record of two text fields); a NULL element or field
    reads as None."""
    if data is None:
        return None, None
    data = bytes(data)
    names: List[Optional[str]] = []
    values: List[Optional[str]] = []
    if _INT4.unpack_from(data, 0)[0] == 0:
        return names, values
    count = _INT4.unpack_from(data, 12)[0]
    offset = 20
    unpack = _INT4.unpack_from
    for _ in range(count):
        length = unpack(data, offset)[0]
        offset += 4
        if length < 0:
            names.append(None)
            values.append(None)
            continue
        end = offset + length
        offset += 4                     # the record's field count: 2
        fields = []
        while offset < end:
            size = unpack(data, offset + 4)[0]      # after the field's type oid
            offset += 8
            if size < 0:
                fields.append(None)
            else:
                fields.append(data[offset:offset + size].decode("utf-8"))
                offset += size
        names.append(fields[0])
        values.append(fields[1])
    return names, values


def header_array(headers: Sequence[Tuple[str, str]], header_type: int) -> bytes:
    """The request's headers as an omni_http.http_header[] in PostgreSQL's binary array
    format (records of two text fields)."""
    if not headers:
        return _ARRAY_EMPTY.pack(0, 0, header_type)
    parts = [_ARRAY_HEADER.pack(1, 0, header_type, len(headers), 1)]
    append = parts.append
    pack_element = _HEADER_ELEMENT.pack
    pack_int = _INT4.pack
    for name, value in headers:
        if "\x00" in value:
            raise HandlerError("request contains a NUL character")
        name_data = name.encode("utf-8")
        value_data = value.encode("utf-8")
        append(pack_element(20 + len(name_data) + len(value_data), 2, 25, len(name_data)))
        append(name_data)
        append(_TEXT_FIELD.pack(25, len(value_data)))
        append(value_data)
    return b"".join(parts)


_NO_OUTCOME: List[Optional[bytes]] = [None] * 7


def route_parameters(request: Request, route_row: str, outcome: Optional[HandlerRow],
                     own_objects: int, header_type: int) -> List[Optional[bytes]]:
    """The sixteen binary parameters of a route call: the request's headers as one
    omni_http.http_header[] ($6; $7 is unused)."""
    if outcome is None:
        flat = _NO_OUTCOME
    else:
        kind, status, names, values, body, proxy_url, preserve_host = outcome
        flat = [_text(kind), _INT4.pack(status) if status is not None else None,
                text_array(names) if names is not None else None,
                text_array(values) if values is not None else None, body, _text(proxy_url),
                None if preserve_host is None else (b"\x01" if preserve_host else b"\x00")]
    return ([_INT4.pack(request.listener_id), _text(request.method), _text(request.path),
             _text(request.query_string), request.body, header_array(request.headers, header_type), None,
             _route_text(route_row)] + flat + [_INT4.pack(own_objects)])


@functools.lru_cache(maxsize=1024)
def _route_text(route_row: str) -> bytes:
    # The same few route rows on every request: encode each once.
    return route_row.encode("utf-8")


def call_route(conn: psycopg.Connection, installed: Installed, request: Request, route_row: str,
               outcome: Optional[HandlerRow], own_objects: int,
               clean_after_failure: bool = True) -> Optional[HandlerRow]:
    """Run one route for ``request`` with the outcome so far; as `call` for errors."""
    params = route_parameters(request, route_row, outcome, own_objects, installed.header_type)
    if installed.nonatomic:
        return _call_nonatomic(conn, installed, params[:15], own_objects)
    return _execute(conn, installed, params, clean_after_failure)


_FLATTEN = b"SELECT * FROM omni_httpd._outcome_row($1::pg_catalog.text::omni_httpd.http_outcome)"


def _call_nonatomic(conn: psycopg.Connection, installed: Installed, params: List[Optional[bytes]],
                    own_objects: int) -> Optional[HandlerRow]:
    """A transaction-controlling procedure, as a top-level CALL (so it may COMMIT) under
    SET ROLE: only ever installed when the login role has nothing of its own to gain by a
    RESET ROLE (omni_httpd._login_role_is_unprivileged). Several round trips; such
    procedures are rare."""
    pgconn = conn.pgconn
    if temporary_objects(conn) != own_objects:
        raise SessionDirty("a request left temporary objects in the session")
    conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(installed.role)))
    res = pgconn.exec_prepared(installed.statement, params, [1] * len(params), 0)
    failed = res.status != pq.ExecStatus.TUPLES_OK
    if failed and pgconn.status == pq.ConnStatus.BAD:
        raise DatabaseUnavailable(result_error_text(res))
    sqlstate = res.error_field(pq.DiagnosticField.SQLSTATE) if failed else None
    message = result_error_text(res) if failed else None
    value = None if failed or res.ntuples == 0 else res.get_value(0, 0)
    conn.execute("RESET ROLE")
    after_failure(conn)     # the same clean-up a handler function ends with
    if failed:
        raise HandlerError(message, sqlstate.decode() if sqlstate else None)
    if value is None:
        return None
    flat = pgconn.exec_params(_FLATTEN, [value], None, [0], 1)
    if flat.status != pq.ExecStatus.TUPLES_OK:
        raise HandlerError(result_error_text(flat))
    return read_row(flat)


def ends_processing(row: Optional[HandlerRow]) -> bool:
    """Does a middleware's outcome end the chain: an abort or proxy, or a response with
    a body or a status other than 200. NULL, or a 200 response of headers only (the
    headers a middleware adds to whatever answers), goes on to the next route."""
    if row is None:
        return False
    kind, status, _names, _values, body, _url, _preserve = row
    return kind != "response" or body is not None or (status or 200) != 200


def merge(pending: Optional[HandlerRow], row: Optional[HandlerRow]) -> Optional[HandlerRow]:
    """A handler's outcome with the headers the middleware before it set (those of a
    name the handler did not set itself); a NULL outcome leaves the middleware's."""
    if row is None:
        return pending
    if pending is None or row[0] != "response" or not pending[2]:
        return row
    kind, status, names, values, body, url, preserve = row
    names, values = list(names or []), list(values or [])
    own = {name.lower() for name in names}
    for name, value in zip(pending[2], pending[3] or []):
        if name.lower() not in own:
            names.append(name)
            values.append(value)
    return (kind, status, names, values, body, url, preserve)


def call(conn: psycopg.Connection, installed: Installed, request: Request,
         own_objects: int, clean_after_failure: bool = True) -> Optional[HandlerRow]:
    """Run the handler for ``request``: one round trip when it succeeds.

    Raises `SessionDirty` (nothing ran), `HandlerError` (the handler failed; the session
    has been cleaned unless ``clean_after_failure`` is false, for a session that is
    closed anyway) or `DatabaseUnavailable` (the connection is gone).
    """
    return _execute(conn, installed, parameters(request, own_objects), clean_after_failure)


def _execute(conn: psycopg.Connection, installed: Installed, params: List[Optional[bytes]],
             clean_after_failure: bool) -> Optional[HandlerRow]:
    pgconn = conn.pgconn
    res = pgconn.exec_prepared(installed.statement, params, [1] * len(params), 1)
    if res.status == pq.ExecStatus.TUPLES_OK:
        return read_row(res)
    failure = _failure(pgconn, res)
    if clean_after_failure and isinstance(failure, HandlerError):
        after_failure(conn)
    raise failure


def _failure(pgconn: pq.abc.PGconn, res: Optional[pq.abc.PGresult]) -> Exception:
    """What a call's result that is no row means: the exception to raise."""
    if res is None:
        return DatabaseUnavailable("the database connection ended")
    if pgconn.status == pq.ConnStatus.BAD:
        return DatabaseUnavailable(result_error_text(res))
    sqlstate = res.error_field(pq.DiagnosticField.SQLSTATE)
    if sqlstate in DIRTY_STATES:
        return SessionDirty(result_error_text(res))
    return HandlerError(result_error_text(res), sqlstate.decode() if sqlstate else None)


#: A call's outcome in `call_pipelined`: the handler row (None: no row), or the
#: exception `call` would have raised.
CallOutcome = Union[Optional[HandlerRow], Exception]

#: A pipelined call's (statement, binary parameters, may others be sent behind it before
#: its result is in: is it known to answer quickly?).
PipelinedCall = Tuple[bytes, List[Optional[bytes]], bool]

#: The outcome `call_pipelined` gives a call it did not send.
SKIPPED = object()


def call_pipelined(conn: psycopg.Connection, calls: Sequence[PipelinedCall],
                   wanted: Callable[[int], bool], window: int
                   ) -> Iterator[Tuple[int, object, float]]:
    """Run prepared calls through one libpq pipeline; yield (index, outcome, seconds) as
    their results come in, in order, where seconds is about how long the server spent
    on the call (a `CallOutcome`). A call ``wanted(index)`` no longer wants when its
    turn to be sent comes is not sent: it yields (index, SKIPPED, 0.0).

    Every call is still a statement and a transaction of its own (each is followed by a
    Sync), with its own result or error; a failing call does not affect the others. The
    server goes from one call to the next without waiting for us. A call is sent ahead
    of the results before it only while every call in flight is known to answer quickly
    (its flag) and fewer than ``window`` are in flight: so work is never sent behind a
    call that may run long, and a request whose client left while it waited is not
    started. The handler and route functions clean the session up themselves, on
    failure too, so what one call leaves behind never reaches the next
    (sql/012_pipelining.sql). The caller keeps the calls small enough for ``window`` of
    them to fit the socket buffers (`send_all` reads what the server answers meanwhile,
    so neither side can block the other for good).

    A `DatabaseUnavailable` outcome means the connection is gone: it is the outcome of
    that call and of every call after it. No cleanup after a failure is done here.
    """
    pgconn = conn.pgconn
    in_flight: collections.deque = collections.deque()   # (index, sent at or None: skipped)
    slow_in_flight = 0
    following = 0
    last = time.monotonic()
    failure: Optional[Exception] = None
    pgconn.enter_pipeline_mode()
    try:
        while following < len(calls) or in_flight:
            sent = False
            while following < len(calls) and (
                    not in_flight or (slow_in_flight == 0 and len(in_flight) < window)):
                index, following = following, following + 1
                if not wanted(index):
                    if in_flight:
                        # Its turn in the order of results comes after those in flight.
                        in_flight.append((index, None))
                    else:
                        yield index, SKIPPED, 0.0
                    continue
                statement, values, quick = calls[index]
                # In flight before it is sent: if sending fails (the connection broke),
                # the call still gets its outcome below, with the others.
                in_flight.append((index, time.monotonic()))
                slow_in_flight += not quick
                pgconn.send_query_prepared(statement, values, [1] * len(values), 1)
                pgconn.pipeline_sync()
                sent = True
            if sent:
                send_all(pgconn)
            while in_flight and in_flight[0][1] is None:
                yield in_flight.popleft()[0], SKIPPED, 0.0
            if not in_flight:
                continue
            index, sent_at = in_flight[0]
            res = _pipelined_result(pgconn)
            in_flight.popleft()
            slow_in_flight -= not calls[index][2]
            now = time.monotonic()
            seconds, last = now - max(last, sent_at), now
            if res is not None and res.status == pq.ExecStatus.TUPLES_OK:
                yield index, read_row(res), seconds
                continue
            outcome = _failure(pgconn, res)
            yield index, outcome, seconds
            if isinstance(outcome, DatabaseUnavailable):
                failure = outcome
                break
    except psycopg.Error as exc:
        # libpq could not send or read: the connection broke under us.
        failure = DatabaseUnavailable(str(exc).strip() or "the database connection ended")
    if failure is None:
        if pgconn.status == pq.ConnStatus.OK:
            pgconn.exit_pipeline_mode()
        return
    # Every call whose result was not read shares the fate of the connection.
    for index, sent_at in in_flight:
        yield index, (SKIPPED if sent_at is None else failure), 0.0
    for index in range(following, len(calls)):
        yield index, failure, 0.0


def _pipelined_result(pgconn: pq.abc.PGconn) -> Optional[pq.abc.PGresult]:
    """The result of the next call in the pipeline, read up to and including its Sync.

    None when the connection ended (or fell out of step) before the call's result came.
    """
    result = None
    ended = 0
    socket = pgconn.socket
    while True:
        # libpq's PQgetResult would wait for the server with the GIL held (psycopg does
        # not release it there), freezing the reactor: wait in select, which does.
        while pgconn.is_busy():
            select.select([socket], [], [])
            pgconn.consume_input()
        res = pgconn.get_result()
        if res is None:
            ended += 1
            if ended > 1 or pgconn.status == pq.ConnStatus.BAD:
                return None
            continue     # the end of the call's results: its Sync comes next
        ended = 0
        if res.status == pq.ExecStatus.PIPELINE_SYNC:
            return result
        if result is None:
            result = res


def send_all(pgconn: pq.abc.PGconn) -> None:
    """Flush what libpq holds for the server, reading its answers while we wait.

    Without the reading, a server blocked on writing results to us while we are blocked
    on writing requests to it would wait forever.
    """
    while pgconn.flush() == 1:
        readable, _w, _x = select.select([pgconn.socket], [pgconn.socket], [])
        if readable:
            pgconn.consume_input()


def after_failure(conn: psycopg.Connection) -> None:
    """Undo what a failed request can leave behind a rollback."""
    pgconn = conn.pgconn
    res = pgconn.exec_prepared(_AFTER_FAILURE, [])
    if res.status == pq.ExecStatus.TUPLES_OK:
        return
    if pgconn.status == pq.ConnStatus.BAD:
        raise DatabaseUnavailable(result_error_text(res))
    # Our own function failing means the session can no longer be trusted.
    raise SessionDirty(result_error_text(res))


@dataclass(frozen=True)
class ChainResult:
    """What a route chain answered: ``row`` as `call` returns it; ``answered_by`` the
    route (its `Route`) whose outcome it is, None when nothing ran or answered;
    ``handled`` False when no handler ran (the outcome is the middleware's, or none: 404)."""

    row: Optional[HandlerRow]
    answered_by: object
    handled: bool


def run_chain(conn: psycopg.Connection, steps: Sequence[Tuple[Installed, object]], request: Request,
              own_objects: int, clean_after_failure: bool = True) -> ChainResult:
    """Run matching routes in order: middleware pass the outcome on (`ends_processing`
    stops early), the first handler ends the chain. Each route is one prepared statement,
    its own transaction. ``steps``: (installed route, `Route`) pairs."""
    pending: Optional[HandlerRow] = None
    answered_by = None
    for installed, route in steps:
        try:
            row = call_route(conn, installed, request, route.row, pending, own_objects, clean_after_failure)
        except HandlerError as error:
            error.route = route     # for the log: which route of the chain failed
            raise
        if installed.kind == "handler":
            return ChainResult(merge(pending, row), route, True)
        pending, answered_by = row, route
        if ends_processing(row):
            break
    return ChainResult(pending, answered_by if pending is not None else None, False)
