"""DBThread and LocalExecutor against a real PostgreSQL with the schema installed.

No mocks: handlers are installed with omni_httpd._install_handler and run through the
prepared statements; outages are real (backends terminated, connections refused).
"""
import inspect
import threading
import time

import psycopg2
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, DeferredList, gatherResults
from twisted.internet.task import deferLater
from twisted.web.resource import Resource
from twisted.web.server import Site

from omni_httpd.worker import proxy
from omni_httpd.worker.dbthread import DatabaseUnavailable, DBThread, HandlerError
from omni_httpd.worker.executor import LocalExecutor
from omni_httpd.common.request import Request
from omni_httpd.common.settings import Settings
from daemon_support import sql

def respond(expression, where=""):
    """A handler answering ``expression`` (SQL) as the response body."""
    return "SELECT omni_httpd.http_response(%s) FROM request %s" % (expression, where)


def get(path="/", **kwargs):
    fields = dict(method="GET", path=path, query_string=None, headers=[], body=b"", listener_id=1)
    fields.update(kwargs)
    return Request(**fields)


async def wait_for(predicate, timeout=10.0, interval=0.02):
    """Poll ``predicate`` (may return a Deferred or coroutine) until true; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met within %ss" % timeout)
        await deferLater(reactor, interval, lambda: None)


class CountingReactor:
    """The real reactor, counting thread -> reactor hand-offs."""

    def __init__(self, real):
        self._real = real
        self.from_thread = 0

    def callFromThread(self, f, *args, **kwargs):
        self.from_thread += 1
        return self._real.callFromThread(f, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._real, name)


@pytest.fixture
def make_db(dsn):
    made = []

    def make(**kwargs):
        kwargs.setdefault("reactor", reactor)
        kwargs.setdefault("reconnect_delays", (0.05, 0.2))
        db = DBThread(dsn, **kwargs)
        made.append(db)
        return db

    yield make
    for db in made:
        pytest_twisted.blockon(db.stop())


async def started(make_db, handlers=None, generation=1, **kwargs):
    db = make_db(**kwargs)
    await db.start()
    if handlers is not None:
        errors = await db.apply_configuration(generation, handlers)
        assert errors == {}
    return db


# -- batching ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_jobs_run_in_order_on_one_thread_with_one_hand_off_per_batch(make_db):
    counting = CountingReactor(reactor)
    db = await started(make_db, reactor=counting)
    changes = []
    db.on_busy_change(changes.append)
    assert db.busy is False

    gate = threading.Event()
    order = []

    def job(i):
        order.append(i)
        return i, threading.get_ident()

    before = counting.from_thread
    blocked = db.submit(gate.wait, 10)       # holds the DB thread while we queue more
    jobs = [db.submit(job, i) for i in range(100)]
    assert db.busy is True
    gate.set()
    results = await gatherResults([blocked] + jobs)

    assert results[0] is True
    assert [i for i, _ in results[1:]] == list(range(100)) == order
    threads = {ident for _, ident in results[1:]}
    assert len(threads) == 1 and threading.get_ident() not in threads
    # 101 jobs, a handful of wake-ups of the reactor (not one per job).
    assert counting.from_thread - before <= 3
    await wait_for(lambda: not db.busy)
    assert changes == [True, False]


@pytest_twisted.ensureDeferred
async def test_job_errors_stay_with_their_job(make_db):
    db = await started(make_db)

    def boom():
        raise ValueError("boom")

    results = await DeferredList([db.submit(lambda: 1), db.submit(boom), db.submit(lambda: 3)],
                                 consumeErrors=True)
    assert results[0] == (True, 1) and results[2] == (True, 3)
    assert results[1][0] is False and results[1][1].check(ValueError)


@pytest_twisted.ensureDeferred
async def test_cancelled_job_is_skipped(make_db):
    db = await started(make_db)
    gate = threading.Event()
    ran = []
    blocked = db.submit(gate.wait, 10)
    skipped = db.submit(ran.append, "skipped")
    kept = db.submit(ran.append, "kept")
    skipped.cancel()
    gate.set()
    await blocked
    await kept
    with pytest.raises(CancelledError):
        await skipped
    assert ran == ["kept"]


# -- running handlers ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_run_returns_the_handler_row(make_db):
    db = await started(make_db, {7: (respond("'hi ' || request.path"), "postgres")})
    row = await db.run(7, get("/there"))
    kind, status, names, values, body, url, preserve = row
    assert (kind, status, body) == ("response", 200, b"hi /there")
    assert [n.lower() for n in names] == ["content-type"]
    assert values == ["text/plain; charset=utf-8"]
    assert await db.run(7, get("/x")) is not None


@pytest_twisted.ensureDeferred
async def test_request_reaches_the_handler(make_db):
    query = respond(
        "format('%s|%s|%s|%s|%s|%s', request.method, request.path, "
        "coalesce(request.query_string, '<null>'), convert_from(request.body, 'UTF8'), "
        "omni_http.http_header_get(request.headers, 'X-A'), "
        "(request.*::omni_httpd.http_request).path)")
    db = await started(make_db, {1: (query, "postgres")})
    row = await db.run(1, get("/p/q", method="POST", query_string="a=1&b", body=b"caf\xc3\xa9",
                              headers=[("x-a", "first"), ("x-a", "second"), ("x-b", "b")]))
    assert row[4] == "POST|/p/q|a=1&b|café|first|/p/q".encode()
    row = await db.run(1, get("/"))
    assert row[4] == b"GET|/|<null>|||/"         # format() renders NULL as ''



@pytest_twisted.ensureDeferred
async def test_zero_rows_is_none(make_db):
    db = await started(make_db, {1: (respond("'x'", "WHERE false"), "postgres")})
    assert await db.run(1, get()) is None


@pytest_twisted.ensureDeferred
async def test_binary_body_round_trips(make_db):
    db = await started(make_db, {1: ("SELECT omni_httpd.http_response(request.body) FROM request",
                                     "postgres")})
    body = bytes(range(256)) * 4
    row = await db.run(1, get(method="PUT", body=body))
    assert row[4] == body and isinstance(row[4], bytes)


@pytest_twisted.ensureDeferred
async def test_handler_error_is_reported_and_the_worker_keeps_serving(make_db):
    db = await started(make_db, {1: (respond("(1 / (length(request.path) - 1))::text"), "postgres")})
    with pytest.raises(HandlerError) as info:
        await db.run(1, get("/"))
    assert "division by zero" in str(info.value)
    assert info.value.sqlstate == "22012"
    assert (await db.run(1, get("/a")))[4] == b"1"


@pytest_twisted.ensureDeferred
async def test_committed_on_success_rolled_back_on_error(make_db, dsn):
    sql(dsn, "CREATE TABLE hits (path text)")
    query = ("INSERT INTO hits SELECT request.path FROM request "
             "RETURNING omni_httpd.http_response((10 / (length(path) - 1))::text)")
    db = await started(make_db, {1: (query, "postgres")})
    assert (await db.run(1, get("/a")))[4] == b"10"
    with pytest.raises(HandlerError):
        await db.run(1, get("/"))                 # inserts, then divides by zero
    assert (await db.run(1, get("/abc")))[4] == b"3"
    rows = sql(dsn, "SELECT path FROM hits ORDER BY path")
    assert rows == [("/a",), ("/abc",)]


@pytest_twisted.ensureDeferred
async def test_runs_as_role_name_and_cannot_leave_it(make_db, make_role):
    role = make_role()
    db = await started(make_db, {
        1: (respond("current_user::text"), role),
        2: (respond("set_config('role', 'postgres', false)"), role),
        3: (respond("current_user::text"), "postgres"),
    })
    assert (await db.run(1, get()))[4] == role.encode()
    with pytest.raises(HandlerError):
        await db.run(2, get())
    assert (await db.run(1, get()))[4] == role.encode()
    assert (await db.run(3, get()))[4] == b"postgres"
    await db.stop()                  # its functions belong to the role dropped after us


@pytest_twisted.ensureDeferred
async def test_handler_timeout(make_db):
    db = await started(make_db, {1: (respond("'late'", ", pg_sleep(2)"), "postgres"),
                                 2: (respond("'quick'"), "postgres")},
                       handler_timeout=0.2)
    began = time.monotonic()
    with pytest.raises(HandlerError) as info:
        await db.run(1, get())
    assert time.monotonic() - began < 1.5
    assert "statement timeout" in str(info.value)
    assert (await db.run(2, get()))[4] == b"quick"


@pytest_twisted.ensureDeferred
async def test_cancel_running(make_db, dsn):
    db = await started(make_db, {1: (respond("'late'", ", pg_sleep(30)"), "postgres")})
    pid = await backend_pid(db)
    running = db.run(1, get())
    await wait_for(lambda: sql(
        dsn, "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND state = 'active'", (pid,)))
    began = time.monotonic()
    await db.cancel_running()
    with pytest.raises(HandlerError) as info:
        await running
    assert time.monotonic() - began < 5
    assert "canceling statement" in str(info.value)


# -- configuration ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_apply_configuration_between_requests_keeps_order(make_db):
    db = await started(make_db, {1: (respond("'v1'"), "postgres")})
    gate = threading.Event()
    blocked = db.submit(gate.wait, 10)
    before = [db.run(1, get()) for _ in range(5)]
    applied = db.apply_configuration(2, {1: (respond("'v2'"), "postgres")})
    after = [db.run(1, get()) for _ in range(5)]
    gate.set()
    await blocked
    assert [row[4] for row in await gatherResults(before)] == [b"v1"] * 5
    assert await applied == {}
    assert [row[4] for row in await gatherResults(after)] == [b"v2"] * 5


@pytest_twisted.ensureDeferred
async def test_broken_handler_is_reported_and_others_work(make_db):
    db = await started(make_db, {1: (respond("'old'"), "postgres")})
    errors = await db.apply_configuration(2, {
        1: ("SELECT * FROM no_such_table", "postgres"),
        2: (respond("'fine'"), "postgres"),
        3: (respond("'no such role'"), "no_such_role_at_all"),
    })
    assert sorted(errors) == [1, 3]
    assert "no_such_table" in errors[1]
    with pytest.raises(HandlerError) as info:
        await db.run(1, get())                # not the previous version either
    assert "no_such_table" in str(info.value)
    assert (await db.run(2, get()))[4] == b"fine"
    # Fixed in the next generation.
    assert await db.apply_configuration(3, {1: (respond("'new'"), "postgres")}) == {}
    assert (await db.run(1, get()))[4] == b"new"


@pytest_twisted.ensureDeferred
async def test_removed_and_unknown_handlers(make_db):
    db = await started(make_db, {1: (respond("'one'"), "postgres"), 2: (respond("'two'"), "postgres")})
    assert await db.apply_configuration(2, {2: (respond("'two'"), "postgres")}) == {}
    with pytest.raises(HandlerError):
        await db.run(1, get())
    with pytest.raises(HandlerError):
        await db.run(99, get())
    assert (await db.run(2, get()))[4] == b"two"


@pytest_twisted.ensureDeferred
async def test_same_generation_applied_twice(make_db):
    db = await started(make_db, {1: (respond("'a'"), "postgres")}, generation=5)
    assert await db.apply_configuration(5, {1: (respond("'b'"), "postgres")}) == {}
    assert (await db.run(1, get()))[4] == b"b"


@pytest_twisted.ensureDeferred
async def test_old_generations_are_dropped(make_db):
    db = await started(make_db, {1: (respond("'a'"), "postgres")}, generation=1)
    for generation in (2, 3):
        await db.apply_configuration(generation, {1: (respond("'a'"), "postgres")})

    def functions():
        with db.connection.cursor() as cur:
            cur.execute("SELECT proname FROM pg_proc WHERE pronamespace = pg_my_temp_schema() "
                        "AND proname LIKE 'omni_httpd_h%' ORDER BY 1")
            functions = [r[0] for r in cur.fetchall()]
            cur.execute("SELECT name FROM pg_prepared_statements WHERE name LIKE 'omni_httpd_h%' ORDER BY 1")
            return functions, [r[0] for r in cur.fetchall()]

    assert await db.submit(functions) == (["omni_httpd_h1_g3"], ["omni_httpd_h1"])


# -- outages ---------------------------------------------------------------------------


def backend_pid(db):
    return db.submit(lambda: db.connection.info.backend_pid)


@pytest_twisted.ensureDeferred
async def test_terminated_backend_gives_503_then_recovers(make_db, dsn):
    db = await started(make_db, {1: (respond("pg_backend_pid()::text"), "postgres")})
    pid = await backend_pid(db)
    sql(dsn, "SELECT pg_terminate_backend(%s)", (pid,))

    began = time.monotonic()
    with pytest.raises(DatabaseUnavailable):
        await db.run(1, get())
    assert time.monotonic() - began < 2

    async def served():
        try:
            return await db.run(1, get())
        except DatabaseUnavailable:
            return None

    row = await wait_for(served)
    assert int(row[4]) != pid                    # a new session, configuration re-applied


@pytest_twisted.ensureDeferred
async def test_fails_fast_while_the_database_is_away(make_db, dsn):
    dbname = psycopg2.extensions.parse_dsn(dsn)["dbname"]
    db = await started(make_db, {1: (respond("'up'"), "postgres")})
    pid = await backend_pid(db)
    admin_dsn = dsn.replace("dbname=%s" % dbname, "dbname=postgres")
    sql(admin_dsn, 'ALTER DATABASE "%s" ALLOW_CONNECTIONS false' % dbname)
    try:
        sql(admin_dsn, "SELECT pg_terminate_backend(%s)", (pid,))
        for _ in range(3):
            began = time.monotonic()
            with pytest.raises(DatabaseUnavailable):
                await db.run(1, get())
            assert time.monotonic() - began < 1
        # A configuration applied meanwhile is installed on reconnect.
        with pytest.raises(DatabaseUnavailable):
            await db.apply_configuration(2, {1: (respond("'up again'"), "postgres")})
    finally:
        sql(admin_dsn, 'ALTER DATABASE "%s" ALLOW_CONNECTIONS true' % dbname)

    async def served():
        try:
            return await db.run(1, get())
        except DatabaseUnavailable:
            return None

    row = await wait_for(served)
    assert row[4] == b"up again"


@pytest_twisted.ensureDeferred
async def test_start_fails_when_the_database_is_unreachable(tmp_path):
    db = DBThread("host=%s port=5432 dbname=nothing user=nobody" % tmp_path, reactor=reactor)
    with pytest.raises(DatabaseUnavailable):
        await db.start()
    with pytest.raises(DatabaseUnavailable):
        await db.run(1, get())
    await db.stop()


@pytest_twisted.ensureDeferred
async def test_stop_finishes_queued_requests(make_db):
    db = await started(make_db, {1: (respond("request.path"), "postgres")})
    queued = [db.run(1, get("/%d" % i)) for i in range(20)]
    await db.stop()
    assert [row[4] for row in await gatherResults(queued)] == [("/%d" % i).encode() for i in range(20)]
    with pytest.raises(DatabaseUnavailable):
        await db.run(1, get())


# -- LocalExecutor ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_executor_outcomes(make_db, dsn):
    db = await started(make_db, {
        1: (respond("'ok'"), "postgres"),
        2: (respond("(1/0)::text"), "postgres"),
        3: ("SELECT omni_httpd.abort()", "postgres"),
        4: (respond("'x'", "WHERE false"), "postgres"),
        5: ("SELECT omni_httpd.http_response('hello', headers => "
            "array[omni_http.http_header('Content-Length', '2')])", "postgres"),
    })
    listeners = {11: 1, 12: 2, 13: 3, 14: 4, 15: 5}
    executor = LocalExecutor(db, listeners.get, reactor=reactor, settings=Settings())

    ok = await executor.execute(get(listener_id=11))
    assert (ok.status, ok.body) == (200, b"ok")
    failed = await executor.execute(get(listener_id=12))
    assert (failed.status, failed.body) == (500, b"Internal server error")
    assert (await executor.execute(get(listener_id=13))).abort is True
    empty = await executor.execute(get(listener_id=14))
    assert (empty.status, empty.body) == (204, b"")
    truncated = await executor.execute(get(listener_id=15))
    assert truncated.body == b"he"
    assert all(n.lower() != "content-length" for n, _ in truncated.headers)
    missing = await executor.execute(get(listener_id=99))
    assert (missing.status, missing.body) == (404, b"")

    await db.stop()
    unavailable = await executor.execute(get(listener_id=11))
    assert (unavailable.status, unavailable.body) == (503, b"Service unavailable")


@pytest_twisted.ensureDeferred
async def test_executor_proxies(make_db):
    class Upstream(Resource):
        isLeaf = True

        def render(self, request):
            return b"upstream saw " + request.method + b" " + request.uri + b" " + request.content.read()

    port = reactor.listenTCP(0, Site(Upstream()), interface="127.0.0.1")
    try:
        url = "http://127.0.0.1:%d" % port.getHost().port
        db = await started(make_db, {
            1: ("SELECT omni_httpd.http_proxy('%s' || request.path) FROM request" % url, "postgres"),
        })
        executor = LocalExecutor(db, {1: 1}.get, reactor=reactor, settings=Settings())
        result = await executor.execute(get("/up/here", method="POST", body=b"data",
                                            headers=[("host", "h.example")]))
        assert (result.status, result.body) == (200, b"upstream saw POST /up/here data")
    finally:
        await proxy.close(reactor)
        await port.stopListening()


# -- pipelining ----------------------------------------------------------------------------

async def queued_behind_a_gate(db, requests):
    """Queue ``requests`` ((handler id, Request) pairs) while the DB thread is held, so
    that they reach it together (one pipeline); their outcomes, in order, as
    (True, row) or (False, exception)."""
    gate = threading.Event()
    blocked = db.submit(gate.wait, 10)
    pending = [db.run(handler_id, request) for handler_id, request in requests]
    gate.set()
    await blocked
    results = await DeferredList(pending, consumeErrors=True)
    return [(ok, value if ok else value.value) for ok, value in results]


@pytest_twisted.ensureDeferred
async def test_pipelined_requests_each_have_their_own_transaction_and_outcome(make_db, dsn):
    sql(dsn, "CREATE TABLE hits (path text)")
    query = ("INSERT INTO hits SELECT request.path FROM request "
             "RETURNING omni_httpd.http_response((10 / (length(path) - 1))::text)")
    db = await started(make_db, {1: (query, "postgres"), 2: (respond("'two'"), "postgres")})
    paths = ["/a", "/", "/abc", "/", "/ab"]
    requests = [(1, get(p)) for p in paths] + [(2, get("/x")), (3, get("/nobody"))]
    outcomes = await queued_behind_a_gate(db, requests)

    bodies = [value[4] if ok else type(value).__name__ for ok, value in outcomes]
    assert bodies == [b"10", "HandlerError", b"3", "HandlerError", b"5", b"two", "HandlerError"]
    assert "division by zero" in str(outcomes[1][1])
    assert "not installed" in str(outcomes[6][1])
    # What succeeded is committed, what failed rolled back, whatever its neighbours did.
    assert sql(dsn, "SELECT path FROM hits ORDER BY path") == [("/a",), ("/ab",), ("/abc",)]


@pytest_twisted.ensureDeferred
async def test_a_failed_request_leaves_nothing_to_the_next_one_in_its_pipeline(make_db, make_role):
    """Session advisory locks, SQL prepared statements and sequence state survive a
    rolled-back transaction: a pipelined request that takes them and then fails must not
    hand them to the request sent right behind it (another role's)."""
    attacker, victim = make_role(), make_role()
    # Takes the lock, changes a setting, then fails (at run time: not a number).
    leave = ("SELECT omni_httpd.http_response(CASE WHEN pg_try_advisory_lock(42) AND "
             "set_config('work_mem', '77kB', false) IS NOT NULL "
             "THEN ('x' || pg_backend_pid())::int::text END) FROM request")
    look = respond("(SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                   "AND pid = pg_backend_pid())::text || ' ' || current_setting('work_mem')")
    db = await started(make_db, {1: (leave, attacker), 2: (look, victim)})
    baseline = (await db.run(2, get()))[4]
    assert baseline.startswith(b"0 ")
    outcomes = await queued_behind_a_gate(db, [(1, get("/")), (2, get()), (1, get("/")), (2, get())])
    assert [ok for ok, _ in outcomes] == [False, True, False, True]
    assert outcomes[1][1][4] == outcomes[3][1][4] == baseline
    await db.stop()


@pytest_twisted.ensureDeferred
async def test_temporary_objects_left_in_a_pipeline_do_not_reach_the_requests_behind(make_db, dsn):
    sql(dsn, "CREATE FUNCTION public.make_temp() RETURNS text LANGUAGE plpgsql AS "
             "$$ BEGIN CREATE TEMP TABLE left_behind (x int); RETURN 'made'; END $$")
    db = await started(make_db, {
        1: (respond("public.make_temp()"), "postgres"),
        2: (respond("(SELECT count(*) FROM pg_class WHERE relname = 'left_behind')::text"), "postgres"),
    })
    outcomes = await queued_behind_a_gate(db, [(1, get()), (2, get()), (2, get()), (1, get())])
    # The ones behind found the session dirty before anything of theirs ran, and ran
    # again after the reset; the second make_temp could only succeed in a clean session.
    assert [(ok, value[4] if ok else str(value)) for ok, value in outcomes] == [
        (True, b"made"), (True, b"0"), (True, b"0"), (True, b"made")]


def test_every_pipelined_call_gets_an_outcome_when_the_connection_breaks_under_it(dsn):
    """The server went away before the calls were sent: sending one fails, and that
    call, like every other, must still get its outcome (the database is unavailable: a
    503). A call left without one was a request that hung until the client gave up."""
    import psycopg

    from omni_httpd.common import handler_call

    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.pgconn.prepare(b"one", b"SELECT 1").status == psycopg.pq.ExecStatus.COMMAND_OK
        pid = conn.pgconn.backend_pid
        sql(dsn, "SELECT pg_terminate_backend(%s)", (pid,))
        deadline = time.monotonic() + 10
        while sql(dsn, "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)):
            assert time.monotonic() < deadline, "the backend did not end"
            time.sleep(0.02)
        calls = [(b"one", [], True)] * 40      # more than one socket write's worth of none
        outcomes = list(handler_call.call_pipelined(conn, calls, lambda index: True, 8))
    assert sorted(index for index, _outcome, _seconds in outcomes) == list(range(40))
    assert all(isinstance(outcome, DatabaseUnavailable) for _index, outcome, _seconds in outcomes), outcomes
