"""Admin console in a real headless Chromium (system /usr/bin/chromium via Playwright).

The console is served in this process against a real database; the browser runs on a
thread (`run_in_browser`) so the reactor keeps serving it. Screenshots go to the test's
tmp_path, and also to $CONSOLE_SCREENSHOTS when that is set (to look at them).
"""
from __future__ import annotations

import os
import re
import shutil
import time

import pytest
import pytest_twisted
from playwright.sync_api import expect
from twisted.internet import reactor
from twisted.internet.threads import blockingCallFromThread

from admin_support import FixedState, ServedConsole, run_in_browser

PASSWORD = "browser-secret"


def keep_screenshot(path) -> None:
    target = os.environ.get("CONSOLE_SCREENSHOTS")
    if target:
        os.makedirs(target, exist_ok=True)
        shutil.copy(str(path), target)


def log_in(page, url, password=PASSWORD):
    page.goto(url + "/")
    assert page.url == url + "/login"
    page.fill("#password", password)
    page.click("form[action='/login'] button[type=submit]")


@pytest.fixture
def served(dsn):
    state = FixedState(
        workers=[{"slot": 0, "pid": 31337, "state": "idle", "requests": 120, "restarts": 0,
                  "started_at": time.time() - 7300},
                 {"slot": 1, "pid": 31338, "state": "busy", "requests": 98, "restarts": 2,
                  "started_at": time.time() - 45}],
        listeners=[{"id": 1, "address": "127.0.0.1", "port": 8080, "effective_port": 8080,
                    "protocol": "http", "handler_id": 1, "status": "bound", "error": None},
                   {"id": 2, "address": "127.0.0.1", "port": 0, "effective_port": 41817,
                    "protocol": "https", "handler_id": 2, "status": "bound", "error": None},
                   {"id": 3, "address": "192.0.2.10", "port": 80, "effective_port": 0,
                    "protocol": "http", "handler_id": None, "status": "error",
                    "error": "Cannot assign requested address"}],
        last_reload=None)
    console = ServedConsole(state, dsn, password=PASSWORD, login_delay=(0.2, 2.0))
    yield console
    pytest_twisted.blockon(console.close())


@pytest_twisted.ensureDeferred
async def test_login_dashboard_live_refresh_reload_logout(served, tmp_path):
    shot = tmp_path / "dashboard.png"

    def new_worker_state():
        served.state.worker_list[1].update(pid=55555, state="idle", requests=99)
        served.state.listener_list[2].update(status="bound", error=None, effective_port=8181)

    def script(page):
        problems = []
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))

        log_in(page, served.url, "wrong password")
        expect(page.locator("p.error")).to_have_text("Wrong password.")
        page.fill("#password", PASSWORD)
        page.click("form[action='/login'] button[type=submit]")
        expect(page.locator("h1")).to_have_text("Dashboard")
        problems.clear()     # the refused password was logged as a failed (403) load
        cookies = page.context.cookies()
        assert [(c["httpOnly"], c["sameSite"]) for c in cookies] == [(True, "Strict")]

        workers = page.locator("#workers tbody")
        expect(workers).to_contain_text("31338")
        expect(page.locator("#listeners tbody")).to_contain_text("Cannot assign requested address")
        expect(page.locator("#listeners tbody")).to_contain_text("41817")
        expect(page.locator("#live-note")).to_have_text("Live: refreshed every 2 seconds.")
        page.screenshot(path=str(shot), full_page=True)

        # the status tables follow the master's state without reloading the page
        blockingCallFromThread(reactor, new_worker_state)
        expect(workers).to_contain_text("55555", timeout=10000)
        expect(page.locator("#listeners tbody")).not_to_contain_text("Cannot assign")
        expect(page.locator("#listeners tbody")).to_contain_text("8181")

        page.click("text=Reload configuration")
        expect(page.locator(".notice")).to_have_text("Reload requested.")

        page.click("text=Log out")
        expect(page.locator(".notice")).to_have_text("Logged out.")
        page.goto(served.url + "/listeners")
        assert page.url == served.url + "/login"
        return problems

    problems = await run_in_browser(script)
    assert problems == []          # no script errors, nothing refused by the CSP
    assert shot.stat().st_size > 10000
    keep_screenshot(shot)


@pytest_twisted.ensureDeferred
async def test_pages_work_without_javascript(served):
    def script(page):
        log_in(page, served.url)
        expect(page.locator("h1")).to_have_text("Dashboard")
        expect(page.locator("#live-note")).to_contain_text("reload it to refresh")
        page.click("nav >> text=Handlers")
        page.click("text=New handler")
        page.fill("#query", "SELECT omni_httpd.http_response('no js')")
        page.click("#handler-form button[type=submit]")
        expect(page.locator(".notice")).to_have_text("Handler created.")
        page.click("text=Try this handler")
        page.click("#try-form button[type=submit]")
        expect(page.locator("#outcome-body")).to_have_text("no js")
        page.click("nav >> text=Dashboard")
        page.click("text=Reload configuration")
        expect(page.locator(".notice")).to_have_text("Reload requested.")

    await run_in_browser(script, javascript=False)


@pytest_twisted.ensureDeferred
async def test_edit_handlers_and_listeners_and_try_a_request(served, tmp_path):
    def script(page):
        log_in(page, served.url)
        expect(page.locator("h1")).to_have_text("Dashboard")

        # a handler the database refuses: its message next to the form, input kept
        page.click("nav >> text=Handlers")
        page.click("text=New handler")
        broken = "SELECT omni_httpd.http_response(x) FROM no_such_table"
        page.fill("#query", broken)
        page.click("#handler-form button[type=submit]")
        error = page.locator("#handler-form").locator("..").locator(".error")
        expect(error).to_contain_text("invalid query")
        expect(error).to_contain_text('relation "no_such_table" does not exist')
        assert page.input_value("#query") == broken

        page.fill("#query", "SELECT omni_httpd.http_response("
                            "'hello ' || request.path || ' ' || coalesce("
                            "omni_http.http_header_get(request.headers, 'x-name'), '?'))"
                            " FROM request")
        page.click("#handler-form button[type=submit]")
        expect(page.locator(".notice")).to_have_text("Handler created.")
        handler_id = int(re.search(r"/handlers/(\d+)", page.url).group(1))

        # try it
        page.click("text=Try this handler")
        page.select_option("#method", "POST")
        page.fill("#path", "/greet/./me")
        page.fill("#headers", "X-Name: <b>Ada</b>\nAccept: text/plain")
        page.fill("#body", "ignored")
        page.click("#try-form button[type=submit]")
        expect(page.locator("#outcome-status")).to_contain_text("200 OK")
        expect(page.locator("#outcome-body")).to_have_text("hello /greet/me <b>Ada</b>")
        expect(page.locator("#outcome-headers")).to_contain_text("text/plain; charset=utf-8")
        assert page.input_value("#headers") == "X-Name: <b>Ada</b>\nAccept: text/plain"
        assert page.locator("#outcome-body b").count() == 0     # shown as text, not markup
        page.screenshot(path=str(tmp_path / "try.png"), full_page=True)

        # a listener on any free port, with the handler attached at creation
        page.click("nav >> text=Listeners")
        page.click("text=New listener")
        page.fill("#port", "0")
        page.select_option("#handler_id", str(handler_id))
        page.click("#listener-form button[type=submit]")
        expect(page.locator(".notice")).to_have_text("Listener created.")
        attached = page.locator("#attached")
        expect(attached).to_contain_text("#%d" % handler_id)

        page.click("#attached button:has-text('Detach')")
        expect(page.locator(".notice")).to_have_text("Handler detached.")
        expect(attached).to_contain_text("No handler attached")
        page.click("#attach-form button[type=submit]")
        expect(page.locator(".notice")).to_have_text("Handler attached.")
        expect(attached).to_contain_text("#%d" % handler_id)

        page.fill("#port", "70000")
        page.click("#listener-form button[type=submit]")
        expect(page.locator("#listener-form").locator("..").locator(".error")).to_contain_text(
            "listeners_port_check")
        assert page.input_value("#port") == "70000"
        page.screenshot(path=str(tmp_path / "listener.png"), full_page=True)

        page.fill("#port", "0")
        page.click("#listener-form button[type=submit]")
        expect(page.locator(".notice")).to_have_text("Listener saved.")
        page.click("text=Delete listener")
        expect(page.locator(".notice")).to_have_text("Listener deleted.")
        expect(page.locator("#listener-list")).to_contain_text("No listeners yet")

        page.goto(served.url + "/handlers/%d" % handler_id)
        page.click("text=Delete handler")
        expect(page.locator(".notice")).to_have_text("Handler deleted.")

    await run_in_browser(script)
    for name in ("try.png", "listener.png"):
        keep_screenshot(tmp_path / name)
