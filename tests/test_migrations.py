"""The migration runner (omni_httpd.migrations) and the default listener."""
from __future__ import annotations

import threading

import psycopg2

from omni_httpd.master import migrations
from conftest import dsn_for

ALL = [name for _, name, _ in migrations.migrations()]


def one(dsn_or_connection, sql, params=None):
    connection = psycopg2.connect(dsn_or_connection) if isinstance(dsn_or_connection, str) else dsn_or_connection
    try:
        with connection.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchone()[0]
    finally:
        if connection is not dsn_or_connection:
            connection.close()


def in_threads(count, target):
    """Run target(i) in ``count`` threads at once; return their results (or exceptions)."""
    results = [None] * count
    barrier = threading.Barrier(count)

    def run(i):
        try:
            barrier.wait(10)
            results[i] = target(i)
        except Exception as exc:  # returned to the test, which asserts on it
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return results


def test_files_are_numbered_and_shipped():
    assert ALL and ALL == sorted(ALL)
    assert [version for version, _, _ in migrations.migrations()] == list(range(1, len(ALL) + 1))


def test_apply_installs_everything(empty_dsn):
    assert migrations.apply(empty_dsn) == ALL
    assert one(empty_dsn, "SELECT array_agg(name ORDER BY version) FROM omni_httpd.schema_migrations") == ALL
    assert one(empty_dsn, "SELECT omni_httpd.reload_configuration()") is True


def test_apply_again_does_nothing(empty_dsn):
    migrations.apply(empty_dsn)
    applied_at = one(empty_dsn, "SELECT max(applied_at) FROM omni_httpd.schema_migrations")
    assert migrations.apply(empty_dsn) == []
    assert one(empty_dsn, "SELECT max(applied_at) FROM omni_httpd.schema_migrations") == applied_at


def test_apply_on_a_connection_keeps_its_autocommit_setting(empty_dsn):
    connection = psycopg2.connect(empty_dsn)
    try:
        assert migrations.apply(connection) == ALL
        assert connection.autocommit is False
        assert connection.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE
        connection.autocommit = True
        assert migrations.apply(connection) == []
        assert connection.autocommit is True
    finally:
        connection.close()


def test_apply_releases_its_lock(empty_dsn):
    connection = psycopg2.connect(empty_dsn)
    try:
        migrations.apply(connection)
        assert one(connection, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                               " AND pid = pg_backend_pid()") == 0
    finally:
        connection.close()


def test_concurrent_apply_installs_once(empty_dsn):
    results = in_threads(3, lambda i: migrations.apply(empty_dsn))
    assert not [r for r in results if isinstance(r, Exception)], results
    assert sorted(sum(results, [])) == ALL
    assert one(empty_dsn, "SELECT count(*) FROM omni_httpd.schema_migrations") == len(ALL)


def test_apply_as_the_non_superuser_owner_of_the_database(pg_cluster, make_role):
    owner = make_role()
    name = "t_owned_by_%s" % owner
    admin = psycopg2.connect(pg_cluster.dsn)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute('CREATE DATABASE "%s" OWNER "%s"' % (name, owner))
        dsn = dsn_for(pg_cluster, name).replace("user=postgres", "user=%s" % owner)
        assert migrations.apply(dsn) == ALL
        connection = psycopg2.connect(dsn)
        try:
            assert migrations.initialize_default(connection, "127.0.0.1", 8080) is True
            with connection.cursor() as cur:
                cur.execute("SELECT query, role_name::text FROM omni_httpd.handlers")
                query, role_name = cur.fetchone()
                assert role_name == owner
                cur.execute("SELECT omni_httpd._install_handler('page', %s, %s)", (query, role_name))
                cur.execute("SELECT kind, status FROM pg_temp.page('GET', '/', NULL, '', '{}', '{}')")
                assert cur.fetchall() == [("response", 200)]
        finally:
            connection.close()
    finally:
        with admin.cursor() as cur:
            cur.execute('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % name)
        admin.close()


def test_api_is_usable_by_every_role_even_when_public_execute_is_revoked(revoked_public_user):
    user = revoked_public_user
    assert one(user, "SELECT convert_from((omni_httpd.http_response('x')::omni_httpd.http_response).body,"
                     " 'UTF8') || omni_http.http_header_get(ARRAY[omni_http.http_header('a', 'b')], 'a')") == "xb"


# -- initialize_default ---------------------------------------------------------------------

DEFAULT = ("SELECT host(l.address), l.port, h.query FROM omni_httpd.listeners l"
           " JOIN omni_httpd.listeners_handlers lh ON lh.listener_id = l.id"
           " JOIN omni_httpd.handlers h ON h.id = lh.handler_id")


def configuration(dsn):
    connection = psycopg2.connect(dsn)
    try:
        with connection.cursor() as cur:
            cur.execute(DEFAULT)
            return cur.fetchall()
    finally:
        connection.close()


def initialize(dsn, address="127.0.0.1", port=8080):
    connection = psycopg2.connect(dsn)
    try:
        return migrations.initialize_default(connection, address, port)
    finally:
        connection.close()


def test_initialize_default_creates_the_welcome_listener(dsn):
    assert initialize(dsn, "127.0.0.2", 8081) is True
    assert configuration(dsn) == [
        ("127.0.0.2", 8081, "SELECT omni_httpd.default_page(request.*::omni_httpd.http_request) FROM request")]


def test_the_welcome_page_runs_as_a_role_without_rights(dsn, make_role):
    # The tests connect as the cluster's superuser, as the daemon does on its embedded one.
    assert initialize(dsn) is True
    assert one(dsn, "SELECT h.role_name::text || ' ' || r.rolsuper || ' ' || r.rolcanlogin"
                    " FROM omni_httpd.handlers h JOIN pg_roles r ON r.rolname = h.role_name") == \
        "omni_httpd_welcome false false"
    # A daemon that is no superuser keeps its own role for it.
    plain = make_role()
    sql_as = dsn.replace("user=postgres", "user=%s" % plain)
    admin = psycopg2.connect(dsn)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute("DELETE FROM omni_httpd.default_initialization")
        cur.execute('GRANT ALL ON ALL TABLES IN SCHEMA omni_httpd TO "%s"' % plain)
        cur.execute('GRANT USAGE ON SCHEMA omni_httpd TO "%s"' % plain)
    admin.close()
    assert initialize(sql_as) is True
    assert one(dsn, "SELECT string_agg(role_name::text, ',' ORDER BY id) FROM omni_httpd.handlers") == \
        "omni_httpd_welcome,%s" % plain


def test_initialize_default_only_once(dsn):
    assert initialize(dsn) is True
    assert initialize(dsn, port=9999) is False
    assert [row[1] for row in configuration(dsn)] == [8080]


def test_deleted_default_listener_is_not_recreated(dsn):
    initialize(dsn)
    connection = psycopg2.connect(dsn)
    connection.autocommit = True
    with connection.cursor() as cur:
        cur.execute("DELETE FROM omni_httpd.listeners")
        cur.execute("DELETE FROM omni_httpd.handlers")
    connection.close()
    assert initialize(dsn) is False
    assert one(dsn, "SELECT count(*) FROM omni_httpd.listeners") == 0


def test_concurrent_initialize_default_creates_one_listener(dsn):
    results = in_threads(3, lambda i: initialize(dsn))
    assert sorted(results, key=str) == [False, False, True]
    assert len(configuration(dsn)) == 1


def test_initialize_default_commits_and_keeps_autocommit(dsn):
    connection = psycopg2.connect(dsn)
    try:
        migrations.initialize_default(connection, "127.0.0.1", 8080)
        assert connection.autocommit is False
        assert connection.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE
    finally:
        connection.close()
    assert len(configuration(dsn)) == 1
