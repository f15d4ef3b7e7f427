"""The master <-> worker control channel.

One UNIX socketpair per worker (the worker's end is its fd 3). Each message is one JSON
object on one line. A message that carries file descriptors (new listening sockets)
says so with ``"fds": n``; the descriptors travel with SCM_RIGHTS ahead of the line and
are handed to the receiver together with the message.
"""
from __future__ import annotations

import json
import os
from collections import deque
from typing import Callable, Dict, List, Sequence

from twisted.internet.interfaces import IFileDescriptorReceiver
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from zope.interface import implementer

log = Logger()

Handler = Callable[[Dict, List[int]], None]


@implementer(IFileDescriptorReceiver)
class ControlProtocol(LineOnlyReceiver):
    """Both ends of the channel. ``on_message(message, fds)``; ``on_lost()``."""

    delimiter = b"\n"
    MAX_LENGTH = 64 * 1024 * 1024  # a configuration with many large handler queries

    def __init__(self, on_message: Handler, on_lost: Callable[[], None] = lambda: None):
        self.on_message = on_message
        self.on_lost = on_lost
        self._fds: deque = deque()
        self.connected_ = False

    def connectionMade(self) -> None:
        self.connected_ = True

    def fileDescriptorReceived(self, descriptor: int) -> None:
        self._fds.append(descriptor)

    def lineReceived(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            log.error("control channel: undecodable message {line!r}", line=line[:200])
            return
        fds = [self._fds.popleft() for _ in range(int(message.get("fds", 0))) if self._fds]
        try:
            self.on_message(message, fds)
        except Exception:
            log.failure("control channel: handling {type} failed", type=message.get("type"))

    def send(self, message: Dict, fds: Sequence[int] = ()) -> None:
        if not self.connected_:
            return
        if fds:
            message = dict(message, fds=len(fds))
            for fd in fds:
                self.transport.sendFileDescriptor(fd)
        self.transport.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    def connectionLost(self, reason=None) -> None:
        self.connected_ = False
        while self._fds:
            os.close(self._fds.popleft())
        self.on_lost()


def adopt(reactor, fd: int, protocol: ControlProtocol) -> ControlProtocol:
    """Wrap our end of a connected UNIX socket ``fd`` (which is then closed) in ``protocol``."""
    import socket

    reactor.adoptStreamConnection(fd, socket.AF_UNIX, Factory.forProtocol(lambda: protocol))
    os.close(fd)
    return protocol
