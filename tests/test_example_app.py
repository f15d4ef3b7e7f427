"""The example application of docs/sql-api.md ("A small application"), served as written:
a form that posts, a cookie set with omni_web, a static stylesheet. Real daemon, treq."""
from __future__ import annotations

import os
import re
import shutil
import tempfile

import pytest
import pytest_twisted
import treq

from daemon_support import Daemon, add_listener, effective_port, sql, wait_reloads

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "sql-api.md")


def documented(name: str) -> str:
    """The fenced block that follows ``<!-- example: name -->`` in docs/sql-api.md."""
    text = open(DOCS, encoding="utf-8").read()
    match = re.search(r"<!-- example: %s -->\s*```\w*\n(.*?)```" % re.escape(name), text, re.S)
    assert match, "docs/sql-api.md has no example %r" % name
    return match.group(1)


@pytest.fixture(scope="module")
def app(module_dsn):
    public = tempfile.mkdtemp(prefix="omni_httpd_example_")
    os.chmod(public, 0o755)
    with open(os.path.join(public, "app.css"), "w") as handle:
        handle.write(documented("app.css"))
    os.chmod(os.path.join(public, "app.css"), 0o644)
    daemon = Daemon(module_dsn, "--http-workers", "1", "--no-init", "--admin", "none",
                    "--static-root", "public=" + public)
    try:
        daemon.wait_ready()
        wait_reloads(module_dsn, 1)
        listener_id = add_listener(module_dsn, None)
        wait_reloads(module_dsn, 1)
        setup = documented("app.sql").replace(":listener_id", str(listener_id))
        sql(module_dsn, setup)
        wait_reloads(module_dsn, 1)
        yield "http://127.0.0.1:%d" % effective_port(module_dsn, listener_id)
    finally:
        code = daemon.stop()
        shutil.rmtree(public, ignore_errors=True)
    assert code == 0, daemon.output[-3000:]


@pytest_twisted.ensureDeferred
async def test_the_example_application(app):
    response = await treq.get(app + "/", persistent=False)
    page = (await treq.content(response)).decode()
    assert response.code == 200 and "Hello, stranger!" in page
    assert '<link rel="stylesheet" href="/static/app.css">' in page and '<form method="post"' in page
    response = await treq.get(app + "/static/app.css", persistent=False)
    assert response.code == 200 and response.headers.getRawHeaders("content-type") == ["text/css; charset=utf-8"]
    assert (await treq.content(response)).decode() == documented("app.css")
    # The form posts; the answer sets the cookie and sends the browser back to /.
    response = await treq.post(app + "/greet", data={"name": "Ann <& Bob>"}, allow_redirects=False,
                               persistent=False)
    await treq.content(response)
    assert response.code == 303 and response.headers.getRawHeaders("location") == ["/"]
    [cookie] = response.headers.getRawHeaders("set-cookie")
    assert cookie.startswith("name=") and "HttpOnly" in cookie and "SameSite=Lax" in cookie
    response = await treq.get(app + "/", headers={"Cookie": cookie.split(";")[0]}, persistent=False)
    page = (await treq.content(response)).decode()
    assert "Hello, Ann &lt;&amp; Bob&gt;!" in page and "<& Bob>" not in page
    response = await treq.get(app + "/nothing-here", persistent=False)
    assert response.code == 404
