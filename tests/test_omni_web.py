"""The request helpers of schema omni_web (migration 010, docs/sql-api.md "Request helpers
(omni_web)"): query strings and forms, percent-encoding, cookies, multipart/form-data,
against a real PostgreSQL with ordinary and hostile input, and one handler using
parse_multipart served by the real daemon to curl."""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import time
import urllib.parse

import psycopg2
import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.web.client import FileBodyProducer
from treq.multipart import MultiPartProducer

from daemon_support import Daemon, add_listener, effective_port, wait_reloads
from omni_httpd.master import migrations
from sql_support import response_of

BAD_ESCAPE = "22025"      # invalid_escape_sequence
NOT_UTF8 = "22021"        # character_not_in_repertoire
BAD_VALUE = "22023"       # invalid_parameter_value
MALFORMED = "22P02"       # invalid_text_representation


@pytest.fixture(scope="module")
def web(module_dsn):
    """One autocommit connection to a database with the schema, for the whole module
    (hypothesis runs many examples per test)."""
    migrations.apply(module_dsn)
    connection = psycopg2.connect(module_dsn)
    connection.autocommit = True
    yield connection
    connection.close()


def one(connection, sql, params=None):
    with connection.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchone()[0]


def rows(connection, sql, params=None):
    with connection.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchall()


def error(connection, sql, params=None):
    """(SQLSTATE, primary message) of the error ``sql`` raises."""
    with pytest.raises(psycopg2.Error) as raised:
        with connection.cursor() as cur:
            cur.execute(sql, params)
            cur.fetchall()
    return raised.value.pgcode, raised.value.diag.message_primary


# Text PostgreSQL can hold: no NUL, no lone surrogates.
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)
HYPOTHESIS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# -- parse_query_string, param_get, param_get_all -------------------------------------------

@pytest.mark.parametrize("query_string, expected", [
    ("", []),
    ("a", ["a", None]),
    ("a=x&b=1", ["a", "x", "b", "1"]),
    ("a&b=1", ["a", None, "b", "1"]),
    ("a=%20&b=1+3", ["a", " ", "b", "1 3"]),
    ("a=", ["a", ""]),
    ("=x", ["", "x"]),
    ("a=b=c", ["a", "b=c"]),
    ("a%26b=c%3Dd%2B", ["a&b", "c=d+"]),
    ("&&a=1&&", ["a", "1"]),
    ("x=%C3%A9t%C3%A9&y=%E2%82%AC%F0%9F%98%80", ["x", "\u00e9t\u00e9", "y", "\u20ac\U0001F600"]),
    ("k=%e2%82%ac", ["k", "\u20ac"]),
    ("a=1;b=2", ["a", "1;b=2"]),           # `&` only, as browsers and Python (3.9.2+) do
])
def test_parse_query_string(web, query_string, expected):
    assert one(web, "SELECT omni_web.parse_query_string(%s::text)", (query_string,)) == expected


def test_parse_query_string_of_null_is_null(web):
    assert one(web, "SELECT omni_web.parse_query_string(NULL::text) IS NULL")


def test_parse_query_string_of_a_form_body(web):
    body = "name=J%C3%BCrgen+M&tags=a&tags=b".encode()
    assert one(web, "SELECT omni_web.parse_query_string(%s::bytea)", (body,)) == ["name", "J\u00fcrgen M", "tags", "a",
                                                                                 "tags", "b"]


def test_form_body_that_is_not_utf8_is_refused(web):
    assert error(web, "SELECT omni_web.parse_query_string('\\x0000'::bytea)")[0] == NOT_UTF8
    assert error(web, "SELECT omni_web.param_get('\\x613dff'::bytea, 'a')")[0] == NOT_UTF8


@pytest.mark.parametrize("query_string, shown", [
    ("a=%", "%"), ("a=%2", "%2"), ("a=%zz", "%zz"), ("a=%%41", "%%4"), ("a=%G1&b=1", "%G1"),
    ("%u00e9=x", "%u0"), ("a=1&b=100%", "%"),
])
def test_bad_percent_escapes_are_refused_and_named(web, query_string, shown):
    code, message = error(web, "SELECT omni_web.parse_query_string(%s::text)", (query_string,))
    assert code == BAD_ESCAPE
    assert '"%s"' % shown in message and "two hexadecimal digits" in message


@pytest.mark.parametrize("escaped", [
    "%C0%AF",             # overlong `/`
    "%E0%80%AF",          # overlong `/`, three bytes
    "%ED%A0%80",          # a UTF-16 surrogate
    "%F4%90%80%80",       # above U+10FFFF
    "%FF", "%C3", "%80",  # not UTF-8 at all, truncated, lone continuation byte
    "%00",                # NUL cannot be in text
])
def test_percent_escapes_that_are_not_utf8_are_refused(web, escaped):
    for sql in ("SELECT omni_web.parse_query_string(%s::text)", "SELECT omni_web.url_decode(%s)",
                "SELECT omni_web.uri_decode(%s)"):
        code, message = error(web, sql, ("a=" + escaped,))
        assert code == NOT_UTF8 and "not valid UTF-8" in message


def test_param_get_and_get_all(web):
    assert one(web, "SELECT omni_web.param_get(omni_web.parse_query_string('a=1&a=2'), 'a')") == "1"
    assert one(web, "SELECT omni_web.param_get(omni_web.parse_query_string('a&a=2'), 'a')") is None
    assert rows(web, "SELECT omni_web.param_get_all(omni_web.parse_query_string('a&a=2'), 'a')") == [(None,), ("2",)]
    assert one(web, "SELECT omni_web.param_get('a=1', 'a')") == "1"
    assert one(web, "SELECT omni_web.param_get(convert_to('a=1', 'utf8'), 'a')") == "1"
    assert rows(web, "SELECT omni_web.param_get_all('a=1&a=2', 'a')") == [("1",), ("2",)]
    assert rows(web, "SELECT omni_web.param_get_all(convert_to('a=1&a=2', 'utf8'), 'a')") == [("1",), ("2",)]
    assert one(web, "SELECT omni_web.param_get('a=1', 'b')") is None
    assert rows(web, "SELECT omni_web.param_get_all('a=1', 'b')") == []
    # a value equal to the name asked for is not a name
    assert one(web, "SELECT omni_web.param_get('x=a&a=2', 'a')") == "2"
    # by name, and on a plain text[] (not only the params domain)
    assert one(web, "SELECT omni_web.param_get(params => ARRAY['k', 'v'], param => 'k')") == "v"


def test_params_domain_has_pairs(web):
    assert one(web, "SELECT ARRAY['key', 'value']::omni_web.params") == ["key", "value"]
    assert error(web, "SELECT ARRAY['key']::omni_web.params")[0] == "23514"


def test_huge_number_of_params(web):
    count = 50000
    query_string = "&".join("p%d=v%%20%d" % (i, i) for i in range(count))
    started = time.monotonic()
    assert one(web, "SELECT omni_web.param_get(%s::text, 'p49999')", (query_string,)) == "v 49999"
    assert one(web, "SELECT array_length(omni_web.parse_query_string(%s::text), 1)", (query_string,)) == 2 * count
    assert time.monotonic() - started < 20


@HYPOTHESIS
@given(pairs=st.lists(st.tuples(TEXT, TEXT), max_size=8))
def test_parse_query_string_agrees_with_python(web, pairs):
    encoded = urllib.parse.urlencode(pairs)      # what a browser's form submission looks like
    parsed = one(web, "SELECT omni_web.parse_query_string(%s::text)", (encoded,))
    assert parsed == [part for pair in pairs for part in pair]
    python = urllib.parse.parse_qsl(encoded, keep_blank_values=True)
    assert [(parsed[i], parsed[i + 1]) for i in range(0, len(parsed), 2)] == python


@HYPOTHESIS
@given(raw=st.text(st.sampled_from("ab=&+%2f3x\u00e9"), max_size=30))
def test_any_query_string_parses_as_python_does_or_is_refused(web, raw):
    try:
        parsed = one(web, "SELECT omni_web.parse_query_string(%s::text)", (raw,))
    except psycopg2.Error as exc:
        assert exc.pgcode in (BAD_ESCAPE, NOT_UTF8)
        assert re.search(r"%(?![0-9A-Fa-f]{2})", raw) or exc.pgcode == NOT_UTF8
        return
    python = urllib.parse.parse_qsl(raw, keep_blank_values=True)
    assert [(parsed[i], parsed[i + 1] or "") for i in range(0, len(parsed), 2)] == python


# -- url_encode, url_decode, uri_encode, uri_decode ------------------------------------------

def test_url_and_uri_encoding_as_the_reference(web):
    assert one(web, "SELECT omni_web.url_encode('Hello World')") == "Hello%20World"
    assert one(web, "SELECT omni_web.url_decode('Hello%20World')") == "Hello World"
    assert [r[0] for r in rows(web, "SELECT omni_web.url_encode(u) FROM unnest(string_to_array("
                                    "'http://hu.wikipedia.org/wiki/S\u00e3o_Paulo', '/')) WITH ORDINALITY AS t(u, n)"
                                    " ORDER BY n")] == ["http%3A", "", "hu.wikipedia.org", "wiki", "S%C3%A3o_Paulo"]
    assert one(web, "SELECT omni_web.uri_encode('http://hu.wikipedia.org/wiki/S\u00e3o_Paulo')") == \
        "http://hu.wikipedia.org/wiki/S%C3%A3o_Paulo"
    assert one(web, "SELECT omni_web.uri_decode('http://hu.wikipedia.org/wiki/S%C3%A3o_Paulo')") == \
        "http://hu.wikipedia.org/wiki/S\u00e3o_Paulo"


def test_url_decode_keeps_plus_and_uri_decode_keeps_reserved_escapes(web):
    assert one(web, "SELECT omni_web.url_decode('a+b%2B%2f%3F')") == "a+b+/?"
    assert one(web, "SELECT omni_web.uri_decode('/a%2Fb?x=%26%3d%20%25')") == "/a%2Fb?x=%26%3d %"
    assert one(web, "SELECT omni_web.url_encode('')") == ""
    assert one(web, "SELECT omni_web.url_encode(NULL) IS NULL")


def test_decoders_refuse_bad_escapes(web):
    for function in ("url_decode", "uri_decode"):
        code, message = error(web, "SELECT omni_web.%s('a%%zzb')" % function)
        assert code == BAD_ESCAPE and '"%zz"' in message


@HYPOTHESIS
@given(text=TEXT)
def test_url_encode_is_encode_uri_component_and_round_trips(web, text):
    encoded = one(web, "SELECT omni_web.url_encode(%s)", (text,))
    assert encoded == urllib.parse.quote(text, safe="")
    assert one(web, "SELECT omni_web.url_decode(%s)", (encoded,)) == text
    assert urllib.parse.unquote(encoded, errors="strict") == text


@HYPOTHESIS
@given(text=TEXT)
def test_uri_encode_is_encode_uri_and_round_trips(web, text):
    encoded = one(web, "SELECT omni_web.uri_encode(%s)", (text,))
    assert encoded == urllib.parse.quote(text, safe=";,/?:@&=+$!*'()#")
    assert one(web, "SELECT omni_web.uri_decode(%s)", (encoded,)) == text


# -- cookies ---------------------------------------------------------------------------------

def test_cookies_as_the_reference(web):
    assert rows(web, "SELECT * FROM omni_web.cookies('PHPSESSID=298zf09hf012fh2; csrftoken=u32t4o3tb3gg43; _gat=1')") \
        == [("PHPSESSID", "298zf09hf012fh2"), ("csrftoken", "u32t4o3tb3gg43"), ("_gat", "1")]


def test_cookies_syntax_variants(web):
    assert rows(web, "SELECT * FROM omni_web.cookies(%s)",
                (' a=1;b=x==;  c="quoted value" ;;d=;e; f = 2 ',)) == [
        ("a", "1"), ("b", "x=="), ("c", "quoted value"), ("d", ""), ("e", ""), ("f", "2")]
    assert rows(web, "SELECT * FROM omni_web.cookies('')") == []
    assert rows(web, "SELECT * FROM omni_web.cookies(NULL)") == []
    # not decoded: the application decides (url_decode)
    assert rows(web, "SELECT * FROM omni_web.cookies('n=a%20b')") == [("n", "a%20b")]


def test_cookie_get(web):
    assert one(web, "SELECT omni_web.cookie_get('a=1; b=2; b=3', 'b')") == "2"
    assert one(web, "SELECT omni_web.cookie_get('a=1', 'b')") is None
    assert one(web, "SELECT omni_web.cookie_get(NULL, 'b')") is None
    assert one(web, "SELECT omni_web.cookie_get('ab=1; a=2', 'a')") == "2"


def set_cookie(connection, *args, **named):
    arguments = ["%s"] * len(args) + ["%s => %%s" % name for name in named]
    return one(connection, "SELECT (h).value FROM (SELECT omni_web.set_cookie(%s) AS h) s" % ", ".join(arguments),
               list(args) + list(named.values()))


def test_set_cookie_with_every_attribute(web):
    assert set_cookie(web, "sid", "abc") == "sid=abc"
    assert set_cookie(web, "sid", "abc", max_age=3600, expires="2030-01-05 10:02:03.9+02", path="/app",
                      domain="example.com", secure=True, http_only=True, same_site="lax") == (
        "sid=abc; Max-Age=3600; Expires=Sat, 05 Jan 2030 08:02:03 GMT; Path=/app; Domain=example.com;"
        " Secure; HttpOnly; SameSite=Lax")
    assert set_cookie(web, "gone", "", max_age=0) == "gone=; Max-Age=0"
    assert set_cookie(web, "q", '"a=b"', same_site="None", secure=True) == 'q="a=b"; Secure; SameSite=None'
    assert set_cookie(web, "__Host-id", "1", secure=True, path="/") == "__Host-id=1; Path=/; Secure"


def test_set_cookie_expires_is_gmt_whatever_the_session_time_zone_and_locale(web):
    with web.cursor() as cur:
        cur.execute("SET TimeZone = 'Asia/Tokyo'; SET lc_time = 'C'")
        try:
            assert set_cookie(web, "a", "b", expires="2026-12-31 23:59:59+00") == \
                "a=b; Expires=Thu, 31 Dec 2026 23:59:59 GMT"
        finally:
            cur.execute("RESET TimeZone; RESET lc_time")


def test_set_cookie_is_a_header_for_http_response(web):
    response = response_of(web, "omni_httpd.http_response('hi', headers => ARRAY[omni_web.set_cookie('a', '1',"
                                " http_only => true), omni_web.set_cookie('b', '2')])")
    assert response.headers == [("set-cookie", "a=1; HttpOnly"), ("set-cookie", "b=2"),
                                ("content-type", "text/plain; charset=utf-8")]


@pytest.mark.parametrize("name, value, named", [
    ("sid", "a\r\nSet-Cookie: admin=1", {}),       # header splitting
    ("sid", "a\nb", {}), ("sid", "a\rb", {}),
    ("sid", "a;b", {}), ("sid", "a,b", {}), ("sid", "a b", {}), ("sid", 'a"b', {}), ("sid", "a\\b", {}),
    ("sid", '"a', {}), ("sid", "\u00e9", {}), ("sid", "a\tb", {}), ("sid", "\x7f", {}), ("sid", None, {}),
    ("", "a", {}), (None, "a", {}), ("s;d", "a", {}), ("s=d", "a", {}), ("s d", "a", {}), ("s\r\nx", "a", {}),
    ("s,d", "a", {}), ("s\u00e9", "a", {}), ("(sid)", "a", {}),
    ("sid", "a", {"path": "/; Domain=evil.example"}), ("sid", "a", {"path": "/\r\nX: y"}),
    ("sid", "a", {"path": "/\u00e9"}),
    ("sid", "a", {"domain": "evil.example; Secure"}), ("sid", "a", {"domain": "a b"}),
    ("sid", "a", {"domain": "x\r\ny"}), ("sid", "a", {"domain": ""}),
    ("sid", "a", {"same_site": "sometimes"}), ("sid", "a", {"same_site": "None"}),
    ("sid", "a", {"expires": "infinity"}), ("sid", "a", {"expires": "10000-01-01"}),
    ("__Secure-id", "a", {}), ("__secure-id", "a", {}), ("__Host-id", "a", {"secure": True}),
    ("__Host-id", "a", {"secure": True, "path": "/", "domain": "example.com"}),
])
def test_set_cookie_refuses_what_would_break_the_header(web, name, value, named):
    code, message = error(web, "SELECT omni_web.set_cookie(%s)" % ", ".join(
        ["%s", "%s"] + ["%s => %%s" % n for n in named]), [name, value] + list(named.values()))
    assert code == BAD_VALUE, message
    assert "cookie" in message


@HYPOTHESIS
@given(name=st.text(st.characters(max_codepoint=0x7f, blacklist_characters="\x00"), min_size=1, max_size=10),
       value=st.text(st.characters(max_codepoint=0x3000, blacklist_categories=("Cs",), blacklist_characters="\x00"),
                     max_size=20))
def test_set_cookie_output_is_one_header_that_reads_back(web, name, value):
    try:
        header = set_cookie(web, name, value)
    except psycopg2.Error as exc:
        assert exc.pgcode == BAD_VALUE
        return
    assert not re.search(r"[\x00-\x1f\x7f]", header)
    assert rows(web, "SELECT * FROM omni_web.cookies(%s)", (header,)) == [(name, value.strip('"') if len(value) > 1
                                                                           and value[0] == value[-1] == '"'
                                                                           else value)]


# -- multipart/form-data ---------------------------------------------------------------------

def treq_body(fields, boundary=None):
    """The body and Content-Type treq sends for ``fields`` (driven without a reactor)."""
    clock = task.Clock()
    cooperator = task.Cooperator(scheduler=lambda work: clock.callLater(0, work), started=True)

    def producer(data):
        return FileBodyProducer(io.BytesIO(data), cooperator=cooperator)

    converted = [(name, value if not isinstance(value, tuple) else (value[0], value[1], producer(value[2])))
                 for name, value in fields]
    multipart = MultiPartProducer(converted, boundary=boundary, cooperator=cooperator)

    class Consumer:
        chunks = []

        def write(self, data):
            self.chunks.append(data)

    consumer = Consumer()
    done: Deferred = multipart.startProducing(consumer)
    finished = []
    done.addCallback(finished.append)
    while not finished:
        clock.advance(0)
    body = b"".join(consumer.chunks)
    assert len(body) == multipart.length
    return body, "multipart/form-data; boundary=" + multipart.boundary.decode()


def parts(connection, body, content_type):
    return [(name, filename, content_type, bytes(data)) for name, filename, content_type, data in rows(
        connection, "SELECT name, filename, content_type, body FROM omni_web.parse_multipart(%s, %s)",
        (psycopg2.Binary(body), content_type))]


ALL_BYTES = bytes(range(256)) * 4


def test_multipart_from_treq_with_fields_binary_files_and_several_files_in_one_field(web):
    body, content_type = treq_body([
        ("title", "caf\u00e9 \"quoted\""),
        ("empty", ""),
        ("files", ("a.bin", "application/octet-stream", ALL_BYTES)),
        ("files", ("b \"x\".txt", "text/plain", b"second\r\nfile\r\n")),
        ("nothing", ("empty.dat", "application/octet-stream", b"")),
    ])
    # treq puts plain fields before files (sorted); the order within a field is kept.
    assert parts(web, body, content_type) == [
        ("empty", None, None, b""),
        ("title", None, None, "caf\u00e9 \"quoted\"".encode()),
        ("files", "a.bin", "application/octet-stream", ALL_BYTES),
        ("files", 'b "x".txt', "text/plain", b"second\r\nfile\r\n"),
        ("nothing", "empty.dat", "application/octet-stream", b""),
    ]


def test_multipart_content_that_looks_like_the_boundary_is_content(web):
    boundary = "XyZ123"
    tricky = (b"--XyZ123 at the start of a line without CR\n--XyZ123\n"
              b"\r\n--XyZ123X (longer boundary)\r\n--XyZ1 (shorter)\r\n--XyZ123\t+trailing text\r\n"
              b"\\000\\\\ \\377 backslash digits, \x00\xff\xfe, \r\n\r\n-- \r\n")
    body, content_type = treq_body([("a", ("t.bin", "application/octet-stream", tricky)), ("b", "after")],
                                   boundary=boundary)
    assert parts(web, body, content_type) == [("b", None, None, b"after"),
                                              ("a", "t.bin", "application/octet-stream", tricky)]


@HYPOTHESIS
@given(data=st.data())
def test_multipart_round_trips_what_treq_encodes(web, data):
    boundary = data.draw(st.text("abcXYZ019'()+_,-./:=?", min_size=1, max_size=20), label="boundary")
    fragment = st.one_of(st.binary(max_size=30), st.sampled_from([b"\r\n", b"--", b"\\", b"\x00", b"\xff"]),
                         st.binary(max_size=4).map(lambda tail: b"\r\n--" + boundary.encode() + b"x" + tail))
    # No backslash in file names: treq escapes `"` as \" but leaves `\` alone, so a name
    # ending in a backslash cannot be told from an escaped quote by anyone.
    file_name = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\\"), max_size=20)
    files = data.draw(st.lists(st.tuples(st.sampled_from(["f", "g", "\u00e9"]), file_name,
                                         st.lists(fragment, max_size=6).map(b"".join)), max_size=4), label="files")
    fields = data.draw(st.lists(st.tuples(st.sampled_from(["a", "b"]), TEXT), max_size=3), label="fields")
    # Content holding a real delimiter (at a line start, followed by -- or the line's end)
    # is a client's mistake: RFC 2046 has it choose a boundary that does not occur.
    delimiter = re.compile(rb"\r\n--" + re.escape(boundary.encode()) + rb"(--|[ \t]*\r\n)")
    assume(not any(delimiter.search(b"\r\n" + c + b"\r\n") for _, _, c in files))
    body, content_type = treq_body([(n, v) for n, v in fields]
                                   + [(n, (f, "application/octet-stream", c)) for n, f, c in files],
                                   boundary=boundary)
    # treq drops CR and LF from file names and leaves out an empty one; it sends plain
    # fields first, then files, each sorted by name (stable).
    expected = sorted([(n, None, None, v.encode()) for n, v in fields], key=lambda p: p[0]) + sorted([
        (n, f.replace("\r", "").replace("\n", "") if f else None, "application/octet-stream", c)
        for n, f, c in files], key=lambda p: p[0])
    assert parts(web, body, 'multipart/form-data; boundary="%s"' % boundary) == expected
    assert content_type.endswith(boundary)


def test_multipart_headers_are_returned(web):
    body, content_type = treq_body([("f", ("n.txt", "text/plain", b"x"))])
    headers = rows(web, "SELECT h.name, h.value FROM omni_web.parse_multipart(%s, %s) p, unnest(p.headers) h",
                   (body, content_type))
    assert [(name.lower(), value) for name, value in headers] == [
        ("content-disposition", 'form-data; name="f"; filename="n.txt"'), ("content-type", "text/plain"),
        ("content-length", "1")]


def hand_made(*raw_parts, boundary="b0und", preamble=b"", epilogue=b"", close=True):
    body = preamble + b"".join(b"--" + boundary.encode() + b"\r\n" + part + b"\r\n" for part in raw_parts)
    if close:
        body += b"--" + boundary.encode() + b"--" + epilogue
    return body


def test_multipart_preamble_epilogue_padding_and_quoted_boundary(web):
    body = (b"This is the preamble.\r\n--a b:c?=\r\n"
            b"Content-Disposition: form-data; name=one\r\n\r\n1\r\n"
            b"--a b:c?=  \t\r\n"                                   # transport padding
            b"content-disposition: FORM-DATA; NAME=\"two\"; filename*=UTF-8''%E2%82%AC%20rates.txt\r\n"
            b"Content-Type: text/plain;\r\n charset=utf-8\r\n\r\n"     # a folded header line
            b"2\r\n--a b:c?=--\r\nThis is the epilogue.\r\n--a b:c?=\r\nnot a part\r\n")
    assert parts(web, body, 'Multipart/Form-Data; charset=utf-8; boundary="a b:c?="') == [
        ("one", None, None, b"1"), ("two", "\u20ac rates.txt", "text/plain; charset=utf-8", b"2")]


def test_multipart_nested_mixed_as_curl_sends_several_files(web):
    inner = hand_made(b'Content-Disposition: attachment; filename="a.txt"\r\nContent-Type: text/plain\r\n\r\nA',
                      b'Content-Disposition: file; filename="b.bin"\r\n\r\n\x00B', boundary="inner",
                      epilogue=b"\r\n")
    body = hand_made(b'Content-Disposition: form-data; name="files"\r\n'
                     b"Content-Type: multipart/mixed; boundary=inner\r\n\r\n" + inner,
                     b'Content-Disposition: form-data; name="x"\r\n\r\ny')
    assert parts(web, body, "multipart/form-data; boundary=b0und") == [
        ("files", "a.txt", "text/plain", b"A"), ("files", "b.bin", None, b"\x00B"), ("x", None, None, b"y")]


def test_multipart_part_without_headers_and_only_a_close_delimiter(web):
    assert parts(web, b"--b0und--", "multipart/form-data; boundary=b0und") == []
    assert parts(web, b"--b0und--\r\n", "multipart/form-data; boundary=b0und") == []
    assert parts(web, hand_made(b'content-disposition: form-data; name=""\r\n\r\n'),
                 "multipart/form-data; boundary=b0und") == [("", None, None, b"")]


def test_multipart_file_names_as_browsers_and_old_clients_write_them(web):
    body = hand_made(b'Content-Disposition: form-data; name="f"; filename="C:\\dir\\a.txt"\r\n\r\n1',
                     b'Content-Disposition: form-data; name="g"; filename="a%22b.txt"\r\n\r\n2',
                     b'Content-Disposition: form-data; name="h"; filename=""\r\n\r\n',
                     'Content-Disposition: form-data; name="\u00e9"; filename="\u00fc.txt"\r\n\r\n3'.encode())
    assert [(n, f) for n, f, _, _ in parts(web, body, "multipart/form-data; boundary=b0und")] == [
        ("f", "C:\\dir\\a.txt"), ("g", "a%22b.txt"), ("h", ""), ("\u00e9", "\u00fc.txt")]


@pytest.mark.parametrize("body, content_type, code, words", [
    (hand_made(b"Content-Disposition: form-data; name=a\r\n\r\n1", close=False), None, MALFORMED, "closing delimiter"),
    (b"no delimiter at all", None, MALFORMED, "closing delimiter"),
    (b"--b0und\nContent-Disposition: form-data; name=a\n\n1\n--b0und--", None, MALFORMED,
     "closing delimiter"),                                           # LF-only lines
    (b"preamble--b0und\r\nContent-Disposition: form-data; name=a\r\n\r\n1", None, MALFORMED,
     "closing delimiter"),                                           # no line start
    (hand_made(b"Content-Disposition: form-data; name=a\r\n\r\n1")[:-2], None, MALFORMED, "closing delimiter"),
    (hand_made(b"Content-Disposition: form-data; name=a\r\n1"), None, MALFORMED, "no empty line"),
    (hand_made(b"Content-Type: text/plain\r\n\r\n1"), None, MALFORMED, "no Content-Disposition"),
    (hand_made(b"\r\n1"), None, MALFORMED, "no Content-Disposition"),
    (hand_made(b"Content-Disposition: form-data\r\n\r\n1"), None, MALFORMED, "no name"),
    (hand_made(b"Content-Disposition: attachment; name=a\r\n\r\n1"), None, MALFORMED, "not form-data"),
    (hand_made(b'Content-Disposition: form-data; name="a\r\n\r\n1'), None, MALFORMED, "malformed parameters"),
    (hand_made(b'Content-Disposition: form-data; name="a"x; filename="y"\r\n\r\n1'), None, MALFORMED,
     "malformed parameters"),
    (hand_made(b"Content-Disposition: form-data; name=a\r\nno colon here\r\n\r\n1"), None, MALFORMED,
     "malformed header"),
    (hand_made(b"Content-Disposition: form-data; name=\xff\r\n\r\n1"), None, NOT_UTF8, "not valid UTF-8"),
    (hand_made(b"Content-Disposition: form-data; name=a; filename*=ISO-8859-1''%E9\r\n\r\n1"), None, MALFORMED,
     "filename*"),
    (b"--b0und--", "text/plain", BAD_VALUE, "not a multipart/form-data"),
    (b"--b0und--", "multipart/form-data", BAD_VALUE, "no boundary"),
    (b"--b0und--", "multipart/form-data; boundary=", BAD_VALUE, "invalid multipart boundary"),
    (b"--b0und--", "multipart/form-data; boundary=" + "x" * 71, BAD_VALUE, "invalid multipart boundary"),
    (b"--b0und--", "multipart/form-data; boundary=a\\b", BAD_VALUE, "invalid multipart boundary"),
    (b"--b0und--", 'multipart/form-data; boundary="unterminated', MALFORMED, "malformed parameters"),
])
def test_malformed_multipart_is_refused_clearly(web, body, content_type, code, words):
    got, message = error(web, "SELECT * FROM omni_web.parse_multipart(%s, %s)",
                         (psycopg2.Binary(body), content_type or "multipart/form-data; boundary=b0und"))
    assert got == code and words in message, message


def test_multipart_many_parts_and_a_large_file_in_linear_time(web):
    many = hand_made(*[b'Content-Disposition: form-data; name="p%d"\r\n\r\n%d' % (i, i) for i in range(5000)])
    started = time.monotonic()
    assert one(web, "SELECT count(*) FROM omni_web.parse_multipart(%s, 'multipart/form-data; boundary=b0und')",
               (many,)) == 5000
    large = os.urandom(4 * 1024 * 1024)
    body, content_type = treq_body([("big", ("big.bin", "application/octet-stream", large)), ("x", "y")])
    assert one(web, "SELECT array_agg(md5(body) ORDER BY name) FROM omni_web.parse_multipart(%s, %s)",
               (body, content_type)) == [hashlib.md5(large).hexdigest(), hashlib.md5(b"y").hexdigest()]
    assert time.monotonic() - started < 30


def test_multipart_with_many_false_delimiters_stays_linear(web):
    content = b"\r\n--b0undX" * 20000
    body = hand_made(b'Content-Disposition: form-data; name="f"\r\n\r\n' + content)
    started = time.monotonic()
    assert one(web, "SELECT length(body) FROM omni_web.parse_multipart(%s, 'multipart/form-data; boundary=b0und')",
               (body,)) == len(content)
    assert time.monotonic() - started < 10


def test_helpers_are_immutable_strict_pinned_and_executable_by_anyone(web):
    functions = rows(web, "SELECT p.oid::regprocedure::text, p.provolatile, p.proisstrict, p.proparallel,"
                          " p.proconfig, has_function_privilege('public', p.oid, 'EXECUTE')"
                          " FROM pg_proc p WHERE p.pronamespace = 'omni_web'::regnamespace")
    assert len(functions) >= 17
    for signature, volatility, strict, parallel, config, public in functions:
        assert volatility == "i" and parallel == "s" and public, signature
        assert config == ["search_path=pg_catalog, pg_temp"], signature
        assert strict or signature.startswith("omni_web.set_cookie("), signature


# -- through the daemon ------------------------------------------------------------------------

UPLOAD_HANDLER = """
SELECT omni_httpd.http_response(coalesce(jsonb_agg(jsonb_build_object(
           'name', p.name, 'filename', p.filename, 'content_type', p.content_type,
           'md5', md5(p.body), 'size', length(p.body)) ORDER BY p.n), '[]'::jsonb))
FROM request,
     omni_web.parse_multipart(request.body, omni_http.http_header_get(request.headers, 'content-type'))
         WITH ORDINALITY AS p (name, filename, content_type, headers, body, n)
"""


def test_curl_upload_through_the_daemon(empty_dsn, tmp_path):
    files = {"a.txt": b"first\r\n--not-a-boundary\r\n", "b.bin": ALL_BYTES, "c.bin": os.urandom(200000)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    daemon = Daemon(empty_dsn, "--http-workers", "1", "--no-init", "--admin", "none", "--max-body", "1M")
    try:
        daemon.wait_ready()
        wait_reloads(empty_dsn, 1)
        listener = add_listener(empty_dsn, UPLOAD_HANDLER)
        wait_reloads(empty_dsn, 1)
        url = "http://127.0.0.1:%d/upload" % effective_port(empty_dsn, listener)

        def curl(*form, options=()):
            argv = ["curl", "-s", "-w", "\n%{http_code}"] + list(options)
            for field in form:
                argv += ["-F", field]
            done = subprocess.run(argv + [url], cwd=tmp_path, capture_output=True, timeout=60)
            body, _, status = done.stdout.rpartition(b"\n")
            return int(status), body

        status, body = curl("title=caf\u00e9", "files=@a.txt,b.bin", "big=@c.bin;type=image/png")
        assert status == 200, body
        assert json.loads(body) == [
            {"name": "title", "filename": None, "content_type": None,
             "md5": hashlib.md5("caf\u00e9".encode()).hexdigest(), "size": 5},
            {"name": "files", "filename": "a.txt", "content_type": "text/plain",
             "md5": hashlib.md5(files["a.txt"]).hexdigest(), "size": len(files["a.txt"])},
            {"name": "files", "filename": "b.bin", "content_type": "application/octet-stream",
             "md5": hashlib.md5(files["b.bin"]).hexdigest(), "size": len(files["b.bin"])},
            {"name": "big", "filename": "c.bin", "content_type": "image/png",
             "md5": hashlib.md5(files["c.bin"]).hexdigest(), "size": len(files["c.bin"])},
        ]
        # The same over HTTP/2 (cleartext, prior knowledge).
        status, body2 = curl("title=caf\u00e9", "files=@a.txt,b.bin", "big=@c.bin;type=image/png",
                             options=["--http2-prior-knowledge"])
        assert status == 200 and json.loads(body2) == json.loads(body)
        # A malformed body is the handler's error: 500, and the worker goes on serving.
        broken = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H",
                                 "Content-Type: multipart/form-data; boundary=zz", "--data-binary", "--zz\r\n", url],
                                capture_output=True, timeout=60)
        assert broken.stdout == b"500"
        # Over --max-body: 413 from the worker, before the handler (and so parse_multipart) runs.
        (tmp_path / "huge.bin").write_bytes(b"x" * (1024 * 1024 + 1))
        status, _ = curl("huge=@huge.bin")
        assert status == 413
        status, body = curl("after=ok")
        assert status == 200 and json.loads(body)[0]["md5"] == hashlib.md5(b"ok").hexdigest()
    finally:
        code = daemon.stop()
    assert code == 0, daemon.output[-3000:]


# -- in handlers, and for any role ---------------------------------------------------------------

def test_documented_handlers_work(db):
    from sql_support import call, execute, install
    install(db, """SELECT omni_httpd.http_response(format('Hello, %s (%s tags)',
                       coalesce(omni_web.param_get(request.body, 'name'), 'stranger'),
                       (SELECT count(*) FROM omni_web.param_get_all(request.body, 'tag'))))
                   FROM request WHERE request.method = 'POST'""", name="form")
    assert call(db, "form", method="POST", body=b"name=Ann+B%C3%A9&tag=1&tag=2").body == "Hello, Ann B\u00e9 (2 tags)".encode()
    execute(db, "CREATE TABLE uploads (field text, filename text, content_type text, data bytea)")
    install(db, """WITH upload AS (
                       INSERT INTO uploads (field, filename, content_type, data)
                       SELECT p.name, p.filename, p.content_type, p.body
                       FROM request,
                            omni_web.parse_multipart(request.body,
                                                     omni_http.http_header_get(request.headers, 'content-type')) AS p
                       WHERE p.filename IS NOT NULL
                       RETURNING 1)
                   SELECT omni_httpd.http_response(format('%s files stored', (SELECT count(*) FROM upload)))""",
            name="upload")
    body, content_type = treq_body([("a", ("x.bin", "application/octet-stream", ALL_BYTES)), ("note", "n")])
    assert call(db, "upload", method="POST", body=body, headers=[("Content-Type", content_type)]).body == \
        b"1 files stored"
    assert [(r[0], r[1], bytes(r[2])) for r in rows(db, "SELECT field, filename, data FROM uploads")] == [
        ("a", "x.bin", ALL_BYTES)]
    install(db, """SELECT omni_httpd.http_response('hi', headers => ARRAY[omni_web.set_cookie('seen',
                       coalesce(omni_web.cookie_get(omni_http.http_header_get(request.headers, 'cookie'), 'seen'), '0'),
                       path => '/')]) FROM request""", name="cookie")
    assert call(db, "cookie", headers=[("Cookie", "a=b; seen=41")]).header_values[0] == "seen=41; Path=/"


def test_usable_by_a_role_without_rights_even_when_public_execute_is_revoked(revoked_public_user):
    user = revoked_public_user
    assert one(user, "SELECT omni_web.param_get(omni_web.parse_query_string('a=%C3%A9')::omni_web.params, 'a')"
                     " || omni_web.param_get('b=1', 'b') || omni_web.url_encode(' ') || omni_web.uri_decode('%20')"
                     " || omni_web.cookie_get('c=d', 'c') || (omni_web.set_cookie('e', 'f')).value") == \
        "\u00e91%20 de=f"
    assert rows(user, "SELECT name, convert_from(body, 'UTF8') FROM omni_web.parse_multipart("
                      "convert_to(E'--b\\r\\ncontent-disposition: form-data; name=x\\r\\n\\r\\ny\\r\\n--b--', 'UTF8'),"
                      " 'multipart/form-data; boundary=b')") == [("x", "y")]


def test_error_messages_never_carry_a_request_line_break(web):
    for sql, params in [
        ("SELECT omni_web.parse_query_string(%s::text)", ("a=%\r\nInjected: 1",)),
        ("SELECT omni_web.url_decode(%s)", ("%\n\n",)),
        ("SELECT omni_web.set_cookie(%s, 'v')", ("a\r\nb",)),
        ("SELECT * FROM omni_web.parse_multipart('', %s)", ("text/plain\r\nInjected: 1",)),
        ("SELECT * FROM omni_web.parse_multipart('', %s)", ('multipart/form-data; boundary="a\r\nb"',)),
        ("SELECT * FROM omni_web.parse_multipart(%s, 'multipart/form-data; boundary=b0und')",
         (hand_made(b"Content-Disposition: x\r\n y\r\n\r\n"),)),
    ]:
        _, message = error(web, sql, params)
        assert "\r" not in message and "\n" not in message, message
