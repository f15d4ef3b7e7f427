"""Binding listening sockets in the master: one socket per worker slot and listener.

Every socket of a listener is bound to the same address and port with SO_REUSEPORT, so
the kernel spreads new connections evenly over the workers (with one shared socket,
Twisted's accept loop may take a whole burst into one worker). The master keeps all of
them open for the listener's life: a restarted worker adopts the very socket its
predecessor had, and connections that queued on it meanwhile are served, not reset.
"""
from __future__ import annotations

import errno
import itertools
import socket
from dataclasses import dataclass, field
from typing import List, Optional

from omni_httpd.master.config import ListenerSpec

BACKLOG = 1024
_bind_ids = itertools.count(1)


class BindError(Exception):
    """str() is a one-line explanation for the log and the admin console."""


@dataclass
class BoundListener:
    spec: ListenerSpec
    sockets: List[socket.socket] = field(default_factory=list)
    effective_port: int = 0
    error: Optional[str] = None
    #: identifies this set of sockets; a changed listener gets new sockets and a new id
    bind_id: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.spec.address else socket.AF_INET

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets = []


def bind(spec: ListenerSpec, slots: int, tls_available: bool) -> BoundListener:
    """Bind ``slots`` sockets for ``spec``; a failure is recorded, never raised."""
    bound = BoundListener(spec=spec, bind_id=next(_bind_ids))
    if spec.protocol == "https" and not tls_available:
        bound.error = "https listener needs --tls-cert and --tls-key"
        return bound
    try:
        port = spec.port
        for _ in range(slots):
            sock = _bind_one(spec.address, port)
            bound.sockets.append(sock)
            port = sock.getsockname()[1]
        bound.effective_port = port
    except BindError as exc:
        bound.close()
        bound.error = str(exc)
    return bound


def _bind_one(address: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address, port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise BindError("%s:%d: address already in use" % (address, port)) from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise BindError("%s:%d: address not available on this host" % (address, port)) from None
        if exc.errno == errno.EACCES:
            raise BindError("%s:%d: permission denied (ports below 1024 need privileges)" % (address, port)) from None
        raise BindError("%s:%d: %s" % (address, port, exc.strerror or exc)) from None
    return sock
