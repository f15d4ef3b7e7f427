"""``--log-format json``: one JSON object per log line, for log shippers.

The fields are those of the text log: ``time`` (ISO 8601, UTC), ``level``, ``worker``
(the slot number for a worker's line, null for the master's), ``pid`` (a worker's),
``namespace``, ``message`` (the text line's message, formatted), ``traceback`` when the
event carries a failure; an access line (namespace ``omni_httpd.access``) adds ``peer``,
``method``, ``path``, ``protocol``, ``status``, ``bytes`` and ``duration`` (seconds).

A worker writes its events as such objects (one line each, after its ``level|`` prefix,
see worker/main.py's StderrLog); the master parses them back and adds the worker's slot
and pid (fleet.py), so a worker's line comes out as one object too, not as a JSON text
inside a message.
"""
from __future__ import annotations

import json
import time
from typing import Any, Dict, Optional, TextIO

from twisted.logger import FileLogObserver, formatEvent

ACCESS_NAMESPACE = "omni_httpd.access"
FORMATS = ("text", "json")
#: event key of a worker's object relayed by the master (fleet.py)
RELAYED = "omni_httpd_worker_event"


def _iso(timestamp: Optional[float]) -> str:
    if timestamp is None:
        timestamp = time.time()
    seconds = int(timestamp)
    return "%s.%03dZ" % (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)),
                         int((timestamp - seconds) * 1000))


def event_fields(event: Dict[str, Any]) -> Dict[str, Any]:
    """The JSON object of one Twisted log event."""
    relayed = event.get(RELAYED)
    if relayed is not None:
        fields = dict(relayed)
        fields["worker"] = event.get("worker_slot")
        fields["pid"] = event.get("pid")
        return fields
    level = event.get("log_level")
    fields: Dict[str, Any] = {
        "time": _iso(event.get("log_time")),
        "level": level.name if level is not None else "info",
        # a worker's line that was not JSON (e.g. what it printed before its logging
        # started) is still the worker's
        "worker": event.get("worker_slot"),
        "namespace": event.get("log_namespace"),
        "message": formatEvent(event),
    }
    if fields["worker"] is not None:
        fields["pid"] = event.get("pid")
    if fields["namespace"] == ACCESS_NAMESPACE:
        fields.update(peer=event.get("peer"), method=event.get("method"), path=event.get("path"),
                      protocol=event.get("protocol"), status=event.get("status"),
                      bytes=event.get("bytes"),
                      duration=round(float(event.get("duration_ms") or 0.0) / 1000.0, 6))
    failure = event.get("log_failure")
    if failure is not None:
        try:
            fields["traceback"] = failure.getTraceback()
        except Exception:
            fields["traceback"] = repr(failure)
    return fields


def json_line(event: Dict[str, Any]) -> str:
    """One event as one line of JSON (no newline); never raises."""
    try:
        return json.dumps(event_fields(event), default=str, ensure_ascii=False)
    except Exception as exc:   # a field json cannot take even as str()
        return json.dumps({"time": _iso(None), "level": "error", "worker": None,
                           "namespace": __name__, "message": "unloggable event: %r" % exc})


def json_observer(stream: TextIO) -> FileLogObserver:
    """The master's observer for ``--log-format json``."""
    return FileLogObserver(stream, lambda event: json_line(event) + "\n")
