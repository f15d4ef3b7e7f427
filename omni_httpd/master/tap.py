"""The command line of ``twistd omni_httpd``: :class:`Options` and :func:`makeService`.

Every option can also be given as an environment variable ``OMNI_HTTPD_<NAME>`` (name
upper-cased, dashes as underscores, e.g. ``OMNI_HTTPD_HTTP_WORKERS=4``); the command line
wins, an empty variable counts as unset. Flags take 1/true/yes/on or 0/false/no/off.

An invalid value is reported as one line on stderr and twistd exits with status 2
(twistd's own handling would print the whole usage text first).
"""
from __future__ import annotations

import ipaddress
import math
import os
import re
import sys
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from twisted.application.service import IService
from twisted.logger import Logger
from twisted.python import usage

from omni_httpd.common.settings import Settings

log = Logger()

ENV_PREFIX = "OMNI_HTTPD_"
EXIT_USAGE = 2
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_ADMIN_DISABLED = {"", "none", "off", "no", "false", "disabled"}


def env_name(option: str) -> str:
    """``http-workers`` -> ``OMNI_HTTPD_HTTP_WORKERS``."""
    return ENV_PREFIX + option.upper().replace("-", "_")


# -- value converters: return the typed value or raise ValueError(explanation) ---------
def _text(raw: str) -> str:
    if not raw.strip():
        raise ValueError("must not be empty")
    return raw


def _dsn(raw: str) -> str:
    from psycopg2.extensions import parse_dsn
    if not raw.strip():
        raise ValueError("must not be empty (leave --dsn out for the embedded PostgreSQL)")
    try:
        parse_dsn(raw)
    except Exception as exc:  # psycopg2.ProgrammingError: libpq's own explanation
        raise ValueError("not a valid PostgreSQL connection string (%s)"
                         % str(exc).strip().splitlines()[0]) from None
    return raw


def _directory(raw: str) -> str:
    path = os.path.abspath(os.path.expanduser(_text(raw)))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError("%s exists and is not a directory" % path)
    return path


def _integer(raw: str, low: int, high: int, what: str) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise ValueError("expected %s, got %r" % (what, raw)) from None
    if not low <= value <= high:
        raise ValueError("expected %s, got %d" % (what, value))
    return value


def _workers(raw: str) -> int:
    return _integer(raw, 1, 1024, "a number of workers between 1 and 1024")


def _port(raw: str) -> int:
    return _integer(raw, 0, 65535, "a port number between 0 and 65535")


def _address(raw: str) -> str:
    try:
        return str(ipaddress.ip_address(raw.strip()))
    except ValueError:
        raise ValueError("expected an IPv4 or IPv6 address, got %r" % raw) from None


def _endpoint(raw: str) -> Optional[str]:
    """A Twisted server endpoint description, or None for "no admin console"."""
    if raw.strip().lower() in _ADMIN_DISABLED:
        return None
    from twisted.internet.endpoints import serverFromString
    try:
        # Only parses the description (and loads files an ssl: endpoint names); the
        # reactor argument is merely stored, so none is needed yet.
        endpoint = serverFromString(object(), raw)
    except Exception as exc:
        raise ValueError("invalid endpoint %r (%s); expected e.g. tcp:8081:interface=127.0.0.1, or none"
                         % (raw, exc)) from None
    port = getattr(endpoint, "_port", None)
    if isinstance(port, int) and not 0 <= port <= 65535:
        raise ValueError("invalid endpoint %r: port %d out of range" % (raw, port))
    return raw


def _log_format(raw: str) -> str:
    from omni_httpd.common.logformat import FORMATS
    value = raw.strip().lower()
    if value not in FORMATS:
        raise ValueError("expected one of %s, got %r" % (", ".join(FORMATS), raw))
    return value


def _readable_file(raw: str) -> str:
    path = os.path.abspath(os.path.expanduser(_text(raw)))
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as exc:
        raise ValueError("cannot read %s: %s" % (path, exc.strerror)) from None
    return path


def _account(raw: str) -> str:
    import pwd
    name = _text(raw).strip()
    try:
        pwd.getpwnam(name)
    except KeyError:
        raise ValueError("no such account %r" % name) from None
    return name


def _password_file(raw: str) -> str:
    path = _readable_file(raw)
    with open(path, encoding="utf-8", errors="replace") as handle:
        first_line = handle.readline().strip()
    if not first_line:
        raise ValueError("%s is empty (the password is its first line)" % path)
    return path


def _address_rules(raw: str) -> str:
    from omni_httpd.common.proxy_rules import parse_address_rules
    rules = parse_address_rules(_text(raw))
    if not rules:
        raise ValueError("must name at least one address, network or class")
    return ",".join(rules)


_HOST_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?$")


def _host_names(raw: str) -> str:
    """Comma-separated host names (or IP addresses), normalised: lower case, no final dot."""
    names = []
    for item in _text(raw).split(","):
        name = item.strip().lower()
        if not name:
            continue
        if name.startswith("[") and name.endswith("]"):
            name = name[1:-1]
        try:
            names.append(str(ipaddress.ip_address(name)))
            continue
        except ValueError:
            pass
        name = name.rstrip(".")
        if ":" in name:
            raise ValueError("%r: give the name without a port" % item.strip())
        if not name or not all(_HOST_LABEL.match(label) for label in name.split(".")):
            raise ValueError("%r is not a host name or IP address" % item.strip())
        names.append(name)
    if not names:
        raise ValueError("must name at least one host")
    return ",".join(names)


_ROOT_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def _static_roots(raw) -> Dict[str, str]:
    """``NAME=DIR`` entries: one per --static-root, comma-separated in the environment."""
    entries = raw if isinstance(raw, list) else [item for item in _text(raw).split(",") if item.strip()]
    roots: Dict[str, str] = {}
    for entry in entries:
        name, sep, directory = entry.partition("=")
        name = name.strip()
        if not sep or not name or not directory.strip():
            raise ValueError("expected NAME=DIR, got %r" % entry)
        if not _ROOT_NAME.match(name):
            raise ValueError("root name %r: use letters, digits, '_', '.', '-'" % name)
        if name in roots:
            raise ValueError("root name %r given twice" % name)
        path = os.path.abspath(os.path.expanduser(directory))
        if not os.path.isdir(path):
            raise ValueError("%s (root %r) is not a directory" % (path, name))
        roots[name] = path
    return roots


_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]?)(?:i?b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}


def _size(raw: str) -> int:
    match = _SIZE.match(raw)
    if not match:
        raise ValueError("expected a size in bytes (optionally with a K, M or G suffix), got %r" % raw)
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


def _seconds(raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError("expected a number of seconds, got %r" % raw) from None
    if not math.isfinite(value) or value < 0:
        raise ValueError("expected a non-negative number of seconds, got %r" % raw)
    return value


def _flag(raw: str) -> bool:
    text = raw.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError("expected 1/true/yes/on or 0/false/no/off, got %r" % raw)


_DEFAULTS = Settings()

# option name -> (Settings field, converter, help text). Defaults come from Settings.
PARAMETERS: Dict[str, Tuple[str, Callable[[str], Any], str]] = {
    "dsn": ("dsn", _dsn,
            "PostgreSQL connection string. Default: an embedded PostgreSQL cluster "
            "in --data-dir, created on first start."),
    "data-dir": ("data_dir", _directory,
                 "Directory of the embedded cluster (used without --dsn). "
                 "Default: /var/lib/omni_httpd as root, else ~/.local/share/omni_httpd."),
    "http-workers": ("http_workers", _workers,
                     "Number of HTTP worker processes. Default: CPUs online (%d here)."
                     % _DEFAULTS.http_workers),
    "init-port": ("init_port", _port,
                  "Port of the default listener created on first start. Default: %d."
                  % _DEFAULTS.init_port),
    "init-listen-address": ("init_listen_address", _address,
                            "Address of the default listener. Default: %s."
                            % _DEFAULTS.init_listen_address),
    "admin": ("admin", _endpoint,
              "Admin console endpoint, or 'none' to disable it. Default: %s." % _DEFAULTS.admin),
    "metrics": ("metrics", _endpoint,
                "Endpoint of the master's /live, /ready and /metrics (Prometheus), or 'none'. "
                "Unauthenticated: keep it on a private interface. Default: %s." % _DEFAULTS.metrics),
    "log-format": ("log_format", _log_format,
                   "Log lines as 'text' or 'json' (one object per line, workers' lines "
                   "included). Default: text."),
    "admin-host": ("admin_hosts", _host_names,
                   "Another name the admin console is reached by (e.g. a reverse proxy's), "
                   "repeatable or comma-separated. Requests with any other Host get 421."),
    "admin-password": ("admin_password", _text,
                       "Admin console password. Visible in ps: prefer --admin-password-file "
                       "or OMNI_HTTPD_ADMIN_PASSWORD. Default: generated and written to "
                       "<data-dir>/admin-password (mode 0600)."),
    "admin-password-file": ("admin_password_file", _password_file,
                            "File whose first line is the admin console password."),
    "tls-cert": ("tls_cert", _readable_file,
                 "PEM certificate (chain) for https listeners."),
    "tls-key": ("tls_key", _readable_file,
                "PEM private key for https listeners. Default: the --tls-cert file."),
    "max-body": ("max_body", _size,
                 "Largest request body accepted (bytes; K, M, G suffixes). Default: 16M."),
    "max-connection-body-buffer": ("max_connection_body_buffer", _size,
                                   "HTTP/2: request body bytes one connection may have in "
                                   "memory at once (larger uploads wait their turn). At least "
                                   "--max-body. Default: 32M (or --max-body if larger)."),
    "max-worker-body-buffer": ("max_worker_body_buffer", _size,
                               "HTTP/2: request body bytes all connections of one worker may "
                               "have in memory at once. At least --max-connection-body-buffer. "
                               "Default: 128M (or --max-connection-body-buffer if larger)."),
    "max-header-size": ("max_header_size", _size,
                        "Largest request head (all header lines). Default: 64K."),
    "max-pipeline-bytes": ("max_pipeline_bytes", _size,
                           "HTTP/1: request bodies a connection may have waiting for their "
                           "turn before reading from it pauses (bytes; K, M, G suffixes). "
                           "Default: 1M."),
    "header-timeout": ("header_timeout", _seconds,
                       "Seconds a client may take to send the request head. Default: %g."
                       % _DEFAULTS.header_timeout),
    "body-timeout": ("body_timeout", _seconds,
                     "Seconds a request body may stall. Default: %g." % _DEFAULTS.body_timeout),
    "idle-timeout": ("idle_timeout", _seconds,
                     "Seconds an idle keep-alive connection stays open (and an HTTP/1 client may "
                     "leave our answers unread). Default: %g."
                     % _DEFAULTS.idle_timeout),
    "shutdown-grace": ("shutdown_grace", _seconds,
                       "Seconds in-flight requests may run after SIGTERM. Default: %g."
                       % _DEFAULTS.shutdown_grace),
    "handler-timeout": ("handler_timeout", _seconds,
                        "statement_timeout of handler queries in seconds, 0 for none. Default: %g."
                        % _DEFAULTS.handler_timeout),
    "handler-lock-timeout": ("handler_lock_timeout", _seconds,
                             "lock_timeout of handler queries in seconds, 0 for none. Default: %g."
                             % _DEFAULTS.handler_lock_timeout),
    "worker-user": ("worker_user", _account,
                    "Account the HTTP workers run as when the daemon is started as root "
                    "(root keeps them root). Default: the embedded cluster's account, or "
                    "nobody with --dsn; if that account cannot run a worker they stay root, "
                    "with a warning. Not root (e.g. twistd --uid): workers run as the daemon's account."),
    "proxy-allow": ("proxy_allow", _address_rules,
                    "Addresses proxy outcomes may connect to: networks (CIDR), addresses or "
                    "any, loopback, private, link-local; comma-separated. Default: any."),
    "trusted-proxies": ("trusted_proxies", _address_rules,
                        "Proxies (networks in CIDR, addresses, loopback, private, link-local; "
                        "comma-separated) whose X-Forwarded-For/Forwarded are believed: the "
                        "omnigres-connecting-ip request header then names the client they "
                        "report, and proxy outcomes append to those headers. Default: none."),
    "proxy-deny": ("proxy_deny", _address_rules,
                   "Addresses proxy outcomes may not connect to, even if allowed "
                   "(same syntax), e.g. loopback,link-local. Default: none."),
    "static-root": ("static_roots", _static_roots,
                    "NAME=DIR: a directory static files may be served from, named by "
                    "omni_httpd.static_files rows; repeatable (comma-separated in the "
                    "environment). Default: none (no static files)."),
}

#: Parameters that may be given more than once; the values are joined with commas.
REPEATABLE = frozenset(["admin-host", "static-root"])

# flag name -> (Settings field, value when given, help text)
FLAGS: Dict[str, Tuple[str, bool, str]] = {
    "no-init": ("init", False, "Do not create the default listener and handler on first start."),
    "no-access-log": ("access_log", False, "Do not log a line per request."),
    "trust-forwarded": ("trust_forwarded", True,
                        "Trust X-Forwarded-For/Forwarded from the client (only behind a proxy "
                        "that sets them): proxy outcomes append to them instead of replacing "
                        "them."),
}


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = ("Serve HTTP with request handlers that are SQL queries stored in PostgreSQL. "
                "Every option may also be set as an environment variable OMNI_HTTPD_<NAME>, "
                "e.g. OMNI_HTTPD_HTTP_WORKERS=4; the command line wins.")
    optFlags = [[name, None, doc] for name, (_field, _value, doc) in FLAGS.items()]
    optParameters = [[name, None, None, doc] for name, (_field, _conv, doc) in PARAMETERS.items()]

    def __init__(self, environ: Optional[Mapping[str, str]] = None) -> None:
        super().__init__()
        self.environ = os.environ if environ is None else environ
        self.settings: Optional[Settings] = None

    def opt_admin_host(self, value: str) -> None:
        # One method for the repeatable parameters (see REPEATABLE): twistd's table
        # would keep only the last value.
        previous = self["admin-host"]
        self["admin-host"] = value if previous is None else previous + "," + value

    # usage.Options takes a handler's help from its docstring.
    opt_admin_host.__doc__ = PARAMETERS["admin-host"][2]

    def opt_static_root(self, value: str) -> None:
        # A list, not a comma-joined string: a directory may hold a comma.
        previous = self["static-root"]
        self["static-root"] = [value] if previous is None else previous + [value]

    opt_static_root.__doc__ = PARAMETERS["static-root"][2]

    def parseOptions(self, options=None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError as exc:
            # One line, not twistd's full usage text followed by the error.
            sys.stderr.write("omni_httpd: error: %s (see: twistd omni_httpd --help)\n" % exc)
            sys.stderr.flush()
            raise SystemExit(EXIT_USAGE)

    def postOptions(self) -> None:
        values: Dict[str, Any] = {}
        for name, (field, convert, _doc) in PARAMETERS.items():
            raw, source = self[name], "--" + name
            if raw is None and self.environ.get(env_name(name)):
                raw, source = self.environ[env_name(name)], env_name(name)
            if raw is None:
                continue
            try:
                values[field] = convert(raw)
            except ValueError as exc:
                raise usage.UsageError("%s: %s" % (source, exc)) from None
        for name, (field, value, _doc) in FLAGS.items():
            given = bool(self[name])
            if not given and self.environ.get(env_name(name)):
                try:
                    given = _flag(self.environ[env_name(name)])
                except ValueError as exc:
                    raise usage.UsageError("%s: %s" % (env_name(name), exc)) from None
            if given:
                values[field] = value
        self._check_combinations(values)
        self.settings = Settings(**values)
        if self["admin-password"] is not None:
            # Any local user can read a command line (ps, /proc/PID/cmdline).
            log.warn("--admin-password on the command line is visible to every local user "
                     "(ps); use --admin-password-file or OMNI_HTTPD_ADMIN_PASSWORD instead")

    @staticmethod
    def _check_combinations(values: Dict[str, Any]) -> None:
        if values.get("admin_password") is not None and values.get("admin_password_file"):
            raise usage.UsageError("--admin-password and --admin-password-file are mutually exclusive")
        if values.get("tls_key") and not values.get("tls_cert"):
            raise usage.UsageError("--tls-key needs --tls-cert")
        if values.get("tls_cert"):
            values.setdefault("tls_key", values["tls_cert"])
            _check_tls(values["tls_cert"], values["tls_key"])
        # Each body budget must hold the largest body the next smaller limit allows, or
        # such an upload could never be admitted; defaults grow along, given values must fit.
        smaller = ("--max-body", values.get("max_body", _DEFAULTS.max_body))
        for option, field in (("--max-connection-body-buffer", "max_connection_body_buffer"),
                              ("--max-worker-body-buffer", "max_worker_body_buffer")):
            given = values.get(field)
            if given is None:
                values[field] = max(getattr(_DEFAULTS, field), smaller[1])
            elif given < smaller[1]:
                raise usage.UsageError("%s (%d bytes) must be at least %s (%d bytes)"
                                       % (option, given, smaller[0], smaller[1]))
            smaller = (option, values[field])


def _check_tls(cert: str, key: str) -> None:
    """Load the pair once now, so a bad file is a start-up error, not a failed listener."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    with open(cert, "rb") as handle:
        cert_pem = handle.read()
    with open(key, "rb") as handle:
        key_pem = handle.read()
    try:
        certificate = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise usage.UsageError("--tls-cert: %s is not a PEM certificate" % cert) from None
    try:
        # password=None: an encrypted key is refused here, never prompted for.
        private_key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise usage.UsageError("--tls-key: %s is encrypted; give an unencrypted key" % key) from None
    except (ValueError, Exception):
        raise usage.UsageError("--tls-key: %s is not a PEM private key" % key) from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.PEM
    if (certificate.public_key().public_bytes(encoding, public)
            != private_key.public_key().public_bytes(encoding, public)):
        raise usage.UsageError("--tls-key: %s does not match the certificate %s" % (key, cert))


def makeService(options: Options) -> IService:
    # Imported here so that `--help` and option errors work without loading the daemon.
    from omni_httpd.master.service import MasterService
    assert options.settings is not None, "parseOptions() was not called"
    return MasterService(options.settings)
