"""The configuration as the database holds it, and the statements that read it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

from omni_httpd.master import queries


@dataclass(frozen=True)
class HandlerSpec:
    id: int
    query: str
    role_name: str


@dataclass(frozen=True)
class ListenerSpec:
    id: int
    address: str
    port: int
    protocol: str  # "http" | "https"
    handler: Optional[HandlerSpec]

    @property
    def socket_key(self) -> Tuple[str, int, str]:
        """What decides whether the bound socket can be kept across a reload."""
        return (self.address, self.port, self.protocol)


@dataclass(frozen=True)
class Configuration:
    listeners: List[ListenerSpec]


def from_rows(rows) -> Configuration:
    listeners = []
    for listener_id, address, port, protocol, handler_id, query, role_name in rows:
        handler = HandlerSpec(handler_id, query, role_name) if handler_id is not None else None
        listeners.append(ListenerSpec(listener_id, address, port, protocol, handler))
    return Configuration(listeners)


def load(connection):
    """Read the configuration through a txpostgres connection; Deferred[Configuration]."""
    return connection.runQuery(queries.LOAD_CONFIGURATION).addCallback(from_rows)
