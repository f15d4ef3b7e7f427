"""The chart: req/s and p99 per target, one bar per workload.

Importable (draw()) or runnable as `python chart.py results.json out.png`, which is how
run.py uses bench/.venv's matplotlib when the running interpreter has none.
"""
from __future__ import annotations

import json
import sys


def _ms(value: float) -> str:
    if not value:
        return ""
    return "%.0f" % value if value >= 10 else "%.2g" % value


def draw(results: dict, png_path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r.get("rps") is not None]
    targets, workloads = [], []
    for row in rows:
        if row["label"] not in targets:
            targets.append(row["label"])
        if row["workload"] not in workloads:
            workloads.append(row["workload"])
    value = {(r["label"], r["workload"]): r for r in rows}
    fig, (ax_rps, ax_p99) = plt.subplots(2, 1, figsize=(11, 8.5), sharex=True)
    width = 0.8 / max(1, len(workloads))
    colors = ["#4C72B0", "#DD8452", "#55A868", "#C44E52"]
    for k, workload in enumerate(workloads):
        xs = [i + (k - (len(workloads) - 1) / 2.0) * width for i in range(len(targets))]
        rps = [value[(t, workload)]["rps"] if (t, workload) in value else 0 for t in targets]
        p99 = [value[(t, workload)]["p99_ms"] if (t, workload) in value else 0 for t in targets]
        color = colors[k % len(colors)]
        bars = ax_rps.bar(xs, rps, width, label=workload, color=color)
        ax_rps.bar_label(bars, labels=["%.1fk" % (v / 1000.0) if v else "" for v in rps],
                         fontsize=7, rotation=90, padding=2)
        bars = ax_p99.bar(xs, p99, width, label=workload, color=color)
        ax_p99.bar_label(bars, labels=[_ms(v) for v in p99], fontsize=7, padding=2)
    ax_rps.set_ylabel("requests / s")
    ax_rps.set_title("omni_httpd benchmark %s (%s s per run%s)" % (
        results.get("timestamp", ""), results.get("duration", "?"), ", smoke" if results.get("smoke") else ""))
    ax_rps.legend(title="workload")
    ax_rps.margins(y=0.2)
    ax_p99.set_ylabel("p99 latency (ms, log scale)")
    ax_p99.set_yscale("log")
    ax_p99.margins(y=0.2)
    ax_p99.set_xticks(range(len(targets)))
    ax_p99.set_xticklabels(targets, rotation=20, ha="right", fontsize=8)
    for ax in (ax_rps, ax_p99):
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    with open(sys.argv[1]) as handle:
        draw(json.load(handle), sys.argv[2])
