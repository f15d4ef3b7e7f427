"""The benchmark suite's smoke mode: bench/run.py --smoke starts a private PostgreSQL and
the daemon (`twistd -n omni_httpd`), checks every workload's response over HTTP/1.1 (and
h2c when h2load is installed), loads each for about a second, and measures RSS, restart
time and reload latency. No thresholds: this checks that the suite and the daemon work
together, not how fast they are.

wrk is required (the CI script installs it). Without it the test checks that the suite
refuses with the exact apt-get command to run, then fails saying so: never a skip.
"""
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(REPO, "bench", "run.py")


def _run(args, tmp_path):
    proc = subprocess.run([sys.executable, RUN, "--smoke", "--results-dir", str(tmp_path)] + args,
                          capture_output=True, text=True, timeout=180, cwd=str(tmp_path))
    return proc, proc.stdout + proc.stderr


def test_bench_smoke(tmp_path):
    if shutil.which("wrk") is None:
        proc, output = _run([], tmp_path)
        assert proc.returncode == 2, output
        assert "apt-get install -y" in output and " wrk" in output, output
        pytest.fail("wrk is not installed, so the benchmark cannot run; install it with: "
                    "apt-get install -y wrk nghttp2-client")

    proc, output = _run([], tmp_path)
    assert proc.returncode == 0, output

    reports = glob.glob(str(tmp_path / "*.json"))
    assert len(reports) == 1, output
    with open(reports[0]) as handle:
        results = json.load(handle)
    rows = {(r["target"], r["workload"]): r for r in results["rows"]}
    expected_targets = ["daemon-h1"] + (["daemon-h2c"] if shutil.which("h2load") else [])
    for target in expected_targets:
        for workload in ("W1", "W1route", "W2", "W3"):
            r = rows[(target, workload)]
            assert r["rps"] is not None, (target, workload, r["message"], output)
            assert r["requests"] > 0 and r["errors"] == 0 and r["non2xx"] == 0, (r, output)
            assert 0 < r["p50_ms"] <= r["p99_ms"], r

    daemon = results["daemon"]
    assert daemon["rss"]["main_mb"] > 0 and len(daemon["rss"]["workers_mb"]) == 2, daemon
    assert daemon["restart_s"] is not None and daemon["restart_s"] > 0, daemon
    assert daemon["reload"]["failures"] == 0 and daemon["reload"]["median_ms"] > 0, daemon

    # the printed table and the Markdown report carry the same rows
    assert "omni_httpd HTTP/1.1" in output and "req/s" in output
    markdown = open(reports[0][:-len(".json")] + ".md").read()
    assert "| omni_httpd HTTP/1.1 | W1 |" in markdown
    # smoke runs never replace the committed latest report
    assert not os.path.exists(tmp_path / "latest.md")


def test_bench_names_missing_tools(tmp_path):
    """Without the load generators on PATH the suite stops at once and prints the exact
    apt-get command (here: wrk and h2load for the smoke targets, nginx for nginx)."""
    env = dict(os.environ, PATH=os.path.dirname(sys.executable))
    for args, packages in ((["--smoke"], "nghttp2-client wrk"),
                           (["--targets", "nginx-h1", "--workloads", "W1"], "nginx wrk")):
        proc = subprocess.run([sys.executable, RUN, "--results-dir", str(tmp_path)] + args, env=env,
                              capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "apt-get install -y %s" % packages in proc.stderr, proc.stderr
    assert os.listdir(str(tmp_path)) == []  # nothing was started or written


def test_bench_response_checks():
    """What makes a target's answer acceptable before it is measured."""
    sys.path.insert(0, os.path.join(REPO, "bench"))
    try:
        import workloads
    finally:
        sys.path.remove(os.path.join(REPO, "bench"))
    w1, w2, w3 = (workloads.WORKLOADS[name] for name in ("W1", "W2", "W3"))
    assert w1.check(200, "text/html", b"Hello, <b>John</b>!") is None
    assert w1.check(200, "text/html; charset=utf-8", b"Hello, <b>John</b>!") is None
    assert "status 404" in w1.check(404, "text/html", b"")
    assert "content type" in w1.check(200, "text/plain", b"Hello, <b>John</b>!")
    assert "body" in w1.check(200, "text/html", b"Hello, <b>Jane</b>!")
    assert len(w2.body) == 4096
    # jsonb re-formats the document: equal as JSON is what counts
    reformatted = json.dumps(json.loads(w2.body), indent=1).encode()
    assert w2.check(200, "application/json", reformatted) is None
    assert w2.check(200, "application/json", b'{"order": 1}') is not None
    assert w3.check(200, "text/plain; charset=utf-8", b"x" * 262144) is None
    assert "bytes" in w3.check(200, "text/plain; charset=utf-8", b"x" * 1000)
    # the database ceiling runs the very handler, with `request` given as a CTE
    assert workloads.pgbench_sql(w1).startswith("WITH request AS (")
    assert workloads.pgbench_sql(w1).endswith(w1.handler)


def test_bench_soak_smoke(tmp_path):
    """bench/run.py --soak for 6 s (reloads every 2 s, RSS every second): the daemon lives
    through it, every reload is applied, the samples and slopes are written."""
    if shutil.which("wrk") is None:
        pytest.fail("wrk is not installed, so the soak cannot run; install it with: apt-get install -y wrk")
    proc = subprocess.run([sys.executable, RUN, "--soak", "0.1", "--reload-every", "2", "--sample-every", "1",
                           "--results-dir", str(tmp_path)], capture_output=True, text=True, timeout=120,
                          cwd=str(tmp_path))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    reports = glob.glob(str(tmp_path / "soak-*.json"))
    assert len(reports) == 1, output
    with open(reports[0]) as handle:
        results = json.load(handle)
    assert results["ok"] and results["exit_code"] == 0, output
    assert results["load"]["requests"] > 0 and results["load"]["errors"] == 0, results["load"]
    assert len(results["reloads"]) >= 2 and all(r["seconds"] for r in results["reloads"]), results["reloads"]
    assert len(results["samples"]) >= 5, results["samples"]
    # the master and both workers, each with a slope
    names = sorted(results["series"])
    assert names[0] == "master" and [n.split()[0] for n in names[1:]] == ["w0", "w1"], names
    assert all(s["slope_kb_min"] is not None and s["first_kb"] > 0 for s in results["series"].values())
    assert "slope KB/min" in output and os.path.exists(reports[0][:-len(".json")] + ".md")
