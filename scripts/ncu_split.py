#!/usr/bin/env python3
"""Kernel-by-kernel table from an Nsight Compute CSV log (`ncu --csv --print-units base --log-file`).

usage: ncu_split.py LOG.csv [--last-step DEPTH | --runs N] [--top K]

--last-step DEPTH: keep the last guided step only, from two kernels before its first attention kernel
  (DEPTH attention launches a step: 28 for the ImageNet models) to the end of the log.
--runs N: divide every total by N (e.g. the warm-up and the timed decode of `bench model`).
Kernels are grouped by name (template arguments dropped) and grid; every metric other than the time is
averaged over a group weighted by time. The table is Markdown, longest total first.
"""
import argparse
import collections
import csv
import re
import sys

TIME = "gpu__time_duration.sum"


def read(path):
    """[(id, kernel, grid, {metric: value})] in launch order."""
    lines = open(path).read().splitlines()
    start = next((i for i, l in enumerate(lines) if l.startswith('"ID"')), None)
    if start is None:
        sys.exit(f"{path}: no ncu table (the run failed or wrote no CSV)")
    per = collections.OrderedDict()
    for r in csv.DictReader(lines[start:]):
        key = (int(r["ID"]), r["Kernel Name"], r["Grid Size"])
        try:
            per.setdefault(key, {})[r["Metric Name"]] = float(r["Metric Value"].replace(",", ""))
        except ValueError:
            pass  # a metric ncu could not collect ("n/a")
    return [(i, k, g, m) for (i, k, g), m in sorted(per.items())]


def last_step(rows, depth):
    att = [n for n, r in enumerate(rows) if r[1].startswith("attention")]
    if len(att) < depth:
        sys.exit(f"only {len(att)} attention kernels in the log, fewer than one step of {depth}")
    return rows[max(att[-depth] - 2, 0):]


def table(rows, runs=1, top=24):
    metrics = sorted({m for *_, ms in rows for m in ms} - {TIME})
    groups = collections.OrderedDict()
    for _, kernel, grid, ms in rows:
        g = groups.setdefault((re.sub(r"<.*", "", kernel)[:72], grid), {"n": 0, "t": 0.0, "w": collections.Counter()})
        t = ms.get(TIME, 0.0) / 1e3  # ns -> µs
        g["n"] += 1
        g["t"] += t
        for m in metrics:
            g["w"][m] += ms.get(m, 0.0) * t
    total = sum(g["t"] for g in groups.values())
    out = [f"{len(rows)} kernels, {total / runs / 1e3:.3f} ms a run ({runs} run(s) in the log)", ""]
    out.append("| kernel | grid | count a run | ms a run | mean µs |" + "".join(f" {m} |" for m in metrics))
    out.append("|---|---|---|---|---|" + "---|" * len(metrics))
    for (kernel, grid), g in sorted(groups.items(), key=lambda kv: -kv[1]["t"])[:top]:
        cells = "".join(f" {g['w'][m] / g['t']:.0f} |" if g["t"] else " – |" for m in metrics)
        out.append(f"| {kernel} | {grid} | {g['n'] / runs:g} | {g['t'] / runs / 1e3:.3f} | {g['t'] / g['n']:.1f} |{cells}")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log")
    ap.add_argument("--last-step", type=int, metavar="DEPTH")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--top", type=int, default=24)
    a = ap.parse_args()
    rows = read(a.log)
    if a.last_step:
        rows = last_step(rows, a.last_step)
    print(table(rows, a.runs, a.top))


if __name__ == "__main__":
    main()
