"""Re-dispatch transport between workers: real UNIX sockets, a real killed process."""
from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor

from omni_httpd.common.request import Request
from omni_httpd.common.response import ABORT, Response
from omni_httpd.worker.siblings import SiblingClient, SiblingError, SiblingServer
from tests.test_http2 import MB, _poll, within


@pytest.fixture
def socket_dir():
    # UNIX socket paths are limited to ~107 bytes: keep them short.
    path = tempfile.mkdtemp(prefix="sib")
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Executor:
    """Stands in for the worker's local executor; answers are held until released."""

    def __init__(self, hold: bool = False) -> None:
        self.hold = hold
        self.requests = []
        self.deferreds = []

    def __call__(self, request: Request) -> defer.Deferred:
        self.requests.append(request)
        if self.hold:
            d: defer.Deferred = defer.Deferred()
            self.deferreds.append(d)
            return d
        if request.path == "/fail":
            return defer.fail(RuntimeError("executor broke"))
        if request.path == "/abort":
            return defer.succeed(ABORT)
        if request.path == "/null":
            return defer.succeed(Response(204, [("x-a", "1")], None))
        return defer.succeed(Response(200, [("x-len", str(len(request.body))),
                                            ("x-query", repr(request.query_string))],
                                      request.body[::-1]))


@pytest_twisted.async_yield_fixture
async def sibling(socket_dir):
    ports = []
    clients = []

    def start(executor, **kwargs):
        path = os.path.join(socket_dir, "worker-%d.sock" % len(ports))
        server = SiblingServer(executor, **kwargs)
        ports.append(reactor.listenUNIX(path, server))
        client = SiblingClient(path)
        clients.append(client)
        return server, client

    yield start
    for client in clients:
        client.close()
    for port in ports:
        await port.stopListening()


def make_request(**fields) -> Request:
    values = dict(method="POST", path="/p", query_string=None,
                  headers=[("host", "h"), ("x-b", "ünï"), ("x-b", "second")],
                  body=b"", listener_id=9, http_version="2", scheme="https", peer="1.2.3.4:5")
    values.update(fields)
    return Request(**values)


@pytest_twisted.ensureDeferred
async def test_round_trip_keeps_every_field(sibling):
    executor = Executor()
    _server, client = sibling(executor)
    body = bytes(range(256)) * 3
    response = await within(client.run(make_request(body=body, query_string="")))
    assert executor.requests == [make_request(body=body, query_string="")]
    assert response.status == 200
    assert response.headers == [("x-len", "768"), ("x-query", "''")]
    assert response.body == body[::-1] and not response.abort
    none_query = await within(client.run(make_request()))
    assert ("x-query", "None") in none_query.headers
    null = await within(client.run(make_request(path="/null")))
    assert (null.status, null.headers, null.body) == (204, [("x-a", "1")], None)
    aborted = await within(client.run(make_request(path="/abort")))
    assert aborted.abort


@pytest_twisted.ensureDeferred
async def test_ten_megabyte_bodies(sibling):
    _server, client = sibling(Executor(), max_body=16 * MB)
    body = os.urandom(10 * MB)
    response = await within(client.run(make_request(body=body)), 60)
    assert response.body == body[::-1]


@pytest_twisted.ensureDeferred
async def test_many_requests_in_flight_on_one_connection(sibling):
    executor = Executor(hold=True)
    server, client = sibling(executor)
    results = [client.run(make_request(path="/%d" % i, body=b"%d" % i)) for i in range(20)]
    await within(_poll(lambda: len(executor.requests) == 20))
    assert len(server.connections) == 1
    assert client.in_flight == 20
    # Answer in reverse order: each answer still reaches its own request.
    for index in reversed(range(20)):
        executor.deferreds[index].callback(
            Response(200, [], executor.requests[index].path.encode()))
    bodies = [(await within(d)).body for d in results]
    assert bodies == [b"/%d" % i for i in range(20)]
    assert client.in_flight == 0


@pytest_twisted.ensureDeferred
async def test_a_cancelled_request_is_cancelled_on_the_sibling_and_the_channel_survives(sibling):
    executor = Executor(hold=True)
    _server, client = sibling(executor)
    first = client.run(make_request(path="/gone"))
    await within(_poll(lambda: len(executor.requests) == 1))
    first.addErrback(lambda f: None)      # the caller expects CancelledError
    first.cancel()
    # The sibling hears of it: its executor's Deferred (queued work) is cancelled (and
    # fired by that: a DB thread job never starts then).
    await within(_poll(lambda: executor.deferreds[0].called))
    assert client.in_flight == 0
    # The same connection still carries requests.
    second = client.run(make_request(path="/next"))
    await within(_poll(lambda: len(executor.requests) == 2))
    executor.deferreds[1].callback(Response(200, [], b"still here"))
    assert (await within(second)).body == b"still here"


@pytest_twisted.ensureDeferred
async def test_executor_failure_fails_only_that_request(sibling):
    _server, client = sibling(Executor())
    with pytest.raises(SiblingError, match="executor broke"):
        await within(client.run(make_request(path="/fail")))
    assert (await within(client.run(make_request(body=b"ok")))).body == b"ko"


@pytest_twisted.ensureDeferred
async def test_oversized_request_is_refused(sibling):
    executor = Executor()
    _server, client = sibling(executor, max_body=1000)
    with pytest.raises(SiblingError, match="went away"):
        await within(client.run(make_request(body=b"x" * 5000)))
    assert executor.requests == []
    # The client connects again for the next request.
    assert (await within(client.run(make_request(body=b"small")))).body == b"llams"


@pytest_twisted.ensureDeferred
async def test_no_sibling_listening(socket_dir):
    client = SiblingClient(os.path.join(socket_dir, "nobody.sock"))
    with pytest.raises(SiblingError, match="cannot connect"):
        await within(client.run(make_request()))


@pytest_twisted.ensureDeferred
async def test_sibling_closing_its_end_fails_pending(sibling):
    executor = Executor(hold=True)
    server, client = sibling(executor)
    pending = [client.run(make_request()) for _ in range(3)]
    await within(_poll(lambda: len(executor.requests) == 3))
    for connection in list(server.connections):
        connection.transport.abortConnection()
    for d in pending:
        with pytest.raises(SiblingError, match="went away with 3 request"):
            await within(d)
    # A late answer from the executor is dropped quietly.
    executor.deferreds[0].callback(Response(200, [], b"late"))


_SERVER_SCRIPT = r"""
import sys
from twisted.internet import defer, reactor
from omni_httpd.worker.siblings import SiblingServer

def execute(request):
    sys.stdout.write("got %s\n" % request.path)
    sys.stdout.flush()
    return defer.Deferred()   # never answers: the test kills us mid-request

reactor.listenUNIX(sys.argv[1], SiblingServer(execute))
sys.stdout.write("ready\n")
sys.stdout.flush()
reactor.run()
"""


class _Watch(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.ended: defer.Deferred = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    def processEnded(self, reason) -> None:
        self.ended.callback(reason.value)


@pytest_twisted.ensureDeferred
async def test_sibling_process_killed_mid_request(socket_dir):
    path = os.path.join(socket_dir, "worker-1.sock")
    watch = _Watch()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    process = reactor.spawnProcess(watch, sys.executable, [sys.executable, "-c", _SERVER_SCRIPT, path],
                                   env=env)
    try:
        await within(_poll(lambda: b"ready\n" in watch.output))
        client = SiblingClient(path)
        first = client.run(make_request(path="/one", body=b"a" * MB))
        second = client.run(make_request(path="/two"))
        await within(_poll(lambda: b"got /two\n" in watch.output))
        process.signalProcess(signal.SIGKILL)
        for d in (first, second):
            with pytest.raises(SiblingError, match="went away with 2 request"):
                await within(d)
        # Once the process is gone (its listening socket with it), the next request
        # fails at connect time.
        await within(watch.ended)
        with pytest.raises(SiblingError, match="cannot connect"):
            await within(client.run(make_request()))
    finally:
        if process.pid is not None:
            process.signalProcess(signal.SIGKILL)
        if not watch.ended.called:
            await within(watch.ended)
