"""One access-log line per request, through twisted.logger (SPEC 8).

Callers check ``settings.access_log`` first and do not call `log_request` at all when it
is off, so a disabled access log costs one attribute test per request. When it is on,
the event carries the fields and the text is only formatted by whichever observer
writes it out (the worker's stderr observer, relayed by the master).

Line format (namespace ``omni_httpd.access``)::

    127.0.0.1:50312 "GET /users/john?x=1 HTTP/1.1" 200 512 1.3ms worker=w0

``bytes`` is the number of body bytes sent (0 for HEAD, 204, 304 and aborts);
``-`` stands for a value the request never had (a request line that did not parse).
"""
from __future__ import annotations

from typing import Optional

from twisted.logger import Logger

from omni_httpd.common.request import Request

log = Logger(namespace="omni_httpd.access")

_FORMAT = '{peer} "{method} {path} {protocol}" {status} {bytes} {duration_ms:.1f}ms worker={worker}'


def log_request(request: Optional[Request], method: str, path: str, status: int, bytes_sent: int,
                duration_s: float, worker_label: str, protocol: str) -> None:
    """Emit the access-log event for one answered request.

    ``request`` may be None for answers the server generated before a request existed
    (400, 408, 431, ...); ``method`` and ``path`` are then whatever was known, or "-".
    ``path`` should include ``?query`` when there was one. ``protocol`` is e.g.
    ``HTTP/1.1`` or ``HTTP/2``.
    """
    log.info(_FORMAT, peer=(request.peer if request is not None else "") or "-",
             method=method or "-", path=path or "-", protocol=protocol, status=status,
             bytes=bytes_sent, duration_ms=duration_s * 1000.0, worker=worker_label or "-")
