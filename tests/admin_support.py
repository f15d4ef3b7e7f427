"""Serving the admin console in tests and driving it with treq or headless Chromium."""
from __future__ import annotations

import html
import re
from dataclasses import dataclass
from http.cookiejar import CookieJar
from typing import Callable, Dict, List, Optional

from twisted.internet import defer, reactor, threads
from twisted.web.client import Agent
from twisted.web.server import Site
from treq.client import HTTPClient

from omni_httpd.console.app import AdminConsole
from daemon_support import reactor_wait_until

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]

_CSRF = re.compile(r'name="csrf" value="([^"]*)"')


class FixedState:
    """The master's state as the console reads it; tests set the lists directly."""

    def __init__(self, workers: Optional[List[dict]] = None,
                 listeners: Optional[List[dict]] = None, last_reload=None):
        self.worker_list = list(workers or [])
        self.listener_list = list(listeners or [])
        self.reloaded_at = last_reload

    def workers(self) -> List[dict]:
        return [dict(w) for w in self.worker_list]

    def listeners(self) -> List[dict]:
        return [dict(entry) for entry in self.listener_list]

    def last_reload(self):
        return self.reloaded_at


class ServedConsole:
    """An `AdminConsole` served by ``Site`` on 127.0.0.1 (a free port) in this process."""

    def __init__(self, state, dsn: str, **kwargs):
        self.state = state
        self.dsn = dsn
        self.console = AdminConsole(state, dsn, reactor=reactor, **kwargs)
        self.port = reactor.listenTCP(0, Site(self.console.resource()), interface="127.0.0.1")
        self.url = "http://127.0.0.1:%d" % self.port.getHost().port

    def close(self) -> defer.Deferred:
        self.console.close()
        return defer.maybeDeferred(self.port.stopListening)


@dataclass
class Page:
    status: int
    headers: object          # twisted.web.http_headers.Headers
    text: str

    def header(self, name: str) -> Optional[str]:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    def all(self, name: str) -> List[str]:
        return self.headers.getRawHeaders(name) or []

    @property
    def location(self) -> Optional[str]:
        return self.header("location")


class ConsoleClient:
    """A treq client with its own cookie jar that remembers the last page's CSRF token.

    Redirects are not followed, so tests see them.
    """

    def __init__(self, base_url: str):
        self.base = base_url
        self.jar = CookieJar()
        self._http = HTTPClient(Agent(reactor), cookiejar=self.jar)
        self.csrf: Optional[str] = None

    async def _page(self, response) -> Page:
        text = (await response.content()).decode("utf-8")
        match = _CSRF.search(text)
        if match:
            self.csrf = html.unescape(match.group(1))
        return Page(response.code, response.headers, text)

    async def get(self, path: str) -> Page:
        return await self._page(await self._http.get(self.base + path, allow_redirects=False))

    async def post(self, path: str, fields: Optional[Dict[str, str]] = None,
                   csrf: bool = True) -> Page:
        data = dict(fields or {})
        if csrf and "csrf" not in data and self.csrf is not None:
            data["csrf"] = self.csrf
        response = await self._http.post(self.base + path, data=data, allow_redirects=False)
        return await self._page(response)

    async def login(self, password: str) -> Page:
        await self.get("/login")
        return await self.post("/login", {"password": password})

    def cookie(self) -> Optional[str]:
        for cookie in self.jar:
            return cookie.value
        return None


def launch_chromium(playwright):
    """The system Chromium, headless (no browser download)."""
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)


def run_in_browser(script: Callable, *args, javascript: bool = True) -> defer.Deferred:
    """Run ``script(page, *args)`` in a fresh headless Chromium on a thread.

    Playwright's sync API blocks; on a thread the reactor keeps serving the console the
    browser talks to. Fires with the script's result.
    """
    def in_thread():
        from playwright.sync_api import sync_playwright
        with sync_playwright() as playwright:
            browser = launch_chromium(playwright)
            try:
                context = browser.new_context(viewport={"width": 1280, "height": 900},
                                              java_script_enabled=javascript)
                page = context.new_page()
                page.set_default_timeout(20000)
                return script(page, *args)
            finally:
                browser.close()
    return threads.deferToThread(in_thread)


wait_for = reactor_wait_until


__all__ = ["CHROMIUM", "CHROMIUM_ARGS", "ConsoleClient", "FixedState", "Page", "ServedConsole",
           "launch_chromium", "run_in_browser", "wait_for"]
