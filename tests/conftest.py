"""Fixtures shared by all tests: a real, temporary PostgreSQL cluster.

One cluster per test session (started with the project's own embedded_pg module, as an
unprivileged account when the tests run as root); every test that needs a database gets a
fresh one, created from a template that already has the schema installed.
"""
import itertools
import os
import re
import shutil
import tempfile
from typing import Optional

import psycopg2
import pytest

from omni_httpd.master.embedded_pg import EmbeddedPostgres

_counter = itertools.count()


def _cluster(prefix: str, **settings):
    """A started temporary cluster, stopped and removed when the generator ends."""
    base = tempfile.mkdtemp(prefix=prefix)
    os.chmod(base, 0o755)  # PostgreSQL runs as an unprivileged account when the tests run as root
    cluster = EmbeddedPostgres(os.path.join(base, "data"),
                               settings=dict({"fsync": "off", "synchronous_commit": "off",
                                              "full_page_writes": "off"}, **settings))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_cluster():
    yield from _cluster("omni_httpd_test_pg_", max_connections="200")


@pytest.fixture
def own_cluster():
    """A PostgreSQL cluster of this test alone (it is stopped and started again)."""
    yield from _cluster("omni_httpd_own_pg_")


def dsn_for(cluster, dbname):
    return "host=%s port=5432 user=postgres dbname=%s" % (cluster.socket_dir, dbname)


def create_database(cluster, prefix, template=None):
    """Create a new database (copied from ``template`` if given); returns its name."""
    name = "%s_%d_%d" % (prefix, os.getpid(), next(_counter))
    admin = psycopg2.connect(cluster.dsn)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute('CREATE DATABASE "%s"%s' % (name, ' TEMPLATE "%s"' % template if template else ""))
    admin.close()
    return name


@pytest.fixture
def empty_dsn(pg_cluster):
    """DSN of a new, empty database (no schema installed)."""
    name = create_database(pg_cluster, "t_empty")
    yield dsn_for(pg_cluster, name)
    _drop_database(pg_cluster, name)


@pytest.fixture(scope="module")
def module_dsn(pg_cluster):
    """DSN of a new, empty database shared by one test module (e.g. with one daemon)."""
    name = create_database(pg_cluster, "t_module")
    yield dsn_for(pg_cluster, name)
    _drop_database(pg_cluster, name)


def _drop_database(cluster, name):
    admin = psycopg2.connect(cluster.dsn)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % name)
    admin.close()


@pytest.fixture(scope="session")
def schema_template(pg_cluster):
    """Name of a database with the omni_httpd schema installed, to copy from."""
    from omni_httpd.master import migrations

    name = create_database(pg_cluster, "t_template")
    migrations.apply(dsn_for(pg_cluster, name))
    yield name
    _drop_database(pg_cluster, name)


@pytest.fixture
def dsn(pg_cluster, schema_template):
    """DSN of a new database with the omni_httpd schema installed (a copy of the template)."""
    name = create_database(pg_cluster, "t_schema", template=schema_template)
    yield dsn_for(pg_cluster, name)
    _drop_database(pg_cluster, name)


@pytest.fixture
def make_role(pg_cluster):
    """Factory: make_role(*grant_to, superuser=False) -> name of a new LOGIN role.

    The roles are dropped after the test (with what they own or were granted in every
    database still present); close their connections before the test ends.
    """
    created = []

    def make(*member_of, superuser=False):
        name = "t_role_%d_%d" % (os.getpid(), next(_counter))
        admin = psycopg2.connect(pg_cluster.dsn)
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute('CREATE ROLE "%s" LOGIN %s' % (name, "SUPERUSER" if superuser else "NOSUPERUSER"))
            for group in member_of:
                cur.execute('GRANT "%s" TO "%s"' % (group, name))
        admin.close()
        created.append(name)
        return name

    yield make
    if not created:
        return
    admin = psycopg2.connect(pg_cluster.dsn)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute("SELECT datname FROM pg_database WHERE datallowconn")
        databases = [row[0] for row in cur.fetchall()]
    admin.close()
    for database in databases:
        conn = psycopg2.connect(dsn_for(pg_cluster, database))
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("DROP OWNED BY %s" % ", ".join('"%s"' % name for name in created))
        conn.close()
    admin = psycopg2.connect(pg_cluster.dsn)
    admin.autocommit = True
    with admin.cursor() as cur:
        for name in reversed(created):
            cur.execute('DROP ROLE "%s"' % name)
    admin.close()


@pytest.fixture
def connect(dsn, make_role):
    """Factory: connect(user=None, autocommit=True) -> connection to the test database.

    Depends on make_role so that its connections are closed before roles are dropped.
    """
    connections = []

    def make(user: Optional[str] = None, autocommit: bool = True):
        target = dsn if user is None else re.sub(r"user=\S+", "user=%s" % user, dsn)
        connection = psycopg2.connect(target)
        connection.autocommit = autocommit
        connections.append(connection)
        return connection

    yield make
    for connection in connections:
        connection.close()


@pytest.fixture
def db(connect):
    """An autocommit connection to a fresh database with the schema, as a superuser."""
    return connect()


@pytest.fixture
def warnings():
    """The warning events logged during the test (twisted.logger)."""
    from twisted.logger import globalLogPublisher

    events = []

    def observer(event):
        if event.get("log_level") is not None and event["log_level"].name == "warn":
            events.append(event)

    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


@pytest.fixture
def revoked_public_user(empty_dsn, make_role):
    """A connection, as a new role without rights, to a database whose schema was
    installed after ALTER DEFAULT PRIVILEGES REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC
    (as some managed databases are): the migrations must grant what roles need."""
    from omni_httpd.master import migrations

    admin = psycopg2.connect(empty_dsn)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute("ALTER DEFAULT PRIVILEGES REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC")
    migrations.apply(admin)
    user = psycopg2.connect(empty_dsn.replace("user=postgres", "user=%s" % make_role()))
    try:
        yield user
    finally:
        user.close()
        with admin.cursor() as cur:
            cur.execute("ALTER DEFAULT PRIVILEGES GRANT EXECUTE ON FUNCTIONS TO PUBLIC")
        admin.close()
