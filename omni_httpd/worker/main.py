"""An HTTP worker process: `python -m omni_httpd.worker` (spawned by fleet.py).

Main thread: the Twisted reactor, all network I/O (listeners adopted from the master,
the sibling socket, the control channel). One DB thread (dbthread.py) holds the
worker's only PostgreSQL connection and runs every handler.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import socket
import sys
from typing import Dict, List

from twisted.internet import defer
from twisted.logger import Logger, formatEvent, globalLogBeginner

from omni_httpd.common.routing import Route, RouteTable
from omni_httpd.common.settings import Settings

log = Logger()

CONTROL_FD = 3
#: seconds between two samples of the open connections and in-flight requests gauges
SAMPLE_EVERY = 1.0
_observers: List["StderrLog"] = []


class Worker:
    def __init__(self, reactor, slot: int, run_dir: str, settings: Settings, dsn: str,
                 inherited: Dict[str, int]):
        self.reactor = reactor
        self.slot = slot
        self.run_dir = run_dir
        self.settings = settings
        self.dsn = dsn
        self.inherited = {int(k): v for k, v in inherited.items()}
        self.label = "w%d" % slot
        self.counters = None       # --metrics: common/scoreboard.py's SlotCounters
        self._sampler = None
        self._db_was_lost = False
        self.handler_map: Dict[int, int] = {}      # listener id -> handler id
        self.ports: Dict[int, tuple] = {}           # listener id -> (bind_id, port, factory)
        self.control = None
        self.dbthread = None
        self.executor = None
        self.dispatcher = None
        self.sibling_port = None
        self.stopping = False
        self.static_files = None
        self.dispatch = None        # the listeners' dispatch: static mounts, then the dispatcher

    # -- start-up ---------------------------------------------------------------------------
    async def start(self) -> None:
        from omni_httpd.common import control
        from omni_httpd.worker.dbthread import DBThread
        from omni_httpd.worker.dispatch import Dispatcher, sibling_socket_path
        from omni_httpd.worker.executor import LocalExecutor
        from omni_httpd.common.scoreboard import Scoreboard
        from omni_httpd.worker.siblings import SiblingServer

        settings = self.settings
        self.scoreboard = Scoreboard(os.path.join(self.run_dir, "scoreboard"), settings.http_workers)
        if settings.metrics:
            # Without --metrics nobody reads the counters: nothing is counted.
            self.counters = self.scoreboard.writer(self.slot)
        self.dbthread = DBThread(self.dsn, reactor=self.reactor, handler_timeout=settings.handler_timeout,
                                 lock_timeout=settings.handler_lock_timeout,
                                 application_name="omni_httpd worker %d" % self.slot)
        self.dbthread.on_busy_change(lambda busy: self.scoreboard.set_busy(self.slot, busy))
        if self.counters is not None:
            self.dbthread.on_connection_change = self._db_connection_changed
        try:
            # A worker (re)started while the database is away serves anyway: its requests
            # get 503 at once instead of waiting in a socket no process reads.
            await self.dbthread.start(keep_trying=True)
        except Exception as exc:
            log.error("cannot connect to the database: {error}", error=str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc))
            self.reactor.callLater(0, self._exit, 3)
            return
        executor = self.executor = LocalExecutor(self.dbthread, self.handler_map.get, reactor=self.reactor,
                                                 settings=settings)
        self.dispatcher = Dispatcher(executor, self.dbthread, self.scoreboard, self.slot,
                                     self.run_dir, settings.http_workers)
        from omni_httpd.worker.static_files import StaticFiles
        self.static_files = StaticFiles(settings.static_roots)
        self.dispatch = self.static_files.wrap(
            self.dispatcher.dispatch, lambda: self.scoreboard.count_request(self.slot))
        path = sibling_socket_path(self.run_dir, self.slot)
        if os.path.exists(path):
            os.unlink(path)
        sibling_server = SiblingServer(self.dispatcher.run_forwarded, max_body=settings.max_body)
        sibling_server.noisy = False
        self.sibling_port = self.reactor.listenUNIX(path, sibling_server, mode=0o600)
        self.control = control.adopt(self.reactor, CONTROL_FD,
                                     control.ControlProtocol(self.on_message, self.on_control_lost))
        self.control.send({"type": "ready", "pid": os.getpid()})
        if self.counters is not None:
            self._count_into(self.counters)

    def _count_into(self, counters) -> None:
        """--metrics: wire the counters (common/scoreboard.py) to what they count."""
        from functools import partial

        from twisted.internet.task import LoopingCall

        from omni_httpd.common import scoreboard as sb

        executor = self.dispatcher.executor
        executor.count_handler_error = partial(counters.count, sb.HANDLER_ERRORS)
        executor.count_unavailable = partial(counters.count, sb.DB_UNAVAILABLE)
        self.dispatcher.count_redispatched = partial(counters.count, sb.REDISPATCHED)
        self._sampler = LoopingCall(self._sample)
        self._sampler.clock = self.reactor
        self._sampler.start(SAMPLE_EVERY)

    def _db_connection_changed(self, connected: bool) -> None:
        from omni_httpd.common.scoreboard import DB_CONNECTED, DB_RECONNECTS
        if connected and self._db_was_lost:
            self.counters.count(DB_RECONNECTS)
        self._db_was_lost = self._db_was_lost or not connected
        self.counters.set(DB_CONNECTED, 1 if connected else 0)

    def _sample(self) -> None:
        """Metrics gauges, sampled: no cost per connection or request."""
        from omni_httpd.common.scoreboard import IN_FLIGHT, OPEN_CONNECTIONS
        connections = in_flight = 0
        for _bind_id, _port, factory in self.ports.values():
            connections += len(factory.connections)
            for connection in factory.connections:
                protocol = connection.protocol
                if protocol is not None:
                    in_flight += protocol.in_flight()
        self.counters.set(OPEN_CONNECTIONS, connections)
        self.counters.set(IN_FLIGHT, in_flight)

    def _exit(self, code: int) -> None:
        for observer in _observers:
            observer.flush()
        os._exit(code)

    # -- control ----------------------------------------------------------------------------------
    def on_message(self, message: dict, fds: List[int]) -> None:
        kind = message.get("type")
        if kind == "config":
            self.apply(message, fds)
        elif kind == "stop":
            self.settings.shutdown_grace = float(message.get("grace", self.settings.shutdown_grace))
            if not self.stopping:
                self.reactor.stop()
        else:
            for fd in fds:
                os.close(fd)

    def on_control_lost(self) -> None:
        # The master is gone: nobody will restart or reconfigure us. Finish and exit.
        if not self.stopping and self.reactor.running:
            log.warn("control channel to the master lost; stopping")
            self.reactor.stop()

    def apply(self, message: dict, fds: List[int]) -> None:
        generation = int(message["generation"])
        wanted = {entry["id"]: entry for entry in message["listeners"]}
        used_fds = set()
        errors = []
        for listener_id, entry in wanted.items():
            current = self.ports.get(listener_id)
            if current is not None and current[0] == entry["bind_id"]:
                continue
            if "fd_index" in entry:
                fd = fds[entry["fd_index"]]
            else:
                fd = self.inherited.get(entry["bind_id"])
            if fd is None:
                errors.append("listener %d: no socket received" % listener_id)
                continue
            used_fds.add(fd)
            try:
                port, factory = self._listen(fd, entry)
            except Exception as exc:
                errors.append("listener %d: %s" % (listener_id, exc))
                continue
            if current is not None:
                self._retire(current)
            self.ports[listener_id] = (entry["bind_id"], port, factory)
        for listener_id in [i for i in self.ports if i not in wanted]:
            self._retire(self.ports.pop(listener_id))
        for fd in list(fds) + list(self.inherited.values()):
            if fd not in used_fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.inherited = {}
        self.static_files.configure([mount for entry in message["listeners"]
                                     for mount in entry.get("static_files", ())])

        handlers = {}
        new_map = {}
        for listener_id, entry in wanted.items():
            handler = entry.get("handler")
            if handler is not None:
                handlers[handler["id"]] = (handler["query"], handler["role_name"])
                new_map[listener_id] = handler["id"]
        # A route refused here (pattern) or by the DB thread (role, signature) is logged
        # there with its description, not reported again in "applied".
        routes = RouteTable(Route.from_message(entry) for entry in message.get("routes", ()))
        # Requests dispatched from now on use the new map and routes and are queued after
        # the installation below; requests already queued run first with the old ones.
        self.handler_map.clear()
        self.handler_map.update(new_map)
        self.executor.set_routes(routes, {listener_id: int(entry["port"])
                                          for listener_id, entry in wanted.items()})
        d = self.dbthread.apply_configuration(generation, handlers, routes.routes)

        def applied(install_errors):
            for handler_id, error in sorted((install_errors or {}).items()):
                errors.append("handler %s cannot be installed: %s" % (handler_id, error))
            self.control.send({"type": "applied", "generation": generation, "errors": errors})

        def failed(failure):
            errors.append("applying the configuration failed: %s" % failure.getErrorMessage())
            self.control.send({"type": "applied", "generation": generation, "errors": errors})

        d.addCallbacks(applied, failed)

    def _listen(self, fd: int, entry: dict):
        from omni_httpd.worker.http.connection import ServerFactory
        from omni_httpd.worker.http.context import ListenerContext

        scheme = entry["protocol"]
        recorders = {}
        if self.counters is not None:
            recorders = dict(record_h1=self.counters.recorder(entry["id"], 0),
                             record_h2=self.counters.recorder(entry["id"], 1))
        factory = ServerFactory(ListenerContext(self.dispatch, self.settings, entry["id"],
                                                scheme, clock=self.reactor, worker_label=self.label,
                                                **recorders))
        factory.noisy = False
        served = factory
        if scheme == "https":
            from twisted.protocols.tls import TLSMemoryBIOFactory

            from omni_httpd.worker.http.tls import server_context_factory

            served = TLSMemoryBIOFactory(server_context_factory(self.settings.tls_cert, self.settings.tls_key),
                                         False, factory)
        port = self.reactor.adoptStreamPort(fd, entry.get("family", socket.AF_INET), served)
        os.close(fd)
        return port, factory

    def _retire(self, current: tuple) -> None:
        _bind_id, port, factory = current
        port.stopListening()
        factory.graceful_close()

    # -- shutdown ---------------------------------------------------------------------------------
    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (bounded), close the database."""
        self.stopping = True
        if self._sampler is not None and self._sampler.running:
            self._sampler.stop()
        factories = [factory for _bind_id, _port, factory in self.ports.values()]
        for _bind_id, port, _factory in self.ports.values():
            await port.stopListening()
        drained = defer.DeferredList([factory.graceful_close() for factory in factories], consumeErrors=True)
        grace = max(self.settings.shutdown_grace, 0)
        timer = self.reactor.callLater(grace, drained.cancel)
        try:
            await drained
        except defer.CancelledError:
            pass
        if timer.active():
            timer.cancel()
        else:
            log.warn("shutdown grace period ({grace}s) over: dropping remaining connections", grace=grace)
            for factory in factories:
                factory.abort_all()
            if self.dbthread is not None:
                # A handler still running must not commit after we have given up on it.
                self.dbthread.cancel_running()
        if self.sibling_port is not None:
            await self.sibling_port.stopListening()
        if self.dispatcher is not None:
            self.dispatcher.close()
        if self.dbthread is not None:
            await self.dbthread.stop()


class StderrLog:
    """Worker log observer: lines `level|text` on stderr, relayed by the master.

    Lines are buffered and written at most every ``FLUSH_EVERY`` seconds (at once for
    warnings and errors): with the access log on, a write per request would cost a
    system call in the worker and a wake-up in the master for every request.
    """

    FLUSH_EVERY = 0.05
    MAX_BUFFER = 64 * 1024

    def __init__(self, stream=None, json_lines: bool = False):
        self.stream = stream if stream is not None else sys.stderr
        # --log-format json: each event is one `level|{json}` line (common/logformat.py)
        self.json_lines = json_lines
        self.reactor = None
        self._buffer: List[str] = []
        self._size = 0
        self._call = None

    def __call__(self, event) -> None:
        try:
            level = event.get("log_level")
            name = level.name if level is not None else "info"
            if self.json_lines:
                from omni_httpd.common.logformat import json_line
                chunk = "%s|%s\n" % (name, json_line(event))
            else:
                text = formatEvent(event)
                failure = event.get("log_failure")
                if failure is not None:
                    text = text + "\n" + failure.getTraceback()
                chunk = "".join("%s|%s\n" % (name, line) for line in text.splitlines() or [""])
            self._buffer.append(chunk)
            self._size += len(chunk)
            if name not in ("debug", "info") or self.reactor is None or self._size > self.MAX_BUFFER:
                self.flush()
            elif self._call is None:
                self._call = self.reactor.callLater(self.FLUSH_EVERY, self.flush)
        except Exception:
            pass

    def flush(self) -> None:
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None
        if self._buffer:
            data, self._buffer, self._size = "".join(self._buffer), [], 0
            try:
                self.stream.write(data)
                self.stream.flush()
            except Exception:
                pass


def _import_reactor_without_tls():
    """The reactor, without pyOpenSSL loaded for TCP's startTLS support.

    twisted.internet.tcp imports pyOpenSSL and cryptography (12 MB per worker) only to
    offer startTLS, which we never use: https listeners wrap their factory in
    twisted.protocols.tls, which imports pyOpenSSL itself when the first one is served.
    """
    blocked = "OpenSSL" not in sys.modules
    if blocked:
        sys.modules["OpenSSL"] = None  # makes `import OpenSSL` fail: tcp falls back
    try:
        importlib.import_module("twisted.internet.tcp")
        from twisted.internet import reactor
    finally:
        if blocked and sys.modules.get("OpenSSL", 0) is None:
            del sys.modules["OpenSSL"]
    return reactor


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="omni_httpd.worker.main")
    parser.add_argument("--slot", type=int, required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--inherited", default="{}")
    args = parser.parse_args(argv)
    settings = Settings(**json.loads(os.environ.get("OMNI_HTTPD_WORKER_SETTINGS", "{}")))
    dsn = os.environ["OMNI_HTTPD_WORKER_DSN"]
    observer = StderrLog(json_lines=settings.log_format == "json")
    _observers.append(observer)
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)

    reactor = _import_reactor_without_tls()

    observer.reactor = reactor
    reactor.addSystemEventTrigger("after", "shutdown", observer.flush)

    worker = Worker(reactor, args.slot, args.run_dir, settings, dsn, json.loads(args.inherited))
    reactor.addSystemEventTrigger("before", "shutdown", lambda: defer.ensureDeferred(worker.stop()))
    reactor.callWhenRunning(lambda: defer.ensureDeferred(worker.start()).addErrback(
        lambda f: (log.failure("worker start-up failed", f), reactor.callLater(0, worker._exit, 3))))
    reactor.run()


if __name__ == "__main__":
    main()
