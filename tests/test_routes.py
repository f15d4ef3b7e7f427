"""Routes (issue 12, docs/sql-api.md "Routes") against a real daemon: URL-pattern routers,
function and procedure handlers, middleware, the roles routes run as, the client address.

One daemon with ONE worker for the module: every route of every role runs in the same
database session, so whatever one could leave there the next would see. The daemon's
login role is the cluster's superuser, as on an embedded database.
"""
from __future__ import annotations

import http.client
import os
import re
import threading

import psycopg2
import pytest

from conftest import _drop_database, create_database, dsn_for
from daemon_support import Daemon, add_listener, effective_port, sql, wait_reloads, wait_until


class Site:
    def __init__(self, dsn, daemon, port, listener, alice):
        self.dsn = dsn
        self.daemon = daemon
        self.port = port
        self.listener = listener
        self.alice = alice
        self.alice_dsn = re.sub(r"user=\S+", "user=%s" % alice, dsn)

    def change(self, statement, params=None, reloads=1, dsn=None):
        """Run ``statement`` (one transaction) and wait until the daemon applied it."""
        sql(dsn or self.dsn, statement, params)
        wait_reloads(self.dsn, reloads)

    def get(self, path, method="GET", headers=None, body=None, port=None):
        conn = http.client.HTTPConnection("127.0.0.1", port or self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            if response.status == 500 and os.environ.get("ROUTES_DEBUG"): print(self.daemon.output[-2500:])
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()


@pytest.fixture(scope="module")
def site(pg_cluster, schema_template):
    name = create_database(pg_cluster, "t_routes", template=schema_template)
    dsn = dsn_for(pg_cluster, name)
    alice = "alice_%d" % os.getpid()
    sql(pg_cluster.dsn, 'CREATE ROLE "%s" LOGIN' % alice)
    sql(dsn, 'CREATE SCHEMA "%s" AUTHORIZATION "%s"' % (alice, alice))
    sql(dsn, "CREATE TABLE public.secrets (body text); INSERT INTO public.secrets VALUES ('s3cret');"
             "REVOKE ALL ON public.secrets FROM PUBLIC")
    daemon = Daemon(dsn, "--http-workers", "1", "--no-init", "--admin", "none")
    try:
        daemon.wait_ready()
        wait_reloads(dsn, 1)
        listener = add_listener(dsn, None)
        wait_reloads(dsn, 1)
        yield Site(dsn, daemon, effective_port(dsn, listener), listener, alice)
    finally:
        code = daemon.stop()
        _drop_database(pg_cluster, name)
        sql(pg_cluster.dsn, 'DROP ROLE IF EXISTS "%s"' % alice)
    assert code == 0, daemon.output[-3000:]


@pytest.fixture
def clean_routes(site):
    yield
    site.change("TRUNCATE omni_httpd.urlpattern_router")


ROUTES = """
CREATE OR REPLACE FUNCTION public.get_user(request omni_httpd.http_request) RETURNS omni_httpd.http_outcome
LANGUAGE sql AS $$ SELECT omni_httpd.http_response('user ' || split_part(request.path, '/', 3)) $$;
CREATE OR REPLACE FUNCTION public.create_user(request omni_httpd.http_request) RETURNS omni_httpd.http_outcome
LANGUAGE sql AS $$ SELECT omni_httpd.http_response('created ' || convert_from(request.body, 'UTF8'), 201) $$;
CREATE OR REPLACE FUNCTION public.fallback() RETURNS omni_httpd.http_outcome
LANGUAGE sql AS $$ SELECT omni_httpd.http_response('nothing here', 404) $$;
CREATE OR REPLACE FUNCTION public.special() RETURNS omni_httpd.http_outcome
LANGUAGE sql AS $$ SELECT omni_httpd.http_response('special user') $$;
INSERT INTO omni_httpd.urlpattern_router (match, handler, priority) VALUES
    (omni_httpd.urlpattern('/users/:id', method => 'GET'), 'public.get_user(omni_httpd.http_request)', 1),
    (omni_httpd.urlpattern('/users', method => 'POST'), 'public.create_user(omni_httpd.http_request)', 1),
    (omni_httpd.urlpattern('/users/admin'), 'public.special()', 5),
    (omni_httpd.urlpattern('*'), 'public.fallback()', -10);
"""


def test_router_answers_by_pattern_method_and_priority(site, clean_routes):
    site.change(ROUTES)
    assert site.get("/users/42")[::2] == (200, b"user 42")
    assert site.get("/users", method="POST", body=b"bob")[::2] == (201, b"created bob")
    # Higher priority first: /users/admin matches both, the special route wins.
    assert site.get("/users/admin")[::2] == (200, b"special user")
    # The fallback: no other pattern, or the right path with another method.
    assert site.get("/elsewhere")[::2] == (404, b"nothing here")
    assert site.get("/users/42", method="DELETE")[::2] == (404, b"nothing here")
    assert site.get("/users", method="GET")[::2] == (404, b"nothing here")


def test_routes_added_changed_and_deleted_are_served_after_reload(site, clean_routes):
    site.change(ROUTES)
    site.change("""CREATE OR REPLACE FUNCTION public.hello() RETURNS omni_httpd.http_outcome
                   LANGUAGE sql AS $$ SELECT omni_httpd.http_response('hello') $$;
                   INSERT INTO omni_httpd.urlpattern_router VALUES
                   (omni_httpd.urlpattern('/hello'), 'public.hello()', 0)""")
    assert site.get("/hello")[::2] == (200, b"hello")
    site.change("UPDATE omni_httpd.urlpattern_router SET match = omni_httpd.urlpattern('/hi') "
                "WHERE handler = 'public.hello()'::regprocedure")
    assert site.get("/hi")[::2] == (200, b"hello")
    assert site.get("/hello")[::2] == (404, b"nothing here")
    site.change("DELETE FROM omni_httpd.urlpattern_router WHERE handler = 'public.hello()'::regprocedure")
    assert site.get("/hi")[::2] == (404, b"nothing here")


def test_no_route_is_404_and_a_listener_with_a_handler_keeps_it(site, clean_routes):
    assert site.get("/anything")[0] == 404
    listener = add_listener(site.dsn, "SELECT omni_httpd.http_response('query handler') FROM request")
    wait_reloads(site.dsn, 1)
    site.change(ROUTES)
    assert site.get("/users/1", port=effective_port(site.dsn, listener))[::2] == (200, b"query handler")
    assert site.get("/users/1")[::2] == (200, b"user 1")
    site.change("DELETE FROM omni_httpd.listeners WHERE id = %s", (listener,))


def test_a_new_router_table_is_picked_up_with_the_four_parameter_kinds(site):
    site.change("""
        CREATE TABLE public.my_router (LIKE omni_httpd.urlpattern_router);
        CREATE FUNCTION public.everything(route public.my_router, listener int,
                                          request omni_httpd.http_request)
            RETURNS omni_httpd.http_outcome LANGUAGE sql AS $$
            SELECT omni_httpd.http_response(format('listener=%s path=%s qs=%s pattern=%s priority=%s',
                   listener, request.path, request.query_string, (route.match).pathname, route.priority)) $$;
        CREATE FUNCTION public.stamp(request omni_httpd.http_request, INOUT outcome omni_httpd.http_outcome)
            LANGUAGE sql AS $$
            SELECT omni_httpd.http_response(headers => ARRAY[omni_http.http_header('x-seen',
                   coalesce(((outcome).response).status::text, 'none') || ' ' || request.method::text)]) $$;
        INSERT INTO public.my_router VALUES
            (omni_httpd.urlpattern('/kinds/*'), 'public.everything(public.my_router, int, omni_httpd.http_request)', 3),
            (omni_httpd.urlpattern('/kinds/*'), 'public.stamp(omni_httpd.http_request, omni_httpd.http_outcome)', 4);
    """)
    try:
        status, headers, body = site.get("/kinds/x?a=1")
        assert (status, body) == (200, b"listener=%d path=/kinds/x qs=a=1 pattern=/kinds/* priority=3" % site.listener)
        assert headers["x-seen"] == "none GET"     # the middleware ran first, with no outcome yet
    finally:
        # Dropping a router is applied too.
        site.change("DROP TABLE public.my_router CASCADE")
    assert site.get("/kinds/x")[0] == 404


MIDDLEWARE = """
CREATE OR REPLACE FUNCTION public.add_header(INOUT outcome omni_httpd.http_outcome)
LANGUAGE sql AS $$ SELECT omni_httpd.http_response(headers => ARRAY[omni_http.http_header('x-middleware', 'yes')]) $$;
CREATE OR REPLACE PROCEDURE public.require_token(request omni_httpd.http_request, INOUT outcome omni_httpd.http_outcome)
LANGUAGE plpgsql AS $$
BEGIN
    IF omni_http.http_header_get(request.headers, 'authorization') IS NULL THEN
        outcome := omni_httpd.http_response('no token', 401);
    END IF;
END $$;
CREATE OR REPLACE FUNCTION public.private() RETURNS omni_httpd.http_outcome
LANGUAGE sql AS $$ SELECT omni_httpd.http_response('private data') $$;
INSERT INTO omni_httpd.urlpattern_router VALUES
    (omni_httpd.urlpattern('*'), 'public.add_header(omni_httpd.http_outcome)', 100),
    (omni_httpd.urlpattern('/private/*'), 'public.require_token(omni_httpd.http_request, omni_httpd.http_outcome)', 50),
    (omni_httpd.urlpattern('/private/*'), 'public.private()', 0);
"""


def test_middleware_runs_before_the_handler_and_can_end_the_request(site, clean_routes):
    site.change(ROUTES + MIDDLEWARE)
    status, headers, body = site.get("/users/7")
    assert (status, body, headers.get("x-middleware")) == (200, b"user 7", "yes")
    status, headers, body = site.get("/private/x")
    assert (status, body) == (401, b"no token")
    status, headers, body = site.get("/private/x", headers={"Authorization": "Bearer t"})
    assert (status, body, headers.get("x-middleware")) == (200, b"private data", "yes")


def test_middleware_without_a_handler_answers_what_it_left(site, clean_routes):
    site.change("""CREATE OR REPLACE FUNCTION public.add_header(INOUT outcome omni_httpd.http_outcome)
                   LANGUAGE sql AS $$ SELECT omni_httpd.http_response(headers => ARRAY[omni_http.http_header('x-middleware', 'yes')]) $$;
                   INSERT INTO omni_httpd.urlpattern_router VALUES
                   (omni_httpd.urlpattern('*'), 'public.add_header(omni_httpd.http_outcome)', 0)""")
    status, headers, _ = site.get("/none")
    assert (status, headers.get("x-middleware")) == (200, "yes")


def test_procedure_handler_with_out_outcome(site, clean_routes):
    site.change("""
        CREATE TABLE IF NOT EXISTS public.visits (path text);
        CREATE OR REPLACE PROCEDURE public.visit(request omni_httpd.http_request, OUT outcome omni_httpd.http_outcome)
        LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO public.visits VALUES (request.path);
            outcome := omni_httpd.http_response((SELECT count(*) FROM public.visits)::text);
        END $$;
        INSERT INTO omni_httpd.urlpattern_router VALUES
            (omni_httpd.urlpattern('/visit'), 'public.visit(omni_httpd.http_request)', 0);
    """)
    assert site.get("/visit")[::2] == (200, b"1")
    assert site.get("/visit")[::2] == (200, b"2")


def test_a_transaction_controlling_procedure_is_refused_with_a_reason(site, clean_routes):
    """The daemon's login role is a superuser: such a procedure could not be confined."""
    mark = site.daemon.mark()
    site.change("""
        CREATE TABLE IF NOT EXISTS public.steps (step text);
        CREATE OR REPLACE PROCEDURE public.half(OUT outcome omni_httpd.http_outcome)
        LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO public.steps VALUES ('first');
            COMMIT;
            RAISE EXCEPTION 'second part fails';
        END $$;
        INSERT INTO omni_httpd.urlpattern_router VALUES
            (omni_httpd.urlpattern('/half'), 'public.half()', 0);
    """)
    site.daemon.wait_for(r"route .*public\.half.* refused: procedure .* controls transactions", start=mark)
    assert site.get("/half")[0] == 404
    assert sql(site.dsn, "SELECT count(*) FROM public.steps")[0][0] == 0


def test_bad_patterns_and_handlers_are_refused_at_commit(site):
    for pattern, problem in [("/users/(unclosed", "not closed"), ("/a/:", "not followed by a group name"),
                             ("/a/{b", "not closed"), ("/a/(?x)", 'starts with "?"'),
                             ("/a/((b))", "capturing group")]:
        with pytest.raises(psycopg2.Error) as error:
            sql(site.dsn, "INSERT INTO omni_httpd.urlpattern_router VALUES (omni_httpd.urlpattern(%s), "
                          "'pg_catalog.now()', 0)", (pattern,))
        assert "invalid URL pattern" in str(error.value) and problem in str(error.value)
    with pytest.raises(psycopg2.Error) as error:
        sql(site.dsn, "INSERT INTO omni_httpd.urlpattern_router VALUES (omni_httpd.urlpattern('/x'), "
                      "'pg_catalog.now()', 0)")
    assert "invalid route handler" in str(error.value)


def test_routes_run_as_the_function_owner_or_handler_role(site, clean_routes):
    alice = site.alice
    sql(site.alice_dsn, """
        CREATE FUNCTION "%(a)s".whoami() RETURNS omni_httpd.http_outcome LANGUAGE sql
            AS $$ SELECT omni_httpd.http_response(current_user::text) $$;
        CREATE FUNCTION "%(a)s".read_secret() RETURNS omni_httpd.http_outcome LANGUAGE sql
            AS $$ SELECT omni_httpd.http_response((SELECT body FROM public.secrets)) $$;
        CREATE FUNCTION "%(a)s".escape() RETURNS omni_httpd.http_outcome LANGUAGE plpgsql AS $$
        BEGIN
            BEGIN
                IF current_setting('request.method', true) IS NULL THEN
                    SET ROLE postgres;
                END IF;
            EXCEPTION WHEN OTHERS THEN
                BEGIN
                    RESET ROLE;
                EXCEPTION WHEN OTHERS THEN
                    RETURN omni_httpd.http_response('refused: ' || SQLERRM);
                END;
            END;
            RETURN omni_httpd.http_response('escaped as ' || current_user);
        END $$;
    """ % {"a": alice})
    site.change("""
        CREATE OR REPLACE FUNCTION public.superuser_whoami() RETURNS omni_httpd.http_outcome LANGUAGE sql
            AS $$ SELECT omni_httpd.http_response(current_user::text) $$;
        INSERT INTO omni_httpd.handler_role VALUES ('public.superuser_whoami()', %(q)s);
        INSERT INTO omni_httpd.urlpattern_router VALUES
            (omni_httpd.urlpattern('/whoami'), '"%(a)s".whoami()', 0),
            (omni_httpd.urlpattern('/secret'), '"%(a)s".read_secret()', 0),
            (omni_httpd.urlpattern('/escape'), '"%(a)s".escape()', 0),
            (omni_httpd.urlpattern('/assigned'), 'public.superuser_whoami()', 0);
    """ % {"a": alice, "q": "'\"%s\"'" % alice})
    try:
        assert site.get("/whoami")[::2] == (200, alice.encode())
        assert site.get("/assigned")[::2] == (200, alice.encode())
        status, _, body = site.get("/secret")
        assert status == 500 and b"s3cret" not in body
        status, _, body = site.get("/escape")
        assert status == 200 and body.startswith(b"refused: ")
    finally:
        site.change("DELETE FROM omni_httpd.handler_role")


def test_connecting_ip_cannot_be_spoofed(site, clean_routes):
    site.change("""
        CREATE OR REPLACE FUNCTION public.client(request omni_httpd.http_request) RETURNS omni_httpd.http_outcome
        LANGUAGE sql AS $$ SELECT omni_httpd.http_response((SELECT string_agg(v, '|')
            FROM omni_http.http_header_get_all(request.headers, 'omnigres-connecting-ip') v)) $$;
        INSERT INTO omni_httpd.urlpattern_router VALUES
            (omni_httpd.urlpattern('/ip'), 'public.client(omni_httpd.http_request)', 0);
    """)
    spoof = {"omnigres-connecting-ip": "6.6.6.6", "X-Forwarded-For": "7.7.7.7"}
    assert site.get("/ip", headers=spoof)[::2] == (200, b"127.0.0.1")
    # Handler queries see it too.
    listener = add_listener(site.dsn, "SELECT omni_httpd.http_response(omni_http.http_header_get("
                                      "request.headers, 'omnigres-connecting-ip')) FROM request")
    wait_reloads(site.dsn, 1)
    try:
        assert site.get("/", headers=spoof, port=effective_port(site.dsn, listener))[::2] == (200, b"127.0.0.1")
    finally:
        site.change("DELETE FROM omni_httpd.listeners WHERE id = %s", (listener,))


def test_a_route_gets_the_request_headers_in_order_and_intact(site, clean_routes):
    """The worker passes the request's headers to a route as one binary
    omni_http.http_header[] (handler_call.header_array): order, empty values and
    non-ASCII text arrive as the client sent them."""
    site.change("""
        CREATE OR REPLACE FUNCTION public.echo_headers(request omni_httpd.http_request) RETURNS omni_httpd.http_outcome
        LANGUAGE sql AS $$ SELECT omni_httpd.http_response((SELECT string_agg(h.name || '=' || h.value, '|' ORDER BY n)
            FROM unnest(request.headers) WITH ORDINALITY AS h(name, value, n) WHERE h.name LIKE 'x-%') || '.') $$;
        INSERT INTO omni_httpd.urlpattern_router VALUES
            (omni_httpd.urlpattern('/headers'), 'public.echo_headers(omni_httpd.http_request)', 0);
    """)
    sent = {"X-B": "2", "X-A": "ünï ✓".encode("utf-8"), "X-Empty": b""}
    status, _, body = site.get("/headers", headers=sent)
    assert (status, body.decode("utf-8")) == (200, "x-b=2|x-a=ünï ✓|x-empty=.")


# -- attacks on the new surface --------------------------------------------------------

def test_a_router_of_an_unprivileged_role_cannot_run_a_superuser_function(site):
    """alice makes her own router and points it at a function the superuser owns: it
    would run with the superuser's rights, so it is refused (and logged)."""
    sql(site.dsn, """CREATE OR REPLACE FUNCTION public.leak() RETURNS omni_httpd.http_outcome LANGUAGE sql
                     AS $$ SELECT omni_httpd.http_response((SELECT body FROM public.secrets)) $$""")
    mark = site.daemon.mark()
    # The commit-time check refuses it for alice...
    with pytest.raises(psycopg2.Error) as error:
        sql(site.alice_dsn, 'CREATE TABLE "%s".r (m omni_httpd.urlpattern, h regprocedure, p omni_httpd.route_priority);'
                            'INSERT INTO "%s".r VALUES (omni_httpd.urlpattern(\'/leak\'), \'public.leak()\', 0)'
            % (site.alice, site.alice))
    assert "cannot become" in str(error.value)
    # ... and with the check's trigger dropped (she owns the table), the worker refuses it.
    site.change('CREATE TABLE "%(a)s".r (m omni_httpd.urlpattern, h regprocedure, p omni_httpd.route_priority);'
                'DROP TRIGGER omni_httpd_route_check ON "%(a)s".r;'
                'INSERT INTO "%(a)s".r VALUES (omni_httpd.urlpattern(\'/leak\'), \'public.leak()\', 0)'
                % {"a": site.alice}, dsn=site.alice_dsn)
    try:
        site.daemon.wait_for(r"route .*public\.leak\(\) refused: .*cannot become", start=mark)
        status, _, body = site.get("/leak")
        assert status == 404 and b"s3cret" not in body
    finally:
        site.change('DROP TABLE "%s".r' % site.alice, dsn=site.alice_dsn)


def test_a_route_to_a_function_its_role_may_not_execute_is_refused(site, clean_routes):
    mark = site.daemon.mark()
    site.change("""
        CREATE OR REPLACE FUNCTION public.locked() RETURNS omni_httpd.http_outcome LANGUAGE sql
            AS $$ SELECT omni_httpd.http_response('locked') $$;
        REVOKE ALL ON FUNCTION public.locked() FROM PUBLIC;
        INSERT INTO omni_httpd.handler_role VALUES ('public.locked()', %s);
        INSERT INTO omni_httpd.urlpattern_router VALUES (omni_httpd.urlpattern('/locked'), 'public.locked()', 0);
    """, ('"%s"' % site.alice,))
    try:
        site.daemon.wait_for(r"route .*public\.locked\(\) refused: role .* may not execute", start=mark)
        assert site.get("/locked")[0] == 404
    finally:
        site.change("DELETE FROM omni_httpd.handler_role")


def test_pattern_strings_with_sql_in_them_are_only_patterns(site, clean_routes):
    site.change("""
        CREATE OR REPLACE FUNCTION public.literal() RETURNS omni_httpd.http_outcome LANGUAGE sql
            AS $$ SELECT omni_httpd.http_response('literal') $$;
        INSERT INTO omni_httpd.urlpattern_router VALUES
            (omni_httpd.urlpattern($p$/a';DROP TABLE public.secrets;--$p$, search => $s$x=1' OR '1'='1$s$),
             'public.literal()', 0);
    """)
    assert site.get("/a';DROP%20TABLE%20public.secrets;--?x=1'OR'1'='2")[0] == 404
    assert site.get("/a';DROP%20TABLE%20public.secrets;--?x=1%27%20OR%20%271%27=%271")[::2] == (200, b"literal")
    assert site.get("/a';DROP%20TABLE%20public.secrets;--")[0] == 404
    assert sql(site.dsn, "SELECT body FROM public.secrets")[0][0] == "s3cret"


def test_writing_handler_role_needs_the_right_to_become_the_role(site):
    sql(site.dsn, 'GRANT INSERT, DELETE ON omni_httpd.handler_role TO "%s"' % site.alice)
    try:
        with pytest.raises(psycopg2.Error) as error:
            sql(site.alice_dsn, "INSERT INTO omni_httpd.handler_role VALUES ('pg_catalog.now()', 'postgres')")
        assert "handler_role_role_check" in str(error.value)
        sql(site.alice_dsn, "INSERT INTO omni_httpd.handler_role VALUES ('pg_catalog.now()', %s)",
            ('"%s"' % site.alice,))
        wait_reloads(site.dsn, 1)
    finally:
        site.change("DELETE FROM omni_httpd.handler_role")
        sql(site.dsn, 'REVOKE ALL ON omni_httpd.handler_role FROM "%s"' % site.alice)


def test_what_a_route_leaves_in_the_session_does_not_reach_the_next(site, clean_routes):
    """One worker, one session: settings, advisory locks and temporary tables of one
    route's request are gone when the next request (another route) runs."""
    site.change("""
        CREATE OR REPLACE FUNCTION public.litter() RETURNS omni_httpd.http_outcome LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM set_config('app.secret', 'leaked', false);
            PERFORM pg_advisory_lock(4242);
            CREATE TEMPORARY TABLE litter_box (x int);
            SET search_path = pg_temp;
            RETURN omni_httpd.http_response('littered');
        END $$;
        CREATE OR REPLACE FUNCTION public.look() RETURNS omni_httpd.http_outcome LANGUAGE sql AS $$
            SELECT omni_httpd.http_response(format('setting=%s lock=%s temp=%s path=%s',
                coalesce(nullif(current_setting('app.secret', true), ''), 'none'),
                pg_try_advisory_lock(4242),
                (SELECT count(*) FROM pg_class WHERE relname = 'litter_box'),
                current_setting('search_path'))) $$;
        INSERT INTO omni_httpd.urlpattern_router VALUES
            (omni_httpd.urlpattern('/litter'), 'public.litter()', 0),
            (omni_httpd.urlpattern('/look'), 'public.look()', 0);
    """)
    assert site.get("/litter")[::2] == (200, b"littered")
    status, _, body = site.get("/look")
    # The search_path is the session's default again (handlers get pg_temp last).
    assert (status, body) == (200, b'setting=none lock=t temp=0 path="$user", public, pg_temp')


def test_a_role_allowed_to_write_the_shared_router_cannot_route_to_a_superuser_function(site):
    """omni_httpd.urlpattern_router belongs to the daemon (a superuser here), so the
    worker's router-owner check lets any role through: the commit-time check is what
    stops a writer from routing to a function that runs as a role it cannot become."""
    sql(site.dsn, """CREATE OR REPLACE FUNCTION public.leak() RETURNS omni_httpd.http_outcome LANGUAGE sql
                     AS $$ SELECT omni_httpd.http_response((SELECT body FROM public.secrets)) $$;
                     GRANT INSERT, UPDATE ON omni_httpd.urlpattern_router TO "%s" """ % site.alice)
    try:
        with pytest.raises(psycopg2.Error) as error:
            sql(site.alice_dsn, "INSERT INTO omni_httpd.urlpattern_router VALUES "
                                "(omni_httpd.urlpattern('/leak'), 'public.leak()', 0)")
        assert "invalid route handler" in str(error.value) and "cannot become" in str(error.value)
    finally:
        sql(site.dsn, 'REVOKE ALL ON omni_httpd.urlpattern_router FROM "%s"' % site.alice)
    assert sql(site.dsn, "SELECT count(*) FROM omni_httpd.urlpattern_router")[0][0] == 0


def test_a_handler_role_whose_role_was_dropped_refuses_the_route(site, pg_cluster):
    """regrole records no dependency: the role can be dropped while handler_role names
    it. The route is then refused, not run as the function's owner (a superuser here)."""
    gone = "gone_%d" % os.getpid()
    sql(pg_cluster.dsn, 'CREATE ROLE "%s"' % gone)
    sql(site.dsn, """CREATE OR REPLACE FUNCTION public.su_whoami() RETURNS omni_httpd.http_outcome LANGUAGE sql
                     AS $$ SELECT omni_httpd.http_response(current_user::text) $$;
                     INSERT INTO omni_httpd.handler_role VALUES ('public.su_whoami()', '"%s"')""" % gone)
    wait_reloads(site.dsn, 1)
    sql(pg_cluster.dsn, 'DROP ROLE "%s"' % gone)
    try:
        with pytest.raises(psycopg2.Error) as error:
            sql(site.dsn, "BEGIN; SELECT omni_httpd._install_route('t', 'public.su_whoami()', "
                          "'omni_httpd.urlpattern_router'); ROLLBACK")
        assert "no longer exists" in str(error.value)
        with pytest.raises(psycopg2.Error) as error:
            sql(site.dsn, "INSERT INTO omni_httpd.urlpattern_router VALUES "
                          "(omni_httpd.urlpattern('/su'), 'public.su_whoami()', 0)")
        assert "invalid route handler" in str(error.value)
    finally:
        site.change("DELETE FROM omni_httpd.handler_role")


def test_the_route_runtime_pins_its_search_path(site):
    """SPEC 9: a role's objects cannot stand in for the runtime's. Only the constructor
    (which names nothing unqualified and stays inlinable) has no SET clause."""
    unpinned = sql(site.dsn, """
        SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = 'omni_httpd'
          AND (p.proname IN ('register_router', 'urlpattern') OR p.proname LIKE '\\_route%%'
               OR p.proname LIKE '%%urlpattern%%' OR p.proname LIKE '%%router%%'
               OR p.proname IN ('_check_route', '_controls_transactions', '_install_route',
                                '_outcome_row', '_flatten_columns', '_flatten_expression',
                                '_login_role_is_unprivileged'))
          AND NOT coalesce(array_to_string(p.proconfig, ',') LIKE '%%search_path=%%', false)""")
    assert unpinned == [("omni_httpd.urlpattern(text,text,text,omni_http.http_method,text,integer,text,text,text)",)]


def test_a_failed_route_leaves_nothing_to_the_requests_pipelined_behind_it(site, clean_routes):
    """Requests that queue up while the worker's DB thread is busy go to PostgreSQL
    together (one pipeline), each still its own transaction. A route that takes a session
    advisory lock (which a rollback keeps) and then fails must not leave the lock to the
    requests sent right behind it."""
    site.change("""
        CREATE OR REPLACE FUNCTION public.slow() RETURNS omni_httpd.http_outcome LANGUAGE sql AS $$
            SELECT omni_httpd.http_response('slept') FROM pg_sleep(1) $$;
        CREATE OR REPLACE FUNCTION public.grab_and_fail() RETURNS omni_httpd.http_outcome LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_advisory_lock(4343);
            RAISE EXCEPTION 'failing on purpose';
        END $$;
        CREATE OR REPLACE FUNCTION public.count_locks() RETURNS omni_httpd.http_outcome LANGUAGE sql AS $$
            SELECT omni_httpd.http_response((SELECT count(*) FROM pg_locks
                WHERE locktype = 'advisory' AND pid = pg_backend_pid())::text) $$;
        INSERT INTO omni_httpd.urlpattern_router VALUES
            (omni_httpd.urlpattern('/slow'), 'public.slow()', 0),
            (omni_httpd.urlpattern('/grab'), 'public.grab_and_fail()', 0),
            (omni_httpd.urlpattern('/count'), 'public.count_locks()', 0);
    """)
    results = {}

    def fetch(key, path):
        results[key] = site.get(path)

    slow = threading.Thread(target=fetch, args=("slow", "/slow"))
    slow.start()
    # Queue the others only once the DB thread is inside the slow request.
    wait_until(lambda: sql(site.dsn, "SELECT 1 FROM pg_stat_activity WHERE wait_event = 'PgSleep'"),
               interval=0.01, what="the slow route running")
    others = [threading.Thread(target=fetch, args=(i, "/grab" if i % 2 == 0 else "/count"))
              for i in range(20)]
    for thread in others:
        thread.start()
    for thread in [slow] + others:
        thread.join(60)
    assert results["slow"][::2] == (200, b"slept")
    assert [results[i][0] for i in range(0, 20, 2)] == [500] * 10
    assert [results[i][::2] for i in range(1, 20, 2)] == [(200, b"0")] * 10
