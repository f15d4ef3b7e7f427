"""The ``Date`` header value, formatted at most once per second.

Every response carries a Date header (RFC 9110 6.6.1); formatting it per response costs
more than a dictionary lookup, so the text is cached for the current whole second. HTTP/1
(`http1.py`) and HTTP/2 (`http2.py`) both use it with their own clock's ``seconds()``.
"""
from __future__ import annotations

import time
from typing import Tuple

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

# (whole second, text, bytes); one tuple so a reader never sees a half-updated cache.
_cache: Tuple[int, str, bytes] = (-1, "", b"")


def format_http_date(seconds: float) -> str:
    """IMF-fixdate for ``seconds`` since the epoch, e.g. ``Sun, 06 Nov 1994 08:49:37 GMT``."""
    t = time.gmtime(seconds)
    return "%s, %02d %s %04d %02d:%02d:%02d GMT" % (
        _DAYS[t.tm_wday], t.tm_mday, _MONTHS[t.tm_mon - 1], t.tm_year, t.tm_hour, t.tm_min, t.tm_sec)


def _cached(now: float) -> tuple:
    global _cache
    second = int(now)
    cached = _cache
    if cached[0] != second:
        text = format_http_date(second)
        cached = _cache = (second, text, text.encode("ascii"))
    return cached


def http_date(now: float) -> str:
    """The Date header value for time ``now`` (``clock.seconds()``), cached per second."""
    return _cached(now)[1]


def http_date_bytes(now: float) -> bytes:
    """Like `http_date`, as ASCII bytes (what the HTTP/1 serialiser and h2 want)."""
    return _cached(now)[2]
