#!/usr/bin/env python3
"""PostgreSQL instructions per W1 call, handler query against route (callgrind).

    python bench/pg_instructions.py [--calls 1000]

Throughput on the shared 2-core machine moves by ±15 % between runs; instruction counts
do not. This installs W1 as a handler query and as a route (bench/workloads.py) the way
a worker does (omni_httpd.common.handler_call), copies the generated functions into a
script for a single-user backend that calls each one in a DO loop, runs that backend
under `valgrind --tool=callgrind` twice (100 and 100 + CALLS calls) and prints the
difference per call: the backend's own work per request, without the client, the socket
or the commit (the same for both). Needs valgrind (Debian: apt-get install valgrind);
as root, the backend runs as the cluster's account. Figures: docs/performance.md.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import psycopg  # noqa: E402

from omni_httpd.common import handler_call  # noqa: E402
from omni_httpd.master import migrations  # noqa: E402
from omni_httpd.master.embedded_pg import EmbeddedPostgres  # noqa: E402
from workloads import W1_HANDLER, W1_ROUTE  # noqa: E402

HEADERS = [("host", "x"), ("user-agent", "wrk"), ("accept", "*/*"), ("omnigres-connecting-ip", "127.0.0.1")]


def literal(text: str) -> str:
    return "'%s'" % text.replace("'", "''")


def text_array(values) -> str:
    return literal("{%s}" % ",".join('"%s"' % v.replace("\\", "\\\\").replace('"', '\\"') for v in values))


def install(dsn: str):
    """Install W1 both ways; returns (search_path, {name: (signature, returns, body, call)})."""
    migrations.apply(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE users (handle text PRIMARY KEY, name text); "
                     "INSERT INTO users VALUES ('johndoe', 'John')")
        conn.execute(W1_ROUTE)
        handler_call.prepare_session(conn)
        handler = handler_call.install(conn, 1, 1, W1_HANDLER, None)
        handler_oid, row = conn.execute("SELECT r.handler::oid::int8, r::text FROM omni_httpd.urlpattern_router r").fetchone()
        router = conn.execute("SELECT 'omni_httpd.urlpattern_router'::regclass::oid::int8").fetchone()[0]
        route = handler_call.install_route(conn, 1, 1, handler_oid, router)
        search_path = conn.execute("SELECT omni_httpd._handler_search_path()").fetchone()[0]
        functions = {}
        for name, installed in (("handler", handler), ("route", route)):
            signature, returns, body = conn.execute(
                "SELECT pg_get_function_identity_arguments(p.oid), pg_get_function_result(p.oid), p.prosrc "
                "FROM pg_proc p WHERE p.proname = %s", (installed.function,)).fetchone()
            functions[name] = (signature, returns, body)
    check = ("omni_httpd._before_request('GET', (SELECT oid FROM pg_catalog.pg_proc WHERE proname = '%s'), "
             "(SELECT xmin FROM pg_catalog.pg_proc WHERE proname = '%s'), 2)")
    names, values = [n for n, _ in HEADERS], [v for _, v in HEADERS]
    headers = literal("{%s}" % ",".join('"(%s,%s)"' % h for h in HEADERS)) + "::omni_http.http_header[]"
    calls = {
        "handler": "pg_temp.handler(%s, '/users/johndoe', NULL, '', %s::text[], %s::text[])"
                   % (check % ("handler", "handler"), text_array(names), text_array(values)),
        "route": "pg_temp.route(1, %s, '/users/johndoe', NULL, '', %s, NULL, %s, NULL, NULL, NULL, NULL, NULL, "
                 "NULL, NULL)" % (check % ("route", "route"), headers, literal(row)),
    }
    return search_path, {name: functions[name] + (calls[name],) for name in functions}


def script(search_path: str, functions: dict, which: str, calls: int) -> str:
    out = ["SELECT pg_catalog.set_config('search_path', %s, false);" % literal(search_path)]
    for name, (signature, returns, body, _call) in functions.items():
        out.append("CREATE FUNCTION pg_temp.%s(%s) RETURNS %s LANGUAGE plpgsql SECURITY DEFINER "
                   "SET search_path FROM CURRENT AS %s;" % (name, signature, returns, literal(body)))
    out.append("RESET search_path;")
    call = functions[which][3]
    out.append("DO $do$ BEGIN FOR i IN 1..%d LOOP PERFORM * FROM %s WITH ORDINALITY; END LOOP; END $do$;"
               % (calls, call))
    out.append("SELECT kind, status, body FROM %s;" % call)      # what the backend prints: checked below
    return "\n\n".join(out) + "\n\n"


def instructions(cluster: EmbeddedPostgres, dbname: str, text: str, workdir: str) -> int:
    path = os.path.join(workdir, "script.sql")
    out = os.path.join(workdir, "callgrind.out")
    with open(path, "w") as f:
        f.write(text)
    command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=" + out,
               os.path.join(cluster.bin_dir, "postgres"), "--single", "-j", "-D", cluster.pgdata, dbname]
    account = cluster.account      # as root: the cluster's own account
    owner = dict(user=account.pw_uid, group=account.pw_gid, extra_groups=[]) if account is not None else {}
    with open(path) as stdin:
        done = subprocess.run(command, stdin=stdin, capture_output=True, text=True, cwd=workdir, **owner)
    if 'body = "\\x48656c6c6f2c203c623e4a6f686e3c2f623e21"' not in done.stdout:
        sys.exit("the call did not answer W1's body:\n" + (done.stdout + done.stderr)[-2000:])
    with open(out) as f:
        for line in f:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    sys.exit("no totals in the callgrind output")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000)
    args = parser.parse_args()
    if not shutil.which("valgrind"):
        sys.exit("valgrind not found: apt-get install valgrind")
    workdir = tempfile.mkdtemp(prefix="omni_httpd_pgi_")
    os.chmod(workdir, 0o777)
    cluster = EmbeddedPostgres(os.path.join(workdir, "data"), settings={"fsync": "off"})
    try:
        cluster.start()
        search_path, functions = install(cluster.dsn)
        with psycopg.connect(cluster.dsn) as conn:
            dbname = conn.info.dbname
        cluster.stop()
        for which in ("handler", "route"):
            low = instructions(cluster, dbname, script(search_path, functions, which, 100), workdir)
            high = instructions(cluster, dbname, script(search_path, functions, which, 100 + args.calls), workdir)
            print("W1 as a %-7s %8.0f PostgreSQL instructions per call" % (which, (high - low) / args.calls))
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
