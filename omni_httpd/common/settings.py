"""Daemon settings: what `tap.Options` parses and every service reads."""
from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from typing import Dict, Optional


def default_data_dir() -> str:
    """Per-user location of the embedded cluster.

    Root gets /var/lib/omni_httpd (the unprivileged account that runs PostgreSQL must be
    able to reach it, which it cannot below /root); everyone else gets
    $XDG_DATA_HOME/omni_httpd (~/.local/share/omni_httpd).
    """
    if os.geteuid() == 0:
        return "/var/lib/omni_httpd"
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "omni_httpd")


@dataclass
class Settings:
    dsn: Optional[str] = None                 # None: embedded PostgreSQL
    data_dir: str = field(default_factory=default_data_dir)
    http_workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    init: bool = True                          # False with --no-init
    init_port: int = 8080
    init_listen_address: str = "127.0.0.1"
    admin: Optional[str] = "tcp:8081:interface=127.0.0.1"   # None: console disabled
    admin_password: Optional[str] = None
    admin_password_file: Optional[str] = None
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    max_body: int = 16 * 1024 * 1024
    # HTTP/2 request bodies held in memory (received, not yet answered): per connection
    # and per worker process, across its connections (http2.BodyBudget). Each is raised
    # to max_body (resp. the connection's) when smaller, so one largest body always fits.
    max_connection_body_buffer: int = 32 * 1024 * 1024
    max_worker_body_buffer: int = 128 * 1024 * 1024
    max_header_size: int = 64 * 1024          # all header lines together
    # HTTP/1: request bodies one connection may hold while they wait for their turn
    # (pipelined) before reading from it pauses; a lone request is bounded by max_body.
    max_pipeline_bytes: int = 1024 * 1024
    header_timeout: float = 30.0               # slow-header (slowloris) limit
    idle_timeout: float = 60.0                 # keep-alive idle connection limit
    body_timeout: float = 60.0                 # a body must keep arriving
    shutdown_grace: float = 10.0               # SIGTERM: how long in-flight requests may run
    handler_timeout: float = 30.0              # statement_timeout for handlers, 0 = none
    handler_lock_timeout: float = 5.0          # lock_timeout for handlers, 0 = none
    access_log: bool = True
    # the master's /live, /ready and /metrics (master/metrics.py); None: not served
    metrics: Optional[str] = "tcp:9187:interface=127.0.0.1"
    log_format: str = "text"                   # or "json" (common/logformat.py)
    # Trust X-Forwarded-For / Forwarded (and X-Forwarded-Proto/-Host) sent by the client:
    # only when every client reaches us through a proxy that sets them.
    trust_forwarded: bool = False
    # Peers (networks, addresses) whose X-Forwarded-For / Forwarded are believed, for the
    # omnigres-connecting-ip header and proxy outcomes alike (common/client_address.py).
    trusted_proxies: str = ""
    proxy_allow: str = "any"                   # addresses a proxy outcome may connect to
    proxy_deny: str = ""                       # ... minus these
    admin_hosts: str = ""                      # extra Host names of the console, comma-separated
    worker_user: Optional[str] = None          # as root: account of the workers (None: default)
    # --static-root NAME=DIR: the only directories static files are served from
    # (omni_httpd.static_files rows name them; worker/static_files.py serves them).
    static_roots: Dict[str, str] = field(default_factory=dict)
    # This daemon's name in the Via header of requests it proxies, so that it recognises
    # them when they come back (loops, its own admin console). Random per master; the
    # workers get the master's (settings travel to them as JSON). Not an option, and not
    # part of equality: two parses of one command line are the same settings.
    proxy_token: str = field(default_factory=lambda: secrets.token_hex(6), compare=False,
                             repr=False)
