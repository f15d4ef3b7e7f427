"""Attacks on the daemon's database privileges and on other roles' requests (docs/sql-api.md, "Security model").

Each test plays an attacker as the issue that found the hole did: an HTTP client with
no credentials, or a handler author whose role has no rights. One daemon with ONE
worker, so every request of every role runs in the same database session: whatever a
request could leave there, the next one would see. The daemon's own login role is the
cluster's superuser, as on an embedded database.
"""
from __future__ import annotations

import http.client
import os
import re

import psycopg2
import pytest

from daemon_support import Daemon, add_listener, effective_port, sql, wait_reloads
from conftest import create_database, dsn_for, _drop_database


class Site:
    """The daemon, the attacker role `mallory` (no rights beyond its own schema) and a
    victim listener whose handler runs as the superuser."""

    def __init__(self, dsn, daemon, mallory):
        self.dsn = dsn
        self.daemon = daemon
        self.mallory = mallory
        self.mallory_dsn = re.sub(r"user=\S+", "user=%s" % mallory, dsn)

    def serve(self, query, role_name=None) -> int:
        listener = add_listener(self.dsn, query, role_name=role_name)
        wait_reloads(self.dsn, 1)
        return effective_port(self.dsn, listener)

    def as_mallory(self, statement, params=None):
        return sql(self.mallory_dsn, statement, params)

    def mallory_is_superuser(self) -> bool:
        return sql(self.dsn, "SELECT rolsuper FROM pg_roles WHERE rolname = %s", (self.mallory,))[0][0]


@pytest.fixture(scope="module")
def site(pg_cluster, schema_template):
    name = create_database(pg_cluster, "t_confine", template=schema_template)
    dsn = dsn_for(pg_cluster, name)
    mallory = "mallory_%d" % os.getpid()
    sql(pg_cluster.dsn, 'CREATE ROLE "%s" LOGIN' % mallory)
    sql(dsn, 'CREATE SCHEMA "%s" AUTHORIZATION "%s"' % (mallory, mallory))
    # What a victim handler reads; mallory may read it too, as many apps allow.
    sql(dsn, "CREATE TABLE public.notes (body text); INSERT INTO public.notes VALUES ('the real note');"
             "GRANT SELECT ON public.notes TO PUBLIC")
    daemon = Daemon(dsn, "--http-workers", "1", "--no-init", "--admin", "none")
    try:
        daemon.wait_ready()
        wait_reloads(dsn, 1)
        yield Site(dsn, daemon, mallory)
    finally:
        code = daemon.stop()
        _drop_database(pg_cluster, name)
        sql(pg_cluster.dsn, 'DROP ROLE IF EXISTS "%s"' % mallory)
    assert code == 0, daemon.output[-3000:]


def request(port, path="/", headers=None, method="GET", body=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def respond(expression):
    return "SELECT omni_httpd.http_response(%s) FROM request" % expression


# -- 1. request values never become SQL text -------------------------------------------

def test_a_header_cannot_become_sql_even_after_a_handler_changed_the_encoding(site):
    # A role with no rights switches the session to SJIS with backslash_quote on, the
    # setting under which hand-quoted literals broke: 0x81 swallowed the escaping backslash.
    poison = site.serve("SELECT omni_httpd.http_response(set_config('client_encoding', 'SJIS', false) "
                        "|| set_config('backslash_quote', 'on', false)) FROM request", site.mallory)
    echo = site.serve(respond("omni_http.http_header_get(request.headers, 'x-a')"))
    payload = b"\x81\\']); CREATE TABLE public.injected AS SELECT current_user AS who; --"
    assert request(poison)[0] == 200
    status, body = request(echo, headers={"X-A": payload})
    assert status == 200
    # The value arrived as data, byte for byte (the server decoded it as UTF-8)...
    assert body == payload.decode("latin-1").encode("utf-8")
    # ...and no statement of the attacker's ran.
    assert sql(site.dsn, "SELECT to_regclass('public.injected')")[0][0] is None


# -- 2. no name in the runtime can be hijacked ----------------------------------------

def test_a_role_cannot_hijack_the_runtime_through_search_path(site):
    # mallory's own `unnest` and `=` for header arrays, better matches than pg_catalog's;
    # whoever calls them makes mallory superuser.
    site.as_mallory("""
        CREATE FUNCTION {m}.escalate() RETURNS void LANGUAGE plpgsql AS $$
        BEGIN EXECUTE 'ALTER ROLE {m} SUPERUSER'; EXCEPTION WHEN insufficient_privilege THEN NULL; END $$;
        CREATE FUNCTION {m}.unnest(omni_http.http_header[]) RETURNS SETOF omni_http.http_header
            LANGUAGE plpgsql AS $$ BEGIN PERFORM {m}.escalate(); RETURN QUERY SELECT * FROM pg_catalog.unnest($1); END $$;
        CREATE FUNCTION {m}.unnest(text[], text[]) RETURNS TABLE (a text, b text)
            LANGUAGE plpgsql AS $$ BEGIN PERFORM {m}.escalate(); RETURN QUERY SELECT * FROM pg_catalog.unnest($1, $2); END $$;
        CREATE FUNCTION {m}.eq(omni_httpd.http_response, omni_httpd.http_response) RETURNS boolean
            LANGUAGE plpgsql AS $$ BEGIN PERFORM {m}.escalate(); RETURN true; END $$;
        CREATE OPERATOR {m}.= (FUNCTION = {m}.eq, LEFTARG = omni_httpd.http_response, RIGHTARG = omni_httpd.http_response);
    """.format(m=site.mallory))
    # Its handler puts its schema first on the session's search_path.
    hijack = site.serve("SELECT omni_httpd.http_response(set_config('search_path', '%s, pg_catalog', false)) "
                        "FROM request" % site.mallory, site.mallory)
    victim = site.serve(respond("(SELECT string_agg(h.name, ',') FROM unnest(request.headers) h)"))
    assert request(hijack)[0] == 200
    status, body = request(victim, headers={"X-One": "1"})
    assert status == 200 and b"x-one" in body
    assert request(hijack)[0] == 200
    assert request(victim, headers={"X-Two": "2"})[0] == 200
    assert not site.mallory_is_superuser()


def test_a_handler_cannot_change_its_own_function_to_run_as_the_daemon(site):
    # mallory owns its handler's SECURITY DEFINER function; it makes it SECURITY INVOKER
    # with a body that escalates, so that the next call would run as the daemon.
    site.as_mallory("""
        CREATE FUNCTION {m}.tamper() RETURNS text LANGUAGE plpgsql AS $fn$
        DECLARE f regprocedure;
        BEGIN
            SELECT p.oid INTO f FROM pg_proc p
            WHERE p.pronamespace = pg_my_temp_schema() AND p.proowner = '{m}'::regrole
              AND p.proname LIKE 'omni_httpd_h%'
            ORDER BY p.oid DESC LIMIT 1;     -- its own: the last one installed
            EXECUTE format('ALTER FUNCTION %s SECURITY INVOKER', f);
            EXECUTE format($f$CREATE OR REPLACE FUNCTION %s RETURNS SETOF omni_httpd._handler_outcome
                LANGUAGE plpgsql AS $b$ BEGIN EXECUTE 'ALTER ROLE {m} SUPERUSER'; END $b$$f$,
                f::text);
            RETURN 'changed ' || f::text;
        END $fn$;
    """.format(m=site.mallory))
    port = site.serve(respond("%s.tamper()" % site.mallory), site.mallory)
    mark = site.daemon.mark()
    status, body = request(port)
    assert status == 200 and body.startswith(b"changed ")
    status, body = request(port)      # the changed function is noticed before it runs
    assert status == 200 and body.startswith(b"changed ")
    assert not site.mallory_is_superuser()
    site.daemon.wait_for(r"resetting the database session \(the handler function was changed", start=mark)


def test_a_role_cannot_call_another_handlers_function(site):
    victim_port = site.serve(respond("'secret of ' || current_user"))
    assert request(victim_port)[1].startswith(b"secret of ")
    site.as_mallory("""
        CREATE FUNCTION {m}.steal() RETURNS text LANGUAGE plpgsql AS $$
        DECLARE f regprocedure; answer text;
        BEGIN
            FOR f IN SELECT p.oid FROM pg_proc p WHERE p.pronamespace = pg_my_temp_schema()
                     AND p.proowner <> '{m}'::regrole AND p.proname LIKE 'omni_httpd_h%' LOOP
                BEGIN
                    EXECUTE format('SELECT convert_from(body, ''UTF8'') FROM %s(''GET'', ''/'', NULL, '''', ''{{}}'', ''{{}}'')',
                                   f::regproc) INTO answer;
                    RETURN 'stole: ' || answer;
                EXCEPTION WHEN insufficient_privilege THEN
                    answer := coalesce(answer, '') || 'denied ';
                END;
            END LOOP;
            RETURN coalesce(answer, 'nothing found');
        END $$;
    """.format(m=site.mallory))
    port = site.serve(respond("%s.steal()" % site.mallory), site.mallory)
    status, body = request(port)
    assert status == 200
    assert body.startswith(b"denied "), body


# -- 3. handler text is never run with the daemon's privileges -------------------------

def test_a_statement_hidden_behind_a_carriage_return_comment_is_refused(site, tmp_path):
    marker = tmp_path / "written-by-copy"
    hidden = ("SELECT omni_httpd.http_response('x') FROM request --\r; "
              "COPY (SELECT 1) TO PROGRAM 'touch %s'" % marker)
    with pytest.raises(psycopg2.Error) as refused:
        sql(site.dsn, "INSERT INTO omni_httpd.handlers (query) VALUES (%s)", (hidden,))
    assert "query can only contain one statement" in str(refused.value)

    # With the check bypassed (triggers off), the worker still refuses to install it, and
    # nothing of it runs.
    conn = psycopg2.connect(site.dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SET LOCAL session_replication_role = replica")
            cur.execute("""
                WITH l AS (INSERT INTO omni_httpd.listeners(address, port) VALUES ('127.0.0.1', 0) RETURNING id),
                     h AS (INSERT INTO omni_httpd.handlers(query) VALUES (%s) RETURNING id)
                INSERT INTO omni_httpd.listeners_handlers SELECT l.id, h.id FROM l, h RETURNING listener_id""",
                        (hidden,))
            listener = cur.fetchone()[0]
    finally:
        conn.close()
    mark = site.daemon.mark()
    sql(site.dsn, "SELECT omni_httpd.reload_configuration()")
    wait_reloads(site.dsn, 1)
    site.daemon.wait_for(r"could not be installed: .*one statement", start=mark)
    assert request(effective_port(site.dsn, listener))[0] == 500
    assert not marker.exists()


def test_installing_a_handler_runs_none_of_it(site):
    # An IMMUTABLE function is folded while a query is *planned*; the daemon only asks
    # PostgreSQL to describe the query, so at install time nothing of it runs.
    site.as_mallory("""
        CREATE FUNCTION {m}.trap() RETURNS text LANGUAGE plpgsql IMMUTABLE AS $$
        BEGIN PERFORM pg_advisory_lock(4242); RETURN current_user; END $$;
    """.format(m=site.mallory))
    listener = add_listener(site.dsn, respond("%s.trap()" % site.mallory), role_name=site.mallory)
    wait_reloads(site.dsn, 1)
    assert sql(site.dsn, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242")[0][0] == 0
    status, body = request(effective_port(site.dsn, listener))
    assert (status, body) == (200, site.mallory.encode())       # at request time: as mallory


# -- 4. a request affects later requests only through what it committed ----------------

def test_settings_do_not_reach_the_next_request(site):
    names = ["search_path", "client_encoding", "standard_conforming_strings", "DateStyle",
             "statement_timeout", "work_mem", "myapp.user"]
    setter = site.serve("SELECT omni_httpd.http_response(" + " || ".join(
        "set_config(%s, %s, false)" % (repr(n).replace('"', "'"), v) for n, v in zip(
            names, ["'%s, public'" % site.mallory, "'SJIS'", "'off'", "'SQL, DMY'", "'0'", "'64MB'", "'mallory'"]))
        + ") FROM request", site.mallory)
    # (A custom setting once set stays defined, as an empty string, after RESET ALL: what
    # must not reach the next request is its value.)
    reader = site.serve(respond("concat_ws('|', %s)" % ", ".join(
        "coalesce(current_setting('%s', true), '')" % n for n in names)))
    before = request(reader)[1]
    assert request(setter)[0] == 200
    assert request(reader)[1] == before
    assert b"mallory" not in before and b"SJIS" not in before


def test_a_temporary_table_does_not_shadow_a_real_one_or_outlive_its_request(site):
    site.as_mallory("""
        CREATE FUNCTION {m}.plant() RETURNS text LANGUAGE plpgsql AS $$
        BEGIN
            CREATE TEMP TABLE notes (body text);
            INSERT INTO pg_temp.notes VALUES ('a note planted by mallory');
            GRANT SELECT ON pg_temp.notes TO PUBLIC;
            RETURN 'planted';
        END $$;
        CREATE FUNCTION {m}.look() RETURNS text LANGUAGE sql AS $$
            SELECT coalesce(to_regclass('pg_temp.notes')::text, 'no temporary table') $$;
    """.format(m=site.mallory))
    plant = site.serve(respond("%s.plant()" % site.mallory), site.mallory)
    look = site.serve(respond("%s.look()" % site.mallory), site.mallory)
    victim = site.serve(respond("(SELECT string_agg(body, ',') FROM notes)"))
    assert request(plant) == (200, b"planted"), site.daemon.output[-1500:]
    assert request(victim) == (200, b"the real note")
    assert request(look) == (200, b"no temporary table")


def test_a_session_advisory_lock_is_released_with_the_request(site):
    holder = site.serve(respond("pg_advisory_lock(77)::text"), site.mallory)
    failing = site.serve("SELECT omni_httpd.http_response(pg_advisory_lock(78)::text || (1/0)::text) FROM request",
                         site.mallory)
    assert request(holder)[0] == 200
    assert request(failing)[0] == 500

    def free(key):
        return sql(site.dsn, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = %s", (key,))[0][0] == 0
    assert free(77) and free(78)


def test_prepared_statements_cursors_listens_and_sequences_do_not_persist(site):
    sql(site.dsn, "CREATE SEQUENCE public.tickets; GRANT USAGE ON SEQUENCE public.tickets TO PUBLIC")
    site.as_mallory("""
        CREATE FUNCTION {m}.leave_things() RETURNS text LANGUAGE plpgsql AS $$
        BEGIN
            EXECUTE 'PREPARE mallory_stmt AS SELECT 1';
            EXECUTE 'DECLARE mallory_cursor CURSOR WITH HOLD FOR SELECT 1';
            LISTEN mallory_channel;
            PERFORM nextval('public.tickets');
            RETURN 'left';
        END $$;
        CREATE FUNCTION {m}.find_things() RETURNS text LANGUAGE plpgsql AS $$
        DECLARE last text;
        BEGIN
            BEGIN last := lastval()::text; EXCEPTION WHEN OTHERS THEN last := 'none'; END;
            RETURN concat_ws('|',
                (SELECT count(*) FROM pg_prepared_statements WHERE from_sql),
                (SELECT count(*) FROM pg_cursors WHERE is_holdable),
                (SELECT count(*) FROM pg_listening_channels()),
                last);
        END $$;
    """.format(m=site.mallory))
    leave = site.serve(respond("%s.leave_things()" % site.mallory), site.mallory)
    find = site.serve(respond("%s.find_things()" % site.mallory), site.mallory)
    assert request(leave) == (200, b"left")
    assert request(find) == (200, b"0|0|0|none")


# -- 6. every handler is bounded in time ---------------------------------------------

def test_a_handler_cannot_lift_its_own_statement_timeout(pg_cluster, schema_template):
    name = create_database(pg_cluster, "t_timeout", template=schema_template)
    dsn = dsn_for(pg_cluster, name)
    daemon = Daemon(dsn, "--http-workers", "1", "--no-init", "--admin", "none", "--handler-timeout", "1")
    try:
        daemon.wait_ready()
        wait_reloads(dsn, 1)
        lift = add_listener(dsn, "SELECT omni_httpd.http_response(set_config('statement_timeout', '0', false)) FROM request")
        wait_reloads(dsn, 1)
        slow = add_listener(dsn, "SELECT omni_httpd.http_response('late') FROM request, pg_sleep(20)")
        wait_reloads(dsn, 1)
        assert request(effective_port(dsn, lift))[0] == 200
        assert request(effective_port(dsn, slow))[0] == 500
        daemon.wait_for(r"canceling statement due to statement timeout")
    finally:
        assert daemon.stop() == 0
        _drop_database(pg_cluster, name)
