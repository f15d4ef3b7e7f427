"""Reloading: read the configuration, (re)bind listeners, push it to every worker, record it.

A reload is requested by NOTIFY (triggers on the configuration tables), by the admin
console, or when the master's database connection comes back. Requests arriving while
a reload runs are folded into one more reload after it. Listeners whose address, port
and protocol did not change keep their sockets, so their connections are untouched;
handler-only changes never restart a worker.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Tuple

from twisted.internet import defer
from twisted.logger import Logger

from omni_httpd.master import config as configuration
from omni_httpd.master import listeners
from omni_httpd.master import queries
from omni_httpd.master import static_config
from omni_httpd.master.config import Configuration

log = Logger()


class Reloader:
    def __init__(self, settings, db, slots: int):
        self.settings = settings
        self.db = db  # txpostgres connection
        self.slots = slots
        self.fleet = None
        self.config = Configuration([])
        self.static_files: Dict[int, List[dict]] = {}   # listener id -> static_config entries
        self.bound: Dict[int, listeners.BoundListener] = {}
        self.generation = 0
        self.last_reload = None
        self._running = False
        self._pending = False
        self._started = False
        #: metrics: called with the seconds from the first request to applied (None: not
        #: requested, the first start's) each time a generation is applied by all workers
        self.on_applied: Callable[[Optional[float]], object] = lambda seconds: None
        self._requested_at: Optional[float] = None

    # -- what the fleet asks for ----------------------------------------------------------
    def listener_fds(self, slot: int) -> Dict[int, int]:
        return {b.bind_id: b.sockets[slot].fileno() for b in self.bound.values() if b.ok}

    def config_message(self, worker) -> Tuple[dict, list, list]:
        fds, entries, bind_ids = [], [], []
        for spec in self.config.listeners:
            bound = self.bound.get(spec.id)
            if bound is None or not bound.ok:
                continue
            entry = dict(id=spec.id, address=spec.address, port=bound.effective_port,
                         protocol=spec.protocol, bind_id=bound.bind_id,
                         family=int(bound.family),
                         handler=None if spec.handler is None else dict(
                             id=spec.handler.id, query=spec.handler.query,
                             role_name=spec.handler.role_name))
            entry["static_files"] = self.static_files.get(spec.id, [])
            if bound.bind_id not in worker.bind_ids:
                entry["fd_index"] = len(fds)
                fds.append(bound.sockets[worker.slot].fileno())
            entries.append(entry)
            bind_ids.append(bound.bind_id)
        message = dict(type="config", generation=self.generation, listeners=entries,
                       routes=[route.to_message() for route in self.config.routes])
        return message, fds, bind_ids

    # -- reloading ----------------------------------------------------------------------
    @defer.inlineCallbacks
    def load(self):
        """Read the configuration and bind what changed; no push (used at start-up)."""
        new = yield configuration.load(self.db)
        self.static_files = yield static_config.load(self.db, self.settings.static_roots)
        self._rebind(new)
        yield self._write_effective_ports()

    def request(self) -> None:
        """Ask for a reload; several requests while one runs make one more reload."""
        if self._requested_at is None:
            self._requested_at = time.monotonic()
        if self._running or not self._started:
            self._pending = True
            return
        self._run()

    def started(self) -> None:
        """The first configuration is applied: serve reload requests from now on."""
        self._started = True
        if self._pending:
            self._run()

    @defer.inlineCallbacks
    def _run(self):
        self._running = True
        try:
            while True:
                self._pending = False
                try:
                    yield self.reload_once()
                except defer.CancelledError:
                    return
                except Exception as exc:
                    log.error("reload failed: {error}", error=_one_line(exc))
                if not self._pending or self.fleet is None or self.fleet.stopping:
                    break
        finally:
            self._running = False

    @property
    def reloading(self) -> bool:
        """A reload is running or requested."""
        return self._running or self._pending

    @defer.inlineCallbacks
    def reload_once(self):
        requested, self._requested_at = self._requested_at, None
        yield self.load()
        yield self.apply(requested)

    @defer.inlineCallbacks
    def apply(self, requested_at: Optional[float] = None):
        """Push the current configuration as a new generation and record it when applied."""
        self.generation += 1
        generation = self.generation
        yield self.fleet.push(generation)
        yield self.db.runOperation(queries.RECORD_RELOAD)
        rows = yield self.db.runQuery(queries.LAST_RELOAD)
        self.last_reload = rows[0][0] if rows else None
        self.on_applied(None if requested_at is None else time.monotonic() - requested_at)
        log.info("configuration generation {generation} applied by all workers: {summary}",
                 generation=generation, summary=self.summary())

    def summary(self) -> str:
        parts = []
        for spec in self.config.listeners:
            bound = self.bound.get(spec.id)
            where = "%s://%s:%s" % (spec.protocol, spec.address, bound.effective_port if bound and bound.ok else spec.port)
            what = ("handler %d" % spec.handler.id) if spec.handler else "no handler"
            state = "" if bound and bound.ok else " (NOT BOUND: %s)" % (bound.error if bound else "?")
            parts.append("listener %d %s -> %s%s" % (spec.id, where, what, state))
        if self.config.routes:
            parts.append("%d routes" % len(self.config.routes))
        return "; ".join(parts) or "no listeners"

    def _rebind(self, new: Configuration) -> None:
        old_bound = self.bound
        bound: Dict[int, listeners.BoundListener] = {}
        taken: Dict[Tuple[str, int], int] = {}
        tls = bool(self.settings.tls_cert and self.settings.tls_key)
        for spec in new.listeners:
            previous = old_bound.get(spec.id)
            if previous is not None and previous.ok and previous.spec.socket_key == spec.socket_key:
                previous.spec = spec
                bound[spec.id] = previous
            elif spec.port and (spec.address, spec.port) in taken:
                result = listeners.BoundListener(spec=spec)
                result.error = "%s:%d is already used by listener %d" % (
                    spec.address, spec.port, taken[(spec.address, spec.port)])
                bound[spec.id] = result
            else:
                result = listeners.bind(spec, self.slots, tls)
                bound[spec.id] = result
                if result.ok:
                    log.info("listener {id} bound to {protocol}://{address}:{port}",
                             id=spec.id, protocol=spec.protocol, address=spec.address,
                             port=result.effective_port)
            if bound[spec.id].error:
                log.error("listener {id} ({address}:{port}) not served: {error}", id=spec.id,
                          address=spec.address, port=spec.port, error=bound[spec.id].error)
            elif spec.port:
                taken[(spec.address, spec.port)] = spec.id
        for listener_id, previous in old_bound.items():
            if bound.get(listener_id) is not previous:
                # Workers hold their own duplicates until they apply the new generation.
                previous.close()
        self.bound = bound
        self.config = new

    @defer.inlineCallbacks
    def _write_effective_ports(self):
        for spec in self.config.listeners:
            bound = self.bound[spec.id]
            port = bound.effective_port if bound.ok else 0
            yield self.db.runOperation(queries.SET_EFFECTIVE_PORT, (port, spec.id, port))

    def close(self) -> None:
        for bound in self.bound.values():
            bound.close()

    # -- for the admin console ------------------------------------------------------------
    def route_states(self) -> List[dict]:
        return [dict(id=route.id, router=route.router, pattern=route.pattern, method=route.method,
                     handler=route.handler, priority=route.priority, description=route.describe())
                for route in self.config.routes]

    def listener_states(self) -> List[dict]:
        rows = []
        for spec in self.config.listeners:
            bound = self.bound.get(spec.id)
            rows.append(dict(id=spec.id, address=spec.address, port=spec.port,
                             effective_port=bound.effective_port if bound and bound.ok else 0,
                             protocol=spec.protocol,
                             handler_id=spec.handler.id if spec.handler else None,
                             status="bound" if bound and bound.ok else ("error" if bound else "pending"),
                             error=bound.error if bound else None))
        return rows


def _one_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__
