"""What the connections of one listener share, passed to each protocol as one object."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from omni_httpd.common.settings import Settings


def _count_nothing(status, duration_s: float) -> None:
    pass


@dataclass(frozen=True)
class ListenerContext:
    """What the connections of one listener share (one per listener and worker).

    ``dispatch(request, allow_remote)`` runs a request (dispatch.py); HTTP/1 never lets a
    request leave its worker, HTTP/2 may. ``record_h1`` / ``record_h2``
    ``(status, duration_s)`` count one answered request in the worker's metrics
    (common/scoreboard.py's `SlotCounters.recorder`); the default counts nothing.
    """

    dispatch: Callable[..., Any]
    settings: Settings
    listener_id: int
    scheme: str = "http"
    clock: Any = None
    worker_label: str = ""
    record_h1: Callable[[Any, float], None] = _count_nothing
    record_h2: Callable[[Any, float], None] = _count_nothing

    def __post_init__(self):
        if self.clock is None:
            from twisted.internet import reactor
            object.__setattr__(self, "clock", reactor)
