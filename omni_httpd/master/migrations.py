"""The database schema: versioned migrations in ``omni_httpd/sql/NNN_name.sql``.

``apply`` installs the files not yet recorded in ``omni_httpd.schema_migrations``, in
order, each in its own transaction, while holding a session-level advisory lock: two
daemons starting at once take turns, and the second finds nothing left to do. It needs
no superuser rights: the owner of the database (CREATE privilege on it) is enough.

A released migration file is never edited: a change is a new file with the next number.

Blocking (psycopg2); the master calls it from a thread.
"""
from __future__ import annotations

import re
from importlib import resources
from typing import List, Tuple, Union

import psycopg2
import psycopg2.extensions

# The statements the runner itself issues; everything else is in sql/*.sql.
# Advisory lock key: two int4 so that it does not collide with single-bigint users.
LOCK = "SELECT pg_advisory_lock(1869440617, 1752462448)"      # 'omni', 'http'
UNLOCK = "SELECT pg_advisory_unlock(1869440617, 1752462448)"
BOOTSTRAP = """
CREATE SCHEMA IF NOT EXISTS omni_httpd;
CREATE TABLE IF NOT EXISTS omni_httpd.schema_migrations (
    version int PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
"""
# Bootstrapping needs CREATE rights even when everything exists already (PostgreSQL checks
# them before IF NOT EXISTS); a role without them (the authenticator of docs/sql-api.md,
# "Procedures") starts against a schema installed by its owner.
BOOTSTRAPPED = "SELECT to_regclass('omni_httpd.schema_migrations') IS NOT NULL"
APPLIED = "SELECT version FROM omni_httpd.schema_migrations"
RECORD = "INSERT INTO omni_httpd.schema_migrations (version, name) VALUES (%s, %s)"
INITIALIZE_DEFAULT = "SELECT omni_httpd._initialize_default(%s, %s)"

_FILE_NAME = re.compile(r"^(\d+)_(\w+)\.sql$")

Connectable = Union[str, "psycopg2.extensions.connection"]


def migrations() -> List[Tuple[int, str, str]]:
    """Every migration shipped with the package: (version, name, sql), by version."""
    found = []
    for entry in resources.files("omni_httpd").joinpath("sql").iterdir():
        match = _FILE_NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name[:-len(".sql")], entry.read_text(encoding="utf-8")))
    found.sort()
    versions = [version for version, _, _ in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError("two migration files share a version number: %s" % [name for _, name, _ in found])
    return found


def apply(dsn_or_connection: Connectable) -> List[str]:
    """Apply the migrations this database lacks; return their names (empty: up to date).

    Takes a DSN or an idle psycopg2 connection (whose autocommit setting is restored
    afterwards). Raises psycopg2 errors as they come; a failed migration is rolled back
    entirely and the ones before it stay applied.
    """
    if isinstance(dsn_or_connection, str):
        connection = psycopg2.connect(dsn_or_connection)
        try:
            return _apply(connection)
        finally:
            connection.close()
    return _apply(dsn_or_connection)


def _apply(connection) -> List[str]:
    was_autocommit = connection.autocommit
    connection.autocommit = True
    applied: List[str] = []
    try:
        with connection.cursor() as cur:
            cur.execute(LOCK)
        try:
            connection.autocommit = False
            with connection.cursor() as cur:
                cur.execute(BOOTSTRAPPED)
                if not cur.fetchone()[0]:
                    cur.execute(BOOTSTRAP)
                cur.execute(APPLIED)
                done = {row[0] for row in cur.fetchall()}
            connection.commit()
            for version, name, sql in migrations():
                if version in done:
                    continue
                try:
                    with connection.cursor() as cur:
                        cur.execute(sql)
                        cur.execute(RECORD, (version, name))
                    connection.commit()
                except BaseException:
                    connection.rollback()
                    raise
                applied.append(name)
        finally:
            _release(connection)
    finally:
        if connection.closed == 0:
            connection.autocommit = was_autocommit
    return applied


def _release(connection) -> None:
    """Unlock; a lost connection has released the lock already."""
    if connection.closed:
        return
    try:
        connection.rollback()
        connection.autocommit = True
        with connection.cursor() as cur:
            cur.execute(UNLOCK)
    except (psycopg2.OperationalError, psycopg2.InterfaceError):
        pass


def initialize_default(connection, address: str, port: int) -> bool:
    """Create the default listener (``address``:``port``) serving the welcome page.

    Only the first call in the life of the database does it (the database remembers),
    so an operator who deletes the default listener does not get it back. Commits.
    Returns whether the listener was created now.
    """
    was_autocommit = connection.autocommit
    connection.autocommit = False
    try:
        with connection.cursor() as cur:
            cur.execute(INITIALIZE_DEFAULT, (address, port))
            created = bool(cur.fetchone()[0])
        connection.commit()
        return created
    except BaseException:
        connection.rollback()
        raise
    finally:
        connection.autocommit = was_autocommit
