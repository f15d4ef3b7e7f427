"""Text table, goals and the Markdown report."""
from __future__ import annotations

from typing import List, Optional

GOAL_RATIO, STRETCH_RATIO = 2.5, 3.0
GOAL_H2_SHARE = 0.60
GOAL_WORKER_RSS_MB = 60.0
GOAL_RELOAD_MS = 200.0

COLUMNS = ["target", "workload", "req/s", "p50 ms", "p99 ms", "errors", "non-2xx", "vs daemon h1"]


def _fmt(value: Optional[float], pattern: str = "%.2f") -> str:
    return "-" if value is None else pattern % value


def table_rows(results: dict) -> List[List[str]]:
    base = {r["workload"]: r["rps"] for r in results["rows"] if r["target"] == "daemon-h1" and r.get("rps")}
    out = []
    for r in results["rows"]:
        if r.get("rps") is None:
            out.append([r["label"], r["workload"], r["status"], "", "", "", "", ""])
            continue
        ratio = "%.2fx" % (r["rps"] / base[r["workload"]]) if base.get(r["workload"]) else "-"
        out.append([r["label"], r["workload"], "%.0f" % r["rps"], _fmt(r["p50_ms"]), _fmt(r["p99_ms"]),
                    str(r["errors"]), "n/a" if r["non2xx"] is None else str(r["non2xx"]), ratio])
    return out


def text_table(results: dict) -> str:
    rows = table_rows(results)
    measured = [COLUMNS] + [row for row in rows if row[3] != ""]
    widths = [max(len(row[i]) for row in measured) for i in range(len(COLUMNS))]
    for i in (0, 1):
        widths[i] = max(len(row[i]) for row in [COLUMNS] + rows)
    lines = []
    for n, row in enumerate([COLUMNS] + rows):
        head = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        if n > 0 and row[3] == "":  # not measured: the reason instead of figures
            lines.append("  ".join(head + [row[2]]))
        else:
            lines.append("  ".join(head + [c.rjust(w) for c, w in zip(row[2:], widths[2:])]))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(results: dict) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|---|" + "---:|" * (len(COLUMNS) - 2)]
    for row in table_rows(results):
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    return "\n".join(lines)


def cpu_table(results: dict, markdown: bool) -> List[str]:
    """CPU time per request: the server's main process, its workers (children), and the
    PostgreSQL backends of the benchmark database, from /proc during the measurement."""
    rows = [r for r in results["rows"] if r.get("cpu_us")]
    if not rows:
        return []
    head = ["target", "workload", "main µs/req", "workers µs/req", "PostgreSQL µs/req", "total µs/req"]
    body = []
    for r in rows:
        cpu = r["cpu_us"]
        total = cpu["main"] + cpu["children"] + cpu["postgres"]
        body.append([r["label"], r["workload"], "%.0f" % cpu["main"], "%.0f" % cpu["children"],
                     "%.0f" % cpu["postgres"], "%.0f" % total])
    if markdown:
        return (["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
                + ["| " + " | ".join(b) + " |" for b in body])
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    return ["  ".join([x[0].ljust(widths[0]), x[1].ljust(widths[1])]
                      + [c.rjust(w) for c, w in zip(x[2:], widths[2:])]) for x in [head] + body]


def _row(results: dict, target: str, workload: str = "W1") -> Optional[dict]:
    for r in results["rows"]:
        if r["target"] == target and r["workload"] == workload and r.get("rps") is not None:
            return r
    return None


def goals(results: dict) -> List[str]:
    """One line per goal (workload W1): PASS / FAIL / n/a and the figures behind it."""
    lines = []
    own, peer, h2 = _row(results, "daemon-h1"), _row(results, "uvicorn"), _row(results, "daemon-h2c")
    if own and peer:
        ratio = own["rps"] / peer["rps"] if peer["rps"] else float("inf")
        p99_ok = own["p99_ms"] <= peer["p99_ms"]
        ok = ratio >= GOAL_RATIO and p99_ok
        verdict = ("PASS (stretch %.1fx met)" % STRETCH_RATIO if ok and ratio >= STRETCH_RATIO
                   else "PASS" if ok else "FAIL")
        lines.append("%s  HTTP/1.1 req/s >= %.1fx uvicorn+asyncpg (stretch %.1fx), p99 no worse: "
                     "%.2fx, p99 %.2f ms vs %.2f ms" % (verdict, GOAL_RATIO, STRETCH_RATIO, ratio,
                                                        own["p99_ms"], peer["p99_ms"]))
    else:
        lines.append("n/a   HTTP/1.1 req/s >= %.1fx uvicorn+asyncpg: needs both measured" % GOAL_RATIO)
    if own and h2:
        share = h2["rps"] / own["rps"] if own["rps"] else 0.0
        lines.append("%s  h2c req/s >= %d %% of HTTP/1.1: %.0f %%" % (
            "PASS" if share >= GOAL_H2_SHARE else "FAIL", GOAL_H2_SHARE * 100, share * 100))
    else:
        lines.append("n/a   h2c req/s >= %d %% of HTTP/1.1: needs both measured" % (GOAL_H2_SHARE * 100))
    rss = (results.get("daemon") or {}).get("rss")
    if rss and rss.get("workers_mb"):
        worst = max(rss["workers_mb"])
        lines.append("%s  worker RSS <= %.0f MB: %.1f MB (largest worker)" % (
            "PASS" if worst <= GOAL_WORKER_RSS_MB else "FAIL", GOAL_WORKER_RSS_MB, worst))
    else:
        lines.append("n/a   worker RSS <= %.0f MB: not measured" % GOAL_WORKER_RSS_MB)
    reload = (results.get("daemon") or {}).get("reload")
    if reload and reload.get("median_ms") is not None:
        ok = reload["median_ms"] <= GOAL_RELOAD_MS and not reload["failures"]
        lines.append("%s  reload latency median <= %.0f ms: %.0f ms (%d samples, %d not seen)" % (
            "PASS" if ok else "FAIL", GOAL_RELOAD_MS, reload["median_ms"], reload["samples"], reload["failures"]))
    else:
        lines.append("n/a   reload latency median <= %.0f ms: not measured" % GOAL_RELOAD_MS)
    return lines


def extras(results: dict) -> List[str]:
    lines = []
    daemon = results.get("daemon") or {}
    rss = daemon.get("rss")
    if rss:
        lines.append("omni_httpd RSS after the run: master %.1f MB, workers %s MB" % (
            rss["main_mb"], ", ".join("%.1f" % v for v in rss["workers_mb"]) or "-"))
    if daemon.get("first_start_s") is not None:
        lines.append("omni_httpd first start on a fresh database -> first served request: %.2f s "
                     "(schema installed after %.2f s, then listeners and handlers inserted by the benchmark)"
                     % (daemon["first_start_s"], daemon["schema_s"] or 0.0))
    if daemon.get("restart_s") is not None:
        ready = daemon.get("restart_ready_s")
        lines.append("omni_httpd restart -> first served request (schema and configuration present): %.2f s; "
                     "start-up complete (configuration_reloads row) after %s"
                     % (daemon["restart_s"], "%.2f s" % ready if ready is not None else "- (not seen)"))
    elif daemon.get("restart_error"):
        lines.append("omni_httpd restart -> first served request: %s" % daemon["restart_error"])
    reload = daemon.get("reload")
    if reload:
        if reload.get("median_ms") is not None:
            lines.append("omni_httpd reload latency (handler commit -> first response showing it): "
                         "median %.0f ms, max %.0f ms, %d samples, %d not seen within 10 s"
                         % (reload["median_ms"], reload["max_ms"], reload["samples"], reload["failures"]))
        else:
            lines.append("omni_httpd reload latency: no change seen in %d samples" % reload["samples"])
    if "exit_code" in daemon:
        code = daemon["exit_code"]
        if code is None:
            how = "did not exit within 20 s, killed"
        elif code == -15:
            how = "exited by SIGTERM (twistd re-raises the signal after its shutdown)"
        else:
            how = "exit code %s" % code
        took = " after %.2f s" % daemon["stop_s"] if daemon.get("stop_s") is not None and code is not None else ""
        lines.append("omni_httpd stop on SIGTERM to the master: %s%s" % (how, took))
    for name, rss in sorted((results.get("peer_rss") or {}).items()):
        lines.append("%s RSS after the run: main %.1f MB, children %s MB" % (
            name, rss["main_mb"], ", ".join("%.1f" % v for v in rss["workers_mb"]) or "-"))
    return lines


def notes(results: dict) -> List[str]:
    return ["%s %s: %s" % (r["label"], r["workload"], r["message"]) for r in results["rows"] if r.get("message")] \
        + list(results.get("notes") or [])


def markdown(results: dict, png_name: Optional[str]) -> str:
    out = ["# omni_httpd benchmark, %s%s" % (results["timestamp"], " (smoke)" if results["smoke"] else ""), ""]
    out.append("Commit `%s`, %s cores, %s s per measurement after %s s warm-up; all load on 127.0.0.1 "
               "from the same machine. HTTP/1.1: `wrk -t1 -c64` (keep-alive); h2c: `h2load -c16 -m8` "
               "(prior knowledge); DB ceiling: `pgbench -M prepared -c %d -j %d` running the handler "
               "statement itself. omni_httpd: 2 HTTP workers; gunicorn: 2 sync workers, one connection "
               "each; uvicorn: 2 workers, asyncpg pool of %d each. Ratios are to omni_httpd's HTTP/1.1 "
               "figure for the same workload. non-2xx counts responses with status >= 400 (wrk) or "
               ">= 300 (h2load). Load average at start/end: %s / %s (other work on the machine skews "
               "absolute figures; compare rows of one run)."
               % (results["commit"], results["cpus"], results["duration"], results["warmup"],
                  results["pg_clients"], results["pg_clients"], results.get("peer_pool", 2),
                  results.get("load_start", "?"), results.get("load_end", "?")))
    if results.get("versions"):
        out.append("")
        out.append("Versions: " + ", ".join("%s %s" % kv for kv in sorted(results["versions"].items())) + ".")
    out.append("")
    out.append("Workloads: " + "; ".join("%s %s" % (k, v) for k, v in results["workloads"].items()) + ".")
    out += ["", markdown_table(results), ""]
    if png_name:
        out += ["![req/s and p99 per target](%s)" % png_name, ""]
    cpu = cpu_table(results, markdown=True)
    if cpu:
        out += ["## CPU per request", "",
                "CPU time during the measurement divided by the requests served: the server's main "
                "process (omni_httpd: the master), its child processes (the workers), and the "
                "PostgreSQL backends of the benchmark database. The load generator is not counted.",
                ""] + cpu + [""]
    more = extras(results)
    if more:
        out += ["## Memory, start-up, reload, shutdown", ""] + ["- " + line for line in more] + [""]
    if not results["smoke"]:
        out += ["## Goals (W1)", "", "```"] + goals(results) + ["```", ""]
    n = notes(results)
    if n:
        out += ["## Notes", ""] + ["- " + line for line in n] + [""]
    return "\n".join(out)
