"""The worker fleet: spawn, watch, restart with backoff, push configurations, stop.

A worker is `python -m omni_httpd.worker` started with ``reactor.spawnProcess``. It
gets its end of a control socketpair as fd 3 and the listening sockets of its slot as
fds 4, 5, ... through ``childFDs``; sockets of listeners added later arrive over the
control channel (SCM_RIGHTS). Its stdout/stderr lines are relayed into the master's log.
With ``account`` (a root master, see privileges.py) it runs as that account, in ``/``.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from typing import Callable, Dict, List, Optional

from twisted.internet import defer
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, LogLevel

from omni_httpd.common import control
from omni_httpd.common.scoreboard import Scoreboard

log = Logger()

#: seconds before the n-th consecutive restart of a slot
BACKOFF = [0.1, 0.5, 1, 2, 5, 10, 30]
#: a worker that lived this long resets its slot's backoff
STABLE_AFTER = 30.0
#: exit status of a worker that could not start (worker.py), e.g. no database connection
STARTUP_FAILED = 3
#: ...such a slot is retried at least this often: while PostgreSQL is away, every start
#: fails at once, and the long crash-loop delays would keep the slot down (its socket's
#: connections unanswered) for up to 30 s after the database is back
STARTUP_RETRY_MAX = 2.0

_LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn,
           "error": LogLevel.error, "critical": LogLevel.critical}


class WorkerProcess(ProcessProtocol):
    """The master's view of one worker process."""

    def __init__(self, fleet: "Fleet", slot: int):
        self.fleet = fleet
        self.slot = slot
        self.pid: Optional[int] = None
        self.control: Optional[control.ControlProtocol] = None
        self.ready = False
        self.applied_generation = 0
        self.bind_ids: set = set()
        self.started_at = time.monotonic()
        self.exited = defer.Deferred()
        self.kill_call = None
        self._buffers = {1: b"", 2: b""}

    # -- process events -------------------------------------------------------------
    def connectionMade(self) -> None:
        self.pid = self.transport.pid
        self.transport.closeStdin()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        buffered = self._buffers.get(childFD, b"") + data
        *lines, rest = buffered.split(b"\n")
        self._buffers[childFD] = rest[-65536:]
        for line in lines:
            self._relay(line)

    def _relay(self, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip()
        if not text:
            return
        level, sep, message = text.partition("|")
        if not sep or level not in _LEVELS:
            level, message = "info", text
        relayed = None
        if message.startswith("{") and self.fleet.settings.log_format == "json":
            # --log-format json: the worker's event as an object (common/logformat.py)
            try:
                relayed = json.loads(message)
                message = str(relayed.get("message", ""))
            except ValueError:
                relayed = None
        log.emit(_LEVELS[level], "[worker {slot} pid {pid}] {message}",
                 slot=self.slot, pid=self.pid, message=message, worker_slot=self.slot,
                 omni_httpd_worker_event=relayed)

    def processEnded(self, reason) -> None:
        for fd in (1, 2):
            if self._buffers.get(fd):
                self._relay(self._buffers[fd])
                self._buffers[fd] = b""
        if self.control is not None and self.control.transport is not None:
            self.control.transport.loseConnection()
        if self.kill_call is not None and self.kill_call.active():
            self.kill_call.cancel()
        code = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        self.fleet._worker_ended(self, code, sig)
        self.exited.callback(None)

    # -- control channel ------------------------------------------------------------
    def on_message(self, message: Dict, fds: List[int]) -> None:
        for fd in fds:  # workers never send descriptors
            os.close(fd)
        kind = message.get("type")
        if kind == "ready":
            self.ready = True
            self.fleet._worker_ready(self)
        elif kind == "applied":
            self.applied_generation = int(message["generation"])
            for error in message.get("errors") or []:
                log.warn("worker {slot}: {error}", slot=self.slot, error=error)
            self.fleet._worker_applied(self)

    def send(self, message: Dict, fds=()) -> None:
        if self.control is not None:
            self.control.send(message, fds)


class Fleet:
    """All worker slots. ``config_message(worker)`` builds what a worker must run."""

    def __init__(self, reactor, settings, dsn: str, run_dir: str, scoreboard: Scoreboard,
                 listener_fds: Callable[[], Dict[int, int]],
                 config_message: Callable[[WorkerProcess], tuple], account=None):
        self.reactor = reactor
        self.account = account                # privileges.Account, or None: as the master
        self.settings = settings
        self.dsn = dsn
        self.run_dir = run_dir
        self.scoreboard = scoreboard
        self.listener_fds = listener_fds      # slot -> {bind_id: fd}
        self.config_message = config_message  # worker -> (message, fds, bind_ids)
        self.workers: Dict[int, WorkerProcess] = {}
        self.stopping = False
        self._failures = [0] * settings.http_workers
        self._restart_calls: Dict[int, object] = {}
        self._waiters: List = []  # (generation, Deferred)
        self.generation = 0

    # -- life cycle -------------------------------------------------------------------
    def start(self) -> None:
        for slot in range(self.settings.http_workers):
            self._spawn(slot)

    def _spawn(self, slot: int) -> None:
        self._restart_calls.pop(slot, None)
        if self.stopping:
            return
        worker = WorkerProcess(self, slot)
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        inherited = self.listener_fds(slot)
        child_fds = {0: "w", 1: "r", 2: "r", 3: child_end.fileno()}
        passed = {}
        for number, (bind_id, fd) in enumerate(sorted(inherited.items()), start=4):
            child_fds[number] = fd
            passed[bind_id] = number
        args = [sys.executable, "-m", "omni_httpd.worker.main",
                "--slot", str(slot), "--run-dir", self.run_dir,
                "--inherited", json.dumps(passed)]
        env = dict(os.environ)
        # Absolute ('' is the master's working directory): the worker may start in "/".
        env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in sys.path)
        spawn_as = {}
        if self.account is not None:
            # Twisted's child calls initgroups() (the account's groups) before setuid().
            spawn_as = dict(uid=self.account.uid, gid=self.account.gid, path="/")
            env.update(HOME=self.account.home, USER=self.account.name, LOGNAME=self.account.name)
        env["OMNI_HTTPD_WORKER_DSN"] = self.dsn
        env["OMNI_HTTPD_WORKER_SETTINGS"] = json.dumps(self._settings_for_worker())
        try:
            self.reactor.spawnProcess(worker, sys.executable, args, env=env, childFDs=child_fds,
                                      **spawn_as)
        finally:
            child_end.close()
        worker.bind_ids = set(inherited)
        worker.control = control.adopt(self.reactor, os.dup(parent_end.fileno()),
                                       control.ControlProtocol(worker.on_message))
        parent_end.close()
        self.workers[slot] = worker
        self.scoreboard.worker_started(slot, worker.pid or 0)
        log.info("worker {slot} started (pid {pid})", slot=slot, pid=worker.pid)

    def _settings_for_worker(self) -> Dict:
        from dataclasses import asdict
        return {key: value for key, value in asdict(self.settings).items()
                if key not in ("admin_password", "dsn")}

    def _worker_ready(self, worker: WorkerProcess) -> None:
        self.scoreboard.worker_ready(worker.slot)
        self.push_to(worker)

    def _worker_ended(self, worker: WorkerProcess, code, sig) -> None:
        if self.workers.get(worker.slot) is worker:
            del self.workers[worker.slot]
        lived = time.monotonic() - worker.started_at
        if self.stopping:
            self.scoreboard.worker_down(worker.slot, restarted=False)
            log.info("worker {slot} (pid {pid}) stopped", slot=worker.slot, pid=worker.pid)
            return
        self.scoreboard.worker_down(worker.slot, restarted=True)
        if lived > STABLE_AFTER:
            self._failures[worker.slot] = 0
        delay = BACKOFF[min(self._failures[worker.slot], len(BACKOFF) - 1)]
        if code == STARTUP_FAILED and not worker.ready:
            delay = min(delay, STARTUP_RETRY_MAX)
        self._failures[worker.slot] += 1
        how = "killed by signal %s" % sig if sig else "exited with status %s" % code
        log.warn("worker {slot} (pid {pid}) {how}; restarting in {delay}s",
                 slot=worker.slot, pid=worker.pid, how=how, delay=delay)
        self._restart_calls[worker.slot] = self.reactor.callLater(delay, self._spawn, worker.slot)
        self._check_waiters()

    # -- configurations -----------------------------------------------------------------
    def push(self, generation: int) -> defer.Deferred:
        """Send generation ``generation`` to every ready worker.

        Fires once every live worker runs it (workers started later get it at start).
        """
        self.generation = generation
        waiter = defer.Deferred()
        self._waiters.append((generation, waiter))
        for worker in list(self.workers.values()):
            if worker.ready:
                self.push_to(worker)
        self._check_waiters()
        return waiter

    def push_to(self, worker: WorkerProcess) -> None:
        message, fds, bind_ids = self.config_message(worker)
        worker.send(message, fds)
        worker.bind_ids = set(bind_ids)

    def _worker_applied(self, worker: WorkerProcess) -> None:
        self._check_waiters()

    def _check_waiters(self) -> None:
        live = [w for w in self.workers.values()]
        remaining = []
        for generation, waiter in self._waiters:
            if live and all(w.ready and w.applied_generation >= generation for w in live):
                waiter.callback(generation)
            else:
                remaining.append((generation, waiter))
        self._waiters = remaining

    def stop(self, grace: float) -> defer.Deferred:
        """Ask every worker to finish in-flight requests (at most ``grace`` s) and exit."""
        self.stopping = True
        for call in self._restart_calls.values():
            if call.active():
                call.cancel()
        self._restart_calls.clear()
        exits = []
        for worker in list(self.workers.values()):
            worker.send({"type": "stop", "grace": grace})
            if not worker.ready:
                self._signal(worker, signal.SIGTERM)
            exits.append(worker.exited)
            worker.kill_call = self.reactor.callLater(grace + 5, self._signal, worker, signal.SIGKILL)
        for _generation, waiter in self._waiters:
            waiter.cancel()
        self._waiters = []
        return defer.DeferredList(exits)

    def _signal(self, worker: WorkerProcess, signum: int) -> None:
        if not worker.exited.called:
            try:
                worker.transport.signalProcess(signum)
            except Exception:
                pass
