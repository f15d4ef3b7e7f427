"""Fixtures shared by all tests: a real, temporary PostgreSQL cluster.

One cluster per test session (started with the project's own embedded_pg module, as an
unprivileged account when the tests run as root); every test that needs a database gets a
fresh one, created from a template that already has the schema installed.
"""
import itertools
import os
import shutil
import tempfile

import psycopg2
import pytest

from omni_httpd.embedded_pg import EmbeddedPostgres

_counter = itertools.count()


@pytest.fixture(scope="session")
def pg_cluster():
    base = tempfile.mkdtemp(prefix="omni_httpd_test_pg_")
    os.chmod(base, 0o755)
    cluster = EmbeddedPostgres(os.path.join(base, "data"),
                               settings={"fsync": "off", "max_connections": "200",
                                         "synchronous_commit": "off", "full_page_writes": "off"})
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


def dsn_for(cluster, dbname):
    return "host=%s port=5432 user=postgres dbname=%s" % (cluster.socket_dir, dbname)


@pytest.fixture
def empty_dsn(pg_cluster):
    """DSN of a new, empty database (no schema installed)."""
    name = "t_empty_%d_%d" % (os.getpid(), next(_counter))
    admin = psycopg2.connect(pg_cluster.dsn)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute('CREATE DATABASE "%s"' % name)
    admin.close()
    yield dsn_for(pg_cluster, name)
    _drop_database(pg_cluster, name)


def _drop_database(cluster, name):
    admin = psycopg2.connect(cluster.dsn)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % name)
    admin.close()
