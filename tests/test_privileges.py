"""Workers of a root master run unprivileged (privileges.py, --worker-user).

The unit tests check the permission-bit walk on a fake file tree (pure) and on real
directories. The daemon tests run the real daemon; what they expect depends on who runs
them (root in CI, or a normal user: then the feature is inactive) and on whether the
worker's account can actually run a worker here, which they find out independently of
the code under test: by running the interpreter as that account.
"""
from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile

import pytest

from daemon_support import ROOT, Daemon, effective_port, sql, twistd_argv, wait_until
from omni_httpd.master import privileges
from omni_httpd.master import tap
from omni_httpd.master.privileges import R, W, X, Account, first_inaccessible, permits

IS_ROOT = os.geteuid() == 0
NOBODY = pwd.getpwnam("nobody")
#: an account that is not ours, for --worker-user
OTHER = "nobody" if IS_ROOT else "root"
WARNING = r"HTTP workers run as root: account '([^']+)' cannot use "


# -- the permission-bit check (pure: a fake file tree) ---------------------------------------
def fake_tree(entries):
    """stat function over {path: (mode, uid, gid)}; other paths do not exist."""
    def stat_fn(path):
        if path not in entries:
            raise FileNotFoundError(path)
        mode, uid, gid = entries[path]
        kind = stat.S_IFREG if "." in os.path.basename(path) else stat.S_IFDIR
        return os.stat_result((kind | mode, 0, 0, 1, uid, gid, 0, 0, 0, 0))
    return stat_fn


TREE = fake_tree({
    "/": (0o755, 0, 0),
    "/root": (0o700, 0, 0),
    "/root/python.bin": (0o755, 0, 0),
    "/usr": (0o755, 0, 0),
    "/usr/python.bin": (0o755, 0, 0),
    "/usr/private.key": (0o600, 0, 0),
    "/usr/group.key": (0o640, 0, 50),
    "/usr/own.key": (0o600, 1000, 1000),
    "/srv": (0o750, 0, 50),
    "/srv/app.py": (0o644, 0, 0),
    "/srv/noexec.bin": (0o644, 0, 0),
})


def test_permits_reads_owner_group_and_other_bits():
    st = TREE("/usr/group.key")
    assert permits(st, 1000, [50], R)          # group bits
    assert not permits(st, 1000, [50], W)
    assert not permits(st, 1000, [60], R)      # other bits: none
    assert permits(TREE("/usr/own.key"), 1000, [1000], R | W)   # owner bits
    assert not permits(TREE("/usr/own.key"), 1001, [1000], R)   # not the owner, other bits
    # root: everything, except executing a file without any x bit
    assert permits(TREE("/usr/private.key"), 0, [0], R | W)
    assert permits(TREE("/root"), 0, [0], X)
    assert not permits(TREE("/srv/noexec.bin"), 0, [0], X)


def test_first_inaccessible_walks_every_parent():
    # the situation of this sandbox: the interpreter below a 0700 /root
    assert first_inaccessible("/root/python.bin", 65534, [65534], R | X, TREE) == "/root"
    assert first_inaccessible("/root/python.bin", 0, [0], R | X, TREE) is None
    assert first_inaccessible("/usr/python.bin", 65534, [65534], R | X, TREE) is None
    # the file itself
    assert first_inaccessible("/usr/private.key", 65534, [65534], R, TREE) == "/usr/private.key"
    assert first_inaccessible("/usr/group.key", 65534, [65534, 50], R, TREE) is None
    # a directory reachable only through a supplementary group
    assert first_inaccessible("/srv/app.py", 1000, [1000], R, TREE) == "/srv"
    assert first_inaccessible("/srv/app.py", 1000, [1000, 50], R, TREE) is None
    # something missing counts as inaccessible: the first missing component
    assert first_inaccessible("/usr/nothing/x.py", 1000, [1000], R, TREE) == "/usr/nothing"
    assert privileges.can_access("/usr/python.bin", 1000, [1000], X, TREE)
    assert not privileges.can_access("/srv/noexec.bin", 1000, [1000, 50], X, TREE)


def test_check_on_real_directories_and_symlinks():
    base = tempfile.mkdtemp(prefix="omni_httpd_access_")   # in the temp dir: every account can reach it
    try:
        os.chmod(base, 0o755)
        closed, opened = os.path.join(base, "closed"), os.path.join(base, "open")
        os.mkdir(closed, 0o700)
        os.mkdir(opened, 0o755)
        target = os.path.join(closed, "python")
        with open(target, "wb") as handle:
            handle.write(b"#!/bin/sh\n")
        os.chmod(target, 0o755)
        link = os.path.join(opened, "python")
        os.symlink(target, link)
        os.chmod(closed, 0o700)
        # an account that owns none of this (the check only needs numbers)
        nobody = Account("stranger", 4242424, 4242424, (4242424,), "/")
        assert os.stat(target).st_uid != nobody.uid
        assert first_inaccessible(base, nobody.uid, nobody.groups, X) is None
        # Reachable as written (the link is in an open directory), not where it leads.
        assert first_inaccessible(link, nobody.uid, nobody.groups, R | X) is None
        assert privileges.inaccessible(nobody, [(link, R | X)]) == (link, closed)
        os.chmod(closed, 0o711)   # search, no listing: enough
        assert privileges.inaccessible(nobody, [(link, R | X)]) is None
        os.chmod(target, 0o700)
        assert privileges.inaccessible(nobody, [(link, R | X)]) == (link, target)
        # the owner of a file gets the owner bits, whatever the others get
        me = Account("me", os.stat(target).st_uid, os.stat(target).st_gid, (), "/")
        assert privileges.inaccessible(me, [(link, R | X)]) is None
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_dsn_socket_directories():
    assert privileges.dsn_socket_dirs("host=/run/pg port=5432 dbname=x") == ["/run/pg"]
    assert privileges.dsn_socket_dirs("host=db.example,/tmp/s dbname=x") == ["/tmp/s"]
    assert privileges.dsn_socket_dirs("postgresql://u@localhost/db") == []


def test_requirements_name_interpreter_packages_socket_run_dir_and_tls():
    needed = dict(privileges.worker_requirements("host=/run/pg dbname=x", "/tmp", ("/etc/c.pem", None)))
    assert needed[sys.executable] == R | X
    assert needed["/run/pg"] == X and needed["/tmp"] == X and needed["/etc/c.pem"] == R
    package = os.path.dirname(os.path.dirname(os.path.abspath(privileges.__file__)))   # omni_httpd/
    assert needed[package] == R | X


def test_choosing_the_account():
    blocked = [("/nonexistent/python", R | X)]
    if IS_ROOT:
        # default account that cannot run a worker: stay root, one warning naming both
        account, warning = privileges.choose_worker_account(None, None, blocked)
        assert account is None
        assert re.match(WARNING, warning) and "/nonexistent" in warning and "'nobody'" in warning
        # the embedded cluster's account is the default when there is one
        postgres_like = pwd.getpwnam("nobody")
        account, warning = privileges.choose_worker_account(None, postgres_like, [])
        assert warning is None and account.uid == postgres_like.pw_uid
        assert postgres_like.pw_gid in account.groups
        # explicit: an error, one line
        with pytest.raises(privileges.WorkerAccountError) as error:
            privileges.choose_worker_account("nobody", None, blocked)
        assert "--worker-user nobody cannot run the HTTP workers" in str(error.value)
        assert "\n" not in str(error.value)
        # --worker-user root: kept root on purpose, no warning
        assert privileges.choose_worker_account("root", None, blocked) == (None, None)
    else:
        # not root: workers run as the master's account, nothing is checked
        assert privileges.choose_worker_account(None, None, blocked) == (None, None)
        me = pwd.getpwuid(os.geteuid()).pw_name
        assert privileges.choose_worker_account(me, None, blocked) == (None, None)
        with pytest.raises(privileges.WorkerAccountError) as error:
            privileges.choose_worker_account(OTHER, None, blocked)
        assert "needs root" in str(error.value)


def test_worker_user_option(capsys):
    options = tap.Options(environ={"OMNI_HTTPD_WORKER_USER": "nobody"})
    options.parseOptions([])
    assert options.settings.worker_user == "nobody"
    options = tap.Options(environ={})
    options.parseOptions(["--worker-user", "root"])
    assert options.settings.worker_user == "root"
    assert tap.Options(environ={}).parseOptions([]) is None
    with pytest.raises(SystemExit) as exit_info:
        tap.Options(environ={}).parseOptions(["--worker-user", "no-such-account-here"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "no such account 'no-such-account-here'" in err[0]


# -- real daemons ------------------------------------------------------------------------------------
def get_status(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return sock.recv(64)


def uid_of(pid: int) -> int:
    with open("/proc/%d/status" % pid) as handle:
        for line in handle:
            if line.startswith("Uid:"):
                return int(line.split()[1])   # real uid (effective, saved, fs follow)
    raise AssertionError("no Uid line for pid %d" % pid)


def account_can_run_worker(python: str, account: pwd.struct_passwd, dsn=None, pythonpath=None) -> bool:
    """Whether ``python`` run as account imports the worker (and reaches the database):
    found out by doing it, not with the code under test."""
    code = "import omni_httpd.worker.main, twisted, psycopg2, h2, httptools"
    if dsn:
        code += "; psycopg2.connect(%r).close()" % dsn
    env = dict(os.environ, PYTHONPATH=pythonpath or os.pathsep.join(os.path.abspath(p) for p in sys.path))
    try:
        return subprocess.run([python, "-c", code], user=account.pw_uid, group=account.pw_gid,
                              extra_groups=os.getgrouplist(account.pw_name, account.pw_gid),
                              cwd="/", env=env, capture_output=True, timeout=60).returncode == 0
    except OSError:
        return False


def test_root_workers_stay_root_with_one_warning_when_the_account_cannot_run_them(empty_dsn):
    daemon = Daemon(empty_dsn, "--http-workers", "2", "--init-port", "0", "--admin", "none")
    try:
        daemon.wait_ready()
        port = effective_port(empty_dsn, sql(empty_dsn, "SELECT min(id) FROM omni_httpd.listeners",
                                              fetch=True)[0][0])
        assert get_status(port).startswith(b"HTTP/1.1 200")
        pids = wait_until(lambda: len(daemon.worker_pids()) == 2 and daemon.worker_pids(), what="2 workers")
        warnings = [line for line in daemon.lines if re.search(WARNING, line)]
        if not IS_ROOT:
            assert warnings == [] and "HTTP workers run as account" not in daemon.output
            assert {uid_of(pid) for pid in pids} == {os.geteuid()}
        elif not account_can_run_worker(sys.executable, NOBODY, empty_dsn):
            # This sandbox and CI: the interpreter is below /root (0700).
            assert len(warnings) == 1, daemon.output
            assert "account 'nobody' cannot use" in warnings[0]
            assert "--worker-user" in warnings[0] and "--uid" in warnings[0]
            assert {uid_of(pid) for pid in pids} == {0}
        else:
            assert warnings == []
            assert {uid_of(pid) for pid in pids} == {NOBODY.pw_uid}
        # A worker restarted later is not checked again: still one warning, same account.
        os.kill(pids[0], signal.SIGKILL)
        restarted = wait_until(lambda: daemon.worker_pids()[0] != pids[0] and daemon.worker_pids()[0],
                               what="worker 0 restarted")
        wait_until(lambda: get_status(port).startswith(b"HTTP/1.1 200"), what="serving again")
        assert uid_of(restarted) == uid_of(pids[1])
        assert len([line for line in daemon.lines if re.search(WARNING, line)]) == len(warnings)
        assert daemon.stop() == 0
    finally:
        daemon.stop()


def test_explicit_worker_user_that_cannot_run_workers_is_a_one_line_error(empty_dsn, tmp_path):
    from tests.test_tls import make_certificate

    os.chmod(tmp_path, 0o700)
    cert, key = make_certificate(tmp_path)
    os.chmod(key, 0o600)   # root's private key in root's private directory
    result = subprocess.run(twistd_argv("--dsn", empty_dsn, "--admin", "none", "--no-init",
                                        "--tls-cert", cert, "--tls-key", key, "--worker-user", OTHER),
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("omni_httpd: error:")]
    assert len(errors) == 1, result.stderr + result.stdout
    if IS_ROOT:
        assert "--worker-user nobody cannot run the HTTP workers: it cannot use" in errors[0]
    else:
        assert "--worker-user root: switching accounts needs root" in errors[0]
    assert "Traceback" not in result.stderr
    assert "worker 0 started" not in result.stdout


def _accessible_python(account: pwd.struct_passwd):
    """(interpreter, PYTHONPATH) of a Python of our version that ``account`` can run with
    our packages, or None. Ours usually cannot (pyenv below /root); a system one may."""
    version = "python%d.%d" % sys.version_info[:2]
    pythonpath = os.pathsep.join([ROOT, sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    for candidate in (sys.executable, "/usr/bin/" + version, "/usr/local/bin/" + version):
        if os.path.exists(candidate) and account_can_run_worker(candidate, account, pythonpath=pythonpath):
            return candidate, pythonpath
    return None


def test_workers_run_as_the_embedded_clusters_account_when_it_can_run_them():
    base = tempfile.mkdtemp(prefix="omni_httpd_priv_")
    os.chmod(base, 0o755)
    data_dir = os.path.join(base, "data")
    os.mkdir(data_dir)
    os.chmod(data_dir, 0o755)   # made private (0700) at start
    try:
        from omni_httpd.master.embedded_pg import service_account
        account = service_account()   # root: postgres or nobody; else None
        found = _accessible_python(account) if account is not None else (sys.executable, None)
        if found is None:
            # Nothing here that the account could run a worker with: the case the test
            # above covers. Make sure that is really so for our own interpreter.
            assert not account_can_run_worker(sys.executable, account)
            return
        python, pythonpath = found
        env = {"PYTHONPATH": pythonpath} if pythonpath else {}
        daemon = Daemon(None, "--data-dir", data_dir, "--http-workers", "2", "--init-port", "0",
                        "--admin", "none", env=env, python=python)
        try:
            daemon.wait_ready(90)
            dsn = daemon.wait_for(r'connect with: psql "([^"]+)"').group(1)
            port = effective_port(dsn, sql(dsn, "SELECT min(id) FROM omni_httpd.listeners", fetch=True)[0][0])
            assert get_status(port).startswith(b"HTTP/1.1 200")
            pids = wait_until(lambda: len(daemon.worker_pids()) == 2 and daemon.worker_pids(), what="2 workers")
            pgdata = os.path.join(data_dir, "pgdata")
            for path in (data_dir, pgdata):
                assert stat.S_IMODE(os.stat(path).st_mode) == 0o700, path
            cluster_uid = os.stat(pgdata).st_uid
            assert {uid_of(pid) for pid in pids} == {cluster_uid}
            assert uid_of(daemon.proc.pid) == os.geteuid()    # the master keeps its account
            assert not re.search(WARNING, daemon.output)
            run_dir = daemon.wait_for(r"SiblingServer starting on '([^']+)/worker-0\.sock'").group(1)
            st = os.stat(run_dir)
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (cluster_uid, 0o700)
            for name in ("scoreboard", "worker-0.sock", "worker-1.sock"):
                assert os.stat(os.path.join(run_dir, name)).st_uid == cluster_uid, name
            if IS_ROOT:
                assert cluster_uid != 0
                assert "HTTP workers run as account %r" % pwd.getpwuid(cluster_uid).pw_name in daemon.output
                with open("/proc/%d/status" % pids[0]) as handle:
                    groups = next(l for l in handle if l.startswith("Groups:")).split()[1:]
                expected = os.getgrouplist(pwd.getpwuid(cluster_uid).pw_name, os.stat(pgdata).st_gid)
                assert sorted(int(g) for g in groups) == sorted(set(expected))
            else:
                assert "HTTP workers run as account" not in daemon.output
            assert daemon.stop() == 0
        finally:
            daemon.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)

