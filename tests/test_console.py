"""Admin console, server side: every route over real HTTP (treq) against a real database.

The master's live state is the test's input (`FixedState`); everything else is real: the
console's own PostgreSQL connections, the schema's validation, argon2, the reactor.
"""
from __future__ import annotations

import datetime
import html
import json
import os
import re
import time

import psycopg2
import pytest
import pytest_twisted
from argon2 import PasswordHasher
import treq
from twisted.internet import defer, reactor, threads

from admin_support import ConsoleClient, FixedState, ServedConsole, wait_for
from omni_httpd.worker import proxy
from omni_httpd.console.app import AdminConsole
from omni_httpd.console.auth import COOKIE_NAME
from omni_httpd.master.queries import NOTIFY_CHANNEL
from omni_httpd.common.settings import Settings
from daemon_support import send_and_read, sql

PASSWORD = "correct horse battery staple"

GET_ROUTES = ["/", "/status.json", "/listeners", "/listeners/new", "/listeners/1",
              "/handlers", "/handlers/new", "/handlers/1", "/handlers/1/try", "/try", "/routes"]
POST_ROUTES = ["/logout", "/reload", "/listeners/new", "/listeners/1", "/listeners/1/delete",
               "/listeners/1/attach", "/listeners/1/detach", "/handlers/new", "/handlers/1",
               "/handlers/1/delete", "/handlers/1/try", "/try", "/routes/try"]


def state_fixture():
    return FixedState(
        workers=[{"slot": 0, "pid": 4242, "state": "idle", "requests": 17, "restarts": 1,
                  "started_at": time.time() - 3725},
                 {"slot": 1, "pid": 4243, "state": "busy", "requests": 3, "restarts": 0,
                  "started_at": time.time() - 5}],
        listeners=[{"id": 1, "address": "127.0.0.1", "port": 0, "effective_port": 40123,
                    "protocol": "http", "handler_id": 1, "status": "bound", "error": None},
                   {"id": 2, "address": "10.255.255.1", "port": 8080, "effective_port": 0,
                    "protocol": "http", "handler_id": None, "status": "error",
                    "error": "Cannot assign requested address"}],
        last_reload=datetime.datetime(2026, 1, 2, 3, 4, 5))


@pytest.fixture
def served(dsn):
    console = ServedConsole(state_fixture(), dsn, password=PASSWORD, login_delay=(0.3, 5.0))
    yield console
    pytest_twisted.blockon(console.close())


async def logged_in(served) -> ConsoleClient:
    client = ConsoleClient(served.url)
    page = await client.login(PASSWORD)
    assert page.status == 303 and page.location == "/", page.text
    return client


async def create_handler(client, query, role_name="postgres") -> int:
    await client.get("/handlers/new")
    page = await client.post("/handlers/new", {"query": query, "role_name": role_name})
    assert page.status == 303, page.text
    return int(re.match(r"/handlers/(\d+)\?", page.location).group(1))


def textarea(text, element_id):
    # The template puts a newline after the tag (HTML drops the first one).
    match = re.search(r'<textarea id="%s"[^>]*>\n(.*?)</textarea>' % element_id, text, re.S)
    assert match, "no textarea %s" % element_id
    return html.unescape(match.group(1))


# --- authentication --------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_nothing_without_a_session(served):
    client = ConsoleClient(served.url)
    for path in GET_ROUTES:
        page = await client.get(path)
        if path.endswith(".json"):
            assert page.status == 403, path
        else:
            assert (page.status, page.location) == (303, "/login"), path
    for path in POST_ROUTES:
        page = await client.post(path, {"query": "SELECT 1"}, csrf=False)
        assert page.status == 403, path
    # a forged cookie is no session either
    forged = ConsoleClient(served.url)
    response = await forged._http.get(served.url + "/", cookies={COOKIE_NAME: "bogus.value"},
                                      allow_redirects=False)
    assert response.code == 303
    # the login page and static assets are public
    assert (await client.get("/login")).status == 200
    css = await client.get("/static/admin.css")
    assert css.status == 200 and "header.top" in css.text
    assert (await client.get("/static/")).status == 404   # no directory listing
    assert sql(served.dsn, "SELECT count(*) FROM omni_httpd.handlers") == [(0,)]


@pytest_twisted.ensureDeferred
async def test_login_cookie_and_logout(served):
    client = ConsoleClient(served.url)
    login = await client.get("/login")
    assert login.status == 200 and 'type="password"' in login.text
    assert login.header("content-security-policy").startswith("default-src 'self'")
    assert login.header("x-frame-options") == "DENY"

    wrong = await client.post("/login", {"password": "nope"})
    assert wrong.status == 403 and "Wrong password" in wrong.text

    page = await client.post("/login", {"password": PASSWORD})
    assert page.status == 303 and page.location == "/"
    cookie = page.header("set-cookie")
    assert cookie.startswith(COOKIE_NAME + "=")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    session_cookie = client.cookie()

    dashboard = await client.get("/")
    assert dashboard.status == 200 and "Workers" in dashboard.text
    assert session_cookie not in dashboard.text    # the CSRF token does not reveal it
    assert (await client.get("/login")).location == "/"

    out = await client.post("/logout")
    assert out.status == 303 and out.location.startswith("/login")
    # the old cookie is dead even if a client keeps sending it
    again = ConsoleClient(served.url)
    response = await again._http.get(served.url + "/", cookies={COOKIE_NAME: session_cookie},
                                     allow_redirects=False)
    assert response.code == 303


@pytest_twisted.ensureDeferred
async def test_post_without_valid_csrf_token_is_refused(served):
    # login form itself
    client = ConsoleClient(served.url)
    await client.get("/login")
    assert (await client.post("/login", {"password": PASSWORD}, csrf=False)).status == 403
    assert (await client.post("/login", {"password": PASSWORD, "csrf": "x"})).status == 403

    client = await logged_in(served)
    other = await logged_in(served)
    await client.get("/")
    await other.get("/")
    for path in POST_ROUTES:
        for fields in ({}, {"csrf": ""}, {"csrf": "forged"}, {"csrf": other.csrf}):
            page = await client.post(path, dict(fields, query="SELECT 1", address="127.0.0.1",
                                                port="0", handler_id="1"), csrf=False)
            assert page.status == 403, (path, fields)
            assert "security token" in page.text
    assert sql(served.dsn, "SELECT count(*) FROM omni_httpd.handlers") == [(0,)]
    assert sql(served.dsn, "SELECT count(*) FROM omni_httpd.listeners") == [(0,)]
    # still logged in: the refused logout did nothing
    assert (await client.get("/")).status == 200


@pytest_twisted.ensureDeferred
async def test_failed_logins_are_slowed_down_without_blocking(served):
    client = ConsoleClient(served.url)
    await client.get("/login")

    started = time.monotonic()
    assert (await client.post("/login", {"password": "guess1"})).status == 403
    first = time.monotonic() - started
    assert first >= 0.3

    # While the second failure is being held back, the console answers others at once.
    started = time.monotonic()
    pending = defer.ensureDeferred(client.post("/login", {"password": "guess2"}))
    bystander = ConsoleClient(served.url)
    page = await bystander.get("/login")
    assert page.status == 200
    assert not pending.called
    assert (await pending).status == 403
    assert time.monotonic() - started >= 0.6     # doubled
    assert served.console._throttle.failures("127.0.0.1") == 2

    # Hanging up on a failed attempt does not shorten the wait for the next one.
    hung_up = defer.ensureDeferred(client.post("/login", {"password": "guess3"}))
    hung_up.addErrback(lambda failure: None)
    throttle = served.console._throttle
    await wait_for(lambda: throttle.failures("127.0.0.1") == 3, what="third failure")
    allowed = throttle.next_allowed("127.0.0.1")
    assert allowed - reactor.seconds() > 0.6
    hung_up.cancel()

    # The right password still works (after its wait) and resets the count.
    page = await client.post("/login", {"password": PASSWORD})
    assert page.status == 303
    assert reactor.seconds() >= allowed
    assert served.console._throttle.failures("127.0.0.1") == 0
    started = time.monotonic()
    other = ConsoleClient(served.url)
    await other.get("/login")
    assert (await other.post("/login", {"password": "x"})).status == 403
    assert time.monotonic() - started >= 0.3
    assert served.console._throttle.failures("127.0.0.1") == 1


def test_password_sources(tmp_path, dsn):
    plain = tmp_path / "plain"
    plain.write_text("from-file\n")
    console = AdminConsole(FixedState(), dsn, password_file=str(plain))
    assert console.generated_password is None
    assert console._password.verify("from-file") and not console._password.verify("from-file\n")

    hashed = tmp_path / "hashed"
    hashed.write_text(PasswordHasher().hash("hashed-secret") + "\n")
    console = AdminConsole(FixedState(), dsn, password_file=str(hashed))
    assert console._password.verify("hashed-secret") and not console._password.verify("x")

    generated = AdminConsole(FixedState(), dsn)
    assert generated.generated_password and len(generated.generated_password) >= 20
    assert generated._password.verify(generated.generated_password)
    assert generated.generated_password not in repr(vars(generated._password))

    with pytest.raises(ValueError, match="not both"):
        AdminConsole(FixedState(), dsn, password="a", password_file=str(plain))
    with pytest.raises(ValueError, match="cannot read"):
        AdminConsole(FixedState(), dsn, password_file=str(tmp_path / "missing"))
    (tmp_path / "empty").write_text("")
    with pytest.raises(ValueError, match="empty"):
        AdminConsole(FixedState(), dsn, password_file=str(tmp_path / "empty"))


@pytest_twisted.ensureDeferred
async def test_generated_password_logs_in(dsn):
    served = ServedConsole(FixedState(), dsn)
    try:
        password = served.console.generated_password
        client = ConsoleClient(served.url)
        assert (await client.login(password)).status == 303
        assert (await client.get("/")).status == 200
        assert served.console.generated_password is None     # no longer needed in memory
    finally:
        await served.close()


def test_generated_password_goes_to_a_private_file(tmp_path, dsn):
    data_dir = tmp_path / "state"
    console = AdminConsole(FixedState(), dsn, settings=Settings(data_dir=str(data_dir)))
    path = data_dir / "admin-password"
    assert console.generated_password_file == str(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert os.stat(data_dir).st_mode & 0o777 == 0o700           # created private
    assert path.read_text() == console.generated_password + "\n"
    # a symlink planted there is replaced, not written through
    (tmp_path / "elsewhere").write_text("untouched")
    path.unlink()
    path.symlink_to(tmp_path / "elsewhere")
    again = AdminConsole(FixedState(), dsn, settings=Settings(data_dir=str(data_dir)))
    assert (tmp_path / "elsewhere").read_text() == "untouched"
    assert not path.is_symlink() and path.read_text() == again.generated_password + "\n"
    assert os.listdir(data_dir) == ["admin-password"]               # no temporary left
    # a given password is not written anywhere
    AdminConsole(FixedState(), dsn, password="given", settings=Settings(data_dir=str(tmp_path / "x")))
    assert not (tmp_path / "x").exists()


def test_unwritable_state_directory_is_a_clear_error(tmp_path, dsn):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="cannot write the generated password to .*admin-password"):
        AdminConsole(FixedState(), dsn, settings=Settings(data_dir=str(blocker / "sub")))


# --- Host check (DNS rebinding) and requests our own proxy forwarded ---------------------

async def fetch(url, host=None, **headers):
    if host is not None:
        headers["Host"] = host
    response = await treq.get(url, headers=headers, persistent=False, allow_redirects=False)
    return response.code, (await treq.content(response)).decode()


@pytest_twisted.ensureDeferred
async def test_a_forged_host_is_refused(served):
    port = served.port.getHost().port
    for host in ("evil.example", "evil.example:%d" % port, "127.0.0.1.evil.example",
                 "[::1]:%d" % port, "10.0.0.1"):
        status, body = await fetch(served.url + "/login", host)
        assert status == 421, (host, body)
        assert "does not answer to the name" in body and "--admin-host" in body
        assert "password" not in body.lower()
    # also for the form posts, and with the security headers
    response = await treq.post(served.url + "/login", data={"password": PASSWORD},
                               headers={"Host": "evil.example"}, persistent=False)
    assert response.code == 421
    assert response.headers.getRawHeaders("x-frame-options") == ["DENY"]
    assert served.console._throttle.failures("127.0.0.1") == 0     # never reached the check


@pytest_twisted.ensureDeferred
async def test_the_names_it_is_reachable_as_are_served(served):
    port = served.port.getHost().port
    for host in ("127.0.0.1:%d" % port, "127.0.0.1", "localhost:%d" % port, "LOCALHOST.",
                 "console.localhost:%d" % port):
        status, body = await fetch(served.url + "/login", host)
        assert status == 200, (host, body)
        assert 'name="password"' in body


@pytest_twisted.ensureDeferred
async def test_admin_host_names_are_served(dsn):
    served = ServedConsole(FixedState(), dsn, password=PASSWORD,
                           settings=Settings(admin_hosts="console.example,10.9.8.7"))
    try:
        for host in ("console.example", "Console.Example:443", "10.9.8.7:8081", "localhost"):
            assert (await fetch(served.url + "/login", host))[0] == 200, host
        assert (await fetch(served.url + "/login", "other.example"))[0] == 421
    finally:
        await served.close()


def _raw(port, data):
    return send_and_read(port, data)


@pytest_twisted.ensureDeferred
async def test_a_missing_or_malformed_host_is_a_bad_request(served):
    port = served.port.getHost().port
    for request in (b"GET /login HTTP/1.0\r\n\r\n",
                    b"GET /login HTTP/1.1\r\nHost: a b\r\nConnection: close\r\n\r\n",
                    b"GET /login HTTP/1.1\r\nHost: [::1\r\nConnection: close\r\n\r\n",
                    b"GET /login HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\n"
                    b"Connection: close\r\n\r\n"):
        reply = await threads.deferToThread(_raw, port, request)
        assert reply.startswith(b"HTTP/1.") and b" 400 " in reply.split(b"\r\n")[0], (request, reply)
        assert b"Host header" in reply


@pytest_twisted.ensureDeferred
async def test_requests_proxied_by_this_daemon_are_refused(dsn):
    settings = Settings()
    served = ServedConsole(FixedState(), dsn, password=PASSWORD, settings=settings)
    try:
        own = "1.1 " + proxy.via_pseudonym(settings)
        status, body = await fetch(served.url + "/login", Via="1.0 front, " + own)
        assert status == 403 and "proxied by this daemon's own handlers" in body
        # another proxy's Via (even another omni_httpd's) is fine
        other = "1.1 " + proxy.via_pseudonym(Settings())
        assert (await fetch(served.url + "/login", Via=other))[0] == 200
    finally:
        await served.close()


# --- dashboard -------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_dashboard_shows_database_workers_listeners_and_reload(served):
    client = await logged_in(served)
    page = await client.get("/")
    assert page.status == 200
    dbname, version = sql(served.dsn,
                          "SELECT current_database(), current_setting('server_version')")[0]
    text = page.text
    assert dbname in text and version in text
    for expected in ("4242", "4243", "idle", "busy", "17", "1h 2m", "40123", "bound",
                     "Cannot assign requested address", "10.255.255.1", "2026-01-02 03:04:05"):
        assert expected in text, expected
    assert 'href="/handlers/1"' in text
    assert '<script src="/static/admin.js"' in text

    status = json.loads((await client.get("/status.json")).text)
    assert [w["pid"] for w in status["workers"]] == [4242, 4243]
    assert status["listeners"][1]["error"] == "Cannot assign requested address"
    assert status["last_reload"] == "2026-01-02T03:04:05"
    assert "40123" in status["html"]["listeners"] and "4243" in status["html"]["workers"]

    # the reload button asks the database (NOTIFY after commit)
    listen = psycopg2.connect(served.dsn)
    listen.autocommit = True
    listen.cursor().execute("LISTEN %s" % NOTIFY_CHANNEL)
    try:
        page = await client.post("/reload")
        assert page.status == 303 and page.location == "/?done=reloaded"
        assert "Reload requested." in (await client.get(page.location)).text

        def notified():
            listen.poll()
            return any(n.channel == NOTIFY_CHANNEL for n in listen.notifies)
        await wait_for(notified, what="reload notification")
    finally:
        listen.close()


@pytest_twisted.ensureDeferred
async def test_dashboard_when_the_database_is_unreachable(pg_cluster):
    dsn = "host=%s port=5432 user=postgres dbname=no_such_database" % pg_cluster.socket_dir
    served = ServedConsole(state_fixture(), dsn, password=PASSWORD)
    try:
        client = await logged_in(served)
        page = await client.get("/")
        assert page.status == 200
        assert "unavailable" in page.text and "no_such_database" in page.text
        assert "4242" in page.text                     # live state still shown
        page = await client.get("/handlers")
        assert page.status == 500 and "Database error" in page.text
    finally:
        await served.close()


@pytest_twisted.ensureDeferred
async def test_console_reconnects_after_its_connections_are_cut(served):
    client = await logged_in(served)
    assert (await client.get("/handlers")).status == 200
    served.console._db.idle_check = 0      # check every connection before use
    cut = sql(served.dsn, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                          " WHERE application_name = 'omni_httpd admin console'"
                          " AND datname = current_database()")
    assert cut and all(ok for (ok,) in cut)
    for _ in range(3):
        page = await client.get("/handlers")
        assert page.status == 200, page.text


# --- listeners -------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_listener_create_edit_attach_detach_delete(served):
    dsn = served.dsn
    client = await logged_in(served)
    handler_id = await create_handler(client, "SELECT omni_httpd.http_response('hi')")
    other_handler = await create_handler(client, "SELECT omni_httpd.http_response('other')")

    page = await client.get("/listeners/new")
    assert page.status == 200 and '<option value="https"' in page.text
    page = await client.post("/listeners/new", {"address": "127.0.0.1", "port": "0",
                                                "protocol": "http", "handler_id": str(handler_id)})
    assert page.status == 303, page.text
    listener_id = int(re.match(r"/listeners/(\d+)\?done=listener-created", page.location).group(1))
    assert sql(dsn, "SELECT host(address), port, protocol::text FROM omni_httpd.listeners") == \
        [("127.0.0.1", 0, "http")]
    assert sql(dsn, "SELECT listener_id, handler_id FROM omni_httpd.listeners_handlers") == \
        [(listener_id, handler_id)]

    page = await client.get("/listeners")
    assert 'href="/listeners/%d"' % listener_id in page.text
    assert 'href="/handlers/%d"' % handler_id in page.text

    # the database's errors, shown next to the form, with what was typed kept
    page = await client.post("/listeners/%d" % listener_id,
                             {"address": "127.0.0.1", "port": "70000", "protocol": "http"})
    assert page.status == 400
    assert 'role="alert"' in page.text and "listeners" in page.text
    assert 'value="70000"' in page.text
    page = await client.post("/listeners/new", {"address": "not-an-address", "port": "81",
                                                "protocol": "http", "handler_id": ""})
    assert page.status == 400
    assert "invalid input syntax for type inet" in html.unescape(page.text)
    assert 'value="not-an-address"' in page.text and 'value="81"' in page.text
    page = await client.post("/listeners/new", {"address": "127.0.0.1", "port": "eighty",
                                                "protocol": "http", "handler_id": ""})
    assert page.status == 400 and "invalid input syntax for type integer" in html.unescape(page.text)
    assert sql(dsn, "SELECT count(*) FROM omni_httpd.listeners") == [(1,)]

    page = await client.post("/listeners/%d" % listener_id,
                             {"address": "127.0.0.2", "port": "8090", "protocol": "http"})
    assert page.status == 303
    assert sql(dsn, "SELECT host(address), port FROM omni_httpd.listeners") == [("127.0.0.2", 8090)]
    assert "Listener saved." in (await client.get(page.location)).text

    page = await client.post("/listeners/%d/attach" % listener_id, {"handler_id": str(other_handler)})
    assert page.status == 303
    page = await client.post("/listeners/%d/attach" % listener_id, {"handler_id": str(other_handler)})
    assert page.status == 303    # attaching twice changes nothing
    assert sql(dsn, "SELECT handler_id FROM omni_httpd.listeners_handlers ORDER BY 1") == \
        [(handler_id,), (other_handler,)]
    page = await client.post("/listeners/%d/attach" % listener_id, {"handler_id": "999"})
    assert page.status == 400 and "listeners_handlers" in page.text
    page = await client.post("/listeners/%d/detach" % listener_id, {"handler_id": str(handler_id)})
    assert page.status == 303
    assert sql(dsn, "SELECT handler_id FROM omni_httpd.listeners_handlers") == [(other_handler,)]

    page = await client.post("/listeners/%d/delete" % listener_id)
    assert page.status == 303 and page.location == "/listeners?done=listener-deleted"
    assert sql(dsn, "SELECT count(*) FROM omni_httpd.listeners") == [(0,)]
    assert (await client.get("/listeners/%d" % listener_id)).status == 404
    assert (await client.post("/listeners/%d/delete" % listener_id)).status == 404


# --- handlers --------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_handler_validation_errors_shown_with_input_kept(served, make_role):
    dsn = served.dsn
    client = await logged_in(served)

    query = "SELECT omni_httpd.http_response(x) FROM no_such_table"
    await client.get("/handlers/new")
    page = await client.post("/handlers/new", {"query": query, "role_name": "postgres"})
    assert page.status == 400
    assert "invalid query" in page.text
    assert 'relation "no_such_table" does not exist' in html.unescape(page.text)
    assert textarea(page.text, "query") == query

    page = await client.post("/handlers/new", {"query": "SELECT 1; SELECT 2", "role_name": "postgres"})
    assert page.status == 400 and "query can only contain one statement" in page.text

    # The console connected as a role that is not a superuser: it may give handlers its
    # own role or one it is a member of, not another.
    team, nobody = make_role(), make_role()
    editor = make_role(team)
    for grant in ("GRANT USAGE ON SCHEMA omni_httpd, omni_http TO %s",
                  "GRANT ALL ON ALL TABLES IN SCHEMA omni_httpd TO %s",
                  "GRANT ALL ON ALL SEQUENCES IN SCHEMA omni_httpd TO %s",
                  "GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA omni_httpd, omni_http TO %s"):
        sql(dsn, grant % editor)
    editor_dsn = dsn.replace("user=postgres", "user=" + editor)
    served_as_editor = ServedConsole(FixedState(), editor_dsn, password=PASSWORD)
    try:
        client = await logged_in(served_as_editor)
        page = await client.get("/handlers/new")
        options = re.findall(r'<option value="([^"]*)"', page.text)
        assert options == [editor, team]
        page = await client.post("/handlers/new", {"query": "SELECT 1", "role_name": nobody})
        assert page.status == 400
        assert "handlers_role_name_check" in page.text
        assert textarea(page.text, "query") == "SELECT 1"
        assert 'value="%s" selected' % nobody in page.text
        page = await client.post("/handlers/new", {"query": "SELECT 1", "role_name": team})
        assert page.status == 303, page.text
    finally:
        await served_as_editor.close()
    assert sql(dsn, "SELECT query, role_name::text FROM omni_httpd.handlers") == [("SELECT 1", team)]


@pytest_twisted.ensureDeferred
async def test_handler_create_edit_delete_and_superuser_roles(served, make_role):
    dsn = served.dsn
    web = make_role()
    client = await logged_in(served)
    page = await client.get("/handlers/new")
    options = re.findall(r'<option value="([^"]*)"', page.text)
    assert options[0] == "postgres" and web in options   # a superuser may choose any role
    assert not any(o.startswith("pg_") for o in options)

    handler_id = await create_handler(client, "SELECT omni_httpd.http_response('one')")
    page = await client.get("/handlers/%d" % handler_id)
    assert textarea(page.text, "query") == "SELECT omni_httpd.http_response('one')"
    page = await client.post("/handlers/%d" % handler_id,
                             {"query": "SELECT omni_httpd.http_response('two')", "role_name": web})
    assert page.status == 303
    assert sql(dsn, "SELECT query, role_name::text FROM omni_httpd.handlers") == \
        [("SELECT omni_httpd.http_response('two')", web)]
    page = await client.post("/handlers/%d" % handler_id,
                             {"query": "SELECT nope FROM nowhere", "role_name": web})
    assert page.status == 400 and "invalid query" in page.text
    assert textarea(page.text, "query") == "SELECT nope FROM nowhere"
    assert sql(dsn, "SELECT query FROM omni_httpd.handlers") == \
        [("SELECT omni_httpd.http_response('two')",)]

    listing = await client.get("/handlers")
    assert "http_response(&#39;two&#39;)" in listing.text

    page = await client.post("/handlers/%d/delete" % handler_id)
    assert page.status == 303 and page.location == "/handlers?done=handler-deleted"
    assert sql(dsn, "SELECT count(*) FROM omni_httpd.handlers") == [(0,)]
    assert (await client.get("/handlers/%d" % handler_id)).status == 404
    assert (await client.get("/handlers/%d/try" % handler_id)).status == 404


@pytest_twisted.ensureDeferred
async def test_markup_in_queries_headers_and_state_is_escaped(served):
    evil = "</textarea><script>alert('q')</script>"
    client = await logged_in(served)
    query = "SELECT omni_httpd.http_response('%s')" % evil.replace("'", "''")
    handler_id = await create_handler(client, query)
    for path in ("/handlers", "/handlers/%d" % handler_id, "/handlers/%d/try" % handler_id):
        page = await client.get(path)
        assert "<script>alert" not in page.text, path
        assert "&lt;script&gt;alert" in page.text, path
    assert textarea((await client.get("/handlers/%d" % handler_id)).text, "query") == query

    # a header value echoed by the handler, and the header sent in the outcome
    echo = ("SELECT omni_httpd.http_response("
            "omni_http.http_header_get(request.headers, 'x-evil'), 200,"
            " ARRAY[omni_http.http_header('x-echo', omni_http.http_header_get(request.headers, 'x-evil'))])"
            " FROM request")
    page = await client.post("/try", {"query": echo, "role_name": "postgres", "method": "GET",
                                      "path": "/", "query_string": "",
                                      "headers": "X-Evil: <img src=x onerror=alert(1)>", "body": ""})
    assert page.status == 200, page.text
    assert "<img src=x" not in page.text
    assert page.text.count("&lt;img src=x onerror=alert(1)&gt;") >= 3   # input, header, body

    served.state.listener_list[1]["error"] = "<b onmouseover=alert(1)>bad</b>"
    for text in ((await client.get("/")).text, json.loads((await client.get("/status.json")).text)["html"]["listeners"]):
        assert "<b onmouseover" not in text and "&lt;b onmouseover=alert(1)&gt;" in text


# --- try a handler ---------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_try_a_handler(served):
    dsn = served.dsn
    sql(dsn, "CREATE TABLE visits (n int)")
    client = await logged_in(served)
    query = ("WITH v AS (INSERT INTO visits VALUES (1) RETURNING n) "
             "SELECT omni_httpd.http_response("
             "  format('%s %s ?%s body=%s ua=%s', request.method, request.path,"
             "         request.query_string, convert_from(request.body, 'utf8'),"
             "         omni_http.http_header_get(request.headers, 'user-agent')),"
             "  201, ARRAY[omni_http.http_header('x-one', 'a'), omni_http.http_header('x-two', 'b')])"
             " FROM request, v")
    handler_id = await create_handler(client, query)

    page = await client.get("/handlers/%d/try" % handler_id)
    assert textarea(page.text, "query") == query
    fields = {"query": query, "role_name": "postgres", "method": "POST", "path": "/a/./b/../c",
              "query_string": "x=1&y=2", "headers": "User-Agent: tester/1.0\n\nAccept: */*",
              "body": "hello"}
    page = await client.post("/handlers/%d/try" % handler_id, fields)
    assert page.status == 200, page.text
    text = html.unescape(page.text)
    assert re.search(r'class="code-status">201</span> Created', text)
    assert "POST /a/c ?x=1&amp;y=2 body=hello ua=tester/1.0" in page.text
    assert "<th>x-one</th><td>a</td>" in page.text and "<th>x-two</th><td>b</td>" in page.text
    assert "text/plain; charset=utf-8" in page.text
    # the form keeps what was typed
    assert textarea(page.text, "headers").replace("\r\n", "\n") == fields["headers"]
    assert textarea(page.text, "body") == "hello"
    assert 'value="x=1&amp;y=2"' in page.text
    # rolled back: the handler's insert and the temporary function are gone
    assert sql(dsn, "SELECT count(*) FROM visits") == [(0,)]

    # zero rows -> 204, an error -> the database's message
    page = await client.post("/try", dict(fields, query="SELECT omni_httpd.http_response('x') WHERE false"))
    assert page.status == 200 and 'class="code-status">204</span> No Content' in page.text
    page = await client.post("/try", dict(fields, query="SELECT 1/0"))
    assert page.status == 400 and "division by zero" in page.text
    page = await client.post("/try", dict(fields, query="SELECT omni_httpd.abort()"))
    assert "connection would be closed" in page.text
    page = await client.post("/try", dict(fields, query="SELECT omni_httpd.http_proxy('http://127.0.0.1:9/x', false)"))
    assert "Proxy to <code>http://127.0.0.1:9/x</code>" in page.text
    page = await client.post("/try", dict(fields, query="SELECT omni_httpd.http_response('\\x00ff'::bytea)"))
    assert "2 bytes of binary data" in page.text and "00 ff" in page.text

    # a malformed header line is refused before anything runs, input kept
    page = await client.post("/try", dict(fields, headers="no colon here"))
    assert page.status == 400 and "header line 1" in page.text
    assert textarea(page.text, "headers") == "no colon here"

    # the query string field: empty means no '?' (NULL)
    page = await client.post("/try", dict(fields, query="SELECT omni_httpd.http_response(coalesce(request.query_string, 'NULL')) FROM request",
                                          query_string=""))
    assert '<pre class="body" id="outcome-body">NULL</pre>' in page.text


@pytest_twisted.ensureDeferred
async def test_routes_are_listed_and_tried_on_a_listener(served):
    dsn = served.dsn
    sql(dsn, """
        CREATE TABLE route_visits (n int);
        CREATE FUNCTION public.console_user(request omni_httpd.http_request) RETURNS omni_httpd.http_outcome
        LANGUAGE plpgsql AS $$ BEGIN INSERT INTO route_visits VALUES (1);
            RETURN omni_httpd.http_response('<b>user</b> ' || split_part(request.path, '/', 3)); END $$;
        CREATE FUNCTION public.console_stamp(INOUT outcome omni_httpd.http_outcome) LANGUAGE sql AS $$
            SELECT omni_httpd.http_response(headers => ARRAY[omni_http.http_header('x-stamp', '1')]) $$;
        INSERT INTO omni_httpd.urlpattern_router VALUES
            (omni_httpd.urlpattern('/users/:id', method => 'GET'), 'public.console_user(omni_httpd.http_request)', 1),
            (omni_httpd.urlpattern('*'), 'public.console_stamp(omni_httpd.http_outcome)', 9);
        INSERT INTO omni_httpd.listeners (port) VALUES (0);
    """)
    listener_id = sql(dsn, "SELECT max(id) FROM omni_httpd.listeners")[0][0]
    client = await logged_in(served)
    page = await client.get("/routes")
    assert page.status == 200
    assert "pathname=/users/:id" in page.text and "public.console_user(omni_httpd.http_request)" in page.text
    fields = {"listener_id": str(listener_id), "method": "GET", "path": "/users/7", "query_string": "",
              "headers": "", "body": ""}
    # CSRF as everywhere else
    refused = await client.post("/routes/try", fields, csrf=False)
    assert refused.status == 403
    page = await client.post("/routes/try", fields)
    assert page.status == 200, page.text
    assert "Answered by <code>omni_httpd.urlpattern_router GET pathname=/users/:id -&gt; " \
           "public.console_user(omni_httpd.http_request)</code>" in page.text
    assert "&lt;b&gt;user&lt;/b&gt; 7" in page.text          # autoescaped
    assert "<th>x-stamp</th><td>1</td>" in page.text
    assert sql(dsn, "SELECT count(*) FROM route_visits") == [(0,)]     # rolled back
    page = await client.post("/routes/try", dict(fields, path="/other"))
    assert "(middleware; no handler matched)" in page.text
