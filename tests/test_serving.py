"""SPEC section 4 end to end: the real daemon, real workers, real PostgreSQL, treq as client."""
from __future__ import annotations

import json
import os
import socket

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor
from twisted.web import resource, server

from daemon_support import (Daemon, add_listener, effective_port, set_handler, sql, wait_reloads,
                            wait_until)


class Served:
    def __init__(self, dsn, daemon):
        self.dsn = dsn
        self.daemon = daemon

    def serve(self, query, role_name=None, protocol="http"):
        """Attach ``query`` to a new listener; returns the base URL once it is served."""
        listener_id = add_listener(self.dsn, query, protocol=protocol, role_name=role_name)
        wait_reloads(self.dsn, 1)
        self.last_listener = listener_id
        return "http://127.0.0.1:%d" % effective_port(self.dsn, listener_id)


@pytest.fixture(scope="module")
def served(module_dsn):
    daemon = Daemon(module_dsn, "--http-workers", "2", "--no-init", "--admin", "none")
    try:
        daemon.wait_ready()
        wait_reloads(module_dsn, 1)  # the start-up's own record
        yield Served(module_dsn, daemon)
    finally:
        code = daemon.stop()
    assert code == 0, daemon.output[-3000:]


def raw(port, data: bytes, timeout=10.0) -> bytes:
    """Send raw bytes, read until the server closes (or the timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:  # an aborted connection may end with a reset
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


ECHO = """SELECT omni_httpd.http_response(json_build_object(
    'method', request.method, 'path', request.path, 'query_string', request.query_string,
    'headers', (SELECT json_agg(json_build_array(h.name, h.value)) FROM unnest(request.headers) h),
    'body', convert_from(request.body, 'UTF8'))) FROM request"""


@pytest_twisted.ensureDeferred
async def test_default_page_on_first_start(pg_cluster, empty_dsn):
    daemon = Daemon(empty_dsn, "--http-workers", "1", "--init-port", "0", "--admin", "none")
    try:
        daemon.wait_ready()
        rows = sql(empty_dsn, "SELECT id FROM omni_httpd.listeners", fetch=True)
        assert len(rows) == 1
        port = effective_port(empty_dsn, rows[0][0])
        response = await treq.get("http://127.0.0.1:%d/" % port, persistent=False)
        body = (await treq.content(response)).decode()
        assert response.code == 200
        assert response.headers.getRawHeaders("content-type")[0].startswith("text/html")
        assert empty_dsn.split("dbname=")[1] in body
        assert sql(empty_dsn, "SELECT count(*) FROM omni_httpd.configuration_reloads", fetch=True)[0][0] == 1
    finally:
        assert daemon.stop() == 0


@pytest_twisted.ensureDeferred
async def test_request_fields(served):
    base = served.serve(ECHO)
    response = await treq.post(base + "/users/me?x=1%20&y", data=b"hello body",
                               headers={"X-First": "1", "X-Second": "2"}, persistent=False)
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["application/json"]
    seen = json.loads(await treq.content(response))
    assert seen["method"] == "POST"
    assert seen["path"] == "/users/me"
    assert seen["query_string"] == "x=1%20&y"
    names = [name for name, _ in seen["headers"]]
    assert names.index("x-first") < names.index("x-second")
    assert all(name == name.lower() for name in names)
    assert seen["body"] == "hello body"

    response = await treq.get(base + "/no/query", persistent=False)
    seen = json.loads(await treq.content(response))
    assert seen["query_string"] is None
    assert seen["body"] == ""


def test_path_dot_segments_resolved_and_percent_encoding_kept(served):
    base = served.serve("SELECT omni_httpd.http_response(request.path) FROM request")
    port = int(base.rsplit(":", 1)[1])
    reply = raw(port, b"GET /a/./b/../c/%2e%41?q HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200")
    assert reply.endswith(b"\r\n\r\n/a/c/%2e%41")


@pytest_twisted.ensureDeferred
async def test_handler_update_is_served_after_reload(served):
    base = served.serve("SELECT omni_httpd.http_response('before') FROM request")
    response = await treq.get(base + "/", persistent=False)
    assert await treq.content(response) == b"before"
    set_handler(served.dsn, served.last_listener, "SELECT omni_httpd.http_response('after') FROM request")
    wait_reloads(served.dsn, 1)
    for _ in range(4):  # every worker runs the new handler
        response = await treq.get(base + "/", persistent=False)
        assert await treq.content(response) == b"after"


@pytest_twisted.ensureDeferred
async def test_zero_rows_is_204(served):
    base = served.serve("SELECT omni_httpd.http_response('x') FROM request WHERE false")
    response = await treq.get(base + "/", persistent=False)
    assert response.code == 204
    assert await treq.content(response) == b""


@pytest_twisted.ensureDeferred
async def test_query_error_is_500_logged_and_worker_keeps_serving(served):
    base = served.serve("SELECT omni_httpd.http_response((1/(length(request.path)-1))::text) FROM request")
    mark = served.daemon.mark()
    response = await treq.get(base + "/", persistent=False)
    assert response.code == 500
    assert await treq.content(response) == b"Internal server error"
    served.daemon.wait_for(r"division by zero", start=mark)
    response = await treq.get(base + "/a", persistent=False)
    assert response.code == 200
    assert await treq.content(response) == b"1"


@pytest_twisted.ensureDeferred
async def test_status_headers_and_null_body(served):
    base = served.serve("""SELECT omni_httpd.http_response(status => 201,
        headers => array[omni_http.http_header('x-one', 'a'), omni_http.http_header('x-one', 'b')])
        FROM request""")
    response = await treq.get(base + "/", persistent=False)
    assert response.code == 201
    assert response.headers.getRawHeaders("x-one") == ["a", "b"]
    assert not response.headers.hasHeader("content-type")
    assert await treq.content(response) == b""
    # A NULL body is sent empty and delimited (docs/sql-api.md); treq hides the framing
    # headers, so look at the wire.
    reply = raw(int(base.rsplit(":", 1)[1]), b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert b"\r\ncontent-length: 0\r\n" in reply.lower() and reply.endswith(b"\r\n\r\n")


def test_empty_body_has_content_length_zero(served):
    base = served.serve("SELECT omni_httpd.http_response(''::bytea) FROM request")
    reply = raw(int(base.rsplit(":", 1)[1]), b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert b"\r\ncontent-length: 0\r\n" in reply.lower()


def test_smaller_content_length_truncates_larger_is_ignored_with_warning(served):
    base = served.serve("""SELECT omni_httpd.http_response('0123456789',
        headers => array[omni_http.http_header('Content-Length', CASE WHEN request.path = '/small' THEN '4' ELSE '99' END)])
        FROM request""")
    port = int(base.rsplit(":", 1)[1])
    reply = raw(port, b"GET /small HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert reply.lower().count(b"content-length") == 1
    assert b"content-length: 4\r\n" in reply.lower() and reply.endswith(b"\r\n\r\n0123")
    mark = served.daemon.mark()
    reply = raw(port, b"GET /large HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert b"content-length: 10\r\n" in reply.lower() and reply.endswith(b"\r\n\r\n0123456789")
    served.daemon.wait_for(r"(?i)content-length", start=mark)


def test_head_has_no_body_but_the_get_length(served):
    base = served.serve("SELECT omni_httpd.http_response('hello') FROM request")
    port = int(base.rsplit(":", 1)[1])
    reply = raw(port, b"HEAD / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert b"content-length: 5\r\n" in reply.lower()
    assert reply.endswith(b"\r\n\r\n")


def test_abort_closes_connection_without_response(served):
    base = served.serve("SELECT omni_httpd.abort() FROM request")
    reply = raw(int(base.rsplit(":", 1)[1]), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert reply == b""


@pytest_twisted.ensureDeferred
async def test_listener_without_handler_is_404(served):
    listener_id = add_listener(served.dsn, None)
    wait_reloads(served.dsn, 1)
    port = effective_port(served.dsn, listener_id)
    response = await treq.get("http://127.0.0.1:%d/" % port, persistent=False)
    assert response.code == 404
    assert await treq.content(response) == b""


@pytest_twisted.ensureDeferred
async def test_outcome_column_is_the_first_http_outcome(served):
    base = served.serve("SELECT 1 AS n, 'text' AS t, omni_httpd.http_response('chosen') AS o, "
                        "omni_httpd.http_response('second') FROM request")
    response = await treq.get(base + "/", persistent=False)
    assert await treq.content(response) == b"chosen"


@pytest_twisted.ensureDeferred
async def test_committed_side_effects_persist_failed_ones_do_not(served):
    sql(served.dsn, "CREATE TABLE IF NOT EXISTS visits(path text)")
    base = served.serve("""WITH v AS (INSERT INTO visits VALUES (
        (SELECT CASE WHEN path = '/fail' THEN (1/0)::text ELSE path END FROM request)) RETURNING path)
        SELECT omni_httpd.http_response(v.path) FROM v""")
    ok = await treq.get(base + "/ok", persistent=False)
    assert ok.code == 200
    failed = await treq.get(base + "/fail", persistent=False)
    assert failed.code == 500
    assert sql(served.dsn, "SELECT path FROM visits ORDER BY path", fetch=True) == [("/ok",)]


@pytest_twisted.ensureDeferred
async def test_handler_runs_as_role_name_and_cannot_change_role(served):
    sql(served.dsn, "DO $$ BEGIN CREATE ROLE serving_alice; EXCEPTION WHEN duplicate_object THEN NULL; END $$")
    sql(served.dsn, """CREATE OR REPLACE FUNCTION try_role(statement text) RETURNS text LANGUAGE plpgsql AS $$
        BEGIN EXECUTE statement; RETURN 'changed'; EXCEPTION WHEN OTHERS THEN RETURN 'refused: ' || sqlerrm; END $$""")
    base = served.serve("""SELECT omni_httpd.http_response(current_user || ' ' || try_role('RESET ROLE') || ' | '
        || try_role('SET ROLE postgres') || ' | ' || try_role('SET ROLE NONE') || ' ' || current_user) FROM request""",
                        role_name="serving_alice")
    response = await treq.get(base + "/", persistent=False)
    body = (await treq.content(response)).decode()
    assert response.code == 200, body
    assert body.startswith("serving_alice refused: ")
    assert body.endswith(" serving_alice")
    assert "changed" not in body


@pytest_twisted.ensureDeferred
async def test_proxy_outcome_forwards_and_relays(served):
    seen = {}

    class Upstream(resource.Resource):
        isLeaf = True

        def render(self, request):
            seen["method"] = request.method
            seen["host"] = request.getHeader("host")
            seen["body"] = request.content.read()
            request.setResponseCode(202)
            request.setHeader("x-upstream", "yes")
            return b"from upstream"

    port = reactor.listenTCP(0, server.Site(Upstream()), interface="127.0.0.1")
    try:
        base = served.serve("SELECT omni_httpd.http_proxy('http://127.0.0.1:%d/target') FROM request"
                            % port.getHost().port)
        response = await treq.request("PUT", base + "/x", data=b"payload",
                                      headers={"Host": "original.example"}, persistent=False)
        assert response.code == 202
        assert response.headers.getRawHeaders("x-upstream") == ["yes"]
        assert await treq.content(response) == b"from upstream"
        assert seen == {"method": b"PUT", "host": "original.example", "body": b"payload"}
    finally:
        await port.stopListening()


def test_keep_alive_and_pipelining_answer_in_order(served):
    base = served.serve("SELECT omni_httpd.http_response(request.path) FROM request")
    port = int(base.rsplit(":", 1)[1])
    reply = raw(port, b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n"
                      b"GET /3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert reply.count(b"HTTP/1.1 200") == 3
    assert reply.index(b"\r\n\r\n/1") < reply.index(b"\r\n\r\n/2") < reply.index(b"\r\n\r\n/3")


def test_limits_have_clear_answers(served):
    base = served.serve("SELECT omni_httpd.http_response('ok') FROM request")
    port = int(base.rsplit(":", 1)[1])
    assert raw(port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100000 + b"\r\n\r\n").startswith(b"HTTP/1.1 431")
    assert raw(port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n").startswith(b"HTTP/1.1 413")
    assert raw(port, b"THIS IS NOT HTTP\r\n\r\n").startswith(b"HTTP/1.1 400")
    # and the worker still serves
    assert raw(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").endswith(b"ok")


@pytest_twisted.ensureDeferred
async def test_200_concurrent_connections_are_all_answered(served):
    base = served.serve("SELECT omni_httpd.http_response(request.path) FROM request")
    responses = await defer.gatherResults([treq.get(base + "/%d" % i, persistent=False) for i in range(200)])
    bodies = await defer.gatherResults([treq.content(r) for r in responses])
    assert [r.code for r in responses] == [200] * 200
    assert bodies == [b"/%d" % i for i in range(200)]


@pytest_twisted.ensureDeferred
async def test_killed_worker_is_restarted_and_serves(served):
    base = served.serve("SELECT omni_httpd.http_response(pg_backend_pid()::text) FROM request")
    pids = served.daemon.worker_pids()
    assert len(pids) == 2
    mark = served.daemon.mark()
    os.kill(pids[0], 9)
    served.daemon.wait_for(r"worker 0 \(pid %d\) killed by signal 9; restarting" % pids[0], start=mark)
    served.daemon.wait_for(r"worker 0 started", start=mark)
    wait_until(lambda: len(set(served.daemon.worker_pids()) - set(pids)) == 1, what="replacement worker")
    for _ in range(10):
        response = await treq.get(base + "/", persistent=False)
        assert response.code == 200


@pytest_twisted.ensureDeferred
async def test_listener_that_cannot_bind_is_logged_and_others_keep_serving(served):
    base = served.serve("SELECT omni_httpd.http_response('still here') FROM request")
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    try:
        busy_port = blocker.getsockname()[1]
        mark = served.daemon.mark()
        sql(served.dsn, "INSERT INTO omni_httpd.listeners(address, port) VALUES ('127.0.0.1', %s)", (busy_port,))
        wait_reloads(served.dsn, 1)
        served.daemon.wait_for(r"not served: .*address already in use", start=mark)
        response = await treq.get(base + "/", persistent=False)
        assert await treq.content(response) == b"still here"
    finally:
        blocker.close()


def test_database_unavailable_answers_503_then_recovers(served):
    base = served.serve("SELECT omni_httpd.http_response('up') FROM request")
    port = int(base.rsplit(":", 1)[1])
    sql(served.dsn, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name LIKE 'omni_httpd worker%%' AND datname = current_database()")
    replies = [raw(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n") for _ in range(2)]
    assert all(r.startswith(b"HTTP/1.1 503") or r.endswith(b"up") for r in replies), replies
    wait_until(lambda: raw(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").endswith(b"up"),
               what="recovery after the database connection was lost")


def test_request_values_reach_the_handler_verbatim_whatever_the_session_settings(served):
    # A handler may change session settings; quotes and backslashes in the request must
    # still arrive exactly as sent (and never be read as SQL).
    base = served.serve("""SELECT omni_httpd.http_response(
        CASE WHEN request.path = '/off' THEN set_config('standard_conforming_strings', 'off', false)
             ELSE omni_http.http_header_get(request.headers, 'x-v') || '|' || request.query_string END)
        FROM request""")
    port = int(base.rsplit(":", 1)[1])
    tricky = b"it's \\ a \\' test'); SELECT 1; --"
    for _ in range(4):  # reach both workers, after each has had its settings changed
        raw(port, b"GET /off HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reply = raw(port, b"GET /x?q='\\' HTTP/1.1\r\nHost: x\r\nX-V: " + tricky + b"\r\nConnection: close\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 200"), reply
        assert reply.endswith(b"\r\n\r\n" + tricky + b"|q='\\'"), reply


@pytest_twisted.ensureDeferred
async def test_new_connections_spread_over_both_workers(served):
    # Each worker has its own database session: the backend pid tells which one answered.
    base = served.serve("SELECT omni_httpd.http_response(pg_backend_pid()::text) FROM request")
    responses = await defer.gatherResults([treq.get(base + "/", persistent=False) for _ in range(200)])
    bodies = await defer.gatherResults([treq.content(r) for r in responses])
    counts = {}
    for body in bodies:
        counts[body] = counts.get(body, 0) + 1
    assert len(counts) == 2, counts
    assert min(counts.values()) >= 40, counts  # an even spread, not one worker taking the burst


@pytest_twisted.ensureDeferred
async def test_https_listener_without_certificate_is_reported_and_others_keep_serving(served):
    base = served.serve("SELECT omni_httpd.http_response('plain still works') FROM request")
    mark = served.daemon.mark()
    listener_id = add_listener(served.dsn, "SELECT omni_httpd.http_response('never') FROM request",
                               protocol="https")
    wait_reloads(served.dsn, 1)
    served.daemon.wait_for(r"listener %d .*not served: https listener needs --tls-cert and --tls-key"
                           % listener_id, start=mark)
    assert sql(served.dsn, "SELECT effective_port FROM omni_httpd.listeners WHERE id = %s",
               (listener_id,)) == [(0,)]
    response = await treq.get(base + "/", persistent=False)
    assert await treq.content(response) == b"plain still works"


def test_listener_moved_to_another_port_is_served_there_only(served):
    base = served.serve("SELECT omni_httpd.http_response('moved') FROM request")
    old_port = int(base.rsplit(":", 1)[1])
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    new_port = probe.getsockname()[1]
    probe.close()
    sql(served.dsn, "UPDATE omni_httpd.listeners SET port = %s WHERE id = %s", (new_port, served.last_listener))
    wait_reloads(served.dsn, 1)
    assert effective_port(served.dsn, served.last_listener) == new_port
    assert raw(new_port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").endswith(b"moved")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", old_port), timeout=5).close()
