"""The admin console: live state, listeners and handlers editing, trying a handler.

The master builds one `AdminConsole` and serves ``console.resource()`` with
``twisted.web.server.Site`` on the ``--admin`` endpoint. Routing is Klein's; pages are
Jinja2 templates (autoescaped) from ``admin/templates``; static files from
``admin/static``. Authentication and CSRF are in `console_auth`, the console's own
database access in `console_db`. Every page works without JavaScript; ``admin.js`` only
refreshes the dashboard's status tables from ``/status.json``.
"""
from __future__ import annotations

import datetime
import functools
import importlib.util
import ipaddress
import json
import os
import re
import time
from typing import Any, List, Optional, Tuple

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from klein import Klein
from twisted.logger import Logger
from twisted.web import pages, resource, static
from werkzeug.exceptions import HTTPException, NotFound

from omni_httpd.console import db
from omni_httpd.common import proxy_rules
from omni_httpd.console.auth import (COOKIE_NAME, AdminPassword, LoginThrottle, Sessions,
                                     verify_in_thread, write_private_file)
from omni_httpd.console.db import ConsoleDatabase, DatabaseProblem
from omni_httpd.common.exchange import finish
from omni_httpd.common.outcome import ProxyOutcome, response_from_row
from omni_httpd.common.request import METHODS, normalize_path
from omni_httpd.common.response import REASONS
from omni_httpd.common.settings import Settings

log = Logger()

#: Messages shown after a successful POST (the redirect carries only the key).
NOTICES = {
    "reloaded": "Reload requested.",
    "listener-created": "Listener created.",
    "listener-saved": "Listener saved.",
    "listener-deleted": "Listener deleted.",
    "attached": "Handler attached.",
    "detached": "Handler detached.",
    "handler-created": "Handler created.",
    "handler-saved": "Handler saved.",
    "handler-deleted": "Handler deleted.",
    "logged-out": "Logged out.",
}

TRY_METHODS = sorted(m.decode() for m in METHODS)


def assets_dir() -> str:
    """Templates and static files: the installed ``omni_httpd.admin_assets`` package,
    else the source checkout's ``admin/`` directory."""
    spec = importlib.util.find_spec("omni_httpd.admin_assets")
    if spec is not None and spec.submodule_search_locations:
        return list(spec.submodule_search_locations)[0]
    return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "admin")


class _StaticFiles(static.File):
    """Static assets without directory listings."""

    def directoryListing(self):
        return pages.notFound()


def _is_localhost_name(name: str) -> bool:
    """Names that mean this machine's loopback interface (RFC 6761 6.3: ``localhost`` and
    ``*.localhost``): resolved locally, no outside DNS can point them elsewhere."""
    return name == "localhost" or name.endswith(".localhost")


def parse_host_header(value: str) -> Optional[str]:
    """``Host`` -> the host part, lower-cased, without brackets or final dot; None if it
    is not a well-formed ``host[:port]``."""
    value = value.strip().lower()
    if value.startswith("["):
        host, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not re.match(r"^:\d{0,5}$", rest)):
            return None
        try:
            return str(ipaddress.IPv6Address(host))
        except ValueError:
            return None
    host, _colon, port = value.partition(":")
    if port and not port.isdigit():
        return None
    host = host.rstrip(".")
    if not host or not re.match(r"^[a-z0-9_.-]+$", host):
        return None
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


class HostCheck:
    """Which ``Host`` names the console answers to (the defence against DNS rebinding).

    A page on a name the attacker controls, re-pointed at 127.0.0.1, reaches the
    console with the attacker's name in ``Host``: only names this console is really
    reachable as are served. Those are the address the connection came in on (as an IP
    literal), ``localhost``/``*.localhost`` when that address is loopback (or the
    endpoint is a UNIX socket), and the ``--admin-host`` names. The port is not
    checked: a proxy in front may publish the console on another one.
    """

    def __init__(self, extra_names: str = ""):
        self.extra = {name for name in extra_names.split(",") if name}

    def allows(self, host: str, local_address) -> bool:
        if host in self.extra:
            return True
        local = getattr(local_address, "host", None)
        if local is None:                   # UNIX socket: only reachable from this host
            return _is_localhost_name(host)
        try:
            ip = ipaddress.ip_address(local.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if host == str(ip):
            return True
        return ip.is_loopback and _is_localhost_name(host)


class _Guard(resource.Resource):
    """In front of every console response (error pages and static files included):
    security headers, the Host check, and refusing requests our own proxy forwarded."""

    isLeaf = True

    def __init__(self, wrapped: resource.Resource, hosts: HostCheck, settings: Settings):
        super().__init__()
        self._wrapped = wrapped
        self._hosts = hosts
        self._settings = settings

    def render(self, request):
        request.setHeader(b"content-security-policy",
                          b"default-src 'self'; frame-ancestors 'none'; form-action 'self'")
        request.setHeader(b"x-frame-options", b"DENY")
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"referrer-policy", b"same-origin")
        request.setHeader(b"cache-control", b"no-store")
        values = request.requestHeaders.getRawHeaders(b"host") or []
        if len(values) != 1:
            return self._refuse(request, 400, "Bad request: exactly one Host header is required.")
        raw = values[0].decode("latin-1")
        host = parse_host_header(raw)
        if host is None:
            return self._refuse(request, 400, "Bad request: malformed Host header.")
        if not self._hosts.allows(host, request.getHost()):
            self._log_refused_host(raw, request)
            return self._refuse(request, 421, "Misdirected request: this console does not "
                                "answer to the name %r. An operator can add it with "
                                "--admin-host." % host)
        via = [("via", v.decode("latin-1"))
               for v in request.requestHeaders.getRawHeaders(b"via") or []]
        if via and proxy_rules.proxied_by_us(via, self._settings):
            # A handler's proxy outcome pointed at the console: SQL authors must not get
            # a way in (or a password-guessing channel) through the daemon itself.
            log.warn("admin console: refused a request proxied by one of this daemon's "
                     "handlers (from {peer})", peer=_peer(request))
            return self._refuse(request, 403, "Forbidden: requests proxied by this "
                                "daemon's own handlers are not served by its console.")
        return self._wrapped.render(request)

    #: A rebinding page can send requests in a loop: one log line per this many seconds.
    REFUSED_LOG_INTERVAL = 60.0
    _refused_logged = float("-inf")
    _refused_since = 0

    def _log_refused_host(self, raw: str, request) -> None:
        now = time.monotonic()
        if now - self._refused_logged < self.REFUSED_LOG_INTERVAL:
            self._refused_since += 1
            return
        log.warn("admin console: refused a request for Host {host!r} from {peer} (not a "
                 "name of this console; see --admin-host){more}", host=raw, peer=_peer(request),
                 more=" and %d more since the last such line" % self._refused_since
                 if self._refused_since else "")
        self._refused_logged, self._refused_since = now, 0

    @staticmethod
    def _refuse(request, status: int, message: str) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return (message + "\n").encode("utf-8")


def _peer(request) -> str:
    address = request.getClientAddress()
    return getattr(address, "host", None) or str(address)


def _arg(request, name: str) -> str:
    values = request.args.get(name.encode())
    return values[0].decode("utf-8", "replace") if values else ""


def _int_or_none(text: str) -> Optional[int]:
    try:
        return int(text)
    except ValueError:
        return None


def parse_header_lines(text: str) -> Tuple[List[str], List[str]]:
    """``Name: value`` lines -> (lower-cased names, values); blank lines are skipped."""
    names, values = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        name, colon, value = line.partition(":")
        if not colon or not name.strip() or name != name.strip():
            raise ValueError("header line %d is not of the form 'Name: value': %s" % (number, line))
        names.append(name.lower())
        values.append(value.strip())
    return names, values


def _uptime(seconds: Optional[float]) -> str:
    if seconds is None:
        return ""
    seconds = int(max(0, seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return "%dd %dh" % (days, hours)
    if hours:
        return "%dh %dm" % (hours, minutes)
    if minutes:
        return "%dm %ds" % (minutes, secs)
    return "%ds" % secs


def _when(moment: Optional[datetime.datetime]) -> str:
    if moment is None:
        return "never"
    return moment.isoformat(sep=" ", timespec="seconds")


def _body_view(body: Optional[bytes]) -> dict:
    """How to show a response body: as text when it is UTF-8, else as a hex dump."""
    if body is None:
        return {"text": None, "hex": None, "length": None}
    try:
        return {"text": body.decode("utf-8"), "hex": None, "length": len(body)}
    except UnicodeDecodeError:
        shown = body[:4096]
        lines = [" ".join("%02x" % b for b in shown[i:i + 16]) for i in range(0, len(shown), 16)]
        return {"text": None, "hex": "\n".join(lines), "length": len(body),
                "truncated": len(body) > len(shown)}


def outcome_view(row: Optional[tuple], method: str) -> dict:
    """What the try page shows for a handler result row: the server's own reading of it."""
    outcome = response_from_row(row, method)
    if isinstance(outcome, ProxyOutcome):
        return {"kind": "proxy", "url": outcome.url, "preserve_host": outcome.preserve_host}
    if outcome.abort:
        return {"kind": "abort"}
    # What a client would get, by the same rules the workers' protocols apply (status,
    # headers, lengths: common/exchange.py); the body shown is the GET's.
    out = finish(outcome, False, time.time(), True)
    headers = list(out.headers)
    if out.length is not None:
        headers.append(("content-length", str(out.length)))
    return {"kind": "response", "no_rows": row is None, "status": out.status,
            "reason": REASONS.get(out.status, ""), "headers": headers,
            # (a NULL body stays "no body" on the page, though HTTP/1 says content-length: 0)
            "body": _body_view(None if outcome.body is None and out.status == outcome.status
                               else out.body), "head": method == "HEAD"}


def _login_required(method):
    """Route decorator: a logged-in session, and for POST a valid CSRF token.

    The wrapped method gets the session id as ``sid``.
    """
    @functools.wraps(method)
    async def wrapper(self, request, **kwargs):
        sid = self._session_id(request)
        if not self._sessions.logged_in(sid):
            if request.method in (b"GET", b"HEAD") and not request.path.endswith(b".json"):
                return self._redirect(request, "/login")
            return self._render(request, "error.html", status=403, sid=None,
                                title="Not logged in", message="Log in first.")
        if request.method == b"POST" and not self._sessions.csrf_ok(sid, _arg(request, "csrf")):
            return self._csrf_rejected(request, sid)
        return await method(self, request, sid=sid, **kwargs)
    return wrapper


class AdminConsole:
    """The admin console of one master.

    ``state`` answers ``workers()``, ``listeners()`` and ``last_reload()`` (see
    docs/architecture.md); ``dsn`` is where the console reads and edits the
    configuration, with its own connections. ``generated_password`` is set when neither
    ``password`` nor ``password_file`` is given (it is dropped at the first successful
    login; the console itself keeps only its argon2 hash). With ``settings`` (the
    master's) such a password is also written to ``<data-dir>/admin-password``, mode
    0600, whose path is ``generated_password_file``: the master logs that path, never the
    password (logs are often readable by many). ``settings`` also gives the
    ``--admin-host`` names and the daemon's ``Via`` pseudonym.
    ``login_delay`` is the failed-login slow-down ``(first delay, cap)`` in seconds.
    """

    app = Klein()

    #: Where a generated password is written, below the daemon's data directory.
    PASSWORD_FILE = "admin-password"

    def __init__(self, state, dsn: str, password: Optional[str] = None,
                 password_file: Optional[str] = None, reactor=None,
                 login_delay: Tuple[float, float] = (0.5, 30.0),
                 settings: Optional[Settings] = None):
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self._state = state
        self._settings = settings if settings is not None else Settings()
        self._password = AdminPassword(password, password_file)
        self.generated_password: Optional[str] = self._password.generated
        self._password.generated = None
        self.generated_password_file: Optional[str] = None
        if self.generated_password is not None and settings is not None:
            path = os.path.join(settings.data_dir, self.PASSWORD_FILE)
            try:
                write_private_file(path, self.generated_password + "\n")
            except OSError as exc:
                raise ValueError("cannot write the generated password to %s: %s"
                                 % (path, exc.strerror or exc)) from None
            self.generated_password_file = path
        self._sessions = Sessions(reactor)
        self._throttle = LoginThrottle(reactor, base=login_delay[0], cap=login_delay[1])
        self._db = ConsoleDatabase(dsn, reactor)
        assets = assets_dir()
        self._static = os.path.join(assets, "static")
        self._templates = Environment(loader=FileSystemLoader(os.path.join(assets, "templates")),
                                      autoescape=True, undefined=StrictUndefined,
                                      trim_blocks=True, lstrip_blocks=True)
        self._templates.filters["uptime"] = _uptime
        self._templates.filters["when"] = _when

    def resource(self) -> resource.Resource:
        """The console as a twisted.web resource, for ``Site``."""
        return _Guard(self.app.resource(), HostCheck(self._settings.admin_hosts),
                      self._settings)

    def close(self) -> None:
        """Stop the console's database threads (also done at reactor shutdown)."""
        self._db.close()

    # --- plumbing ---------------------------------------------------------------------

    def _session_id(self, request) -> Optional[str]:
        return self._sessions.session_id(request.getCookie(COOKIE_NAME.encode()))

    def _set_cookie(self, request, value: str, max_age: Optional[int] = None) -> None:
        request.addCookie(COOKIE_NAME.encode(), value.encode(), path=b"/", httpOnly=True,
                          sameSite="strict", secure=request.isSecure(),
                          max_age=None if max_age is None else str(max_age).encode())

    def _render(self, request, template: str, status: int = 200, sid: Optional[str] = None,
                **context: Any) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        context.setdefault("nav", "")
        context.setdefault("notice", NOTICES.get(_arg(request, "done")))
        context["logged_in"] = self._sessions.logged_in(sid)
        context["csrf"] = self._sessions.csrf_token(sid) if sid else ""
        return self._templates.get_template(template).render(**context).encode("utf-8")

    def _redirect(self, request, location: str, done: Optional[str] = None) -> bytes:
        if done:
            location += ("&" if "?" in location else "?") + "done=" + done
        request.setResponseCode(303)
        request.setHeader(b"location", location.encode())
        return b""

    def _csrf_rejected(self, request, sid: Optional[str]) -> bytes:
        return self._render(request, "error.html", status=403, sid=sid,
                            title="Form expired",
                            message="The form's security token is missing or invalid. "
                                    "Go back, reload the page and submit it again.")

    @app.handle_errors(HTTPException)
    def _http_error(self, request, failure):
        error = failure.value
        sid = self._session_id(request)
        return self._render(request, "error.html", status=error.code, sid=sid,
                            title="%d %s" % (error.code, error.name), message=error.description)

    @app.handle_errors(DatabaseProblem)
    def _database_error(self, request, failure):
        sid = self._session_id(request)
        return self._render(request, "error.html", status=500, sid=sid,
                            title="Database error", problem=failure.value, message="")

    # --- login ------------------------------------------------------------------------

    @app.route("/static/", branch=True)
    def static_files(self, request):
        return _StaticFiles(self._static)

    @app.route("/login", methods=["GET", "HEAD"])
    def login_page(self, request):
        sid = self._session_id(request)
        if self._sessions.logged_in(sid):
            return self._redirect(request, "/")
        if sid is None:
            sid, cookie = self._sessions.new()
            self._set_cookie(request, cookie)
        return self._render(request, "login.html", sid=sid, error=None)

    @app.route("/login", methods=["POST"])
    async def login(self, request):
        sid = self._session_id(request)
        if not self._sessions.csrf_ok(sid, _arg(request, "csrf")):
            return self._csrf_rejected(request, None)
        password = _arg(request, "password")
        address = request.getClientAddress()
        address = getattr(address, "host", None) or str(address)
        ok = await self._throttle.attempt(
            address, lambda: verify_in_thread(self._reactor, self._password, password))
        if not ok:
            log.warn("admin console: failed login from {address}", address=address)
            return self._render(request, "login.html", status=403, sid=sid,
                                error="Wrong password.")
        self._sessions.end(sid)
        # Someone has used it: the plain text need not stay in memory any longer.
        self.generated_password = None
        sid, cookie = self._sessions.new(logged_in=True)
        self._set_cookie(request, cookie)
        log.info("admin console: login from {address}", address=address)
        return self._redirect(request, "/")

    @app.route("/logout", methods=["POST"])
    @_login_required
    async def logout(self, request, sid):
        self._sessions.end(sid)
        self._set_cookie(request, "", max_age=0)
        return self._redirect(request, "/login", done="logged-out")

    # --- dashboard --------------------------------------------------------------------

    def _status(self) -> dict:
        now = self._reactor.seconds()
        workers = []
        for worker in self._state.workers():
            started = worker.get("started_at")
            workers.append(dict(worker, uptime=None if started is None else now - started))
        return {"workers": workers, "listeners": list(self._state.listeners()),
                "last_reload": self._state.last_reload()}

    @app.route("/", methods=["GET", "HEAD"])
    @_login_required
    async def dashboard(self, request, sid):
        try:
            database, db_problem = await self._db.run(db.database_info), None
        except DatabaseProblem as problem:
            database, db_problem = None, problem
        return self._render(request, "dashboard.html", sid=sid, nav="dashboard",
                            database=database, db_problem=db_problem, **self._status())

    @app.route("/status.json", methods=["GET", "HEAD"])
    @_login_required
    async def status_json(self, request, sid):
        status = self._status()
        fragments = self._templates.get_template("status.html").module
        body = {
            "workers": [dict(w, uptime_text=_uptime(w["uptime"])) for w in status["workers"]],
            "listeners": status["listeners"],
            "last_reload": status["last_reload"].isoformat() if status["last_reload"] else None,
            "html": {
                "workers": str(fragments.worker_rows(status["workers"])),
                "listeners": str(fragments.listener_rows(status["listeners"])),
                "last_reload": _when(status["last_reload"]),
            },
        }
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body, default=str).encode()

    @app.route("/reload", methods=["POST"])
    @_login_required
    async def reload(self, request, sid):
        await self._db.run(db.reload_configuration)
        return self._redirect(request, "/", done="reloaded")

    # --- listeners --------------------------------------------------------------------

    @app.route("/listeners", methods=["GET", "HEAD"])
    @_login_required
    async def listeners(self, request, sid):
        rows = await self._db.run(db.listeners)
        live = {entry["id"]: entry for entry in self._state.listeners()}
        return self._render(request, "listeners.html", sid=sid, nav="listeners",
                            listeners=rows, live=live)

    async def _listener_form(self, request, sid, status=200, listener=None, form=None,
                             problem=None):
        protocols = await self._db.run(db.protocols)
        handlers = await self._db.run(db.handlers)
        live = None
        if listener is not None:
            live = {entry["id"]: entry for entry in self._state.listeners()}.get(listener["id"])
        if form is None:
            form = {"address": listener["address"], "port": str(listener["port"]),
                    "protocol": listener["protocol"], "handler_id": ""} if listener else \
                   {"address": "127.0.0.1", "port": "", "protocol": "http", "handler_id": ""}
        return self._render(request, "listener.html", status=status, sid=sid, nav="listeners",
                            listener=listener, live=live, form=form, problem=problem,
                            protocols=protocols, handlers=handlers)

    @app.route("/listeners/new", methods=["GET", "HEAD"])
    @_login_required
    async def new_listener(self, request, sid):
        return await self._listener_form(request, sid)

    @app.route("/listeners/new", methods=["POST"])
    @_login_required
    async def create_listener(self, request, sid):
        form = {key: _arg(request, key) for key in ("address", "port", "protocol", "handler_id")}
        try:
            listener_id = await self._db.run(db.create_listener, form["address"].strip(),
                                             form["port"].strip(), form["protocol"],
                                             _int_or_none(form["handler_id"]))
        except DatabaseProblem as problem:
            return await self._listener_form(request, sid, status=400, form=form,
                                             problem=problem)
        return self._redirect(request, "/listeners/%d" % listener_id, done="listener-created")

    async def _existing_listener(self, listener_id: int) -> dict:
        listener = await self._db.run(db.listener, listener_id)
        if listener is None:
            raise NotFound("There is no listener %d." % listener_id)
        return listener

    @app.route("/listeners/<int:listener_id>", methods=["GET", "HEAD"])
    @_login_required
    async def edit_listener(self, request, sid, listener_id):
        listener = await self._existing_listener(listener_id)
        return await self._listener_form(request, sid, listener=listener)

    @app.route("/listeners/<int:listener_id>", methods=["POST"])
    @_login_required
    async def update_listener(self, request, sid, listener_id):
        form = {key: _arg(request, key) for key in ("address", "port", "protocol")}
        form["handler_id"] = ""
        try:
            found = await self._db.run(db.update_listener, listener_id, form["address"].strip(),
                                       form["port"].strip(), form["protocol"])
        except DatabaseProblem as problem:
            listener = await self._existing_listener(listener_id)
            return await self._listener_form(request, sid, status=400, listener=listener,
                                             form=form, problem=problem)
        if not found:
            raise NotFound("There is no listener %d." % listener_id)
        return self._redirect(request, "/listeners/%d" % listener_id, done="listener-saved")

    @app.route("/listeners/<int:listener_id>/delete", methods=["POST"])
    @_login_required
    async def delete_listener(self, request, sid, listener_id):
        if not await self._db.run(db.delete_listener, listener_id):
            raise NotFound("There is no listener %d." % listener_id)
        return self._redirect(request, "/listeners", done="listener-deleted")

    @app.route("/listeners/<int:listener_id>/attach", methods=["POST"])
    @_login_required
    async def attach(self, request, sid, listener_id):
        listener = await self._existing_listener(listener_id)
        try:
            await self._db.run(db.attach, listener_id, _arg(request, "handler_id"))
        except DatabaseProblem as problem:
            return await self._listener_form(request, sid, status=400, listener=listener,
                                             problem=problem)
        return self._redirect(request, "/listeners/%d" % listener_id, done="attached")

    @app.route("/listeners/<int:listener_id>/detach", methods=["POST"])
    @_login_required
    async def detach(self, request, sid, listener_id):
        listener = await self._existing_listener(listener_id)
        try:
            await self._db.run(db.detach, listener_id, _arg(request, "handler_id"))
        except DatabaseProblem as problem:
            return await self._listener_form(request, sid, status=400, listener=listener,
                                             problem=problem)
        return self._redirect(request, "/listeners/%d" % listener_id, done="detached")

    # --- handlers ---------------------------------------------------------------------

    @app.route("/handlers", methods=["GET", "HEAD"])
    @_login_required
    async def handlers(self, request, sid):
        rows = await self._db.run(db.handlers)
        return self._render(request, "handlers.html", sid=sid, nav="handlers", handlers=rows)

    async def _handler_form(self, request, sid, status=200, handler=None, form=None,
                            problem=None):
        roles = await self._db.run(db.roles)
        if form is None:
            form = {"query": handler["query"], "role_name": handler["role_name"]} if handler \
                else {"query": "", "role_name": ""}
        if form["role_name"] and form["role_name"] not in roles:
            # Keep what the row (or the operator) has, even if we could not choose it.
            roles = roles + [form["role_name"]]
        return self._render(request, "handler.html", status=status, sid=sid, nav="handlers",
                            handler=handler, form=form, roles=roles, problem=problem)

    @app.route("/handlers/new", methods=["GET", "HEAD"])
    @_login_required
    async def new_handler(self, request, sid):
        return await self._handler_form(request, sid)

    @app.route("/handlers/new", methods=["POST"])
    @_login_required
    async def create_handler(self, request, sid):
        form = {key: _arg(request, key) for key in ("query", "role_name")}
        try:
            handler_id = await self._db.run(db.create_handler, form["query"], form["role_name"])
        except DatabaseProblem as problem:
            return await self._handler_form(request, sid, status=400, form=form, problem=problem)
        return self._redirect(request, "/handlers/%d" % handler_id, done="handler-created")

    async def _existing_handler(self, handler_id: int) -> dict:
        handler = await self._db.run(db.handler, handler_id)
        if handler is None:
            raise NotFound("There is no handler %d." % handler_id)
        return handler

    @app.route("/handlers/<int:handler_id>", methods=["GET", "HEAD"])
    @_login_required
    async def edit_handler(self, request, sid, handler_id):
        handler = await self._existing_handler(handler_id)
        return await self._handler_form(request, sid, handler=handler)

    @app.route("/handlers/<int:handler_id>", methods=["POST"])
    @_login_required
    async def update_handler(self, request, sid, handler_id):
        form = {key: _arg(request, key) for key in ("query", "role_name")}
        try:
            found = await self._db.run(db.update_handler, handler_id, form["query"],
                                       form["role_name"])
        except DatabaseProblem as problem:
            handler = await self._existing_handler(handler_id)
            return await self._handler_form(request, sid, status=400, handler=handler,
                                            form=form, problem=problem)
        if not found:
            raise NotFound("There is no handler %d." % handler_id)
        return self._redirect(request, "/handlers/%d" % handler_id, done="handler-saved")

    @app.route("/handlers/<int:handler_id>/delete", methods=["POST"])
    @_login_required
    async def delete_handler(self, request, sid, handler_id):
        if not await self._db.run(db.delete_handler, handler_id):
            raise NotFound("There is no handler %d." % handler_id)
        return self._redirect(request, "/handlers", done="handler-deleted")

    # --- routes -----------------------------------------------------------------------

    async def _routes_page(self, request, sid, form=None, status=200, view=None, trial=None,
                           problem=None, form_error=None):
        loaded = await self._db.run(db.routes)
        listeners = await self._db.run(db.listeners)
        if form is None:
            served = [l for l in listeners if not l["handler_ids"]]
            form = {"listener_id": str(served[0]["id"]) if served else "", "method": "GET",
                    "path": "/", "query_string": "", "headers": "", "body": ""}
        return self._render(request, "routes.html", status=status, sid=sid, nav="routes",
                            routes=loaded["routes"], router_problems=loaded["problems"],
                            listeners=listeners, form=form, methods=TRY_METHODS, view=view,
                            trial=trial, problem=problem, form_error=form_error)

    @app.route("/routes", methods=["GET", "HEAD"])
    @_login_required
    async def routes(self, request, sid):
        return await self._routes_page(request, sid)

    @app.route("/routes/try", methods=["POST"])
    @_login_required
    async def try_route(self, request, sid):
        form = {key: _arg(request, key) for key in
                ("listener_id", "method", "path", "query_string", "headers", "body")}
        listener_id = _int_or_none(form["listener_id"])
        try:
            names, values = parse_header_lines(form["headers"])
        except ValueError as e:
            return await self._routes_page(request, sid, form=form, status=400, form_error=str(e))
        if listener_id is None:
            return await self._routes_page(request, sid, form=form, status=400,
                                           form_error="Choose a listener.")
        try:
            trial = await self._db.try_route(listener_id, form["method"],
                                             normalize_path(form["path"].strip()),
                                             form["query_string"] or None,
                                             form["body"].encode("utf-8"), names, values)
        except DatabaseProblem as problem:
            return await self._routes_page(request, sid, form=form, status=400, problem=problem)
        view = None
        if trial["row"] is not None or trial["handled"]:
            view = outcome_view(trial["row"], form["method"])
        return await self._routes_page(request, sid, form=form, view=view, trial=trial)

    # --- try a handler ----------------------------------------------------------------

    def _try_page(self, request, sid, handler, roles, form, status=200, view=None,
                  problem=None, form_error=None):
        return self._render(request, "try.html", status=status, sid=sid, nav="try",
                            handler=handler, roles=roles, form=form, methods=TRY_METHODS,
                            view=view, problem=problem, form_error=form_error)

    @app.route("/try", methods=["GET", "HEAD"], endpoint="try_form_blank")
    @app.route("/handlers/<int:handler_id>/try", methods=["GET", "HEAD"])
    @_login_required
    async def try_form(self, request, sid, handler_id=None):
        handler = await self._existing_handler(handler_id) if handler_id is not None else None
        roles = await self._db.run(db.roles)
        form = {"query": handler["query"] if handler else "",
                "role_name": handler["role_name"] if handler else "",
                "method": "GET", "path": "/", "query_string": "", "headers": "", "body": ""}
        return self._try_page(request, sid, handler, roles, form)

    @app.route("/try", methods=["POST"], endpoint="try_run_blank")
    @app.route("/handlers/<int:handler_id>/try", methods=["POST"])
    @_login_required
    async def try_run(self, request, sid, handler_id=None):
        handler = await self._existing_handler(handler_id) if handler_id is not None else None
        roles = await self._db.run(db.roles)
        form = {key: _arg(request, key) for key in
                ("query", "role_name", "method", "path", "query_string", "headers", "body")}
        try:
            names, values = parse_header_lines(form["headers"])
        except ValueError as e:
            return self._try_page(request, sid, handler, roles, form, status=400,
                                  form_error=str(e))
        path = normalize_path(form["path"].strip())
        # An empty field means the request had no '?' at all (query_string NULL).
        query_string = form["query_string"] or None
        try:
            row = await self._db.try_request(form["query"], form["role_name"],
                                             form["method"], path, query_string,
                                             form["body"].encode("utf-8"), names, values)
        except DatabaseProblem as problem:
            return self._try_page(request, sid, handler, roles, form, status=400,
                                  problem=problem)
        return self._try_page(request, sid, handler, roles, form,
                              view=outcome_view(row, form["method"]))
