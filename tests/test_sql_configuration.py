"""The configuration tables: defaults and checks, the role check, handler validity, and
reload requests (SPEC section 3)."""
from __future__ import annotations

import threading

import psycopg2
import psycopg2.errors
import pytest

from sql_support import execute, notifications, one, poll_until, rows

CHANNEL = "omni_httpd_reload"


def insert_handler(connection, query, role_name=None):
    with connection.cursor() as cur:
        if role_name is None:
            cur.execute("INSERT INTO omni_httpd.handlers (query) VALUES (%s) RETURNING id", (query,))
        else:
            cur.execute("INSERT INTO omni_httpd.handlers (query, role_name) VALUES (%s, %s) RETURNING id",
                        (query, role_name))
        return cur.fetchone()[0]


# -- listeners -----------------------------------------------------------------------

def test_listener_defaults(db):
    assert rows(db, "INSERT INTO omni_httpd.listeners DEFAULT VALUES"
                    " RETURNING host(address), port, effective_port, protocol::text") == [
        ("127.0.0.1", 80, 0, "http")]


def test_listener_ids_are_generated(db):
    first = one(db, "INSERT INTO omni_httpd.listeners DEFAULT VALUES RETURNING id")
    second = one(db, "INSERT INTO omni_httpd.listeners DEFAULT VALUES RETURNING id")
    assert second > first
    with pytest.raises(psycopg2.Error):
        execute(db, "INSERT INTO omni_httpd.listeners (id) VALUES (1000)")


@pytest.mark.parametrize("port", [0, 1, 8080, 65535])
def test_listener_ports_in_range(db, port):
    assert one(db, "INSERT INTO omni_httpd.listeners (port) VALUES (%s) RETURNING port", (port,)) == port


@pytest.mark.parametrize("port", [-1, 65536])
def test_listener_ports_out_of_range(db, port):
    with pytest.raises(psycopg2.errors.CheckViolation):
        execute(db, "INSERT INTO omni_httpd.listeners (port) VALUES (%s)", (port,))


def test_listener_protocols(db):
    assert one(db, "SELECT enum_range(NULL::omni_httpd.http_protocol)::text[]") == ["http", "https"]
    assert one(db, "INSERT INTO omni_httpd.listeners (protocol) VALUES ('https') RETURNING protocol::text") == "https"
    with pytest.raises(psycopg2.errors.InvalidTextRepresentation):
        execute(db, "INSERT INTO omni_httpd.listeners (protocol) VALUES ('ftp')")


def test_listener_address_is_required(db):
    with pytest.raises(psycopg2.errors.NotNullViolation):
        execute(db, "INSERT INTO omni_httpd.listeners (address) VALUES (NULL)")
    assert one(db, "INSERT INTO omni_httpd.listeners (address) VALUES ('::1') RETURNING host(address)") == "::1"


# -- handlers and their attachment -------------------------------------------------------

def test_handler_defaults_to_the_current_role(db):
    handler = insert_handler(db, "SELECT 1")
    assert one(db, "SELECT role_name::text FROM omni_httpd.handlers WHERE id = %s", (handler,)) == \
        one(db, "SELECT current_user::text")


def test_handler_query_is_required(db):
    with pytest.raises(psycopg2.errors.NotNullViolation):
        execute(db, "INSERT INTO omni_httpd.handlers (query) VALUES (NULL)")


def test_listeners_handlers_refers_to_both(db):
    listener = one(db, "INSERT INTO omni_httpd.listeners DEFAULT VALUES RETURNING id")
    handler = insert_handler(db, "SELECT 1")
    execute(db, "INSERT INTO omni_httpd.listeners_handlers VALUES (%s, %s)", (listener, handler))
    with pytest.raises(psycopg2.errors.ForeignKeyViolation):
        execute(db, "INSERT INTO omni_httpd.listeners_handlers VALUES (%s, %s)", (listener, handler + 1000))
    with pytest.raises(psycopg2.errors.UniqueViolation):
        execute(db, "INSERT INTO omni_httpd.listeners_handlers VALUES (%s, %s)", (listener, handler))


def test_deleting_a_listener_or_handler_detaches_it(db):
    listener = one(db, "INSERT INTO omni_httpd.listeners DEFAULT VALUES RETURNING id")
    handler = insert_handler(db, "SELECT 1")
    execute(db, "INSERT INTO omni_httpd.listeners_handlers VALUES (%s, %s)", (listener, handler))
    execute(db, "DELETE FROM omni_httpd.listeners WHERE id = %s", (listener,))
    assert one(db, "SELECT count(*) FROM omni_httpd.listeners_handlers") == 0
    assert one(db, "SELECT count(*) FROM omni_httpd.handlers") == 1


def test_configuration_reloads_defaults(db):
    assert one(db, "INSERT INTO omni_httpd.configuration_reloads DEFAULT VALUES"
                   " RETURNING happened_at = now()::timestamp")


# -- the role check -------------------------------------------------------------------

def role_check_violation(error):
    return isinstance(error, psycopg2.errors.CheckViolation) and \
        error.diag.constraint_name == "handlers_role_name_check"


def test_role_check_accepts_own_role(db, connect, make_role):
    role = make_role()
    execute(db, 'GRANT INSERT, SELECT ON omni_httpd.handlers TO "%s"' % role)
    user = connect(user=role)
    handler = insert_handler(user, "SELECT 1", role)
    assert one(db, "SELECT role_name::text FROM omni_httpd.handlers WHERE id = %s", (handler,)) == role


def test_role_check_defaults_to_own_role_for_non_superusers(db, connect, make_role):
    role = make_role()
    execute(db, 'GRANT INSERT, SELECT ON omni_httpd.handlers TO "%s"' % role)
    handler = insert_handler(connect(user=role), "SELECT 1")
    assert one(db, "SELECT role_name::text FROM omni_httpd.handlers WHERE id = %s", (handler,)) == role


def test_role_check_accepts_a_granted_role(db, connect, make_role):
    group = make_role()
    role = make_role(group)
    execute(db, 'GRANT INSERT, SELECT ON omni_httpd.handlers TO "%s"' % role)
    handler = insert_handler(connect(user=role), "SELECT 1", group)
    assert one(db, "SELECT role_name::text FROM omni_httpd.handlers WHERE id = %s", (handler,)) == group


def test_role_check_refuses_a_role_the_user_cannot_become(db, connect, make_role):
    stranger = make_role()
    role = make_role()
    execute(db, 'GRANT INSERT, SELECT, UPDATE ON omni_httpd.handlers TO "%s"' % role)
    user = connect(user=role)
    for target in (stranger, "postgres"):
        with pytest.raises(psycopg2.Error) as info:
            insert_handler(user, "SELECT 1", target)
        assert role_check_violation(info.value)


def test_role_check_applies_to_updates(db, connect, make_role):
    stranger = make_role()
    role = make_role()
    execute(db, 'GRANT INSERT, SELECT, UPDATE ON omni_httpd.handlers TO "%s"' % role)
    user = connect(user=role)
    handler = insert_handler(user, "SELECT 1")
    with pytest.raises(psycopg2.Error) as info:
        execute(user, "UPDATE omni_httpd.handlers SET role_name = %s WHERE id = %s", (stranger, handler))
    assert role_check_violation(info.value)


def test_role_check_lets_a_superuser_pick_any_role(db, make_role):
    stranger = make_role()
    handler = insert_handler(db, "SELECT 1", stranger)
    assert one(db, "SELECT role_name::text FROM omni_httpd.handlers WHERE id = %s", (handler,)) == stranger


def test_role_check_refuses_an_unknown_role(db):
    with pytest.raises(psycopg2.Error) as info:
        insert_handler(db, "SELECT 1", "no_such_role_anywhere")
    assert role_check_violation(info.value)


# -- handler validity ------------------------------------------------------------------

def failure_of(connection, query):
    """The error committing a handler with ``query`` raises (autocommit: at the INSERT)."""
    with pytest.raises(psycopg2.Error) as info:
        insert_handler(connection, query)
    return info.value


@pytest.mark.parametrize("query", [
    "SELECT 1; SELECT 2",
    "SELECT ';'; SELECT 2",
    "SELECT $$;$$; SELECT 2",
    "SELECT 1 /* ; */; SELECT 2 -- ;",
    "",
    "   ",
    "-- only a comment",
    ";",
], ids=["two", "string-then-two", "dollar-then-two", "comments-then-two", "empty", "blank", "comment", "semicolon"])
def test_not_exactly_one_statement_is_refused(db, query):
    error = failure_of(db, query)
    assert error.diag.message_primary == "query can only contain one statement"


@pytest.mark.parametrize("query", [
    "SELECT ';'",
    "SELECT 'it''s; fine'",
    "SELECT E'\\';' AS x",
    "SELECT e'\\\\'';'''",
    "SELECT $$;$$",
    "SELECT $tag$ ; $$ ; $tag$",
    'SELECT 1 AS ";"',
    'SELECT 1 AS "a"";"',
    "SELECT 1 -- ; SELECT 2",
    "SELECT /* ; /* nested ; */ still a comment ; */ 1",
    "SELECT 1;",
    "SELECT 1; -- done",
    "SELECT 1 ;\n/* done */ ;",
    "-- leading comment\nSELECT 1",
], ids=["string", "doubled-quote", "e-string", "e-string-backslash", "dollar", "dollar-tag", "identifier",
        "identifier-escape", "line-comment", "nested-comment", "trailing-semicolon",
        "trailing-comment", "trailing-block-comment", "leading-comment"])
def test_semicolons_inside_strings_and_comments_do_not_count(db, query):
    handler = insert_handler(db, query)
    assert one(db, "SELECT query FROM omni_httpd.handlers WHERE id = %s", (handler,)) == query


def test_invalid_query_reports_the_postgresql_error_as_detail(db):
    error = failure_of(db, "SELECT * FROM no_such_table")
    assert error.diag.message_primary == "invalid query"
    assert error.diag.message_detail == 'relation "no_such_table" does not exist'


def test_syntax_error_is_an_invalid_query(db):
    error = failure_of(db, "SELEKT 1")
    assert error.diag.message_primary == "invalid query"
    assert error.diag.message_detail == 'syntax error at or near "SELEKT"'


def test_request_is_in_scope_for_validation(db):
    insert_handler(db, "SELECT request.*::omni_httpd.http_request, request.path, request.headers FROM request")


def test_unknown_request_column_is_an_invalid_query(db):
    error = failure_of(db, "SELECT request.no_such_column FROM request")
    assert error.diag.message_primary == "invalid query"
    assert "no_such_column" in error.diag.message_detail


def test_validation_does_not_run_the_query(db):
    execute(db, "CREATE TABLE visits (n int)")
    insert_handler(db, "INSERT INTO visits VALUES (1) RETURNING omni_httpd.http_response('ok')")
    insert_handler(db, "WITH v AS (INSERT INTO visits VALUES (2) RETURNING n) SELECT n FROM v")
    insert_handler(db, "INSERT INTO visits VALUES (3)")
    assert one(db, "SELECT count(*) FROM visits") == 0


def test_query_made_valid_later_in_the_transaction_commits(connect):
    connection = connect(autocommit=False)
    insert_handler(connection, "SELECT omni_httpd.http_response(greeting) FROM created_later")
    execute(connection, "CREATE TABLE created_later (greeting text)")
    connection.commit()
    assert one(connection, "SELECT count(*) FROM omni_httpd.handlers") == 1


def test_invalid_query_fails_at_commit_not_at_insert(connect):
    connection = connect(autocommit=False)
    insert_handler(connection, "SELECT * FROM never_created")
    with pytest.raises(psycopg2.Error) as info:
        connection.commit()
    assert info.value.diag.message_primary == "invalid query"


def test_handler_fixed_later_in_the_transaction_commits(connect):
    connection = connect(autocommit=False)
    handler = insert_handler(connection, "SELECT * FROM never_created")
    execute(connection, "UPDATE omni_httpd.handlers SET query = 'SELECT 1' WHERE id = %s", (handler,))
    connection.commit()
    assert one(connection, "SELECT query FROM omni_httpd.handlers") == "SELECT 1"


def test_update_to_an_invalid_query_is_refused(db):
    handler = insert_handler(db, "SELECT 1")
    with pytest.raises(psycopg2.Error) as info:
        execute(db, "UPDATE omni_httpd.handlers SET query = 'SELECT 1; SELECT 2' WHERE id = %s", (handler,))
    assert info.value.diag.message_primary == "query can only contain one statement"
    assert one(db, "SELECT query FROM omni_httpd.handlers") == "SELECT 1"


def test_handler_inserted_then_deleted_in_one_transaction_is_not_checked(connect):
    connection = connect(autocommit=False)
    handler = insert_handler(connection, "SELECT * FROM never_created")
    execute(connection, "DELETE FROM omni_httpd.handlers WHERE id = %s", (handler,))
    connection.commit()


def test_duplicate_output_column_names_are_valid(db):
    insert_handler(db, "SELECT 1 AS a, 2 AS a, omni_httpd.http_response('x') AS a")


def test_handler_with_its_own_data_modifying_with_is_valid(db):
    execute(db, "CREATE TABLE log (path text)")
    insert_handler(db, "WITH logged AS (INSERT INTO log SELECT request.path FROM request RETURNING path)"
                       " SELECT omni_httpd.http_response(path) FROM logged")


# -- reload requests -------------------------------------------------------------------

@pytest.fixture
def listener(connect):
    """A connection LISTENing on the reload channel."""
    connection = connect()
    execute(connection, "LISTEN " + CHANNEL)
    return connection


def mark(connection, payload="marker"):
    """Send a marker notification: everything notified before it arrives before it."""
    execute(connection, "SELECT pg_notify(%s, %s)", (CHANNEL, payload))


@pytest.mark.parametrize("statement", [
    "INSERT INTO omni_httpd.listeners DEFAULT VALUES",
    "UPDATE omni_httpd.listeners SET port = 81",
    "UPDATE omni_httpd.listeners SET address = '127.0.0.2'",
    "UPDATE omni_httpd.listeners SET protocol = 'https'",
    "DELETE FROM omni_httpd.listeners",
    "INSERT INTO omni_httpd.handlers (query) VALUES ('SELECT 2')",
    "UPDATE omni_httpd.handlers SET query = 'SELECT 3'",
    "DELETE FROM omni_httpd.handlers",
    "INSERT INTO omni_httpd.listeners_handlers SELECT l.id, h.id FROM omni_httpd.listeners l, omni_httpd.handlers h",
    "DELETE FROM omni_httpd.listeners_handlers",
    "TRUNCATE omni_httpd.listeners_handlers",
    "SELECT omni_httpd.reload_configuration()",
], ids=["insert-listener", "update-port", "update-address", "update-protocol", "delete-listener",
        "insert-handler", "update-handler", "delete-handler", "attach", "detach", "truncate", "explicit"])
def test_changes_request_a_reload(db, listener, statement):
    execute(db, "INSERT INTO omni_httpd.listeners DEFAULT VALUES")
    execute(db, "INSERT INTO omni_httpd.handlers (query) VALUES ('SELECT 1')")
    mark(db, "ready")
    notifications(listener, "ready")
    execute(db, statement)
    mark(db)
    assert notifications(listener, "marker") == ["", "marker"]


def test_reload_configuration_returns_true(db):
    assert one(db, "SELECT omni_httpd.reload_configuration()") is True


def test_reload_is_requested_only_when_the_transaction_commits(connect, listener):
    writer = connect(autocommit=False)
    other = connect()
    execute(writer, "INSERT INTO omni_httpd.listeners DEFAULT VALUES")
    mark(other, "before commit")
    assert notifications(listener, "before commit") == ["before commit"]
    writer.commit()
    mark(other, "after commit")
    assert notifications(listener, "after commit") == ["", "after commit"]


def test_rolled_back_change_requests_no_reload(connect, listener):
    writer = connect(autocommit=False)
    execute(writer, "INSERT INTO omni_httpd.listeners DEFAULT VALUES")
    writer.rollback()
    mark(writer)
    writer.commit()
    assert notifications(listener, "marker") == ["marker"]


def test_one_transaction_requests_one_reload(connect, listener):
    writer = connect(autocommit=False)
    execute(writer, "INSERT INTO omni_httpd.listeners DEFAULT VALUES")
    execute(writer, "INSERT INTO omni_httpd.handlers (query) VALUES ('SELECT 1')")
    execute(writer, "SELECT omni_httpd.reload_configuration()")
    writer.commit()
    mark(writer)
    writer.commit()
    assert notifications(listener, "marker") == ["", "marker"]


def test_effective_port_updates_do_not_request_a_reload(db, listener):
    execute(db, "INSERT INTO omni_httpd.listeners (port) VALUES (0), (8080)")
    mark(db, "ready")
    notifications(listener, "ready")
    execute(db, "UPDATE omni_httpd.listeners SET effective_port = 40000 + id")
    execute(db, "UPDATE omni_httpd.listeners SET effective_port = effective_port")
    mark(db)
    assert notifications(listener, "marker") == ["marker"]
    assert one(db, "SELECT count(*) FROM omni_httpd.listeners WHERE effective_port > 40000") == 2


def test_effective_port_update_with_another_change_requests_a_reload(db, listener):
    execute(db, "INSERT INTO omni_httpd.listeners (port) VALUES (0)")
    mark(db, "ready")
    notifications(listener, "ready")
    execute(db, "UPDATE omni_httpd.listeners SET effective_port = 40000, port = 40000")
    mark(db)
    assert notifications(listener, "marker") == ["", "marker"]


# -- wait_for_configuration_reloads ----------------------------------------------------------

def record_reloads(connection, count):
    for _ in range(count):
        execute(connection, "INSERT INTO omni_httpd.configuration_reloads DEFAULT VALUES")


def test_wait_for_reloads_already_recorded_consumes_the_oldest(db):
    record_reloads(db, 3)
    newest = one(db, "SELECT max(id) FROM omni_httpd.configuration_reloads")
    execute(db, "CALL omni_httpd.wait_for_configuration_reloads(2)")
    assert rows(db, "SELECT id FROM omni_httpd.configuration_reloads") == [(newest,)]


def test_wait_for_reloads_waits_until_they_happen(db, connect):
    waiter = connect()
    execute(waiter, "SET statement_timeout = '30s'")
    waiter_pid = one(waiter, "SELECT pg_backend_pid()")
    outcome = {}

    def wait():
        try:
            execute(waiter, "CALL omni_httpd.wait_for_configuration_reloads(2)")
            outcome["done"] = True
        except Exception as exc:  # reported by the assertion below
            outcome["error"] = exc

    thread = threading.Thread(target=wait)
    thread.start()
    try:
        record_reloads(db, 1)
        poll_until(lambda: one(db, "SELECT state = 'active' AND query LIKE 'CALL%%'"
                                   " FROM pg_stat_activity WHERE pid = %s", (waiter_pid,)))
        assert thread.is_alive() and not outcome
        record_reloads(db, 1)
    finally:
        thread.join(30)
    assert outcome == {"done": True}
    assert one(db, "SELECT count(*) FROM omni_httpd.configuration_reloads") == 0


def test_wait_for_zero_reloads_returns_at_once(db):
    execute(db, "CALL omni_httpd.wait_for_configuration_reloads(0)")
