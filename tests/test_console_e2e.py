"""The admin console of the real daemon (`twistd -n omni_httpd`), driven by headless Chromium.

An operator logs in, creates a handler and a listener on any free port, sees the port the
daemon bound on the dashboard, gets the handler's response from that port, breaks the
query and is told why, and tries a request without the network.
"""
from __future__ import annotations

import re
import urllib.request

from playwright.sync_api import expect, sync_playwright

from admin_support import launch_chromium
from daemon_support import Daemon, reload_count, wait_until

PASSWORD = "secret"


def test_operator_session_against_the_real_daemon(dsn):
    """Also: the dashboard counts the served requests, and its reload button reloads."""
    daemon = Daemon(dsn, "--http-workers", "1", "--no-init", "--admin-password", PASSWORD,
                    "--admin", "tcp:0:interface=127.0.0.1")
    try:
        daemon.wait_ready()
        url = daemon.wait_for(r"admin console listening on (http://127\.0\.0\.1:\d+)/").group(1)
        with sync_playwright() as playwright:
            browser = launch_chromium(playwright)
            try:
                operate(browser.new_context().new_page(), url, daemon, dsn)
            finally:
                browser.close()
    finally:
        code = daemon.stop()
    assert code == 0, daemon.output[-3000:]


def operate(page, url, daemon, dsn):
    page.set_default_timeout(30000)
    page.goto(url + "/")
    assert page.url == url + "/login"
    page.fill("#password", PASSWORD)
    page.click("form[action='/login'] button[type=submit]")
    expect(page.locator("h1")).to_have_text("Dashboard")
    workers = page.locator("#workers tbody")
    for pid in daemon.worker_pids():
        expect(workers).to_contain_text(str(pid))

    # a handler, then a listener on any free port serving it
    page.click("nav >> text=Handlers")
    page.click("text=New handler")
    page.fill("#query", "SELECT omni_httpd.http_response('served ' || request.path) FROM request")
    page.click("#handler-form button[type=submit]")
    expect(page.locator(".notice")).to_have_text("Handler created.")
    handler_url = page.url.split("?")[0]

    page.click("nav >> text=Listeners")
    page.click("text=New listener")
    page.fill("#address", "127.0.0.1")
    page.fill("#port", "0")
    page.select_option("#handler_id", index=1)
    page.click("#listener-form button[type=submit]")
    expect(page.locator(".notice")).to_have_text("Listener created.")

    # the dashboard (refreshing itself) shows the port the daemon bound
    page.click("nav >> text=Dashboard")
    row = page.locator("#listeners tbody tr").first
    expect(row.locator(".state")).to_have_text("bound")
    expect(row.locator("td.effective-port")).to_have_text(re.compile(r"^[1-9]\d*$"))
    port = int(row.locator("td.effective-port").inner_text())

    with urllib.request.urlopen("http://127.0.0.1:%d/hello" % port, timeout=10) as response:
        assert response.status == 200
        assert response.read() == b"served /hello"
    served = page.context.new_page()
    served.goto("http://127.0.0.1:%d/from-the-browser" % port)
    expect(served.locator("body")).to_have_text("served /from-the-browser")
    served.close()

    # break the query: the database refuses it, the console says why, nothing changes
    page.goto(handler_url)
    page.fill("#query", "SELECT omni_httpd.http_response(x) FROM no_such_table")
    page.click("#handler-form button[type=submit]")
    error = page.locator(".error")
    expect(error).to_contain_text("invalid query")
    expect(error).to_contain_text('relation "no_such_table" does not exist')
    assert page.input_value("#query") == "SELECT omni_httpd.http_response(x) FROM no_such_table"
    with urllib.request.urlopen("http://127.0.0.1:%d/still" % port, timeout=10) as response:
        assert response.read() == b"served /still"

    # try a request against the saved handler
    page.goto(handler_url + "/try")
    page.fill("#path", "/tried")
    page.fill("#query_string", "a=1")
    page.click("#try-form button[type=submit]")
    expect(page.locator("#outcome-status")).to_contain_text("200 OK")
    expect(page.locator("#outcome-body")).to_have_text("served /tried")

    # the dashboard counts the requests the worker served, and its button reloads
    page.click("nav >> text=Dashboard")

    def served_requests():
        status = page.evaluate("fetch('/status.json').then(r => r.json())")
        return sum(w["requests"] for w in status["workers"]) >= 3
    wait_until(served_requests, what="3 requests counted on the dashboard")
    before = reload_count(dsn)
    page.click("text=Reload configuration")
    expect(page.locator(".notice")).to_have_text("Reload requested.")
    wait_until(lambda: reload_count(dsn) > before, what="a reload after the button")
