"""Static files: requests under a prefix of ``omni_httpd.static_files``, served from disk.

The worker answers them itself, before the listener's handler and without a database
round trip (`StaticFiles.wrap` sits in front of the dispatcher). The mounts arrive with
the configuration push (`configure`); each names a root given on the command line
(``--static-root NAME=DIR``), never a path from the database.

What a request under a prefix gets (docs/sql-api.md, "Static files", says why):

- GET and HEAD only; any other method ``405`` with ``allow: GET, HEAD``.
- The rest of the path after the prefix is percent-decoded segment by segment (to bytes:
  any file name works). A segment that decodes to ``.`` or ``..``, or holds ``/`` (an
  encoded ``%2F``), a backslash or NUL, is a ``400``: the path is refused before any file
  system call. The decoded path is resolved with ``realpath`` and must lie inside the
  root's own ``realpath``; a symlink whose target leaves the root is ``404``, as is
  anything missing and anything that is not a regular file or directory (devices, FIFOs,
  sockets). The file is opened ``O_NOFOLLOW | O_NONBLOCK`` (a FIFO swapped in cannot
  block the worker) and must be the very inode (device and inode number) that was
  checked inside the root, so a symlink swapped in between check and open is refused.
- A directory: without a trailing ``/`` a ``301`` to the path with one; then its index
  file (the row's ``index_file``), else an HTML listing when the row allows it, else
  ``404``.
- A miss under a prefix is ``404``: the handler is not asked (a prefix belongs to the
  files).
- Content-Type from the file name (`CONTENT_TYPES`, fixed, so answers do not depend on
  the host's /etc/mime.types; text types with ``charset=utf-8``), a strong ETag from
  inode, size and mtime_ns, Last-Modified, ``accept-ranges: bytes``, the row's
  Cache-Control. If-None-Match / If-Modified-Since give ``304``, If-Match /
  If-Unmodified-Since ``412``. One byte range gives ``206`` with Content-Range, an
  unsatisfiable one ``416``; several ranges get the whole file (``200``); If-Range that
  does not match gets the whole file too.
- Precompressed siblings: ``name.br`` / ``name.gz`` next to ``name`` (regular files,
  inside the root) are sent when Accept-Encoding accepts them (by q-value; ``br`` wins a
  tie), with Content-Encoding; whenever a sibling exists, ``vary: accept-encoding``.
- Files up to `INLINE_LIMIT` are read in one ``pread``; larger ones are a `FileBody`,
  which the protocols read `CHUNK` bytes at a time as the client takes them (HTTP/1
  transport back-pressure, HTTP/2 flow control).
"""
from __future__ import annotations

import email.utils
import html
import mimetypes
import os
import stat
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple
from urllib.parse import quote, unquote_to_bytes

from twisted.internet import defer
from twisted.logger import Logger

from omni_httpd.common.httpdate import format_http_date
from omni_httpd.common.request import Request
from omni_httpd.common.response import Response, error_response, internal_error

log = Logger()

#: Bytes read at a time from a streamed file.
CHUNK = 64 * 1024
#: Files up to this size are read whole (one pread) and sent like any other body.
INLINE_LIMIT = 256 * 1024
#: Entries shown in a directory listing at most.
LISTING_LIMIT = 5000
#: How long a root's realpath is reused (a root that is a symlink, repointed at deploy
#: time, is followed within this many seconds).
ROOT_TTL = 1.0

_ALLOW = "GET, HEAD"
_O_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)

_UTF8 = "; charset=utf-8"
#: Content types by extension (lower case). Fixed here so that the answer does not
#: depend on the host's mime.types; anything else falls back to Python's built-in table
#: (not the host's files), then application/octet-stream.
CONTENT_TYPES: Dict[str, str] = {
    ".html": "text/html" + _UTF8, ".htm": "text/html" + _UTF8,
    ".css": "text/css" + _UTF8, ".js": "text/javascript" + _UTF8,
    ".mjs": "text/javascript" + _UTF8, ".json": "application/json",
    ".map": "application/json", ".webmanifest": "application/manifest+json",
    ".txt": "text/plain" + _UTF8, ".md": "text/markdown" + _UTF8,
    ".csv": "text/csv" + _UTF8, ".xml": "application/xml", ".svg": "image/svg+xml",
    ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
    ".webp": "image/webp", ".avif": "image/avif", ".ico": "image/vnd.microsoft.icon",
    ".bmp": "image/bmp", ".woff": "font/woff", ".woff2": "font/woff2", ".ttf": "font/ttf",
    ".otf": "font/otf", ".pdf": "application/pdf", ".wasm": "application/wasm",
    ".mp4": "video/mp4", ".webm": "video/webm", ".mp3": "audio/mpeg", ".ogg": "audio/ogg",
    ".wav": "audio/wav", ".zip": "application/zip", ".gz": "application/gzip",
    ".br": "application/octet-stream", ".tar": "application/x-tar",
    ".wasm.map": "application/json",
}
_BUILTIN_TYPES = mimetypes.MimeTypes()     # Python's own table only, no system files
_ENCODINGS = (("br", b".br"), ("gzip", b".gz"))


def content_type(name: str) -> str:
    """The Content-Type for a file name."""
    dot = name.rfind(".")
    if dot >= 0:
        known = CONTENT_TYPES.get(name[dot:].lower())
        if known is not None:
            return known
    guessed, _encoding = _BUILTIN_TYPES.guess_type(name, strict=False)
    if guessed is None:
        return "application/octet-stream"
    if guessed.startswith("text/"):
        return guessed + _UTF8
    return guessed


@dataclass(frozen=True)
class Mount:
    """One ``omni_httpd.static_files`` row, with its root resolved to a directory."""

    prefix: str             # without a trailing "/"; "" for "/"
    root: str               # the root's name (--static-root NAME=...)
    directory: bytes        # the directory the name stands for, as given
    index_file: Optional[str]
    listing: bool
    cache_control: Optional[str]


class FileBody:
    """``length`` bytes of an open file from ``offset``, read on demand (Response.file)."""

    def __init__(self, fd: int, offset: int, length: int) -> None:
        self.fd = fd
        self.position = offset
        self.length = length
        self.remaining = length

    def read(self, size: int = CHUNK) -> bytes:
        """The next bytes (at most ``size``); b"" at the end. A file that shrank while it
        was sent raises OSError: the message cannot be completed (the protocol aborts)."""
        if self.remaining <= 0:
            return b""
        data = os.pread(self.fd, min(size, self.remaining), self.position)
        if not data:
            self.close()
            raise OSError("file shrank while it was being sent")
        self.position += len(data)
        self.remaining -= len(data)
        if self.remaining <= 0:
            self.close()
        return data

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        self.close()


class _Length:
    """The length of a body that is not sent (HEAD): nothing is opened."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.remaining = 0

    def read(self, size: int = CHUNK) -> bytes:
        return b""

    def close(self) -> None:
        pass


class _Refused(Exception):
    """The request path cannot name a file under the root (answered 400)."""


def _decode(rest: str) -> Tuple[List[bytes], bool]:
    """(decoded segments, ends with "/") of the path after the prefix; _Refused if one is
    hostile (dot segment after decoding, encoded "/", backslash, NUL)."""
    segments = []
    for raw in rest.split("/"):
        if not raw:
            continue
        if "\\" in raw:
            raise _Refused()
        name = unquote_to_bytes(raw) if "%" in raw else raw.encode("utf-8", "surrogateescape")
        if name in (b".", b"..") or b"/" in name or b"\\" in name or b"\x00" in name:
            raise _Refused()
        segments.append(name)
    return segments, rest.endswith("/")


def _inside(path: bytes, root: bytes) -> bool:
    return path == root or path.startswith(root if root.endswith(b"/") else root + b"/")


def _http_time(text: Optional[str]) -> Optional[int]:
    if not text:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if parsed is None or parsed.tzinfo is None:
        return None
    return int(parsed.timestamp())


def _etag_matches(header: str, etag: str, weak: bool) -> bool:
    """Does an If-None-Match (weak comparison) / If-Match (strong) list match ``etag``?"""
    header = header.strip()
    if header == "*":
        return True
    for candidate in header.split(","):
        candidate = candidate.strip()
        if candidate.startswith("W/"):
            if not weak:
                continue
            candidate = candidate[2:]
        if candidate == etag:
            return True
    return False


def _accepted_encodings(header: Optional[str]) -> Dict[str, float]:
    """Accept-Encoding as {coding: q}; ``*`` stands for any coding not named."""
    accepted: Dict[str, float] = {}
    if not header:
        return accepted
    for part in header.split(","):
        coding, _, params = part.partition(";")
        coding = coding.strip().lower()
        if not coding:
            continue
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = 0.0
                if not 0.0 <= q <= 1.0:
                    q = 0.0
        accepted["gzip" if coding == "x-gzip" else coding] = q
    return accepted


def _byte_range(header: str, size: int):
    """A Range header against ``size`` bytes: (first, last) for one satisfiable range,
    "unsatisfiable", or None (not a single byte range we understand: send it all)."""
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    first, last = first.strip(), last.strip()
    if not dash or (first and not first.isdigit()) or (last and not last.isdigit()):
        return None
    if not first.isascii() or not last.isascii():
        return None
    if not first:
        if not last:
            return None
        suffix = int(last)
        if suffix == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - suffix), size - 1
    start = int(first)
    if last and int(last) < start:
        return None         # invalid: ignored (RFC 9110 14.1.1)
    if start >= size:
        return "unsatisfiable"
    return start, min(int(last), size - 1) if last else size - 1


class StaticFiles:
    """The static mounts of this worker's listeners, and the code that serves them."""

    def __init__(self, roots: Dict[str, str]) -> None:
        """``roots``: the ``--static-root`` names and directories (Settings.static_roots)."""
        self.roots = {name: os.fsencode(path) for name, path in roots.items()}
        self._mounts: Dict[int, List[Mount]] = {}
        self._real_roots: Dict[bytes, Tuple[float, bytes]] = {}
        self._missing: set = set()     # roots found missing (logged once)

    # -- configuration ---------------------------------------------------------------
    def configure(self, entries: List[dict]) -> None:
        """Take the ``static_files`` entries of a config message (master/static_config.py)."""
        mounts: Dict[int, List[Mount]] = {}
        for entry in entries or ():
            directory = self.roots.get(entry.get("root"))
            if directory is None:
                continue    # the master logs it; our settings are the master's
            prefix = entry["url_prefix"].rstrip("/")
            mounts.setdefault(int(entry["listener_id"]), []).append(Mount(
                prefix, entry["root"], directory, entry.get("index_file"),
                bool(entry.get("listing")), entry.get("cache_control")))
        for listed in mounts.values():
            listed.sort(key=lambda mount: len(mount.prefix), reverse=True)   # longest first
        self._mounts = mounts
        self._real_roots = {}

    def mount_for(self, listener_id: int, path: str) -> Optional[Mount]:
        """The mount ``path`` falls under (longest prefix, whole segments), or None."""
        for mount in self._mounts.get(listener_id, ()):
            prefix = mount.prefix
            if path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == "/"):
                return mount
        return None

    def wrap(self, dispatch: Callable[..., defer.Deferred],
             count: Optional[Callable[[], None]] = None) -> Callable[..., defer.Deferred]:
        """``dispatch`` with static mounts checked first (the listener's context uses it);
        ``count()`` is called for each request served here (the scoreboard's counter, as
        the dispatcher counts the others)."""
        def dispatch_static(request: Request, allow_remote: bool = False) -> defer.Deferred:
            if self._mounts:
                mount = self.mount_for(request.listener_id, request.path)
                if mount is not None:
                    if count is not None:
                        count()
                    try:
                        return defer.succeed(self.serve(mount, request))
                    except Exception:
                        log.failure("serving static file {path} failed", path=request.path)
                        return defer.succeed(internal_error())
            return dispatch(request, allow_remote)
        return dispatch_static

    # -- serving -----------------------------------------------------------------------
    def serve(self, mount: Mount, request: Request) -> Response:
        method = request.method
        if method != "GET" and method != "HEAD":
            response = error_response(405, "Method not allowed")
            response.headers.append(("allow", _ALLOW))
            return response
        path = request.path
        try:
            segments, slash = _decode(path[len(mount.prefix):])
        except _Refused:
            return error_response(400, "Bad request: path not allowed")
        root = self._real_root(mount.directory)
        if root is None:
            if mount.directory not in self._missing:
                self._missing.add(mount.directory)      # once, not per request
                log.warn("static root {name!r} ({directory}) is not a directory any more; "
                         "its files answer 404", name=mount.root,
                         directory=os.fsdecode(mount.directory))
            return _not_found()
        directory = os.path.realpath(os.path.join(root, *segments[:-1])) if len(segments) > 1 else root
        if not _inside(directory, root):
            return _not_found()
        if segments:
            found = _lookup(directory, segments[-1], root)
            if found is None:
                return _not_found()
            real, st = found
        else:
            real, st = root, None
            try:
                st = os.stat(root)
            except OSError:
                return _not_found()
        if stat.S_ISDIR(st.st_mode):
            if not slash:
                # One leading "/": "//name/" would be a protocol-relative URL (another host).
                location = ("/" + path.lstrip("/") + "/"
                            + ("?" + request.query_string if request.query_string is not None else ""))
                return Response(301, [("location", location), ("content-type", "text/plain; charset=utf-8")],
                                b"Moved Permanently")
            if mount.index_file:
                found = _lookup(real, os.fsencode(mount.index_file), root)
                if found is not None and stat.S_ISREG(found[1].st_mode):
                    return self._file(mount, request, root, real, found[0], found[1],
                                      mount.index_file)
            if mount.listing:
                return self._listing(mount, request, real, root)
            return _not_found()
        if not stat.S_ISREG(st.st_mode) or slash:
            return _not_found()
        return self._file(mount, request, root, directory, real, st, os.fsdecode(segments[-1]))

    def _real_root(self, directory: bytes) -> Optional[bytes]:
        now = time.monotonic()
        cached = self._real_roots.get(directory)
        if cached is not None and now - cached[0] < ROOT_TTL:
            return cached[1]
        real = os.path.realpath(directory)
        if not os.path.isdir(real):
            return None
        self._real_roots[directory] = (now, real)
        self._missing.discard(directory)
        return real

    def _file(self, mount: Mount, request: Request, root: bytes, directory: bytes, real: bytes,
              st: os.stat_result, name: str) -> Response:
        """Answer with the file ``real`` (``name`` in ``directory``, both real and inside
        ``root``), or one of its precompressed siblings."""
        headers: List[Tuple[str, str]] = [("content-type", content_type(name))]
        # Precompressed siblings, next to the name as requested (inside the root).
        encoding = None
        variants = []
        base = os.fsencode(name)
        for coding, suffix in _ENCODINGS:
            found = _lookup(directory, base + suffix, root)
            if found is not None and stat.S_ISREG(found[1].st_mode):
                variants.append((coding, found))
        if variants:
            headers.append(("vary", "accept-encoding"))
            accepted = _accepted_encodings(request.header("accept-encoding"))
            any_q = accepted.get("*", 0.0)
            best_q = 0.0
            for coding, found in variants:      # br first: it wins a tie
                q = accepted.get(coding, any_q)
                if q > best_q:
                    best_q, encoding, (real, st) = q, coding, found
            if encoding is not None:
                headers.append(("content-encoding", encoding))
        size = st.st_size
        etag = '"%x-%x-%x"' % (st.st_ino, size, st.st_mtime_ns)
        mtime = int(st.st_mtime)
        headers.append(("etag", etag))
        headers.append(("last-modified", format_http_date(mtime)))
        if mount.cache_control:
            headers.append(("cache-control", mount.cache_control))

        if_match = request.header("if-match")
        if if_match is not None:
            if not _etag_matches(if_match, etag, weak=False):
                return Response(412, headers[1:], None)
        else:
            since = _http_time(request.header("if-unmodified-since"))
            if since is not None and mtime > since:
                return Response(412, headers[1:], None)
        if_none_match = request.header("if-none-match")
        if if_none_match is not None:
            if _etag_matches(if_none_match, etag, weak=True):
                return Response(304, headers[1:], None)
        else:
            since = _http_time(request.header("if-modified-since"))
            if since is not None and mtime <= since:
                return Response(304, headers[1:], None)

        headers.append(("accept-ranges", "bytes"))
        status, offset, length = 200, 0, size
        wanted = request.header("range")
        if wanted is not None and _if_range_holds(request.header("if-range"), etag, mtime):
            chosen = _byte_range(wanted, size)
            if chosen == "unsatisfiable":
                headers = [h for h in headers if h[0] not in ("content-type", "content-encoding")]
                headers.append(("content-range", "bytes */%d" % size))
                headers.append(("content-type", "text/plain; charset=utf-8"))
                return Response(416, headers, b"Range not satisfiable")
            if chosen is not None:
                status, offset = 206, chosen[0]
                length = chosen[1] - chosen[0] + 1
                headers.append(("content-range", "bytes %d-%d/%d" % (chosen[0], chosen[1], size)))
        if request.method == "HEAD":
            return Response(status, headers, file=_Length(length))
        fd = _open_checked(real, st)
        if fd is None:
            return _not_found()
        if length <= INLINE_LIMIT:
            try:
                body = os.pread(fd, length, offset) if length else b""
            finally:
                os.close(fd)
            if len(body) != length:
                log.warn("static file {path} changed while it was read", path=os.fsdecode(real))
                return internal_error()
            return Response(status, headers, body)
        return Response(status, headers, file=FileBody(fd, offset, length))

    def _listing(self, mount: Mount, request: Request, directory: bytes, root: bytes) -> Response:
        entries = []
        try:
            with os.scandir(directory) as scan:
                for entry in scan:
                    name = entry.name
                    if name.startswith(b"."):
                        continue        # hidden, and never "." / ".."
                    found = _lookup(directory, name, root)
                    if found is None:
                        continue        # a symlink out of the root, or gone
                    mode = found[1].st_mode
                    if stat.S_ISDIR(mode):
                        entries.append((0, name, b"/", None))
                    elif stat.S_ISREG(mode):
                        entries.append((1, name, b"", found[1].st_size))
                    if len(entries) > LISTING_LIMIT:
                        break
        except OSError:
            return _not_found()
        entries.sort()
        more = len(entries) > LISTING_LIMIT
        shown = os.fsdecode(unquote_to_bytes(request.path)) if "%" in request.path else request.path
        title = html.escape("Index of " + shown)
        lines = ['<!DOCTYPE html>', '<html><head><meta charset="utf-8"><title>%s</title></head>' % title,
                 '<body><h1>%s</h1><ul>' % title]
        if request.path.rstrip("/") != mount.prefix:
            lines.append('<li><a href="../">../</a></li>')
        for _kind, name, suffix, size in entries[:LISTING_LIMIT]:
            text = html.escape(name.decode("utf-8", "replace") + suffix.decode())
            href = html.escape(quote(name + suffix, safe="/"), quote=True)
            extra = "" if size is None else " (%d bytes)" % size
            lines.append('<li><a href="%s">%s</a>%s</li>' % (href, text, extra))
        if more:
            lines.append("<li>... (more than %d entries)</li>" % LISTING_LIMIT)
        lines.append("</ul></body></html>\n")
        return Response(200, [("content-type", "text/html; charset=utf-8")],
                        "\n".join(lines).encode("utf-8"))


def _not_found() -> Response:
    return error_response(404, "Not found")


def _if_range_holds(if_range: Optional[str], etag: str, mtime: int) -> bool:
    """Is a Range to be honoured given If-Range (RFC 9110 13.1.5)? Strong comparison."""
    if if_range is None:
        return True
    if_range = if_range.strip()
    if if_range.startswith('"') or if_range.startswith("W/"):
        return if_range == etag
    return _http_time(if_range) == mtime


def _lookup(directory: bytes, name: bytes, root: bytes) -> Optional[Tuple[bytes, os.stat_result]]:
    """(real path, stat) of ``name`` in ``directory`` (itself real and inside ``root``),
    following a symlink only when where it leads is inside ``root``; None if missing."""
    path = (directory if directory.endswith(b"/") else directory + b"/") + name
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            path = os.path.realpath(path)
            if not _inside(path, root):
                return None
            st = os.stat(path)
    except (OSError, ValueError):
        return None
    return path, st


def _open_checked(path: bytes, expected: os.stat_result) -> Optional[int]:
    """Open ``path`` for reading if it is still the regular file ``expected`` describes
    (checked inside the root); a descriptor, or None."""
    try:
        fd = os.open(path, _O_FLAGS)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        # The inode that was checked inside the root, or nothing: whatever was swapped in
        # between (a symlink, another file) is refused.
        if (not stat.S_ISREG(st.st_mode) or st.st_ino != expected.st_ino
                or st.st_dev != expected.st_dev):
            os.close(fd)
            return None
    except Exception:
        os.close(fd)
        raise
    return fd
