"""The handler runtime contract the worker and the admin console rely on:
omni_httpd._handler_columns and omni_httpd._install_handler, and the pg_temp function it
creates (docs/architecture.md, "Executing a handler")."""
from __future__ import annotations

import psycopg2
import psycopg2.errors
import psycopg
import pytest

from sql_support import HandlerRow, call, execute, install, one, rows

TEXT = "text/plain; charset=utf-8"


def response(body, status=200, names=("content-type",), values=(TEXT,)):
    return HandlerRow("response", status, list(names), list(values), body, None, None)


# -- _handler_columns ------------------------------------------------------------------

def test_handler_columns_are_the_output_types(db):
    assert one(db, "SELECT omni_httpd._handler_columns('SELECT 1, ''x''::text, omni_httpd.abort(),"
                   " request.body FROM request')::text[]") == [
        "integer", "text", "omni_httpd.http_outcome", "bytea"]


def test_handler_columns_with_duplicate_names(db):
    assert one(db, "SELECT omni_httpd._handler_columns('SELECT 1 AS a, true AS a, 2 AS c1')::text[]") == [
        "integer", "boolean", "integer"]


def test_handler_columns_of_a_query_without_columns(db):
    assert one(db, "SELECT omni_httpd._handler_columns('SELECT FROM request')::text[]") == []


def test_handler_columns_do_not_run_the_query(db):
    execute(db, "CREATE TABLE hits (n int)")
    assert one(db, "SELECT omni_httpd._handler_columns('INSERT INTO hits VALUES (1) RETURNING n')::text[]") == [
        "integer"]
    assert one(db, "SELECT count(*) FROM hits") == 0


def test_handler_columns_leave_no_table_behind(db):
    before = one(db, "SELECT count(*) FROM pg_class WHERE relpersistence = 't'")
    one(db, "SELECT omni_httpd._handler_columns('SELECT 1')")
    assert one(db, "SELECT count(*) FROM pg_class WHERE relpersistence = 't'") == before


def test_handler_columns_of_an_invalid_query_raise_its_error(db):
    with pytest.raises(psycopg2.errors.UndefinedTable):
        one(db, "SELECT omni_httpd._handler_columns('SELECT * FROM nowhere')")


def test_handler_columns_refuse_two_statements(db):
    with pytest.raises(psycopg2.Error) as info:
        one(db, "SELECT omni_httpd._handler_columns('SELECT 1; SELECT 2')")
    assert info.value.diag.message_primary == "query can only contain one statement"


# -- outcomes --------------------------------------------------------------------------

def test_response_is_flattened(db):
    install(db, "SELECT omni_httpd.http_response('hi', 201, ARRAY[omni_http.http_header('x-a', '1'),"
                " omni_http.http_header('x-b', '2')]) FROM request")
    assert call(db) == response(b"hi", 201, ["x-a", "x-b", "content-type"], ["1", "2", TEXT])


def test_null_status_becomes_200(db):
    install(db, "SELECT ROW(NULL, NULL, NULL)::omni_httpd.http_response")
    assert call(db) == response(None, 200, [], [])


def test_abort(db):
    install(db, "SELECT omni_httpd.abort()")
    assert call(db) == HandlerRow("abort", None, None, None, None, None, None)


def test_proxy(db):
    install(db, "SELECT omni_httpd.http_proxy('http://127.0.0.1:9/up')")
    assert call(db) == HandlerRow("proxy", None, None, None, None, "http://127.0.0.1:9/up", True)


def test_proxy_without_preserving_host(db):
    install(db, "SELECT omni_httpd.http_proxy('http://u', preserve_host => false)")
    assert call(db) == HandlerRow("proxy", None, None, None, None, "http://u", False)


def test_zero_rows_is_no_row(db):
    install(db, "SELECT omni_httpd.http_response('x') FROM request WHERE false")
    assert call(db) is None


def test_null_outcome_is_no_row(db):
    install(db, "SELECT NULL::omni_httpd.http_outcome")
    assert call(db) is None


def test_only_the_first_row_counts(db):
    install(db, "SELECT omni_httpd.http_response(n) FROM generate_series(7, 9) AS g(n)")
    assert call(db).body == b"7"


def test_first_outcome_column_wins_over_earlier_columns(db):
    install(db, "SELECT 1 AS a, 'x' AS b, omni_httpd.abort() AS c, omni_httpd.http_response('no') AS d")
    assert call(db).kind == "abort"


def test_non_outcome_first_column_becomes_the_body(db):
    install(db, "SELECT 42, 'ignored'")
    assert call(db) == response(b"42")


def test_bytea_first_column_is_octet_stream(db):
    install(db, "SELECT request.body FROM request")
    assert call(db, body=b"\x00\x01") == response(b"\x00\x01", values=["application/octet-stream"])


def test_json_first_column_is_json(db):
    install(db, "SELECT json_build_object('path', request.path) FROM request")
    assert call(db, path="/j") == response(b'{"path" : "/j"}', values=["application/json"])


def test_http_response_column_is_converted(db):
    install(db, "SELECT omni_httpd.http_response('r', 202)::omni_httpd.http_response")
    assert call(db) == response(b"r", 202)


def test_expanded_outcome_columns(db):
    install(db, "SELECT * FROM omni_httpd.abort()")
    assert call(db).kind == "abort"
    install(db, "SELECT * FROM omni_httpd.http_response('e')")
    assert call(db) == response(b"e")


def test_duplicate_column_names(db):
    install(db, "SELECT 1 AS a, 2 AS a, omni_httpd.http_response('dup') AS a")
    assert call(db) == response(b"dup")


def test_handler_columns_named_like_plpgsql_things(db):
    install(db, "SELECT true AS found, 1 AS r, 2 AS s, omni_httpd.http_response('ok') AS o")
    assert call(db) == response(b"ok")


# -- the request relation ---------------------------------------------------------------

def test_request_fields_reach_the_handler(db):
    install(db, "SELECT omni_httpd.http_response(format('%s|%s|%s|%s', request.method, request.path,"
                " coalesce(request.query_string, '<null>'), convert_from(request.body, 'UTF8'))) FROM request")
    assert call(db, method="POST", path="/a/b", query_string="x=1&y", body=b"payload").body == \
        b"POST|/a/b|x=1&y|payload"
    assert call(db).body == b"GET|/|<null>|"


def test_request_headers_arrive_in_order(db):
    install(db, "SELECT omni_httpd.http_response(array_to_string(ARRAY(SELECT h.name || '=' || h.value"
                " FROM unnest(request.headers) AS h), ',')) FROM request")
    assert call(db, headers=[("b", "1"), ("a", "2"), ("b", "3")]).body == b"b=1,a=2,b=3"
    assert call(db).body == b""


def test_request_as_http_request(db):
    install(db, "SELECT omni_httpd.http_response((r).path || ' ' || omni_http.http_header_get((r).headers, 'HOST'))"
                " FROM (SELECT request.*::omni_httpd.http_request AS r FROM request) s")
    assert call(db, path="/p", headers=[("host", "example")]).body == b"/p example"


def test_trailing_semicolon_and_comment(db):
    install(db, "SELECT omni_httpd.http_response('c') -- the end")
    assert call(db).body == b"c"
    install(db, "SELECT omni_httpd.http_response('d'); -- the end")
    assert call(db).body == b"d"


# -- data-modifying handlers -------------------------------------------------------------

@pytest.fixture
def visits(db):
    execute(db, "CREATE TABLE visits (path text)")
    return lambda: [row[0] for row in rows(db, "SELECT path FROM visits")]


def test_insert_returning_handler(db, visits):
    install(db, "INSERT INTO visits SELECT request.path FROM request RETURNING omni_httpd.http_response(path)")
    assert visits() == []
    assert call(db, path="/v").body == b"/v"
    assert visits() == ["/v"]


def test_handler_with_its_own_data_modifying_with(db, visits):
    install(db, "WITH logged AS (INSERT INTO visits SELECT request.path FROM request RETURNING path),\n"
                "counted AS (SELECT count(*) AS n FROM logged)\n"
                "SELECT omni_httpd.http_response(logged.path || counted.n) FROM logged, counted")
    assert call(db, path="/w").body == b"/w1"
    assert visits() == ["/w"]


def test_handler_with_recursive_with(db):
    install(db, "WITH RECURSIVE t(n) AS (VALUES (1) UNION ALL SELECT n + 1 FROM t WHERE n < 4)\n"
                "SELECT omni_httpd.http_response(sum(n)) FROM t")
    assert call(db).body == b"10"


@pytest.mark.parametrize("query, expected", [
    ("WITH a(x) AS (SELECT 'col') SELECT omni_httpd.http_response(x) FROM a", b"col"),
    ("WITH a AS MATERIALIZED (SELECT 'mat' AS x) SELECT omni_httpd.http_response(x) FROM a", b"mat"),
    ("WITH a AS (SELECT 'paren' AS x) (SELECT omni_httpd.http_response(x) FROM a)", b"paren"),
    ("WITH a AS (SELECT request.path AS x FROM request) SELECT omni_httpd.http_response(x) FROM a", b"/r"),
    ("-- comment\nWITH a AS (SELECT 'c' AS x), b AS (SELECT x || x AS y FROM a)\n"
     "SELECT omni_httpd.http_response(y) FROM b -- done", b"cc"),
    ("WITH a AS (SELECT 'v' AS x) VALUES (omni_httpd.http_response((SELECT x FROM a)))", b"v"),
], ids=["column-list", "materialized", "parenthesized-main", "uses-request", "comments", "values"])
def test_handlers_with_their_own_with(db, query, expected):
    install(db, query)
    assert call(db, path="/r").body == expected


def test_with_and_insert_without_returning(db, visits):
    install(db, "WITH p AS (SELECT request.path FROM request) INSERT INTO visits SELECT path FROM p")
    assert call(db, path="/wi") is None
    assert visits() == ["/wi"]


def test_insert_without_returning_runs_and_has_no_outcome(db, visits):
    install(db, "INSERT INTO visits SELECT request.path FROM request")
    assert call(db, path="/quiet") is None
    assert visits() == ["/quiet"]


def test_handler_without_columns_runs_and_has_no_outcome(db):
    execute(db, "CREATE SEQUENCE counter")
    install(db, "SELECT FROM nextval('counter')")
    assert call(db) is None
    assert one(db, "SELECT last_value FROM counter") == 1


# -- roles -------------------------------------------------------------------------------

def test_runs_as_the_current_user_by_default(db):
    install(db, "SELECT current_user")
    assert call(db).body == one(db, "SELECT current_user").encode()


def test_runs_as_role_name(db, make_role):
    role = make_role()
    install(db, "SELECT current_user", role)
    assert call(db).body == role.encode()
    assert one(db, "SELECT current_user") == "postgres"


def test_reinstalling_with_another_role_changes_it(db, make_role):
    role = make_role()
    install(db, "SELECT current_user", role)
    install(db, "SELECT current_user", None)
    assert call(db).body == b"postgres"
    install(db, "SELECT current_user", role)
    assert call(db).body == role.encode()


@pytest.mark.parametrize("statement", ["RESET ROLE", "SET ROLE postgres", "SET ROLE NONE",
                                       "PERFORM set_config('role', 'postgres', false)",
                                       "SET SESSION AUTHORIZATION postgres"])
def test_role_cannot_be_changed_and_the_error_can_be_caught(db, make_role, statement):
    role = make_role()
    execute(db, """CREATE FUNCTION escape() RETURNS text LANGUAGE plpgsql AS $$
                   BEGIN %s; RETURN 'escaped as ' || current_user;
                   EXCEPTION WHEN OTHERS THEN RETURN SQLERRM || ' / ' || current_user; END $$""" % statement)
    install(db, "SELECT escape()", role)
    body = call(db).body.decode()
    assert body.startswith('cannot set parameter "')
    assert "within security-definer function" in body
    assert body.endswith(" / " + role)


def test_uncaught_role_change_is_an_error(db, make_role):
    install(db, "SELECT set_config('role', 'postgres', false)", make_role())
    with pytest.raises(psycopg2.Error) as info:
        call(db)
    assert "within security-definer function" in info.value.diag.message_primary


def test_role_permissions_apply(db, make_role):
    role = make_role()
    execute(db, "CREATE TABLE secret (s text); INSERT INTO secret VALUES ('hidden')")
    install(db, "SELECT s FROM secret", role)
    with pytest.raises(psycopg2.errors.InsufficientPrivilege):
        call(db)


def test_install_as_a_non_superuser_for_a_granted_role(db, connect, make_role):
    handler_role = make_role()
    daemon_role = make_role(handler_role)
    daemon = connect(user=daemon_role)
    install(daemon, "SELECT omni_httpd.http_response(current_user)", handler_role)
    assert call(daemon).body == handler_role.encode()


def test_install_refuses_a_role_the_user_cannot_become(connect, make_role):
    stranger = make_role()
    daemon = connect(user=make_role())
    with pytest.raises(psycopg2.errors.InsufficientPrivilege):
        install(daemon, "SELECT 1", stranger)


# -- errors ------------------------------------------------------------------------------

def test_error_in_the_handler_raises(db):
    install(db, "SELECT omni_httpd.http_response(1 / (length(request.path) - 1)) FROM request")
    assert call(db, path="/a").body == b"1"
    with pytest.raises(psycopg2.errors.DivisionByZero):
        call(db, path="/")


def test_error_after_a_change_rolls_it_back(db, visits):
    install(db, "INSERT INTO visits SELECT request.path FROM request"
                " RETURNING omni_httpd.http_response(1 / (length(path) - 1))")
    with pytest.raises(psycopg2.errors.DivisionByZero):
        call(db, path="/")
    assert visits() == []


def test_install_of_an_invalid_query_raises(db):
    with pytest.raises(psycopg2.errors.UndefinedTable):
        install(db, "SELECT * FROM nowhere")


def test_installed_function_is_a_security_definer_in_pg_temp(db):
    install(db, "SELECT 1", name="h_42_7")
    assert rows(db, "SELECT p.prosecdef, n.nspname = pg_my_temp_schema()::regnamespace::name,"
                    " p.prorettype::regtype::text, p.proretset"
                    " FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE p.proname = 'h_42_7'") == [
        (True, True, "omni_httpd._handler_outcome", True)]


def test_installed_function_can_be_prepared_and_replaced(db):
    # Prepared at the protocol level, as the worker does (a handler's own session must
    # not keep SQL-level PREPAREs: the function deallocates those after each request).
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        conn.execute("SELECT omni_httpd._install_handler('handler', %s, NULL)", ("SELECT 'one'",))
        run = "SELECT * FROM pg_temp.handler(%s, %s, %s, %s, %s, %s)"   # body: column 4
        args = ("GET", "/", None, b"", [], [])
        assert conn.execute(run, args, prepare=True).fetchone()[3] == b"one"
        conn.execute("SELECT omni_httpd._install_handler('handler', %s, NULL)", ("SELECT 'two'",))
        assert conn.execute(run, args, prepare=True).fetchone()[3] == b"two"


@pytest.mark.parametrize("headers, names, values", [
    ("ARRAY[]::omni_http.http_header[]", [], []),
    ("NULL", [], []),
    ("ARRAY[omni_http.http_header('x-é', 'ünï ✓'), omni_http.http_header('x-empty', '')]",
     ["x-é", "x-empty"], ["ünï ✓", ""]),
    ("ARRAY[omni_http.http_header(NULL, 'v'), omni_http.http_header('n', NULL), NULL]",
     [None, "n", None], ["v", None, None]),
])
def test_the_worker_reads_the_response_headers_as_postgresql_sent_them(db, headers, names, values):
    """The worker reads the outcome's headers from PostgreSQL's binary array of records
    itself (handler_call.read_header_array): NULL elements and fields, empty strings and
    non-ASCII text come out as they went in."""
    from omni_httpd.common import handler_call
    from omni_httpd.common.request import Request

    query = "SELECT omni_httpd.http_response('b', 201, %s)" % headers
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        handler_call.prepare_session(conn)
        installed = handler_call.install(conn, 1, 1, query, None)
        row = handler_call.call(conn, installed, Request("GET", "/", None, [("host", "x")]), own_objects=1)
    kind, status, got_names, got_values, body, _url, _preserve = row
    assert (kind, status, body) == ("response", 201, b"b")
    # http_response adds the default content-type where none was given
    assert (got_names, got_values) == (names + ["content-type"], values + ["text/plain; charset=utf-8"])
