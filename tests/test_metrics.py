"""Probes, Prometheus metrics and JSON logs of the real daemon (`twistd -n omni_httpd`).

- /metrics parses with prometheus_client's parser and its request counters move by
  exactly the requests sent, per listener, protocol and status class (200, 404, 500,
  HTTP/1.1 and HTTP/2), with the duration histogram and the handler errors along;
- /ready answers 503 with a reason while a worker slot is down (SIGKILL) or PostgreSQL
  is stopped, and 200 again after recovery; /live stays 200;
- the endpoint answers only GET of /live, /ready, /metrics (others 404 / 405), drops a
  client sending an endless body;
- with --log-format json every line is one JSON object, access lines with their fields.

The daemon's metrics endpoint is on a free port (tcp:0), found from its log line. Every
wait polls a condition against a deadline.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import time

import pytest
import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.task import deferLater

from daemon_support import Daemon, add_listener, effective_port, send_and_read, wait_reloads
from h2_client import h2_exchange

METRICS = ("--metrics", "tcp:0:interface=127.0.0.1")


def metrics_url(daemon: Daemon) -> str:
    return daemon.wait_for(r"metrics and probes listening on (http://127\.0\.0\.1:\d+)/").group(1)


def start(dsn: str, *args: str) -> Daemon:
    daemon = Daemon(dsn, "--no-init", "--admin", "none", *METRICS, *args)
    try:
        daemon.wait_ready(90)
    except BaseException:
        daemon.stop(signal.SIGKILL)
        raise
    return daemon


async def get(url: str):
    response = await treq.get(url, persistent=False)
    return response.code == 200, response.code, (await treq.content(response)).decode("utf-8", "replace")


async def scrape(base: str) -> dict:
    """{(sample name, sorted labels): value} of one /metrics scrape."""
    _ok, code, text = await get(base + "/metrics")
    assert code == 200, text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def requests_count(samples: dict, listener: int, protocol: str, status_class: str) -> float:
    key = ("omni_httpd_requests_total", (("listener", str(listener)), ("protocol", protocol),
                                         ("status_class", status_class)))
    return samples.get(key, 0.0)


async def until(check, timeout: float = 30.0, what: str = "condition"):
    """Poll the async ``check`` (returns a true value when done) until the deadline."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = await check()
        if last and last[0]:
            return last
        await deferLater(reactor, 0.1, lambda: None)
    raise AssertionError("%s not reached within %ss (last: %r)" % (what, timeout, last))


def http1(port: int, paths) -> list:
    """GET every path on one keep-alive connection; the status of each answer."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    statuses = []
    try:
        for path in paths:
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            statuses.append(response.status)
    finally:
        conn.close()
    return statuses


@pytest_twisted.ensureDeferred
async def test_counters_move_by_exactly_the_requests_sent_and_json_log_lines_parse(dsn):
    daemon = start(dsn, "--http-workers", "2", "--log-format", "json")
    try:
        base = metrics_url(daemon)
        wait_reloads(dsn, 1)
        ok = add_listener(dsn, "SELECT omni_httpd.http_response('ok') FROM request")
        wait_reloads(dsn, 1)
        failing = add_listener(dsn, "SELECT omni_httpd.http_response((1 / 0)::text) FROM request")
        wait_reloads(dsn, 1)
        bare = add_listener(dsn, None)      # no handler: 404
        wait_reloads(dsn, 1)
        ok_port, failing_port, bare_port = (effective_port(dsn, i) for i in (ok, failing, bare))
        assert (await get(base + "/live"))[1] == 200
        await until(lambda: get(base + "/ready"), what="/ready 200")

        before = await scrape(base)
        assert http1(ok_port, ["/m/ok/%d" % n for n in range(7)]) == [200] * 7
        assert http1(failing_port, ["/m/fail/%d" % n for n in range(3)]) == [500] * 3
        assert http1(bare_port, ["/m/none/%d" % n for n in range(4)]) == [404] * 4
        streams = h2_exchange(ok_port, [("GET", "/m/h2/%d" % n, b"") for n in range(5)])
        assert [s.status for s in streams] == [200] * 5
        after = await scrape(base)

        def moved(listener, protocol, status_class):
            return (requests_count(after, listener, protocol, status_class)
                    - requests_count(before, listener, protocol, status_class))

        assert moved(ok, "h1", "2xx") == 7
        assert moved(ok, "h2", "2xx") == 5
        assert moved(failing, "h1", "5xx") == 3
        assert moved(bare, "h1", "4xx") == 4
        for listener in (ok, failing, bare):
            for protocol in ("h1", "h2"):
                for status_class in ("1xx", "3xx", "other"):
                    assert moved(listener, protocol, status_class) == 0
        assert moved(failing, "h1", "2xx") == moved(bare, "h2", "4xx") == 0
        errors = ("omni_httpd_handler_errors_total", ())
        assert after[errors] - before.get(errors, 0) == 3
        count = ("omni_httpd_request_duration_seconds_count", (("listener", str(ok)),))
        assert after[count] - before.get(count, 0) == 12
        inf = ("omni_httpd_request_duration_seconds_bucket", (("le", "+Inf"), ("listener", str(ok))))
        assert after[inf] == after[count]
        assert after[("omni_httpd_workers", (("state", "idle"),))] == 2
        assert after[("omni_httpd_configuration_reloads_total", ())] >= 4
        assert after[("omni_httpd_configuration_reload_seconds_count", ())] >= 3
        assert after[("omni_httpd_ready", ())] == 1
        assert ("process_resident_memory_bytes", ()) in after          # the master
        for slot in ("0", "1"):
            assert after[("omni_httpd_worker_resident_memory_bytes", (("slot", slot),))] > 1e6
            assert ("omni_httpd_worker_cpu_seconds_total", (("slot", slot),)) in after

        # every omni_httpd_* name the contrib files use is one /metrics has
        names = {name for name, _labels in after}
        contrib = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "contrib", "prometheus")
        for file_name in os.listdir(contrib):
            with open(os.path.join(contrib, file_name)) as handle:
                used = set(re.findall(r"\b(omni_httpd_[a-z0-9_]+)", handle.read()))
            assert used <= names, (file_name, sorted(used - names))

        # an open connection is seen within the gauges' sampling period
        with socket.create_connection(("127.0.0.1", ok_port)):
            await until(lambda: _gauge(base, "omni_httpd_open_connections", 1), what="open connection")

        # the JSON log: every line one object; our access lines with their fields
        lines = list(daemon.lines)
        objects = [json.loads(line) for line in lines if line.strip()]
        assert all({"time", "level", "worker", "namespace", "message"} <= set(o) for o in objects)
        access = {o["path"]: o for o in objects if o["namespace"] == "omni_httpd.access"}
        deadline = time.monotonic() + 10
        while "/m/none/3" not in access and time.monotonic() < deadline:
            await deferLater(reactor, 0.1, lambda: None)    # workers write their log every 50 ms
            access = {o["path"]: o for o in (json.loads(x) for x in list(daemon.lines) if x.strip())
                      if o["namespace"] == "omni_httpd.access"}
        entry = access["/m/fail/0"]
        assert entry["status"] == 500 and entry["method"] == "GET" and entry["worker"] in (0, 1)
        assert entry["peer"].startswith("127.0.0.1:") and entry["bytes"] == len("Internal server error")
        assert entry["protocol"] == "HTTP/1.1" and 0 <= entry["duration"] < 10 and entry["pid"]
        assert access["/m/h2/0"]["protocol"] == "HTTP/2" and access["/m/none/3"]["status"] == 404
        assert any(o["message"].startswith("omni_httpd ready") and o["worker"] is None for o in objects)
    finally:
        code = daemon.stop()
    assert code == 0, daemon.output[-3000:]


async def _gauge(base: str, name: str, at_least: float):
    value = (await scrape(base)).get((name, ()), 0)
    return (value >= at_least, value)


@pytest_twisted.ensureDeferred
async def test_in_flight_requests_and_streams_re_sent_to_a_sibling_are_seen(dsn):
    daemon = start(dsn, "--http-workers", "2")
    try:
        base = metrics_url(daemon)
        wait_reloads(dsn, 1)
        slow = add_listener(dsn, "SELECT omni_httpd.http_response('slow') FROM pg_sleep(1.5), request")
        wait_reloads(dsn, 1)
        port = effective_port(dsn, slow)
        await until(lambda: get(base + "/ready"), what="/ready 200")
        before = await scrape(base)
        # one slow request in flight: seen by the once-a-second sample
        pending = treq.get("http://127.0.0.1:%d/slow" % port, persistent=False)
        await until(lambda: _gauge(base, "omni_httpd_requests_in_flight", 1), what="one request in flight")
        response = await pending
        assert response.code == 200 and await treq.content(response) == b"slow"
        # two streams at once on one HTTP/2 connection: the second goes to the idle sibling
        streams = h2_exchange(port, [("GET", "/slow/a", b""), ("GET", "/slow/b", b"")])
        assert [s.status for s in streams] == [200, 200]
        after = await scrape(base)
        key = ("omni_httpd_http2_streams_redispatched_total", ())
        assert after[key] - before.get(key, 0) == 1
        # counted once, by the worker that received them
        assert requests_count(after, slow, "h2", "2xx") - requests_count(before, slow, "h2", "2xx") == 2
    finally:
        code = daemon.stop()
    assert code == 0, daemon.output[-3000:]


@pytest_twisted.ensureDeferred
async def test_the_endpoint_answers_only_get_of_its_three_paths(dsn):
    daemon = start(dsn, "--http-workers", "1")
    try:
        base = metrics_url(daemon)
        for path in ("/", "/nothing", "/metrics/more", "/ready/x", "/live/../admin", "/%2e%2e/etc"):
            response = await treq.get(base + path, persistent=False)
            assert response.code == 404, path
            await treq.content(response)
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            response = await treq.request(method, base + "/metrics", data=b"x", persistent=False)
            assert response.code == 405, method
            await treq.content(response)
        head = await treq.head(base + "/live", persistent=False)
        assert head.code == 200
        # an endless body is dropped, not kept
        port = int(base.rsplit(":", 1)[1])
        try:
            answer = send_and_read(port, b"POST /metrics HTTP/1.1\r\nHost: x\r\n"
                                   b"Content-Length: 100000000\r\n\r\n" + b"x" * (256 * 1024))
        except (ConnectionResetError, BrokenPipeError):
            answer = b""        # dropped at 64 KiB, with our bytes still unread: a reset
        assert b" 200 " not in answer.split(b"\r\n", 1)[0], answer[:200]
        assert (await get(base + "/live"))[1:] == (200, "live\n")
        # connections are bounded: past the limit they are closed at once
        from omni_httpd.master.metrics import MAX_CONNECTIONS
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(MAX_CONNECTIONS)]
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:   # until the master has accepted all of them
                # the master aborts the connection as soon as it accepts it; the reset can
                # arrive before connect() has returned, or on the send or the read
                extra = None
                try:
                    extra = socket.create_connection(("127.0.0.1", port), timeout=10)
                    extra.sendall(b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n")
                    answer = extra.recv(100)
                except (ConnectionResetError, BrokenPipeError):
                    answer = b""
                if extra is not None:
                    extra.close()
                if not answer:
                    break
            assert answer == b""
        finally:
            for sock in held:
                sock.close()
        await until(lambda: get(base + "/live"), what="/live once the connections are closed")
        assert daemon.proc.poll() is None
    finally:
        code = daemon.stop()
    assert code == 0, daemon.output[-3000:]


@pytest_twisted.ensureDeferred
async def test_ready_is_503_while_a_worker_slot_is_down_or_postgresql_is_stopped(own_cluster):
    dsn = own_cluster.dsn
    daemon = start(dsn, "--http-workers", "2")
    try:
        base = metrics_url(daemon)
        wait_reloads(dsn, 1)
        listener = add_listener(dsn, "SELECT omni_httpd.http_response('ok') FROM request")
        wait_reloads(dsn, 1)
        port = effective_port(dsn, listener)
        await until(lambda: get(base + "/ready"), what="/ready 200")
        assert http1(port, ["/r/%d" % n for n in range(10)]) == [200] * 10
        before = await scrape(base)

        # a worker slot down: 503 until its replacement is ready. Killed twice, so the
        # second restart waits out the backoff (0.5 s) and the slot is down long enough
        # to be seen whatever the machine's load.
        mark = daemon.mark()
        victim = daemon.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        replacement = int(daemon.wait_for(r"worker 0 started \(pid (\d+)\)", 30, start=mark).group(1))
        os.kill(replacement, signal.SIGKILL)

        async def not_ready():
            _ok, code, text = await get(base + "/ready")
            return code == 503, code, text
        code, text = (await until(not_ready, what="/ready 503 while a slot is down"))[1:]
        assert "worker" in text, text
        await until(lambda: get(base + "/ready"), what="/ready 200 after the restart")
        after = await scrape(base)
        assert after[("omni_httpd_worker_restarts_total", (("slot", "0"),))] == \
            before.get(("omni_httpd_worker_restarts_total", (("slot", "0"),)), 0) + 2
        # the killed worker's counts are kept: counters never go down
        assert requests_count(after, listener, "h1", "2xx") == requests_count(before, listener, "h1", "2xx") == 10

        # PostgreSQL stopped: 503 with the reason, /live still 200
        own_cluster.stop()
        code, text = (await until(not_ready, what="/ready 503 while PostgreSQL is down"))[1:]
        assert "database" in text, text
        assert (await get(base + "/live"))[1] == 200
        statuses = http1(port, ["/down/%d" % n for n in range(3)])
        assert statuses == [503] * 3, statuses
        own_cluster.start()
        await until(lambda: get(base + "/ready"), timeout=60, what="/ready 200 after PostgreSQL is back")
        assert http1(port, ["/back"]) == [200]
        final = await scrape(base)
        assert final[("omni_httpd_database_unavailable_responses_total", ())] >= 3
        assert final[("omni_httpd_master_database_reconnects_total", ())] >= 1
        assert requests_count(final, listener, "h1", "5xx") == 3
    finally:
        code = daemon.stop()
    assert code == 0, daemon.output[-3000:]


def test_readiness_reasons():
    """Each reason /ready can give, on a stand-in for the master."""
    from types import SimpleNamespace

    from omni_httpd.master.metrics import readiness

    worker = SimpleNamespace(ready=True, applied_generation=3)
    fleet = SimpleNamespace(workers={0: worker}, generation=3)
    board = SimpleNamespace(db_connected=lambda slot: True)
    master = SimpleNamespace(_stopping=False, fleet=fleet, reloader=SimpleNamespace(reloading=False),
                             scoreboard=board, ready=SimpleNamespace(called=True),
                             db=SimpleNamespace(detector=SimpleNamespace(connectionIsDead=False)),
                             settings=SimpleNamespace(http_workers=2))
    assert readiness(master) == "worker slot 1 has no ready worker"
    fleet.workers[1] = SimpleNamespace(ready=True, applied_generation=2)
    assert readiness(master) == "worker 1 has not applied configuration generation 3"
    fleet.workers[1].applied_generation = 3
    assert readiness(master) is None
    master.db.detector.connectionIsDead = True
    assert readiness(master) == "database unreachable"
    master.db.detector.connectionIsDead = False
    master.reloader.reloading = True
    assert readiness(master) == "configuration reload under way"
    master._stopping = True
    assert readiness(master) == "shutting down"


def test_counters_survive_a_worker_restart_and_listeners_beyond_the_rows_are_other(tmp_path):
    from omni_httpd.common import scoreboard as sb

    path = str(tmp_path / "scoreboard")
    master = sb.Scoreboard(path, 2, create=True)
    worker = sb.Scoreboard(path, 2)
    try:
        counters = worker.writer(1)
        record = counters.recorder(7, 0)
        for status, seconds in ((200, 0.0005), (404, 0.001), (503, 0.3), (None, 0.0), (700, 99.0)):
            record(status, seconds)
        counters.recorder(7, 1)(204, 0.002)
        counters.count(sb.HANDLER_ERRORS)
        counters.set(sb.OPEN_CONNECTIONS, 3)
        totals = master.totals()
        assert totals.requests == {("7", "h1", "2xx"): 1, ("7", "h1", "4xx"): 1, ("7", "h1", "5xx"): 1,
                                   ("7", "h1", "other"): 2, ("7", "h2", "2xx"): 1}
        buckets, total = totals.durations["7"]
        # le=0.001 holds 0.0005, 0.001 and 0.0; 0.0025 the 0.002; 0.5 the 0.3; +Inf the 99
        assert buckets[0] == 3 and buckets[1] == 1 and buckets[8] == 1 and buckets[-1] == 1
        assert sum(buckets) == 6 and abs(total - 99.3035) < 1e-9
        assert totals.slot[sb.HANDLER_ERRORS] == 1 and totals.gauges == [3, 0]

        master.worker_down(1, restarted=True)          # folded: kept, and the block is zeroed
        assert master.counters(1).requests == {}
        after = master.totals()
        assert after.requests == totals.requests and after.gauges == [0, 0]
        replacement = worker.writer(1)
        replacement.recorder(7, 0)(200, 0.01)
        assert master.totals().requests[("7", "h1", "2xx")] == 2

        for listener in range(100, 100 + sb.LISTENER_ROWS + 5):
            replacement.recorder(listener, 0)(200, 0.01)
        labels = {key[0] for key in master.totals().requests}
        assert "other" in labels and len(labels) == sb.LISTENER_ROWS   # "7", 14 more named, "other"
    finally:
        worker.close()
        master.close()


def test_json_log_lines_carry_the_text_fields():
    from twisted.logger import LogLevel
    from twisted.python.failure import Failure

    from omni_httpd.common import logformat

    event = dict(log_level=LogLevel.info, log_namespace="omni_httpd.access", log_time=1700000000.25,
                 log_format='{peer} "{method} {path}" {status}', peer="127.0.0.1:5", method="GET",
                 path="/x?y", protocol="HTTP/1.1", status=200, bytes=2, duration_ms=1.5, worker="w0")
    line = json.loads(logformat.json_line(event))
    assert line == {"time": "2023-11-14T22:13:20.250Z", "level": "info", "worker": None,
                    "namespace": "omni_httpd.access", "message": '127.0.0.1:5 "GET /x?y" 200',
                    "peer": "127.0.0.1:5", "method": "GET", "path": "/x?y", "protocol": "HTTP/1.1",
                    "status": 200, "bytes": 2, "duration": 0.0015}
    try:
        1 / 0
    except ZeroDivisionError:
        failure = Failure()
    line = json.loads(logformat.json_line(dict(log_level=LogLevel.error, log_format="boom {x}", x=object(),
                                               log_namespace="n", log_failure=failure)))
    assert line["message"].startswith("boom <object") and "ZeroDivisionError" in line["traceback"]
    assert "\n" not in logformat.json_line(dict(log_format="a\nb"))


def test_options_metrics_and_log_format():
    from omni_httpd.master.tap import Options

    options = Options(environ={"OMNI_HTTPD_LOG_FORMAT": "json"})
    options.parseOptions(["--metrics", "tcp:0:interface=127.0.0.1"])
    assert options.settings.metrics == "tcp:0:interface=127.0.0.1" and options.settings.log_format == "json"
    options = Options(environ={})
    options.parseOptions(["--metrics", "none"])
    assert options.settings.metrics is None and options.settings.log_format == "text"
    for argv in (["--log-format", "xml"], ["--metrics", "tcp:99999"], ["--metrics", "nonsense:1"]):
        with pytest.raises(SystemExit):
            Options(environ={}).parseOptions(argv)


def test_a_metrics_port_in_use_is_one_line_and_exit_status_1(dsn):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        daemon = Daemon(dsn, "--no-init", "--admin", "none", "--metrics", "tcp:%d:interface=127.0.0.1" % port)
        try:
            assert daemon.proc.wait(60) == 1, daemon.output[-3000:]
        finally:
            daemon.stop(signal.SIGKILL)
    daemon.wait_for(r"omni_httpd: error: metrics: cannot listen on tcp:%d:interface=127\.0\.0\.1: " % port)
    assert "Traceback" not in daemon.output
