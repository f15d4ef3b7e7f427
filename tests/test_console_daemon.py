"""The admin console of the real daemon (`twistd -n omni_httpd`), over HTTP: where a
generated password goes, which Host names the console answers to, and the warning for a
password on the command line."""
from __future__ import annotations

import os
import re
import stat

import pytest_twisted
import treq

from admin_support import ConsoleClient
from daemon_support import Daemon


def console_url(daemon) -> str:
    return daemon.wait_for(r"admin console listening on (http://127\.0\.0\.1:\d+)/").group(1)


@pytest_twisted.ensureDeferred
async def test_generated_password_is_in_a_private_file_not_in_the_log(dsn, tmp_path):
    data_dir = tmp_path / "state"
    daemon = Daemon(dsn, "--http-workers", "1", "--no-init", "--data-dir", str(data_dir),
                    "--admin", "tcp:0:interface=127.0.0.1",
                    "--admin-host", "console.example", "--admin-host", "ops.example")
    try:
        daemon.wait_ready()
        url = console_url(daemon)
        path = data_dir / "admin-password"
        daemon.wait_for(r"admin console password generated: it is in %s \(mode 0600"
                        % re.escape(str(path)))
        mode = os.stat(path).st_mode
        assert stat.S_IMODE(mode) == 0o600 and stat.S_ISREG(mode)
        password = path.read_text().rstrip("\n")
        assert len(password) >= 20
        assert password not in daemon.output

        client = ConsoleClient(url)
        assert (await client.login("not " + password)).status == 403
        page = await client.login(password)
        assert page.status == 303 and page.location == "/", page.text
        assert (await client.get("/")).status == 200

        # DNS rebinding: a page on another name pointed at 127.0.0.1 is not served
        port = url.rsplit(":", 1)[1]
        for host, expected in [("rebound.attacker.example:" + port, 421),
                               ("console.example", 200), ("ops.example:" + port, 200),
                               ("localhost:" + port, 200)]:
            response = await treq.get(url + "/login", headers={"Host": host}, persistent=False)
            body = (await treq.content(response)).decode()
            assert response.code == expected, (host, body)
        assert re.search(r"admin console: refused a request for Host "
                         r"'rebound\.attacker\.example:\d+'", daemon.output)
    finally:
        code = daemon.stop()
    assert code == 0, daemon.output[-3000:]


def test_a_password_on_the_command_line_is_warned_about(dsn, tmp_path):
    daemon = Daemon(dsn, "--http-workers", "1", "--no-init", "--data-dir", str(tmp_path),
                    "--admin", "tcp:0:interface=127.0.0.1", "--admin-password", "on-argv")
    try:
        daemon.wait_ready()
        daemon.wait_for(r"--admin-password on the command line is visible to every local "
                        r"user \(ps\); use --admin-password-file or OMNI_HTTPD_ADMIN_PASSWORD")
        assert "on-argv" not in daemon.output
        assert not (tmp_path / "admin-password").exists()
    finally:
        code = daemon.stop()
    assert code == 0, daemon.output[-3000:]
    # the same password from the environment: no warning
    quiet = Daemon(dsn, "--http-workers", "1", "--no-init", "--data-dir", str(tmp_path),
                   "--admin", "tcp:0:interface=127.0.0.1",
                   env={"OMNI_HTTPD_ADMIN_PASSWORD": "from-env"})
    try:
        quiet.wait_ready()
        console_url(quiet)
        assert "visible to every local user" not in quiet.output
    finally:
        code = quiet.stop()
    assert code == 0, quiet.output[-3000:]
