"""The master's probes and metrics (``--metrics ENDPOINT``): ``/live``, ``/ready``, ``/metrics``.

- ``GET /live``: 200 ``live`` while the master's reactor runs.
- ``GET /ready``: 200 ``ready`` only when the database is reachable (the master's own
  connection, and every worker's), every worker slot has a ready worker, and every
  worker runs the latest configuration generation with no reload under way; else 503
  with one line saying why (`readiness`).
- ``GET /metrics``: the Prometheus text format (prometheus_client). `FleetCollector`
  reads everything at scrape time: the workers' counters from the scoreboard's shared
  memory (common/scoreboard.py; a worker counts a request with a few memory stores and
  never sends the master a message for it), worker restarts, /proc for the workers'
  memory and CPU; the library's process collector covers the master itself.

Only GET (and HEAD) of exactly these three paths is answered; any other path is 404,
any other method 405. Request bodies are discarded unread (at most 64 KiB, then the
connection is dropped), idle connections time out, at most 32 are open at once:
nothing a client sends is kept, and what clients can hold is bounded. The
endpoint has no authentication (like PostgREST's admin server): bind it to a private
interface (the default is 127.0.0.1).
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Iterator, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST, disable_created_metrics
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from twisted.web import http, resource, server

from omni_httpd.common import scoreboard as sb

if TYPE_CHECKING:
    from omni_httpd.master.service import MasterService

#: request bytes a probe connection may send before it is dropped (bodies are discarded)
MAX_BODY = 64 * 1024
#: seconds an idle probe connection stays open
IDLE_TIMEOUT = 30
#: connections open at once; more are closed as they are accepted
MAX_CONNECTIONS = 32
#: buckets of the reload duration histogram (seconds from the request to applied)
RELOAD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

try:
    _TICKS = os.sysconf("SC_CLK_TCK")
    _PAGE = os.sysconf("SC_PAGE_SIZE")
except (ValueError, OSError, AttributeError):   # not Linux: no worker process figures
    _TICKS, _PAGE = 100, 4096


class MasterMetrics:
    """What the master itself counts (the workers count in the scoreboard)."""

    def __init__(self, master: "MasterService"):
        # No *_created series: they double the output and mean nothing to the alerts.
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=False)
        self.reloads = Counter("omni_httpd_configuration_reloads", "Configuration generations "
                               "applied by every worker (the first start's included).",
                               registry=self.registry)
        self.reload_seconds = Histogram(
            "omni_httpd_configuration_reload_seconds",
            "Seconds from a reload request (the NOTIFY the change's commit sent, the "
            "console's button, the master's reconnection) to its configuration applied by "
            "every worker.", buckets=RELOAD_BUCKETS, registry=self.registry)
        self.master_reconnects = Counter("omni_httpd_master_database_reconnects",
                                         "Reconnections of the master's LISTEN connection.",
                                         registry=self.registry)
        ProcessCollector(registry=self.registry)
        self.registry.register(FleetCollector(master))

    def reload_applied(self, seconds: Optional[float]) -> None:
        self.reloads.inc()
        if seconds is not None:
            self.reload_seconds.observe(seconds)


def readiness(master: "MasterService") -> Optional[str]:
    """None when ready, else the reason (one short line)."""
    if master._stopping:
        return "shutting down"
    fleet, reloader, board = master.fleet, master.reloader, master.scoreboard
    if fleet is None or reloader is None or board is None or not master.ready.called:
        return "starting"
    detector = getattr(master.db, "detector", None)
    if master.db is None or (detector is not None and detector.connectionIsDead):
        return "database unreachable"
    for slot in range(master.settings.http_workers):
        worker = fleet.workers.get(slot)
        if worker is None or not worker.ready:
            return "worker slot %d has no ready worker" % slot
        if not board.db_connected(slot):
            return "worker %d has no database connection" % slot
        if worker.applied_generation < fleet.generation:
            return "worker %d has not applied configuration generation %d" % (slot, fleet.generation)
    if reloader.reloading:
        return "configuration reload under way"
    return None


class FleetCollector(Collector):
    """The workers' figures, read from the scoreboard and /proc at each scrape."""

    def __init__(self, master: "MasterService"):
        self._master = master

    def collect(self) -> Iterator:
        master = self._master
        board = master.scoreboard
        yield GaugeMetricFamily("omni_httpd_ready", "1 when /ready answers 200.",
                                value=1 if readiness(master) is None else 0)
        if board is None:
            return
        totals = board.totals()
        requests = CounterMetricFamily(
            "omni_httpd_requests", "Answered requests (aborts and statuses 600..999: "
            "status_class=\"other\").", labels=["listener", "protocol", "status_class"])
        for (listener, protocol, status_class), n in sorted(totals.requests.items()):
            requests.add_metric([listener, protocol, status_class], n)
        yield requests
        durations = HistogramMetricFamily(
            "omni_httpd_request_duration_seconds",
            "Seconds from a request's arrival to its answer being written.", labels=["listener"])
        bounds = [repr(b) for b in sb.BUCKETS] + ["+Inf"]
        for listener, (buckets, total) in sorted(totals.durations.items()):
            cumulative, running = [], 0
            for bound, n in zip(bounds, buckets):
                running += n
                cumulative.append((bound, running))
            durations.add_metric([listener], cumulative, total)
        yield durations
        slot = totals.slot
        for name, index, text in (
                ("omni_httpd_handler_errors", sb.HANDLER_ERRORS,
                 "Requests whose handler failed (answered 500)."),
                ("omni_httpd_database_unavailable_responses", sb.DB_UNAVAILABLE,
                 "Requests answered 503 because the worker's database connection was down."),
                ("omni_httpd_http2_streams_redispatched", sb.REDISPATCHED,
                 "HTTP/2 streams re-sent to an idle sibling worker."),
                ("omni_httpd_worker_database_reconnects", sb.DB_RECONNECTS,
                 "Database reconnections of the workers' DB threads.")):
            yield CounterMetricFamily(name, text, value=slot[index])
        yield GaugeMetricFamily("omni_httpd_open_connections",
                                "Open client connections (sampled by each worker every second).",
                                value=totals.gauges[0])
        yield GaugeMetricFamily("omni_httpd_requests_in_flight",
                                "Requests received and not answered yet (sampled every second).",
                                value=totals.gauges[1])
        yield from self._workers(board)
        fleet = master.fleet
        if fleet is not None:
            yield GaugeMetricFamily("omni_httpd_configuration_generation",
                                    "The latest configuration generation pushed to the workers.",
                                    value=fleet.generation)

    def _workers(self, board: sb.Scoreboard) -> Iterator:
        rows = board.snapshot()
        restarts = CounterMetricFamily("omni_httpd_worker_restarts",
                                       "Worker processes restarted after they ended.",
                                       labels=["slot"])
        states = GaugeMetricFamily("omni_httpd_workers", "Worker slots by state.",
                                   labels=["state"])
        counts = {"down": 0, "starting": 0, "idle": 0, "busy": 0}
        memory = GaugeMetricFamily("omni_httpd_worker_resident_memory_bytes",
                                   "Resident memory of each slot's worker process.",
                                   labels=["slot"])
        cpu = CounterMetricFamily("omni_httpd_worker_cpu_seconds",
                                  "User and system CPU time of each slot's current worker "
                                  "process (resets when the worker is restarted).",
                                  labels=["slot"])
        for row in rows:
            label = str(row["slot"])
            restarts.add_metric([label], row["restarts"])
            counts[row["state"]] = counts.get(row["state"], 0) + 1
            figures = _process_figures(row["pid"]) if row["pid"] else None
            if figures is not None:
                memory.add_metric([label], figures[0])
                cpu.add_metric([label], figures[1])
        for state, n in counts.items():
            states.add_metric([state], n)
        return [restarts, states, memory, cpu]


def _process_figures(pid: int):
    """(resident bytes, CPU seconds) of process ``pid`` from /proc, None if unreadable."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as handle:
            stat = handle.read()
        with open("/proc/%d/statm" % pid, "rb") as handle:
            statm = handle.read()
    except OSError:
        return None
    try:
        # The command name (2nd field) may hold spaces: split after its closing ")".
        fields = stat[stat.rindex(b")") + 2:].split()
        cpu = (int(fields[11]) + int(fields[12])) / _TICKS   # utime, stime (fields 14, 15)
        return int(statm.split()[1]) * _PAGE, cpu
    except (ValueError, IndexError):
        return None


# -- the HTTP side ------------------------------------------------------------------------
class _ProbeRequest(server.Request):
    """A request whose body is discarded as it arrives, and bounded."""

    def gotLength(self, length) -> None:
        super().gotLength(0)
        self._received = 0

    def handleContentChunk(self, data: bytes) -> None:
        self._received += len(data)
        if self._received > MAX_BODY:
            self.channel.transport.abortConnection()


class _ProbeChannel(http.HTTPChannel):
    def connectionMade(self) -> None:
        site = self.factory
        site.open_connections += 1
        if site.open_connections > MAX_CONNECTIONS:
            self.transport.abortConnection()
            return
        super().connectionMade()

    def connectionLost(self, reason) -> None:
        self.factory.open_connections -= 1
        super().connectionLost(reason)


class _ProbeSite(server.Site):
    protocol = _ProbeChannel
    open_connections = 0


class _Text(resource.Resource):
    isLeaf = True

    def __init__(self, answer):
        super().__init__()
        self._answer = answer   # () -> (status, content type, body bytes)

    def render(self, request):
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(http.NOT_ALLOWED)
            request.setHeader(b"allow", b"GET, HEAD")
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"method not allowed\n"
        return super().render(request)

    def render_GET(self, request):
        if request.postpath and request.postpath != [b""]:
            return _NotFound().render(request)
        status, content_type, body = self._answer()
        request.setResponseCode(status)
        request.setHeader(b"content-type", content_type)
        request.setHeader(b"cache-control", b"no-store")
        return body


class _NotFound(resource.Resource):
    isLeaf = True

    def render(self, request):
        request.setResponseCode(http.NOT_FOUND)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"not found\n"


class _Root(_NotFound):
    """``/`` and every path but the three: 404."""

    isLeaf = False

    def getChild(self, path, request):
        return _NotFound()


def site(master: "MasterService", registry: CollectorRegistry) -> server.Site:
    """The probes' and metrics' web site for ``master``."""
    text = b"text/plain; charset=utf-8"

    def live():
        return 200, text, b"live\n"

    def ready():
        reason = readiness(master)
        if reason is None:
            return 200, text, b"ready\n"
        return 503, text, reason.encode("utf-8", "replace") + b"\n"

    def metrics():
        return 200, CONTENT_TYPE_LATEST.encode("ascii"), generate_latest(registry)

    root = _Root()
    root.putChild(b"live", _Text(live))
    root.putChild(b"ready", _Text(ready))
    root.putChild(b"metrics", _Text(metrics))
    result = _ProbeSite(root, timeout=IDLE_TIMEOUT)
    result.requestFactory = _ProbeRequest
    result.displayTracebacks = False
    result.log = lambda request: None   # scrapes and probes are not traffic worth a log line
    result.noisy = False
    return result
