"""Shared memory between the master and its workers: one fixed-size slot per worker.

The master creates the file in its private run directory; every worker maps it. A worker
writes only its own slot (pid, state, busy flag, requests served); the master writes the
restart count. Reading whether a sibling is idle is a memory read: the HTTP/2
re-dispatch decision costs no round trip.
"""
from __future__ import annotations

import mmap
import os
import struct
import time
from typing import Dict, List

SLOT_SIZE = 64
# pid, state, busy, pad, requests, restarts, started_at
_LAYOUT = struct.Struct("<iBBxxQIxxxxd")
_BUSY_OFFSET = 5

STATES = {0: "down", 1: "starting", 2: "idle"}
DOWN, STARTING, READY = 0, 1, 2


class Scoreboard:
    def __init__(self, path: str, slots: int, create: bool = False):
        self.path = path
        self.slots = slots
        size = SLOT_SIZE * slots
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)

    def close(self) -> None:
        self._map.close()

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
