"""Routes where the daemon could not create event triggers (a managed PostgreSQL: no
superuser), and a daemon behind a trusted proxy (--trusted-proxies)."""
from __future__ import annotations

import http.client

import pytest

from conftest import _drop_database, create_database, dsn_for
from daemon_support import Daemon, add_listener, effective_port, sql, wait_reloads


@pytest.fixture(scope="module")
def site(pg_cluster, schema_template):
    name = create_database(pg_cluster, "t_routes_managed", template=schema_template)
    dsn = dsn_for(pg_cluster, name)
    # What a migration run by a non-superuser leaves: no event triggers.
    sql(dsn, "DROP EVENT TRIGGER omni_httpd_router_ddl; DROP EVENT TRIGGER omni_httpd_router_drop")
    daemon = Daemon(dsn, "--http-workers", "1", "--no-init", "--admin", "none",
                    "--trusted-proxies", "127.0.0.0/8")
    try:
        daemon.wait_ready()
        wait_reloads(dsn, 1)
        listener = add_listener(dsn, None)
        wait_reloads(dsn, 1)
        yield dsn, effective_port(dsn, listener)
    finally:
        code = daemon.stop()
        _drop_database(pg_cluster, name)
    assert code == 0, daemon.output[-3000:]


def get(port, path, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_a_router_registered_by_its_owner_is_served(site):
    dsn, port = site
    sql(dsn, """
        CREATE FUNCTION public.managed() RETURNS omni_httpd.http_outcome LANGUAGE sql
            AS $$ SELECT omni_httpd.http_response('managed') $$;
        CREATE TABLE public.managed_router (m omni_httpd.urlpattern, h regprocedure);
        SELECT omni_httpd.register_router('public.managed_router');
        INSERT INTO public.managed_router VALUES (omni_httpd.urlpattern('/managed'), 'public.managed()');
    """)
    wait_reloads(dsn, 1)
    assert get(port, "/managed") == (200, b"managed")
    # Its triggers follow changes from now on.
    sql(dsn, "UPDATE public.managed_router SET m = omni_httpd.urlpattern('/moved')")
    wait_reloads(dsn, 1)
    assert get(port, "/moved") == (200, b"managed")
    assert get(port, "/managed")[0] == 404
    # Without event triggers, dropping one asks for the reload itself.
    sql(dsn, "DROP TABLE public.managed_router; SELECT omni_httpd.reload_configuration()")
    wait_reloads(dsn, 1)
    assert get(port, "/moved")[0] == 404


def test_register_router_refuses_a_table_that_is_none(site):
    dsn, _port = site
    sql(dsn, "CREATE TABLE public.not_a_router (m omni_httpd.urlpattern)")
    with pytest.raises(Exception) as error:
        sql(dsn, "SELECT omni_httpd.register_router('public.not_a_router')")
    assert "is not a router" in str(error.value)


def test_a_trusted_proxy_names_the_client(site):
    dsn, port = site
    sql(dsn, """
        CREATE FUNCTION public.client_ip(request omni_httpd.http_request) RETURNS omni_httpd.http_outcome
        LANGUAGE sql AS $$ SELECT omni_httpd.http_response(
            omni_http.http_header_get(request.headers, 'omnigres-connecting-ip')) $$;
        INSERT INTO omni_httpd.urlpattern_router VALUES
            (omni_httpd.urlpattern('/ip'), 'public.client_ip(omni_httpd.http_request)', 0);
    """)
    wait_reloads(dsn, 1)
    # The peer (127.0.0.1) is trusted: the nearest untrusted address it reports.
    assert get(port, "/ip", {"X-Forwarded-For": "6.6.6.6, 198.51.100.7, 127.0.0.5"}) == (200, b"198.51.100.7")
    assert get(port, "/ip", {"Forwarded": 'for="[2001:db8::9]";proto=https'}) == (200, b"2001:db8::9")
    # A client-sent header of ours never counts, and no forwarding header: the peer.
    assert get(port, "/ip", {"omnigres-connecting-ip": "6.6.6.6"}) == (200, b"127.0.0.1")
