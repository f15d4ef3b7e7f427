"""Which account the HTTP workers run as, and whether that account can run one.

Started as root, the master keeps root (it binds the ports and runs the embedded
PostgreSQL's programs as that cluster's account) but spawns the workers as an
unprivileged account (``spawnProcess(uid=, gid=)``; Twisted's child calls
``initgroups`` for the account's supplementary groups before ``setuid``):

- ``--worker-user NAME`` when given (``root`` keeps the workers root, on purpose);
- else the embedded cluster's account when the daemon runs the embedded PostgreSQL (the
  cluster's socket lives in its 0700 data directory, reachable only by that account);
- else ``nobody``.

Not root (including under ``twistd --uid/--gid``, which has already dropped
privileges before the master starts): the workers run as the master's account.

Before switching, :func:`worker_requirements` lists what a worker must reach (the
interpreter, the standard library, the packages it imports, the database's socket
directory, the run directory's parent, the TLS files) and :func:`first_inaccessible`
checks each on permission bits. An account that cannot run the worker is an error when
named by ``--worker-user``; for the default account the workers stay root and the master
logs one warning saying why.
"""
from __future__ import annotations

import grp
import importlib.util
import os
import pwd
import stat
import sys
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

R, W, X = os.R_OK, os.W_OK, os.X_OK  # 4, 2, 1: the same numbers as the rwx bits

#: Top-level packages a worker imports (those that are installed).
WORKER_PACKAGES = ("omni_httpd", "twisted", "zope", "psycopg", "psycopg2", "h2", "hpack",
                   "hyperframe", "httptools", "urlpattern", "cryptography", "OpenSSL", "cffi", "attr")

DEFAULT_ACCOUNT = "nobody"


class WorkerAccountError(Exception):
    """--worker-user names an account that cannot be used; str() is one line."""


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    groups: Tuple[int, ...]   # every group the account's processes get (primary included)
    home: str

    @classmethod
    def from_passwd(cls, entry: pwd.struct_passwd) -> "Account":
        try:
            groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
        except OSError:
            groups = (entry.pw_gid,)
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid, groups, entry.pw_dir)


# -- the access check: permission bits only --------------------------------------------
def permits(st: os.stat_result, uid: int, gids: Iterable[int], mode: int) -> bool:
    """Whether a process of uid (with groups gids) may use the file ``st`` with ``mode``
    (a combination of R, W, X), by the permission bits (ACLs are not consulted)."""
    if uid == 0:
        # root passes every check, except executing a file without any x bit
        return not (mode & X) or stat.S_ISDIR(st.st_mode) or bool(st.st_mode & 0o111)
    if st.st_uid == uid:
        bits = st.st_mode >> 6
    elif st.st_gid in set(gids):
        bits = st.st_mode >> 3
    else:
        bits = st.st_mode
    return bits & mode & 7 == mode


def first_inaccessible(path: str, uid: int, gids: Iterable[int], mode: int,
                       stat_fn: Callable[[str], os.stat_result] = os.stat) -> Optional[str]:
    """The first directory on the way to ``path`` (from ``/``) that uid cannot search, or
    ``path`` itself if it cannot be used with ``mode``; None when everything is usable.

    The way is checked as written (no symlink resolved); check ``os.path.realpath(path)``
    too for the way the kernel takes after following links. A path that does not exist
    (or cannot be stat'ed) counts as inaccessible.
    """
    gids = tuple(gids)
    path = os.path.normpath(os.path.abspath(path))
    ways = []
    parent = os.path.dirname(path)
    while True:
        ways.append(parent)
        if parent == os.path.dirname(parent):
            break
        parent = os.path.dirname(parent)
    for directory in reversed(ways):
        try:
            if not permits(stat_fn(directory), uid, gids, X):
                return directory
        except OSError:
            return directory
    try:
        if not permits(stat_fn(path), uid, gids, mode):
            return path
    except OSError:
        return path
    return None


def can_access(path: str, uid: int, gids: Iterable[int], mode: int,
               stat_fn: Callable[[str], os.stat_result] = os.stat) -> bool:
    return first_inaccessible(path, uid, gids, mode, stat_fn) is None


# -- what a worker needs ------------------------------------------------------------------
def _package_paths(names: Iterable[str]) -> List[Tuple[str, int]]:
    needed = []
    for name in names:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is None:
            continue
        if spec.submodule_search_locations:
            needed.extend((location, R | X) for location in spec.submodule_search_locations)
        elif spec.origin and os.path.isfile(spec.origin):
            needed.append((spec.origin, R))
    return needed


def dsn_socket_dirs(dsn: str) -> List[str]:
    """The UNIX socket directories a libpq connection string names (host=/path)."""
    from psycopg2.extensions import parse_dsn
    try:
        host = parse_dsn(dsn).get("host") or os.environ.get("PGHOST") or ""
    except Exception:
        return []
    return [h for h in host.split(",") if h.startswith("/")]


def worker_requirements(dsn: str, run_dir_parent: str, tls_files: Sequence[Optional[str]] = ()
                        ) -> List[Tuple[str, int]]:
    """(path, mode) pairs a worker process must be able to use."""
    needed = [(sys.executable, R | X), (os.path.dirname(os.__file__), R | X)]
    needed += _package_paths(WORKER_PACKAGES)
    needed += [(directory, X) for directory in dsn_socket_dirs(dsn)]
    needed.append((run_dir_parent, X))
    needed += [(path, R) for path in tls_files if path]
    return needed


def inaccessible(account: Account, needed: Iterable[Tuple[str, int]],
                 stat_fn: Callable[[str], os.stat_result] = os.stat) -> Optional[Tuple[str, str]]:
    """(what the worker needs, the path that blocks it) for the first need the account
    cannot meet, following symlinks as the kernel does; None when it can meet them all."""
    for path, mode in needed:
        for way in (os.path.realpath(path), os.path.abspath(path)):
            blocked = first_inaccessible(way, account.uid, account.groups, mode, stat_fn)
            if blocked is not None:
                return path, blocked
    return None


# -- the decision ------------------------------------------------------------------------------
def _mode_text(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError as exc:
        return exc.strerror or "missing"
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return "mode %04o, %s:%s" % (stat.S_IMODE(st.st_mode), owner, group)


def choose_worker_account(explicit: Optional[str], cluster_account: Optional[pwd.struct_passwd],
                          needed: Iterable[Tuple[str, int]]) -> Tuple[Optional[Account], Optional[str]]:
    """(account to spawn workers as or None for "as the master", warning to log or None).

    Raises WorkerAccountError for an explicit ``--worker-user`` that cannot be used.
    """
    if os.geteuid() != 0:
        if explicit is not None and pwd.getpwnam(explicit).pw_uid != os.geteuid():
            raise WorkerAccountError(
                "--worker-user %s: switching accounts needs root, and the daemon runs as uid %d "
                "(under twistd --uid the workers already run as that account: leave --worker-user out)"
                % (explicit, os.geteuid()))
        return None, None
    if explicit is not None:
        entry = pwd.getpwnam(explicit)   # tap.py checked that it exists
    elif cluster_account is not None:
        entry = cluster_account
    else:
        try:
            entry = pwd.getpwnam(DEFAULT_ACCOUNT)
        except KeyError:
            return None, ("HTTP workers run as root: there is no account %r to run them as; "
                          "create one or give --worker-user" % DEFAULT_ACCOUNT)
    if entry.pw_uid == 0:
        return None, None   # --worker-user root: kept root on purpose
    account = Account.from_passwd(entry)
    blocked = inaccessible(account, needed)
    if blocked is None:
        return account, None
    wanted, path = blocked
    where = "%s: %s is %s" % (wanted, path, _mode_text(path)) if wanted != path else \
        "%s (%s)" % (path, _mode_text(path))
    if explicit is not None:
        raise WorkerAccountError(
            "--worker-user %s cannot run the HTTP workers: it cannot use %s; install Python "
            "and omni_httpd where that account can read them, or fix the permissions"
            % (account.name, where))
    return None, ("HTTP workers run as root: account %r cannot use %s; install Python and "
                  "omni_httpd where every account can read them (not below /root), give "
                  "--worker-user an account that can, or run twistd with --uid/--gid "
                  "(--worker-user root keeps the workers root without this warning)"
                  % (account.name, where))


def hand_over(paths: Iterable[str], account: Optional[Account]) -> None:
    """Give the run directory (0700) and the files in it the master made to the workers'
    account: other accounts still cannot enter it; root (the master) always can."""
    if account is None:
        return
    for path in paths:
        os.chown(path, account.uid, account.gid)
