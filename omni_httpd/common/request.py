"""The one request type every protocol produces and every executor consumes.

HTTP/1 (`http1.py`) and HTTP/2 (`http2.py`) turn bytes into a `Request`; the dispatcher
(`dispatch.py`) runs it locally or on a sibling worker (`siblings.py`) and hands back a
`Response` (`response.py`), whatever carried it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

#: Methods the SQL enum ``omni_http.http_method`` knows.
METHODS = frozenset(
    [b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH"]
)


def header_text(value: bytes) -> str:
    """A header name or value as the handler sees it, over HTTP/1 and HTTP/2 alike:
    UTF-8 when the bytes are valid UTF-8, else Latin-1 (every byte one character; never
    fails)."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


@dataclass
class Request:
    """A complete HTTP request, protocol-independent.

    ``path`` is already normalised (dot segments removed, percent-encoding kept);
    ``query_string`` is the raw text after ``?`` or ``None`` when there was no ``?``;
    ``headers`` are ``(name, value)`` pairs in arrival order with lower-cased names.
    """

    method: str
    path: str
    query_string: Optional[str]
    headers: List[Tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    #: id of the ``omni_httpd.listeners`` row the request arrived on.
    listener_id: int = 0
    #: "1.0", "1.1" or "2"; informational (access log, proxying).
    http_version: str = "1.1"
    #: scheme the client used, "http" or "https".
    scheme: str = "http"
    #: peer address for the access log, "ip:port".
    peer: str = ""

    def header(self, name: str) -> Optional[str]:
        """First value of header ``name`` (lower-case), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None


def split_target(target: str) -> Tuple[str, Optional[str]]:
    """Split a request target into (normalised path, raw query string or None)."""
    if "#" in target:
        target = target.split("#", 1)[0]
    if "?" in target:
        path, query = target.split("?", 1)
    else:
        path, query = target, None
    return normalize_path(path), query


def normalize_path(path: str) -> str:
    """Remove dot segments as RFC 3986 section 5.2.4 says; keep percent-encoding as is."""
    if not path:
        return "/"
    if "." not in path:
        return path
    segments = path.split("/")
    output: List[str] = []
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == ".":
            if last:
                output.append("")
            continue
        if segment == "..":
            if len(output) > 1:
                output.pop()
            if last:
                output.append("")
            continue
        output.append(segment)
    result = "/".join(output)
    if not result.startswith("/"):
        result = "/" + result
    return result
