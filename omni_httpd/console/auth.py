"""Admin console authentication: the password, sessions, CSRF tokens, login slow-down.

The password is kept only as an argon2 hash (argon2-cffi). Sessions are random ids kept
in the master's memory (so logout and expiry are real, and a restart logs everyone out);
the cookie carries the id signed with itsdangerous, and a form's CSRF token is a MAC of
that id under another salt, so no per-form state is stored. Nothing here blocks the
reactor: hashing runs in a thread, the slow-down is a timer.
"""
from __future__ import annotations

import hashlib
import os
import secrets
from typing import Callable, Dict, Optional, Tuple

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from itsdangerous import BadSignature, Signer, URLSafeSerializer
from twisted.internet import defer, task, threads

COOKIE_NAME = "omni_httpd_admin"


class AdminPassword:
    """The console password, from an explicit value, a file, or generated.

    A password file holds the password on its first line, or an argon2 hash of it
    (a line starting with ``$argon2``), so the plain password need not be on disk.
    """

    def __init__(self, password: Optional[str] = None, password_file: Optional[str] = None):
        if password is not None and password_file is not None:
            raise ValueError("give either an admin password or an admin password file, not both")
        self._hasher = PasswordHasher()
        #: The generated password (None unless neither a password nor a file was given);
        #: only the hash stays here once the console has handed it out.
        self.generated: Optional[str] = None
        if password_file is not None:
            try:
                with open(password_file, encoding="utf-8") as f:
                    password = f.readline().rstrip("\r\n")
            except OSError as e:
                raise ValueError("cannot read admin password file %s: %s" % (password_file, e.strerror))
            if not password:
                raise ValueError("admin password file %s is empty" % password_file)
            if password.startswith("$argon2"):
                self._hash = password
                return
        if password is None:
            password = self.generated = secrets.token_urlsafe(18)
        elif not password:
            raise ValueError("the admin password must not be empty")
        self._hash = self._hasher.hash(password)

    def verify(self, candidate: str) -> bool:
        """Blocking check of ``candidate`` (argon2 is deliberately slow: call it in a thread)."""
        try:
            return self._hasher.verify(self._hash, candidate)
        except (VerificationError, InvalidHashError):
            return False


def write_private_file(path: str, text: str) -> None:
    """Write ``text`` to ``path`` readable by this account only (mode 0600).

    The directory is created 0700 if missing. The file is written under a fresh name
    (O_EXCL, O_NOFOLLOW: no one can have planted it, or a symlink, there) and renamed
    over ``path``, so it never exists with wider permissions or half written, and a
    symlink at ``path`` is replaced, not followed.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    temporary = os.path.join(directory, ".%s.%s.tmp" % (os.path.basename(path),
                                                        secrets.token_hex(4)))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temporary, flags, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)        # whatever the umask
            os.write(fd, text.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise


class Sessions:
    """Signed session cookies and CSRF tokens; the set of logged-in sessions.

    A visitor who has not logged in gets a signed random id too (not stored), so the
    login form has a CSRF token like every other form. Logging in issues a new id.
    """

    def __init__(self, clock, lifetime: float = 12 * 3600):
        secret = secrets.token_bytes(32)
        self._cookie = URLSafeSerializer(secret, salt="omni_httpd admin session")
        # The token is a MAC of the session id, not the id itself: the page must not
        # reveal what the HttpOnly cookie hides.
        self._csrf = Signer(secret, salt="omni_httpd admin csrf", digest_method=hashlib.sha256)
        self._clock = clock
        self._lifetime = lifetime
        self._active: Dict[str, float] = {}   # session id -> expiry (clock seconds)

    def session_id(self, cookie: Optional[bytes]) -> Optional[str]:
        """The session id in a cookie value, or None if it is missing or forged."""
        if not cookie:
            return None
        try:
            sid = self._cookie.loads(cookie.decode("ascii"))
        except (BadSignature, UnicodeDecodeError):
            return None
        return sid if isinstance(sid, str) else None

    def new(self, logged_in: bool = False) -> Tuple[str, str]:
        """A fresh session: ``(id, cookie value)``."""
        sid = secrets.token_urlsafe(32)
        if logged_in:
            self._prune()
            self._active[sid] = self._clock.seconds() + self._lifetime
        return sid, self._cookie.dumps(sid)

    def logged_in(self, sid: Optional[str]) -> bool:
        if sid is None:
            return False
        expiry = self._active.get(sid)
        if expiry is None:
            return False
        if expiry <= self._clock.seconds():
            del self._active[sid]
            return False
        return True

    def end(self, sid: Optional[str]) -> None:
        self._active.pop(sid, None)

    def csrf_token(self, sid: str) -> str:
        return self._csrf.get_signature(sid).decode("ascii")

    def csrf_ok(self, sid: Optional[str], token: Optional[str]) -> bool:
        if sid is None or not token:
            return False
        try:
            return self._csrf.verify_signature(sid, token.encode("ascii"))
        except UnicodeEncodeError:
            return False

    def _prune(self) -> None:
        now = self._clock.seconds()
        for sid in [s for s, expiry in self._active.items() if expiry <= now]:
            del self._active[sid]


class _Attempts:
    __slots__ = ("failures", "last_failure", "next_allowed", "lock")

    def __init__(self) -> None:
        self.failures = 0
        self.last_failure = 0.0
        self.next_allowed = 0.0
        self.lock = defer.DeferredLock()


class LoginThrottle:
    """Per-client-address slow-down of failed logins.

    Attempts from one address are handled one at a time. After a failure the address must
    wait ``base * 2**(failures-1)`` seconds (at most ``cap``) before its next attempt is
    even checked, and the failure itself is answered only then, so guessing gets
    exponentially slower (hanging up early gains nothing) while other clients and the
    rest of the console are unaffected. Failures are forgotten after ``forget_after``
    quiet seconds or a successful login.
    """

    def __init__(self, reactor, base: float = 0.5, cap: float = 30.0, forget_after: float = 900.0):
        self._reactor = reactor
        self.base = base
        self.cap = cap
        self.forget_after = forget_after
        self._by_address: Dict[str, _Attempts] = {}

    def delay_after(self, failures: int) -> float:
        return min(self.cap, self.base * 2 ** (failures - 1)) if failures > 0 else 0.0

    def failures(self, address: str) -> int:
        entry = self._by_address.get(address)
        return entry.failures if entry else 0

    def next_allowed(self, address: str) -> float:
        """Reactor time before which no attempt from ``address`` is checked."""
        entry = self._by_address.get(address)
        return entry.next_allowed if entry else 0.0

    async def attempt(self, address: str, check: Callable[[], "defer.Deferred[bool]"]) -> bool:
        """Run ``check`` (a password check) for ``address``; True if it succeeded."""
        self._prune()
        entry = self._by_address.setdefault(address, _Attempts())
        await entry.lock.acquire()
        try:
            await self._wait_until(entry.next_allowed)
            if entry.failures and self._reactor.seconds() - entry.last_failure > self.forget_after:
                entry.failures = 0
            if await check():
                entry.failures = 0
                entry.next_allowed = 0.0
                return True
            entry.failures += 1
            entry.last_failure = self._reactor.seconds()
            entry.next_allowed = entry.last_failure + self.delay_after(entry.failures)
            await self._wait_until(entry.next_allowed)
            return False
        finally:
            entry.lock.release()

    async def _wait_until(self, moment: float) -> None:
        delay = moment - self._reactor.seconds()
        if delay > 0:
            await task.deferLater(self._reactor, delay)

    def _prune(self) -> None:
        now = self._reactor.seconds()
        stale = [a for a, e in self._by_address.items()
                 if not e.lock.locked and now - e.last_failure > self.forget_after]
        for address in stale:
            del self._by_address[address]


def verify_in_thread(reactor, password: AdminPassword, candidate: str) -> "defer.Deferred[bool]":
    """Check ``candidate`` on the reactor's thread pool (argon2 takes tens of ms)."""
    return threads.deferToThreadPool(reactor, reactor.getThreadPool(), password.verify, candidate)
