"""`twistd -n omni_httpd ...` as a real process: the plugin is found, --help lists the
options, invalid command lines end with one line on stderr and exit status 2 (not twistd's
full usage text)."""
import os
import subprocess
import sys

import pytest

from omni_httpd.master import tap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def twistd(args, tmp_path, environ=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNI_HTTPD_")}
    # The checkout's omni_httpd and twisted/plugins come first (twistd does not put the
    # current directory on sys.path).
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.update(environ or {})
    return subprocess.run([TWISTD, "-n", "omni_httpd"] + args, cwd=str(tmp_path), env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)


def test_twistd_is_installed_next_to_the_interpreter():
    assert os.access(TWISTD, os.X_OK), TWISTD


def test_help_lists_every_option(tmp_path):
    result = twistd(["--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Usage: twistd [options] omni_httpd [options]" in result.stdout
    for name in list(tap.PARAMETERS) + list(tap.FLAGS):
        assert "--%s" % name in result.stdout
    assert "OMNI_HTTPD_" in result.stdout


@pytest.mark.parametrize("args, environ, expected", [
    (["--http-workers", "abc"], None,
     "omni_httpd: error: --http-workers: expected a number of workers between 1 and 1024, got 'abc'"),
    (["--no-such-option"], None, "omni_httpd: error: option --no-such-option not recognized"),
    (["--init-port", "123456"], None, "omni_httpd: error: --init-port: expected a port number"),
    (["--admin", "tcp:port"], None, "omni_httpd: error: --admin: invalid endpoint 'tcp:port'"),
    (["--tls-cert", "/nonexistent.pem"], None, "omni_httpd: error: --tls-cert: cannot read /nonexistent.pem"),
    (["--admin-password-file", "/nonexistent"], None,
     "omni_httpd: error: --admin-password-file: cannot read /nonexistent"),
    ([], {"OMNI_HTTPD_HTTP_WORKERS": "-3"}, "omni_httpd: error: OMNI_HTTPD_HTTP_WORKERS: expected"),
])
def test_invalid_command_line_is_one_line_and_exit_status_2(tmp_path, args, environ, expected):
    result = twistd(args, tmp_path, environ)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(expected), lines[0]
    assert os.listdir(str(tmp_path)) == []  # no pid file, no log file
