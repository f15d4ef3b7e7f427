"""The SQL API handlers use: omni_http headers, requests, responses and other outcomes,
cascading_query and the default page (SPEC section 3)."""
from __future__ import annotations

import psycopg2
import pytest

from sql_support import execute, one, response_of, rows

TEXT = "text/plain; charset=utf-8"


# -- omni_http ------------------------------------------------------------------------

def test_http_methods(db):
    assert one(db, "SELECT enum_range(NULL::omni_http.http_method)::text[]") == [
        "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"]


def test_http_header_constructor(db):
    assert rows(db, "SELECT (h).name, (h).value FROM (SELECT omni_http.http_header('X-A', '1') AS h) s") == [
        ("X-A", "1")]


def test_http_headers_is_an_array_of_http_header(db):
    assert one(db, "SELECT array_length(ARRAY[omni_http.http_header('a', '1')]::omni_http.http_headers, 1)") == 1


HEADERS = ("ARRAY[omni_http.http_header('Accept', 'a'), omni_http.http_header('x-multi', 'one'),"
           " omni_http.http_header('ACCEPT', 'b'), omni_http.http_header('X-Multi', 'two')]")


def test_http_header_get_returns_the_first_match_whatever_the_case(db):
    assert one(db, "SELECT omni_http.http_header_get(%s, 'accept')" % HEADERS) == "a"
    assert one(db, "SELECT omni_http.http_header_get(%s, 'X-MULTI')" % HEADERS) == "one"


def test_http_header_get_without_match_is_null(db):
    assert one(db, "SELECT omni_http.http_header_get(%s, 'host')" % HEADERS) is None
    assert one(db, "SELECT omni_http.http_header_get(NULL, 'host')") is None


def test_http_header_get_accepts_the_domain_and_names(db):
    assert one(db, "SELECT omni_http.http_header_get(headers => %s::omni_http.http_headers, name => 'Accept')"
               % HEADERS) == "a"


def test_http_header_get_all_returns_every_match_in_order(db):
    assert rows(db, "SELECT omni_http.http_header_get_all(%s, 'x-multi')" % HEADERS) == [("one",), ("two",)]
    assert rows(db, "SELECT omni_http.http_header_get_all(%s, 'accept')" % HEADERS) == [("a",), ("b",)]
    assert rows(db, "SELECT omni_http.http_header_get_all(%s, 'host')" % HEADERS) == []


# -- http_request ---------------------------------------------------------------------

def test_http_request_constructor_defaults(db):
    assert rows(db, "SELECT r.method::text, r.path, r.query_string, r.body, r.headers::text"
                    " FROM omni_httpd.http_request('/x') r") == [("GET", "/x", None, None, "{}")]


def test_http_request_constructor_with_every_field_by_name(db):
    assert rows(db, "SELECT r.method::text, r.path, r.query_string, convert_from(r.body, 'UTF8'),"
                    " omni_http.http_header_get(r.headers, 'host')"
                    " FROM omni_httpd.http_request(path => '/p', method => 'POST', query_string => 'a=1',"
                    " body => 'data', headers => ARRAY[omni_http.http_header('Host', 'h')]) r") == [
        ("POST", "/p", "a=1", "data", "h")]


def test_http_request_field_order(db):
    assert rows(db, "SELECT attname::text FROM pg_attribute WHERE attrelid = 'omni_httpd.http_request'::regclass"
                    " AND attnum > 0 ORDER BY attnum") == [
        ("method",), ("path",), ("query_string",), ("body",), ("headers",)]


# -- http_response: content type inference ----------------------------------------------

@pytest.mark.parametrize("expression, body", [
    ("'hello'", b"hello"),
    ("'hello'::text", b"hello"),
    ("'h\u00e9llo'::text", "h\u00e9llo".encode()),
    ("'hello'::varchar(10)", b"hello"),
    ("'ab'::char(3)", b"ab "),
    ("'postgres'::name", b"postgres"),
    ("42", b"42"),
    ("42::bigint", b"42"),
    ("1.50::numeric", b"1.50"),
    ("true", b"t"),
], ids=["unknown", "text", "utf8", "varchar", "char", "name", "int", "bigint", "numeric", "bool"])
def test_other_types_are_sent_as_text(db, expression, body):
    assert response_of(db, "omni_httpd.http_response(%s)" % expression) == (body, 200, [("content-type", TEXT)])


def test_json_body(db):
    assert response_of(db, "omni_httpd.http_response('{\"a\":  1}'::json)") == (
        b'{"a":  1}', 200, [("content-type", "application/json")])


def test_jsonb_body(db):
    assert response_of(db, "omni_httpd.http_response('{\"a\":  1}'::jsonb)") == (
        b'{"a": 1}', 200, [("content-type", "application/json")])


def test_bytea_body_is_sent_as_is(db):
    assert response_of(db, "omni_httpd.http_response('\\x00ff'::bytea)") == (
        b"\x00\xff", 200, [("content-type", "application/octet-stream")])


def test_null_body_has_no_body_and_no_content_type(db):
    assert response_of(db, "omni_httpd.http_response(NULL)") == (None, 200, [])
    assert response_of(db, "omni_httpd.http_response(NULL::json, 404)") == (None, 404, [])


def test_no_arguments_at_all(db):
    assert response_of(db, "omni_httpd.http_response()") == (None, 200, [])


def test_null_status_is_200(db):
    assert response_of(db, "omni_httpd.http_response('x', NULL)") == (b"x", 200, [("content-type", TEXT)])


def test_null_headers_are_no_headers(db):
    assert response_of(db, "omni_httpd.http_response('x', 200, NULL)") == (b"x", 200, [("content-type", TEXT)])


def test_explicit_status(db):
    assert response_of(db, "omni_httpd.http_response('gone', 410)") == (b"gone", 410, [("content-type", TEXT)])


def test_explicit_headers_come_first_and_the_content_type_is_appended(db):
    assert response_of(db, "omni_httpd.http_response('x', 200, ARRAY[omni_http.http_header('x-b', '2'),"
                           " omni_http.http_header('x-a', '1')])") == (
        b"x", 200, [("x-b", "2"), ("x-a", "1"), ("content-type", TEXT)])


@pytest.mark.parametrize("name", ["content-type", "Content-Type", "CONTENT-TYPE", "cOnTeNt-TyPe"])
def test_callers_content_type_in_any_case_replaces_inference(db, name):
    assert response_of(db, "omni_httpd.http_response('<p>', headers => ARRAY[omni_http.http_header('x-a', '1'),"
                           " omni_http.http_header(%s, 'text/html')])", (name,)) == (
        b"<p>", 200, [("x-a", "1"), (name, "text/html")])


def test_named_arguments_in_any_order(db):
    assert response_of(db, "omni_httpd.http_response(status => 201, headers => ARRAY[omni_http.http_header('a', 'b')],"
                           " body => 'made')") == (b"made", 201, [("a", "b"), ("content-type", TEXT)])


def test_only_status_by_name(db):
    assert response_of(db, "omni_httpd.http_response(status => 404)") == (None, 404, [])


def test_positional_arguments(db):
    assert response_of(db, "omni_httpd.http_response('p', 202, ARRAY[omni_http.http_header('a', 'b')])") == (
        b"p", 202, [("a", "b"), ("content-type", TEXT)])


def test_outcome_casts_to_http_response(db):
    assert rows(db, "SELECT convert_from(body, 'UTF8'), status, headers::text"
                    " FROM (SELECT (omni_httpd.http_response('x')::omni_httpd.http_response).*) s") == [
        ("x", 200, '{"(content-type,\\"text/plain; charset=utf-8\\")"}')]


def test_response_outcome_has_only_the_response_set(db):
    assert rows(db, "SELECT (o).response IS NULL, (o).abort, (o).proxy IS NULL"
                    " FROM (SELECT omni_httpd.http_response('x') AS o) s") == [(False, None, True)]


# -- abort and proxy ---------------------------------------------------------------------

def test_abort_outcome(db):
    assert rows(db, "SELECT (o).response IS NULL, (o).abort, (o).proxy IS NULL"
                    " FROM (SELECT omni_httpd.abort() AS o) s") == [(True, True, True)]


def test_proxy_outcome_preserves_host_by_default(db):
    assert rows(db, "SELECT (o).response IS NULL, (o).abort, ((o).proxy).url, ((o).proxy).preserve_host"
                    " FROM (SELECT omni_httpd.http_proxy('http://127.0.0.1:9/x') AS o) s") == [
        (True, None, "http://127.0.0.1:9/x", True)]


def test_proxy_outcome_without_preserving_host(db):
    assert rows(db, "SELECT ((o).proxy).url, ((o).proxy).preserve_host"
                    " FROM (SELECT omni_httpd.http_proxy(url => 'http://u', preserve_host => false) AS o) s") == [
        ("http://u", False)]


def test_outcome_cast_of_abort_is_null(db):
    assert one(db, "SELECT omni_httpd.abort()::omni_httpd.http_response IS NULL")


# -- cascading_query -------------------------------------------------------------------

ROUTES = """
SELECT omni_httpd.cascading_query(name, query ORDER BY priority DESC NULLS LAST)
FROM (VALUES
    ('fallback', $$SELECT 'fallback'::text AS answer$$, NULL),
    ('low', $$SELECT 'low'::text WHERE %(low)s;$$, 1),
    ('high', $$SELECT 'high'::text WHERE %(high)s -- trailing comment$$, 2)
) AS routes (name, query, priority)
"""


@pytest.mark.parametrize("high, low, expected", [
    ("true", "true", ["high"]),
    ("false", "true", ["low"]),
    ("false", "false", ["fallback"]),
])
def test_cascading_query_answers_with_the_first_branch_that_has_rows(db, high, low, expected):
    query = one(db, ROUTES % {"high": high, "low": low})
    assert [row[0] for row in rows(db, query)] == expected


def test_cascading_query_names_its_branches(db):
    query = one(db, "SELECT omni_httpd.cascading_query(name, query) FROM (VALUES ('first', 'SELECT 1'),"
                    " ('second', 'SELECT 2')) AS q (name, query)")
    assert query.startswith("WITH first AS (")
    assert "second AS (" in query


def test_cascading_query_keeps_every_row_of_the_chosen_branch(db):
    query = one(db, "SELECT omni_httpd.cascading_query(name, query) FROM (VALUES"
                    " ('a', 'SELECT * FROM generate_series(1, 3) AS g(n)'),"
                    " ('b', 'SELECT 42')) AS q (name, query)")
    assert rows(db, query) == [(1,), (2,), (3,)]


def test_cascading_query_of_nothing_is_null(db):
    assert one(db, "SELECT omni_httpd.cascading_query(name, query) FROM (SELECT 'a', 'SELECT 1' WHERE false)"
                   " AS q (name, query)") is None


def test_cascading_query_as_a_handler_routes_on_the_request(db):
    query = one(db, """
        SELECT omni_httpd.cascading_query(name, query ORDER BY priority DESC NULLS LAST)
        FROM (VALUES
            ('hello', $$SELECT omni_httpd.http_response('hello') FROM request WHERE request.path = '/hello'$$, 1),
            ('not_found', $$SELECT omni_httpd.http_response('no', 404) FROM request$$, NULL)
        ) AS routes (name, query, priority)""")
    execute(db, "SELECT omni_httpd._install_handler('routes', %s, NULL)", (query,))
    answers = [rows(db, "SELECT status, convert_from(body, 'UTF8') FROM pg_temp.routes('GET', %s, NULL, '',"
                        " '{}', '{}')", (path,)) for path in ("/hello", "/other")]
    assert answers == [[(200, "hello")], [(404, "no")]]


# -- default_page ----------------------------------------------------------------------

def test_default_page_is_html_about_the_database(db):
    response = response_of(db, "omni_httpd.default_page(omni_httpd.http_request('/'))")
    assert response.status == 200
    assert response.headers == [("content-type", "text/html; charset=utf-8")]
    page = response.body.decode()
    assert page.startswith("<!DOCTYPE html>")
    assert one(db, "SELECT current_database()") in page
    assert one(db, "SELECT current_setting('server_version')") in page
    for label in ("Backends", "Committed transactions", "Server version"):
        assert label in page


def test_default_page_escapes_what_it_shows(db):
    page = response_of(db, "omni_httpd.default_page(omni_httpd.http_request('/<script>&'))").body.decode()
    assert "/&lt;script&gt;&amp;" in page
    assert "<script>" not in page


def test_default_page_handler_runs(db):
    execute(db, "SELECT omni_httpd._install_handler('page', %s, NULL)",
            ("SELECT omni_httpd.default_page(request.*::omni_httpd.http_request) FROM request",))
    assert rows(db, "SELECT kind, status, ARRAY(SELECT (h).value FROM unnest(headers) h)"
                    " FROM pg_temp.page('GET', '/', NULL, '', '{}', '{}')") == [
        ("response", 200, ["text/html; charset=utf-8"])]


def test_api_is_usable_by_any_role(db, connect, make_role):
    role = make_role()
    other = connect(user=role)
    assert response_of(other, "omni_httpd.http_response('x')").body == b"x"
    assert one(other, "SELECT omni_http.http_header_get(ARRAY[omni_http.http_header('a', 'b')], 'A')") == "b"


def test_status_out_of_range_is_an_error(db):
    with pytest.raises(psycopg2.Error):
        one(db, "SELECT omni_httpd.http_response('x', 70000)")
