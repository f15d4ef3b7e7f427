"""The configuration as the database holds it, and the statements that read it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from twisted.logger import Logger

from omni_httpd.common.routing import COMPONENTS, Route
from omni_httpd.master import queries

log = Logger()


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
    routes: List[Route] = field(default_factory=list)
    #: routers the daemon could not read: (router, problem)
    router_problems: List[Tuple[str, str]] = field(default_factory=list)


def from_rows(rows) -> Configuration:
    listeners = []
    for listener_id, address, port, protocol, handler_id, query, role_name in rows:
        handler = HandlerSpec(handler_id, query, role_name) if handler_id is not None else None
        listeners.append(ListenerSpec(listener_id, address, port, protocol, handler))
    return Configuration(listeners)


def routes_from_rows(rows) -> Tuple[List[Route], List[Tuple[str, str]]]:
    routes, problems = [], []
    for row in rows:
        router, router_oid, text, *components, method, handler_oid, handler, priority, problem = row
        if problem is not None:
            problems.append((router, problem))
            continue
        pattern = {name: str(value) for name, value in zip(COMPONENTS, components) if value is not None}
        routes.append(Route(len(routes) + 1, router, int(router_oid), text, pattern, method,
                            int(handler_oid), handler, int(priority)))
    return routes, problems


def load(connection):
    """Read the configuration through a txpostgres connection; Deferred[Configuration]."""
    d = connection.runQuery(queries.LOAD_CONFIGURATION)

    def with_routes(rows):
        listeners = from_rows(rows).listeners

        def done(route_rows):
            routes, problems = routes_from_rows(route_rows)
            for router, problem in problems:
                log.warn("router {router} not served: {problem}", router=router, problem=problem)
            return Configuration(listeners, routes, problems)

        return connection.runQuery(queries.LOAD_ROUTES).addCallback(done)

    return d.addCallback(with_routes)
