"""The SQL lexer (omni_httpd._sql_tokens / _split_statements) against PostgreSQL's own scanner.

What the lexer must never do is see one statement where PostgreSQL sees two: that is
how `--` ended by CR once hid a DO block. PostgreSQL's verdict comes from the protocol's
Parse, which refuses a text with more than one statement ("cannot insert multiple
commands into a prepared statement") and runs nothing. Checked on a corpus of the
constructs that can hide a `;` and on generated texts, under both settings of
standard_conforming_strings.
"""
from __future__ import annotations

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from psycopg import pq

MULTIPLE = "cannot insert multiple commands into a prepared statement"


@pytest.fixture
def pg(dsn):
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET escape_string_warning = off")
        yield conn


def postgres_verdict(conn, text: str, conforming: bool) -> str:
    """'one', 'several' or 'error' (PostgreSQL refuses the text for another reason)."""
    conn.execute("SET standard_conforming_strings = %s" % ("on" if conforming else "off"))
    res = conn.pgconn.prepare(b"", text.encode("utf-8"))
    if res.status == pq.ExecStatus.COMMAND_OK:
        return "one"
    message = (res.error_field(pq.DiagnosticField.MESSAGE_PRIMARY) or b"").decode()
    return "several" if message == MULTIPLE else "error"


def our_count(conn, text: str, conforming: bool) -> int:
    conn.execute("SET standard_conforming_strings = on")
    return conn.execute("SELECT coalesce(array_length(omni_httpd._split_statements(%s, %s), 1), 0)",
                        (text, conforming)).fetchone()[0]


def agree(conn, text: str, conforming: bool) -> None:
    verdict = postgres_verdict(conn, text, conforming)
    ours = our_count(conn, text, conforming)
    if verdict == "several":
        assert ours >= 2, "PostgreSQL sees several statements, the lexer %d: %r" % (ours, text)
    elif verdict == "one":
        assert ours == 1, "PostgreSQL sees one statement, the lexer %d: %r" % (ours, text)


# Each: (text, standard_conforming_strings settings it is checked under, PostgreSQL's
# count where it must be exact). The hostile ones hide or fake a second statement.
CORPUS = [
    ("SELECT 1 --\r; SELECT 2", (True, False), 2),
    ("SELECT 1 --\n; SELECT 2", (True, False), 2),
    ("SELECT 1 -- ; SELECT 2", (True, False), 1),
    ("SELECT 1 --\r\n; SELECT 2", (True, False), 2),
    ("SELECT 1 /* ; */", (True, False), 1),
    ("SELECT 1 /* /* ; */ ; */", (True, False), 1),
    ("SELECT 1 /* /* */ ; */ ; SELECT 2", (True, False), None),   # still in a comment, unterminated
    ("SELECT ';'", (True, False), 1),
    ("SELECT ''';'''", (True, False), 1),
    ("SELECT '\\'; SELECT 2 --'", (True,), 2),       # backslash is just a character
    ("SELECT '\\'; SELECT 2 --'", (False,), 1),      # backslash escapes the quote
    ("SELECT E'\\'; SELECT 2 --'", (True, False), 1),
    ("SELECT e'\\\\'; SELECT 2", (True, False), 2),
    ("SELECT U&'\\\\'; SELECT 2 --'", (True,), 2),     # U&'\\' is one backslash
    ("SELECT U&'\\'; SELECT 2 --'", (True, False), None),  # an invalid escape: refused
    ("SELECT u&'\\0041;'", (True,), 1),
    ("SELECT U&\"a;\" FROM (SELECT 1 AS \"a;\") t", (True, False), 1),
    ("SELECT B'1'; SELECT 2", (True, False), 2),
    ("SELECT X'\\'; SELECT 2 --'", (True,), 2),
    ("SELECT N'\\'; SELECT 2 --'", (True,), 2),
    ("SELECT N'\\'; SELECT 2 --'", (False,), 1),
    ("SELECT $$;$$", (True, False), 1),
    ("SELECT $a$ $$ ; $a$", (True, False), 1),
    ("SELECT $a$ $b$ ; $a$; SELECT 2", (True, False), 2),
    ("SELECT $a$ $ab$;$a$", (True, False), 1),
    ("SELECT 1 AS x$$; SELECT 2", (True, False), 2),
    ("SELECT \"a\"\";\" FROM (SELECT 1 AS \"a\"\";\") t", (True, False), 1),
    ("SELECT 1e'\\'; SELECT 2 --'", (True, False), None),   # refused (PG >= 15) or an E-string
    ("SELECT 1.e5; SELECT 2", (True, False), 2),
    ("SELECT 1..2", (True, False), None),
    ("SELECT $1; SELECT 2", (True, False), 2),
    ("SELECT 1 +--x\r 2; SELECT 2", (True, False), 2),
    ("SELECT 1 */ ; SELECT 2", (True, False), None),
    ("SELECT 'a'\n'b;'", (True, False), 1),
    ("SELECT 'a' -- c\n';'", (True, False), 1),
    ("SELECT 1;", (True, False), 1),
    ("SELECT 1; -- trailing\r", (True, False), 1),
    ("SELECT 1\x0b; SELECT 2", (True, False), None),
    ("SELECT 'é;' AS ü", (True, False), 1),
]


@pytest.mark.parametrize("text, settings_, exact", CORPUS)
def test_the_lexer_agrees_with_postgresql_on_the_corpus(pg, text, settings_, exact):
    for conforming in settings_:
        verdict = postgres_verdict(pg, text, conforming)
        if exact is not None:
            assert verdict == ("several" if exact > 1 else "one"), (text, conforming, verdict)
        agree(pg, text, conforming)


# -- generated texts ------------------------------------------------------------------

_CONTENT = st.text(alphabet=list("a;'\\-*/$\"\r\n xE&"), max_size=12)


def _plain_string(content: str, conforming: bool) -> str:
    body = content.replace("'", "''")
    if not conforming:
        body = body.replace("\\", "\\\\")
    return "'%s'" % body


def _escape_string(content: str) -> str:
    return "E'%s'" % content.replace("\\", "\\\\").replace("'", "\\'")


def _unicode_string(content: str) -> str:
    return "U&'%s'" % content.replace("\\", "\\\\").replace("'", "''")


def _dollar(content: str, tag: str) -> str:
    delimiter = "$%s$" % tag
    if delimiter in content + "$":
        content = content.replace("$", "")
    return "%s%s%s" % (delimiter, content, delimiter)


def _identifier(content: str) -> str:
    return '"%s"' % (content.replace('"', '""').replace("\x00", "") or "x")


@st.composite
def expressions(draw, conforming: bool):
    content = draw(_CONTENT)
    kind = draw(st.sampled_from(["plain", "escape", "unicode", "dollar", "number", "ident"]))
    if kind == "plain":
        return _plain_string(content, conforming)
    if kind == "escape":
        return _escape_string(content)
    if kind == "unicode" and conforming:
        return _unicode_string(content)
    if kind == "dollar":
        return _dollar(content, draw(st.sampled_from(["", "a", "tag_1"])))
    if kind == "ident":
        return "(SELECT 1 AS %s)" % _identifier(content)
    return draw(st.sampled_from(["1", "1.5", "1e3", ".5", "2.e-1"]))


@st.composite
def separators(draw):
    comment = draw(st.text(alphabet=list("a;'-$*/ "), max_size=6))
    return draw(st.sampled_from([
        " ", "\n", "\t",
        " --%s\n" % comment.replace("\n", ""),
        " --%s\r" % comment.replace("\r", ""),
        " /*%s*/ " % comment.replace("*", "").replace("/", ""),
        " /* /*%s*/ ; */ " % comment.replace("*", "").replace("/", ""),
    ]))


@st.composite
def scripts(draw):
    conforming = draw(st.booleans())
    statements = []
    for _ in range(draw(st.integers(1, 3))):
        parts = [draw(expressions(conforming)) for _ in range(draw(st.integers(1, 3)))]
        statements.append("SELECT " + (draw(separators()) + "|| ").join(
            "(%s)::text" % part for part in parts) + draw(separators()))
    return ";".join(statements), conforming, len(statements)


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scripts())
def test_the_lexer_agrees_with_postgresql_on_generated_texts(pg, script):
    text, conforming, count = script
    verdict = postgres_verdict(pg, text, conforming)
    assert verdict == ("several" if count > 1 else "one"), (text, conforming, verdict)
    assert our_count(pg, text, conforming) == count, (text, conforming)
