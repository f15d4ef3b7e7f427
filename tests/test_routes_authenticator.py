"""Transaction-controlling procedures as routes, with the daemon connecting as a
PostgREST-style "authenticator" (LOGIN NOINHERIT, no role attributes, granted the
application role): they run non-atomic, so what they commit before failing stays, and
they still run as their own role (docs/sql-api.md, "Procedures")."""
from __future__ import annotations

import http.client
import os
import re

import pytest

from conftest import _drop_database, create_database, dsn_for
from daemon_support import Daemon, add_listener, effective_port, sql, wait_reloads


@pytest.fixture(scope="module")
def site(pg_cluster, schema_template):
    name = create_database(pg_cluster, "t_routes_auth", template=schema_template)
    dsn = dsn_for(pg_cluster, name)
    suffix = os.getpid()
    authenticator, app = "authenticator_%d" % suffix, "app_%d" % suffix
    sql(pg_cluster.dsn, 'CREATE ROLE "%s" LOGIN NOINHERIT; CREATE ROLE "%s" NOLOGIN; GRANT "%s" TO "%s"'
        % (authenticator, app, app, authenticator))
    # What the daemon's own statements need, and nothing else.
    sql(dsn, """
        GRANT USAGE ON SCHEMA omni_httpd TO "{a}";
        GRANT SELECT ON ALL TABLES IN SCHEMA omni_httpd TO "{a}";
        GRANT UPDATE ON omni_httpd.listeners TO "{a}";
        GRANT INSERT, DELETE ON omni_httpd.configuration_reloads TO "{a}";
        CREATE SCHEMA app AUTHORIZATION "{app}";
        CREATE TABLE app.steps (step text);
        ALTER TABLE app.steps OWNER TO "{app}";
        REVOKE ALL ON app.steps FROM PUBLIC;
    """.format(db=name, a=authenticator, app=app))
    daemon_dsn = re.sub(r"user=\S+", "user=%s" % authenticator, dsn)
    daemon = Daemon(daemon_dsn, "--http-workers", "1", "--no-init", "--admin", "none")
    try:
        daemon.wait_ready()
        wait_reloads(dsn, 1)
        listener = add_listener(dsn, None)
        wait_reloads(dsn, 1)
        yield dsn, daemon, effective_port(dsn, listener), app
    finally:
        code = daemon.stop()
        _drop_database(pg_cluster, name)
        sql(pg_cluster.dsn, 'DROP ROLE IF EXISTS "%s"; DROP ROLE IF EXISTS "%s"' % (authenticator, app))
    assert code == 0, daemon.output[-3000:]


def get(port, path):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_a_procedure_that_commits_half_way_keeps_the_committed_part(site):
    dsn, daemon, port, app = site
    sql(dsn, """
        SET ROLE "{app}";
        CREATE PROCEDURE app.half(request omni_httpd.http_request, OUT outcome omni_httpd.http_outcome)
        LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO app.steps VALUES ('committed ' || request.path);
            COMMIT;
            INSERT INTO app.steps VALUES ('rolled back');
            IF request.path = '/fail' THEN
                RAISE EXCEPTION 'the second half fails';
            END IF;
            outcome := omni_httpd.http_response(current_user::text || ' ' ||
                                                (SELECT count(*) FROM app.steps)::text);
        END $$;
        RESET ROLE;
        GRANT SELECT ON omni_httpd.urlpattern_router TO "{app}";
    """.format(app=app))
    sql(dsn, "INSERT INTO omni_httpd.urlpattern_router VALUES "
             "(omni_httpd.urlpattern('/*'), 'app.half(omni_httpd.http_request)', 0)")
    wait_reloads(dsn, 1)
    status = get(port, "/fail")[0]
    assert status == 500, daemon.output[-3000:]
    assert sql(dsn, "SELECT step FROM app.steps ORDER BY step") == [("committed /fail",)]
    # It ran as its owner, not as the authenticator.
    assert get(port, "/ok") == (200, ("%s 3" % app).encode())


def test_a_non_atomic_procedure_that_resets_its_role_gains_nothing(site):
    """RESET ROLE inside it makes it the authenticator, which may read and write nothing
    of the application's and cannot change the configuration."""
    dsn, daemon, port, app = site
    sql(dsn, """
        SET ROLE "{app}";
        CREATE PROCEDURE app.escape(request omni_httpd.http_request, OUT outcome omni_httpd.http_outcome)
        LANGUAGE plpgsql AS $$
        DECLARE
            found text := '';
        BEGIN
            COMMIT;
            RESET ROLE;
            BEGIN
                PERFORM count(*) FROM app.steps;
                found := found || 'read steps; ';
            EXCEPTION WHEN insufficient_privilege THEN found := found || 'no steps; ';
            END;
            BEGIN
                INSERT INTO omni_httpd.handlers (query) VALUES ('SELECT 1');
                found := found || 'wrote handlers';
            EXCEPTION WHEN insufficient_privilege THEN found := found || 'no handlers';
            END;
            outcome := omni_httpd.http_response(session_user::text || ': ' || found);
        END $$;
        RESET ROLE;
    """.format(app=app))
    sql(dsn, "TRUNCATE omni_httpd.urlpattern_router; INSERT INTO omni_httpd.urlpattern_router VALUES "
             "(omni_httpd.urlpattern('/escape'), 'app.escape(omni_httpd.http_request)', 0)")
    wait_reloads(dsn, 1)
    status, body = get(port, "/escape")
    assert status == 200, daemon.output[-2000:]
    assert body.endswith(b": no steps; no handlers")
    assert sql(dsn, "SELECT count(*) FROM omni_httpd.handlers")[0][0] == 0
