"""The load generators: wrk (HTTP/1.1), h2load (h2c), pgbench (the database alone).

Each returns a Measurement; the loaders run bounded in time and target 127.0.0.1 only.
"""
from __future__ import annotations

import glob
import os
import re
import subprocess
from dataclasses import dataclass, field
from typing import List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
WRK_SCRIPT = os.path.join(HERE, "wrk_report.lua")

WRK_THREADS, WRK_CONNECTIONS = 1, 64
H2_CLIENTS, H2_STREAMS = 16, 8


class LoadError(Exception):
    pass


@dataclass
class Measurement:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    non2xx: Optional[int]  # None where it does not apply (pgbench)
    detail: dict = field(default_factory=dict)


def _run(argv: List[str], duration: float, env: Optional[dict] = None, cwd: Optional[str] = None) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd,
                              timeout=duration + 30)
    except subprocess.TimeoutExpired:
        raise LoadError("%s did not finish within %ds" % (os.path.basename(argv[0]), duration + 30))
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise LoadError("%s exited %d: %s" % (os.path.basename(argv[0]), proc.returncode,
                                              lines[-1] if lines else ""))
    return proc.stdout


def _percentile(sorted_values: List[float], pct: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, int(round(pct / 100.0 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[index]


def wrk(url: str, duration: int, body_file: Optional[str] = None, content_type: Optional[str] = None,
        connections: int = WRK_CONNECTIONS, threads: int = WRK_THREADS) -> Measurement:
    env = dict(os.environ)
    env["BENCH_BODY_FILE"] = body_file or ""
    if content_type:
        env["BENCH_CONTENT_TYPE"] = content_type
    out = _run(["wrk", "-t%d" % threads, "-c%d" % connections, "-d%ds" % duration,
                "-s", WRK_SCRIPT, url], duration, env=env)
    match = re.search(r"^BENCH (.*)$", out, re.M)
    if not match:
        raise LoadError("wrk printed no summary: %s" % out.strip()[-200:])
    values = {k: int(v) for k, v in (item.split("=") for item in match.group(1).split())}
    seconds = values["duration_us"] / 1e6
    errors = values["connect"] + values["read"] + values["write"] + values["timeout"]
    return Measurement(values["requests"], seconds, values["requests"] / seconds if seconds else 0.0,
                       values["p50_us"] / 1000.0, values["p99_us"] / 1000.0, errors, values["status"],
                       detail={k: values[k] for k in ("connect", "read", "write", "timeout")})


def h2load(url: str, duration: int, workdir: str, body_file: Optional[str] = None,
           content_type: Optional[str] = None, clients: int = H2_CLIENTS, streams: int = H2_STREAMS) -> Measurement:
    """h2c with prior knowledge (h2load's default for http:// URLs); latency percentiles
    come from h2load's per-request log (it prints only min/max/mean itself)."""
    log_file = os.path.join(workdir, "h2load-requests.log")
    argv = ["h2load", "-c%d" % clients, "-m%d" % streams, "-t1", "-D", str(duration),
            "--log-file", log_file]
    if body_file:
        argv += ["-d", body_file, "-H", "content-type: %s" % (content_type or "application/octet-stream")]
    out = _run(argv + [url], duration)
    finished = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", out)
    requests = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                         r"(\d+) failed, (\d+) errored, (\d+) timeout", out)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if not (finished and requests and codes):
        raise LoadError("could not read h2load's summary: %s" % out.strip()[-300:])
    seconds = float(finished.group(1)) / (1000.0 if finished.group(2) == "ms" else 1.0)
    done = int(requests.group(3))
    errored, timeout = int(requests.group(6)), int(requests.group(7))
    non2xx = int(codes.group(2)) + int(codes.group(3)) + int(codes.group(4))
    latencies = []
    try:
        with open(log_file) as handle:
            for line in handle:
                parts = line.split()
                if len(parts) >= 3:
                    latencies.append(int(parts[2]) / 1000.0)
    finally:
        if os.path.exists(log_file):
            os.unlink(log_file)
    latencies.sort()
    return Measurement(done, seconds, float(finished.group(3)), _percentile(latencies, 50),
                       _percentile(latencies, 99), errored + timeout, non2xx,
                       detail={"errored": errored, "timeout": timeout})


def pgbench(pgbench_bin: str, sql: str, duration: int, clients: int, workdir: str,
            host: str, port: int, user: str, dbname: str) -> Measurement:
    """`pgbench -M prepared` running one statement per transaction; percentiles from its
    per-transaction log (-l), one client per thread."""
    script = os.path.join(workdir, "pgbench.sql")
    with open(script, "w") as handle:
        handle.write(sql + ";\n")
    prefix = os.path.join(workdir, "pgbench_log")
    for stale in glob.glob(prefix + ".*"):
        os.unlink(stale)
    out = _run([pgbench_bin, "-n", "-M", "prepared", "-c", str(clients), "-j", str(clients),
                "-T", str(duration), "-f", script, "-l", "--log-prefix", prefix,
                "-h", host, "-p", str(port), "-U", user, dbname], duration, cwd=workdir)
    tps = re.search(r"tps = ([\d.]+) \(without initial connection time\)", out)
    processed = re.search(r"number of transactions actually processed: (\d+)", out)
    failed = re.search(r"number of failed transactions: (\d+)", out)
    if not (tps and processed):
        raise LoadError("could not read pgbench's summary: %s" % out.strip()[-300:])
    # The log's own latency column is unreliable for sub-millisecond transactions (pgbench's
    # lazily refreshed clock logs 0 for a third of them here). A client has no think time, so
    # the time between two consecutive completions of one client is its next transaction's
    # latency (to within the client's own few microseconds); the completion stamps are exact.
    latencies = []
    for path in glob.glob(prefix + ".*"):
        last: dict = {}
        with open(path) as handle:
            for line in handle:
                parts = line.split()
                if len(parts) < 6:
                    continue
                client, stamp = parts[0], int(parts[4]) * 1000000 + int(parts[5])
                previous = last.get(client)
                latencies.append((stamp - previous if previous is not None else int(parts[2])) / 1000.0)
                last[client] = stamp
        os.unlink(path)
    latencies.sort()
    count = int(processed.group(1))
    rate = float(tps.group(1))
    return Measurement(count, count / rate if rate else 0.0, rate, _percentile(latencies, 50),
                       _percentile(latencies, 99), int(failed.group(1)) if failed else 0, None)
