"""HTTP/2 through the real daemon: re-dispatch of busy streams to sibling workers, TLS/ALPN."""
from __future__ import annotations

import datetime
import os
import socket
import subprocess

import pytest

from daemon_support import Daemon, add_listener, effective_port, sql, wait_reloads
from h2_client import h2_exchange

# The first request takes advisory lock 1 and waits (up to 20 s) until lock 2 is held by
# someone else; the second takes lock 2, then waits for lock 1. Run one after the other,
# the first gives up (500); run at the same time in two sessions, both answer 200.
COORDINATION = """
CREATE FUNCTION first_request() RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(7001);
    FOR i IN 1..400 LOOP
        IF EXISTS (SELECT FROM pg_locks WHERE locktype = 'advisory' AND objid = 7002 AND granted) THEN
            RETURN 'first ran beside second in backend ' || pg_backend_pid();
        END IF;
        PERFORM pg_sleep(0.05);
    END LOOP;
    RAISE EXCEPTION 'the second request never ran at the same time';
END $$;
CREATE FUNCTION second_request() RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    -- Whichever worker starts first: wait for the first request to hold its lock.
    FOR i IN 1..400 LOOP
        EXIT WHEN EXISTS (SELECT FROM pg_locks WHERE locktype = 'advisory' AND objid = 7001 AND granted);
        PERFORM pg_sleep(0.05);
    END LOOP;
    PERFORM pg_advisory_xact_lock(7002);
    PERFORM pg_advisory_xact_lock(7001);
    RETURN 'second in backend ' || pg_backend_pid();
END $$;
"""

COORDINATED_HANDLER = """SELECT omni_httpd.http_response(CASE request.path WHEN '/first' THEN first_request()
    WHEN '/second' THEN second_request() ELSE 'plain ' || request.path END) FROM request"""


@pytest.fixture(scope="module")
def two_workers(module_dsn, tmp_path_factory):
    cert, key = _self_signed(tmp_path_factory.mktemp("tls"))
    daemon = Daemon(module_dsn, "--http-workers", "2", "--no-init", "--admin", "none",
                    "--tls-cert", cert, "--tls-key", key)
    try:
        daemon.wait_ready()
        wait_reloads(module_dsn, 1)
        yield module_dsn, daemon
    finally:
        code = daemon.stop()
    assert code == 0, daemon.output[-3000:]


def _self_signed(directory):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def serve(dsn, query, protocol="http", role_name=None):
    listener_id = add_listener(dsn, query, protocol=protocol, role_name=role_name)
    wait_reloads(dsn, 1)
    return effective_port(dsn, listener_id)


def test_two_streams_of_one_connection_run_concurrently_in_two_sessions(two_workers):
    dsn, _daemon = two_workers
    sql(dsn, COORDINATION)
    port = serve(dsn, COORDINATED_HANDLER)
    first, second = h2_exchange(port, [("GET", "/first", b""), ("GET", "/second", b"")])
    assert (first.status, second.status) == (200, 200), (first.body, second.body, _daemon.output[-3000:])
    assert first.body.startswith(b"first ran beside second in backend ")
    assert second.body.startswith(b"second in backend ")
    assert first.body.rsplit(b" ", 1)[1] != second.body.rsplit(b" ", 1)[1]


def test_http1_pipelined_pair_completes_in_order(two_workers):
    dsn, _daemon = two_workers
    port = serve(dsn, "SELECT omni_httpd.http_response('plain ' || request.path) FROM request")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\nGET /two HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reply = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    assert reply.count(b"HTTP/1.1 200") == 2
    assert reply.index(b"plain /one") < reply.index(b"plain /two")


def test_redispatched_stream_runs_as_role_in_its_own_transaction(two_workers):
    dsn, _daemon = two_workers
    sql(dsn, "DO $$ BEGIN CREATE ROLE h2_bob; EXCEPTION WHEN duplicate_object THEN NULL; END $$")
    sql(dsn, "CREATE TABLE IF NOT EXISTS h2_log(path text, txid bigint)")
    sql(dsn, "GRANT ALL ON h2_log TO h2_bob")
    port = serve(dsn, """WITH w AS (INSERT INTO h2_log SELECT request.path, txid_current() FROM request
                                    WHERE pg_sleep(CASE WHEN request.path = '/slow' THEN 1 ELSE 0 END) IS NOT NULL
                                    RETURNING txid)
        SELECT omni_httpd.http_response(current_user || ' ' || pg_backend_pid()) FROM w""", role_name="h2_bob")
    slow, fast = h2_exchange(port, [("GET", "/slow", b""), ("GET", "/fast", b"")])
    assert (slow.status, fast.status) == (200, 200)
    assert slow.body.split()[0] == fast.body.split()[0] == b"h2_bob"
    assert slow.body.split()[1] != fast.body.split()[1]  # two database sessions
    rows = sql(dsn, "SELECT path, txid FROM h2_log ORDER BY path", fetch=True)
    assert [r[0] for r in rows] == ["/fast", "/slow"]
    assert rows[0][1] != rows[1][1]  # two transactions


def test_big_bodies_both_ways(two_workers):
    dsn, _daemon = two_workers
    port = serve(dsn, "SELECT omni_httpd.http_response(request.body || request.body) FROM request")
    payload = os.urandom(6 * 1024 * 1024)
    (result,) = h2_exchange(port, [("POST", "/echo", payload)])
    assert result.status == 200
    assert result.body == payload + payload


def test_abort_resets_only_its_stream(two_workers):
    dsn, _daemon = two_workers
    port = serve(dsn, """SELECT CASE WHEN request.path = '/abort' THEN omni_httpd.abort()
                                     ELSE omni_httpd.http_response('kept') END FROM request""")
    aborted, kept = h2_exchange(port, [("GET", "/abort", b""), ("GET", "/ok", b"")])
    assert aborted.reset is not None and aborted.status is None
    assert kept.status == 200 and kept.body == b"kept"


def test_https_listener_negotiates_h2_with_alpn(two_workers):
    dsn, _daemon = two_workers
    port = serve(dsn, "SELECT omni_httpd.http_response('over tls ' || request.path) FROM request", protocol="https")
    (result,) = h2_exchange(port, [("GET", "/x", b"")], tls=True)
    assert result.status == 200 and result.body == b"over tls /x"
    curl = subprocess.run(["curl", "-sk", "--http2", "-o", "-", "-w", "\n%{http_version}",
                           "https://127.0.0.1:%d/y" % port], capture_output=True, text=True, timeout=30)
    assert curl.stdout.splitlines() == ["over tls /y", "2"], curl.stderr
    curl1 = subprocess.run(["curl", "-sk", "--http1.1", "-o", "-", "-w", "\n%{http_version}",
                            "https://127.0.0.1:%d/z" % port], capture_output=True, text=True, timeout=30)
    assert curl1.stdout.splitlines() == ["over tls /z", "1.1"], curl1.stderr


def test_null_body_ends_the_stream_here_and_on_a_sibling(two_workers):
    dsn, _daemon = two_workers
    port = serve(dsn, """SELECT CASE WHEN request.path = '/slow' AND pg_sleep(0.5) IS NOT NULL
                                     THEN omni_httpd.http_response('slow')
                                     ELSE omni_httpd.http_response(body => null) END FROM request""")
    # The slow one keeps this worker busy, so the others are re-sent to the sibling.
    slow, *nulls = h2_exchange(port, [("GET", "/slow", b"")] + [("GET", "/null", b"")] * 3, timeout=30)
    assert slow.status == 200 and slow.body == b"slow"
    for result in nulls:
        assert result.ended and result.reset is None and result.status == 200
        assert result.body == b"" and "content-length" not in dict(result.headers)


def test_closed_connection_cancels_queued_streams_and_the_sibling_channel_survives(two_workers):
    import time

    from daemon_support import wait_until

    dsn, daemon = two_workers
    mark = daemon.mark()
    sql(dsn, "CREATE TABLE h2_queued(path text)")
    port = serve(dsn, """WITH w AS (INSERT INTO h2_queued SELECT request.path FROM request
                                    WHERE pg_sleep(CASE WHEN request.path = '/slow' THEN 1.5 ELSE 0 END)
                                          IS NOT NULL)
                         SELECT omni_httpd.http_response('ran ' || request.path) FROM request""")
    import h2.config
    import h2.connection

    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    connection.initiate_connection()
    for index in range(41):
        path = "/slow" if index == 0 else "/queued/%d" % index
        connection.send_headers(connection.get_next_available_stream_id(),
                                [(":method", "GET"), (":path", path), (":scheme", "http"),
                                 (":authority", "127.0.0.1")], end_stream=True)
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(connection.data_to_send())
    wait_until(lambda: sql(dsn, "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'",
                           fetch=True)[0][0] == 1, what="the slow handler to be running")
    sock.close()
    wait_until(lambda: sql(dsn, "SELECT count(*) FROM h2_queued WHERE path = '/slow'", fetch=True)[0][0] == 1,
               what="the slow handler to finish")
    # Both workers still answer, the sibling channel included (two streams at once: one
    # of them is re-sent while the other runs).
    started = time.monotonic()
    results = h2_exchange(port, [("GET", "/after/1", b""), ("GET", "/after/2", b"")], timeout=30)
    assert [r.status for r in results] == [200, 200]
    assert time.monotonic() - started < 5
    # A stream that had gone to the idle sibling at once may have run there; none of
    # those queued behind the slow one did.
    ran = sql(dsn, "SELECT count(*) FROM h2_queued WHERE path LIKE '/queued/%'", fetch=True)[0][0]
    assert ran <= 1, "%d of 40 queued handlers ran" % ran
    log = "\n".join(daemon.lines[mark:])
    assert "Traceback" not in log and "re-sent to worker" not in log, log[-3000:]


def test_routes_over_http2_run_on_a_sibling_too_without_a_spoofed_client_address(two_workers):
    """Two streams of one connection: the slow one holds this worker's DB thread, so the
    other is re-sent to the sibling, which must match and run the same route."""
    dsn, daemon = two_workers
    sql(dsn, """
        CREATE FUNCTION public.h2_route(request omni_httpd.http_request, route omni_httpd.urlpattern_router)
        RETURNS omni_httpd.http_outcome LANGUAGE sql AS $$
            SELECT omni_httpd.http_response(format('%s %s %s %s', (route.match).pathname, request.path,
                   omni_http.http_header_get(request.headers, 'omnigres-connecting-ip'), pg_backend_pid()))
            WHERE pg_sleep(CASE WHEN request.path = '/h2/slow' THEN 1 ELSE 0 END) IS NOT NULL $$;
        INSERT INTO omni_httpd.urlpattern_router VALUES
            (omni_httpd.urlpattern('/h2/:which'), 'public.h2_route(omni_httpd.http_request, omni_httpd.urlpattern_router)', 0);
    """)
    wait_reloads(dsn, 1)
    listener = add_listener(dsn, None)
    wait_reloads(dsn, 1)
    port = effective_port(dsn, listener)
    try:
        slow, fast = h2_exchange(port, [("GET", "/h2/slow", b""), ("GET", "/h2/fast", b"")],
                                 headers=[("omnigres-connecting-ip", "6.6.6.6")])
        assert (slow.status, fast.status) == (200, 200), daemon.output[-3000:]
        slow_words, fast_words = slow.body.split(), fast.body.split()
        assert slow_words[:3] == [b"/h2/:which", b"/h2/slow", b"127.0.0.1"]
        assert fast_words[:3] == [b"/h2/:which", b"/h2/fast", b"127.0.0.1"]
        assert slow_words[3] != fast_words[3]      # two workers' sessions
    finally:
        sql(dsn, "DELETE FROM omni_httpd.listeners WHERE id = %s; TRUNCATE omni_httpd.urlpattern_router"
            % listener)
        wait_reloads(dsn, 1)
