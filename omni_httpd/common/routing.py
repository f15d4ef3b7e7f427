"""Which routes answer a request, and in what order (docs/sql-api.md, "Routes").

Used by the worker's executor (and so by a sibling that runs a re-sent request: the
`Request` carries the listener id and every header) and by the console's try-a-request.
Patterns are WHATWG URL Patterns compiled by the `urlpattern` package; a pattern it
refuses is logged once per configuration and its route skipped. The chain itself (one
prepared statement per route) runs in handler_call.run_chain.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

from twisted.logger import Logger

from omni_httpd.common.request import Request

log = Logger()

#: Components of omni_httpd.urlpattern that the URL Pattern standard matches.
COMPONENTS = ("protocol", "username", "password", "hostname", "port", "pathname", "search", "hash")


@dataclass(frozen=True)
class Route:
    """One route of the configuration, as the master sends it to the workers."""

    id: int                    # position in the configuration (1 = tried first)
    router: str                # the router table, as PostgreSQL prints it
    router_oid: int
    row: str                   # the route row's text (passed to the handler as its row type)
    pattern: Dict[str, str]    # components given (NULL ones are absent: any)
    method: Optional[str]
    handler_oid: int
    handler: str               # the function, as PostgreSQL prints its regprocedure
    priority: int

    @classmethod
    def from_message(cls, entry: dict) -> "Route":
        return cls(int(entry["id"]), entry["router"], int(entry["router_oid"]), entry["row"],
                   dict(entry["pattern"]), entry.get("method"), int(entry["handler_oid"]),
                   entry["handler"], int(entry["priority"]))

    def to_message(self) -> dict:
        return dict(id=self.id, router=self.router, router_oid=self.router_oid, row=self.row,
                    pattern=self.pattern, method=self.method, handler_oid=self.handler_oid,
                    handler=self.handler, priority=self.priority)

    def describe(self) -> str:
        parts = ["%s=%s" % (name, self.pattern[name]) for name in COMPONENTS if name in self.pattern]
        if self.method:
            parts.insert(0, self.method)
        return "%s %s -> %s" % (self.router, " ".join(parts) or "*", self.handler)


def compile_pattern(pattern: Dict[str, str]):
    """The compiled URL pattern; raises ValueError (the library's message) if refused."""
    import urlpattern

    return urlpattern.URLPattern({name: str(value) for name, value in pattern.items()})


#: Match results remembered per table (requests repeat their URLs); the memory is
#: bounded whatever clients send: the cache is emptied when it holds this many.
MATCH_CACHE_SIZE = 4096


class RouteTable:
    """The routes of one configuration, in the order they are tried."""

    def __init__(self, routes: Iterable[Route] = ()):
        self.routes: List[Route] = []
        self.refused: Dict[int, str] = {}
        # (route, compiled pattern, the components it names: only those are compared,
        # the others are wildcards in the standard's sense)
        self._compiled: List[Tuple[Route, object, Tuple[str, ...]]] = []
        self._cache: Dict[tuple, List[Route]] = {}
        for route in routes:
            try:
                compiled = compile_pattern(route.pattern)
            except (ValueError, TypeError) as exc:
                self.refused[route.id] = str(exc)
                log.warn("route {route} skipped: its URL pattern is refused: {error}",
                         route=route.describe(), error=exc)
                continue
            self.routes.append(route)
            self._compiled.append((route, compiled, tuple(name for name in COMPONENTS if name in route.pattern)))

    def __len__(self) -> int:
        return len(self.routes)

    def match(self, request: Request, port: int) -> List[Route]:
        """The routes matching ``request`` (arrived on a listener bound to ``port``), in order."""
        if not self._compiled:
            return []
        key = (port, request.method, request.path, request.query_string, request.scheme,
               request.header("host"))
        found = self._cache.get(key)
        if found is None:
            url = url_components(request, port)
            method = request.method
            found = [route for route, compiled, names in self._compiled
                     if (route.method is None or route.method == method)
                     and compiled.test({name: url[name] for name in names})]
            if len(self._cache) >= MATCH_CACHE_SIZE:
                self._cache.clear()
            self._cache[key] = found
        return list(found)


def url_components(request: Request, port: int) -> Dict[str, str]:
    """The request's URL as URL Pattern components: host from the Host header (HTTP/2:
    :authority), port of the listener, no credentials and no fragment (clients do not
    send them)."""
    host = request.header("host") or ""
    if host.startswith("["):
        host = host[:host.find("]") + 1] if "]" in host else host
    elif ":" in host:
        host = host.split(":", 1)[0]
    return {"protocol": request.scheme, "username": "", "password": "", "hostname": host.lower(),
            "port": str(port), "pathname": request.path, "search": request.query_string or "",
            "hash": ""}
