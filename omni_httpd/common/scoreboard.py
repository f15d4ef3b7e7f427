"""Shared memory between the master and its workers: one fixed-size slot per worker.

The master creates the file in its private run directory; every worker maps it. A worker
writes only its own slot (pid, state, busy flag, requests served); the master writes the
restart count. Reading whether a sibling is idle is a memory read: the HTTP/2
re-dispatch decision costs no round trip.

After the slots comes a counters region per slot (`SlotCounters`, the worker's writer;
`Scoreboard.counters`, the master's reader) that the master's /metrics endpoint reads at
scrape time: requests by listener, protocol and status class, a duration histogram per
listener, handler errors, 503s while the database is away, streams re-sent to siblings,
database reconnects; the worker's open connections and in-flight requests (sampled once
a second). Counting a request is a few stores into this memory: no lock, no system
call, no message to the master. 64-bit stores of one writer are not torn on the
platforms we run on; a scrape may see one request's counters half updated (its count
but not yet its histogram bucket), which a scrape a moment later corrects.

When a worker exits the master folds its counters into totals it keeps (`retired`) and
zeroes the region for the replacement, so counters never go down across restarts.
"""
from __future__ import annotations

import bisect
import mmap
import os
import struct
import time
from typing import Callable, Dict, List, Tuple

SLOT_SIZE = 64
# pid, state, busy, pad, requests, restarts, started_at
_LAYOUT = struct.Struct("<iBBxxQIxxxxd")
_BUSY_OFFSET = 5

STATES = {0: "down", 1: "starting", 2: "idle"}
DOWN, STARTING, READY = 0, 1, 2

# -- the counters region: 64-bit words, one block per slot ---------------------------------
#: per-slot words
(HANDLER_ERRORS, DB_UNAVAILABLE, REDISPATCHED, DB_RECONNECTS, DB_CONNECTED,
 OPEN_CONNECTIONS, IN_FLIGHT) = range(7)
SLOT_WORDS = 16
#: upper bounds (seconds) of the request duration histogram; one more bucket for +Inf
BUCKETS: Tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                              1.0, 2.5, 5.0, 10.0)
PROTOCOLS = ("h1", "h2")
#: status classes; "other": an abort (no status) or a status from 600 to 999
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx", "other")
#: one listener row: listener id (0: unused), counts[protocol][class], buckets, sum
_ROW_ID = 0
_ROW_COUNTS = 1
_ROW_BUCKETS = _ROW_COUNTS + len(PROTOCOLS) * len(STATUS_CLASSES)
_ROW_SUM = _ROW_BUCKETS + len(BUCKETS) + 1
ROW_WORDS = _ROW_SUM + 1
#: listener rows per slot; the last one counts for every listener beyond the others
#: (label listener="other"), so the region's size never depends on the configuration
LISTENER_ROWS = 16
COUNTER_WORDS = SLOT_WORDS + ROW_WORDS * LISTENER_ROWS
COUNTER_SIZE = 8 * COUNTER_WORDS
#: the per-slot words that are counters (folded on restart); the others are gauges
_SLOT_COUNTERS = (HANDLER_ERRORS, DB_UNAVAILABLE, REDISPATCHED, DB_RECONNECTS)


class Scoreboard:
    def __init__(self, path: str, slots: int, create: bool = False):
        self.path = path
        self.slots = slots
        self._counters_at = SLOT_SIZE * slots
        size = self._counters_at + COUNTER_SIZE * slots
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._views: List[memoryview] = []
        #: master only: counters of workers that have exited, folded (see `fold`)
        self.retired = Counters()

    def close(self) -> None:
        for view in self._views:
            view.release()
        self._views = []
        self._map.close()

    def _counter_views(self, slot: int) -> Tuple[memoryview, memoryview]:
        """The slot's counters region as 64-bit unsigned words and as doubles."""
        start = self._counters_at + slot * COUNTER_SIZE
        raw = memoryview(self._map)[start:start + COUNTER_SIZE]
        words, floats = raw.cast("Q"), raw.cast("d")
        self._views.extend((words, floats, raw))
        return words, floats

    def writer(self, slot: int) -> "SlotCounters":
        """The worker's writer of its own slot's counters."""
        return SlotCounters(*self._counter_views(slot))

    def counters(self, slot: int) -> "Counters":
        """What slot ``slot``'s current worker has counted (a copy)."""
        start = self._counters_at + slot * COUNTER_SIZE
        words = list(struct.unpack_from("<%dQ" % COUNTER_WORDS, self._map, start))
        return Counters.from_words(words, self._map, start)

    def fold(self, slot: int) -> None:
        """Master, after slot ``slot``'s worker exited: keep its counters, zero the region."""
        self.retired.add(self.counters(slot))
        start = self._counters_at + slot * COUNTER_SIZE
        self._map[start:start + COUNTER_SIZE] = bytes(COUNTER_SIZE)

    def totals(self) -> "Counters":
        """Every counter over every worker this master ran (gauges: current workers)."""
        total = Counters()
        total.add(self.retired)
        total.gauges = [0, 0]
        for slot in range(self.slots):
            current = self.counters(slot)
            total.add(current)
            total.gauges[0] += current.gauges[0]
            total.gauges[1] += current.gauges[1]
        return total

    def db_connected(self, slot: int) -> bool:
        start = self._counters_at + slot * COUNTER_SIZE + 8 * DB_CONNECTED
        return struct.unpack_from("<Q", self._map, start)[0] == 1

    # -- one slot's fields ----------------------------------------------------------
    def _read(self, slot: int):
        return _LAYOUT.unpack_from(self._map, slot * SLOT_SIZE)

    def _write(self, slot: int, *values) -> None:
        _LAYOUT.pack_into(self._map, slot * SLOT_SIZE, *values)

    def set_busy(self, slot: int, busy: bool) -> None:
        self._map[slot * SLOT_SIZE + _BUSY_OFFSET] = 1 if busy else 0

    def is_idle(self, slot: int) -> bool:
        base = slot * SLOT_SIZE
        return self._map[base + 4] == READY and self._map[base + _BUSY_OFFSET] == 0

    def worker_started(self, slot: int, pid: int) -> None:
        _pid, _state, _busy, _requests, restarts, _started = self._read(slot)
        self._write(slot, pid, STARTING, 0, 0, restarts, time.time())

    def worker_ready(self, slot: int) -> None:
        pid, _state, busy, requests, restarts, started = self._read(slot)
        self._write(slot, pid, READY, busy, requests, restarts, started)

    def worker_down(self, slot: int, restarted: bool) -> None:
        self.fold(slot)
        _pid, _state, _busy, requests, restarts, _started = self._read(slot)
        self._write(slot, 0, DOWN, 0, requests, restarts + (1 if restarted else 0), 0.0)

    def count_request(self, slot: int, n: int = 1) -> None:
        pid, state, busy, requests, restarts, started = self._read(slot)
        self._write(slot, pid, state, busy, requests + n, restarts, started)

    def snapshot(self) -> List[Dict]:
        rows = []
        for slot in range(self.slots):
            pid, state, busy, requests, restarts, started = self._read(slot)
            name = STATES.get(state, "down")
            if state == READY and busy:
                name = "busy"
            rows.append(dict(slot=slot, pid=pid or None, state=name, requests=requests,
                             restarts=restarts, started_at=started or None))
        return rows


class SlotCounters:
    """A worker's writer of its own counters: plain stores into the shared memory."""

    def __init__(self, words: memoryview, floats: memoryview):
        self._words = words
        self._floats = floats
        self._rows: Dict[int, int] = {}     # listener id -> index of its row's first word
        self._next_row = 0

    def count(self, index: int, n: int = 1) -> None:
        """Add ``n`` to per-slot counter ``index`` (HANDLER_ERRORS, ...)."""
        self._words[index] += n

    def set(self, index: int, value: int) -> None:
        """Set per-slot gauge ``index`` (DB_CONNECTED, OPEN_CONNECTIONS, IN_FLIGHT)."""
        self._words[index] = value

    def _row(self, listener_id: int) -> int:
        base = self._rows.get(listener_id)
        if base is None:
            # Rows are never reused: a row's counts stay its listener's for the life of
            # this worker. Past the last named row, listeners share the "other" row.
            row = min(self._next_row, LISTENER_ROWS - 1)
            if row < LISTENER_ROWS - 1:
                self._next_row += 1
            base = SLOT_WORDS + row * ROW_WORDS
            if row < LISTENER_ROWS - 1:
                self._words[base + _ROW_ID] = listener_id
            self._rows[listener_id] = base
        return base

    def recorder(self, listener_id: int, protocol: int) -> Callable[[object, float], None]:
        """``record(status, duration_s)`` for one answered request of this listener;
        ``protocol`` is 0 (HTTP/1) or 1 (HTTP/2)."""
        base = self._row(listener_id)
        words, floats = self._words, self._floats
        counts = base + _ROW_COUNTS + protocol * len(STATUS_CLASSES)
        other = counts + len(STATUS_CLASSES) - 1
        buckets = base + _ROW_BUCKETS
        total = base + _ROW_SUM
        bounds = BUCKETS
        find = bisect.bisect_left

        def record(status, duration: float) -> None:
            if type(status) is int and 100 <= status < 600:
                words[counts + status // 100 - 1] += 1
            else:
                words[other] += 1
            words[buckets + find(bounds, duration)] += 1
            floats[total] += duration

        return record


class Counters:
    """A copy of counters: one slot's, the retired workers', or a sum of them."""

    def __init__(self):
        self.slot = [0] * SLOT_WORDS
        #: (listener label, protocol, class) -> count
        self.requests: Dict[Tuple[str, str, str], int] = {}
        #: listener label -> ([per-bucket counts, +Inf last], sum of seconds)
        self.durations: Dict[str, Tuple[List[int], float]] = {}
        #: open connections, in-flight requests
        self.gauges = [0, 0]

    @classmethod
    def from_words(cls, words: List[int], buffer, start: int) -> "Counters":
        result = cls()
        result.slot = [words[i] for i in range(SLOT_WORDS)]
        result.gauges = [words[OPEN_CONNECTIONS], words[IN_FLIGHT]]
        for row in range(LISTENER_ROWS):
            base = SLOT_WORDS + row * ROW_WORDS
            counts = words[base + _ROW_COUNTS:base + _ROW_BUCKETS]
            buckets = words[base + _ROW_BUCKETS:base + _ROW_SUM]
            if not any(counts) and not any(buckets):
                continue
            label = "other" if row == LISTENER_ROWS - 1 else str(words[base + _ROW_ID])
            for p, protocol in enumerate(PROTOCOLS):
                for c, status_class in enumerate(STATUS_CLASSES):
                    n = counts[p * len(STATUS_CLASSES) + c]
                    if n:
                        key = (label, protocol, status_class)
                        result.requests[key] = result.requests.get(key, 0) + n
            total = struct.unpack_from("<d", buffer, start + 8 * (base + _ROW_SUM))[0]
            result._add_durations(label, buckets, total)
        return result

    def _add_durations(self, label: str, buckets: List[int], total: float) -> None:
        known = self.durations.get(label)
        if known is None:
            self.durations[label] = (list(buckets), total)
        else:
            self.durations[label] = ([a + b for a, b in zip(known[0], buckets)], known[1] + total)

    def add(self, other: "Counters") -> None:
        """Add ``other``'s counters (not its gauges) to these."""
        for index in _SLOT_COUNTERS:
            self.slot[index] += other.slot[index]
        for key, n in other.requests.items():
            self.requests[key] = self.requests.get(key, 0) + n
        for label, (buckets, total) in other.durations.items():
            self._add_durations(label, buckets, total)
