"""Where a request runs: on this worker's DB thread, or on an idle sibling worker.

HTTP/1 requests always run here, in order. An HTTP/2 stream (``allow_remote``) whose
request is ready while this worker's DB thread is busy goes to a sibling the scoreboard
shows idle; only when every sibling is busy too does it wait here. Either way the
Response comes back through the same path to the protocol that asked.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional

from twisted.internet import defer
from twisted.logger import Logger

from omni_httpd.common.request import Request
from omni_httpd.common.response import Response, error_response

log = Logger()


def sibling_socket_path(run_dir: str, slot: int) -> str:
    return os.path.join(run_dir, "worker-%d.sock" % slot)


class Dispatcher:
    def __init__(self, executor, dbthread, scoreboard, slot: int, run_dir: str, slots: int):
        self.executor = executor
        #: metrics (worker/main.py sets it with --metrics): a stream re-sent to a sibling
        self.count_redispatched: Callable[[], object] = lambda: None
        self.dbthread = dbthread
        self.scoreboard = scoreboard
        self.slot = slot
        self.run_dir = run_dir
        self.slots = slots
        self._clients: Dict[int, object] = {}
        self._next = (slot + 1) % max(slots, 1)

    def dispatch(self, request: Request, allow_remote: bool = False) -> defer.Deferred:
        self.scoreboard.count_request(self.slot)
        if allow_remote and self.slots > 1 and self.dbthread.busy:
            sibling = self._idle_sibling()
            if sibling is not None:
                return self._remote(sibling, request)
        return self.executor.execute(request)

    def run_forwarded(self, request: Request) -> defer.Deferred:
        """A request a sibling sent us: run it here, never forward it again."""
        self.scoreboard.count_request(self.slot)
        return self.executor.execute(request)

    def _idle_sibling(self) -> Optional[int]:
        for step in range(self.slots):
            candidate = (self._next + step) % self.slots
            if candidate != self.slot and self.scoreboard.is_idle(candidate):
                self._next = (candidate + 1) % self.slots
                return candidate
        return None

    def _remote(self, slot: int, request: Request) -> defer.Deferred:
        from omni_httpd.worker.siblings import SiblingClient

        # Mark the sibling busy now: until it has received this request and set its own
        # flag, the scoreboard would show it idle and the next stream would pile onto it
        # instead of going to another idle sibling (or waiting here).
        self.scoreboard.set_busy(slot, True)
        self.count_redispatched()

        client = self._clients.get(slot)
        if client is None:
            client = self._clients[slot] = SiblingClient(sibling_socket_path(self.run_dir, slot))
        d = client.run(request)

        def failed(failure) -> Response:
            if failure.check(defer.CancelledError):
                return failure      # the client went away: the channel is fine
            log.warn("request {method} {path} re-sent to worker {slot} failed: {error}",
                     method=request.method, path=request.path, slot=slot, error=failure.getErrorMessage())
            if self._clients.get(slot) is client:
                del self._clients[slot]
                client.close()
            return error_response(502, "Bad gateway")

        return d.addErrback(failed)

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()
