#!/usr/bin/env python3
"""What live previews cost: the same streamed requests with and without `"preview": true`
against a running diffit-server (loopback), alternating, plus the server's own account of the
time its engines spent making previews.

Reports the median wall time per request of each kind, and from /metrics the seconds per
denoising step against the seconds spent on previews in steps that made any
(diffit_preview_duration_seconds). Checks on the way that both kinds return the same images.

usage: preview_cost.py --url http://127.0.0.1:8080 [--class-label 7] [--n 8] [--steps 25] [--reps 5]
"""
import argparse
import json
import statistics
import sys
import time
import urllib.request


def post_stream(url, body):
    t0 = time.monotonic()
    req = urllib.request.Request(url + "/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    text = urllib.request.urlopen(req, timeout=600).read().decode()
    dt = time.monotonic() - t0
    data = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
    previews = sum(1 for d in data if "preview" in d)
    images = [im["b64_png"] for im in data[-1]["images"]]
    return dt, previews, images


def metric_sums(url, name):
    text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    total, count = 0.0, 0.0
    for line in text.splitlines():
        if line.startswith(name + "_sum"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith(name + "_count"):
            count += float(line.rsplit(" ", 1)[1])
    return total, count


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--class-label", type=int, default=7)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    if not a.url.startswith(("http://127.", "http://localhost", "http://[::1]")):
        sys.exit("loopback URLs only")
    base = {"class_label": a.class_label, "n": a.n, "steps": a.steps, "stream": True}
    times = {False: [], True: []}
    step0, prev0 = metric_sums(a.url, "diffit_step_duration_seconds"), metric_sums(
        a.url, "diffit_preview_duration_seconds")
    n_previews = 0
    for rep in range(a.reps):
        for preview in (False, True):
            dt, previews, images = post_stream(a.url, {**base, "seed": 1000 + rep, "preview": preview})
            times[preview].append(dt)
            n_previews += previews
            if preview:
                if images != reference:
                    sys.exit("images differ with previews")
            else:
                reference = images
    step1, prev1 = metric_sums(a.url, "diffit_step_duration_seconds"), metric_sums(
        a.url, "diffit_preview_duration_seconds")
    steps_s, steps_n = step1[0] - step0[0], step1[1] - step0[1]
    prev_s, prev_n = prev1[0] - prev0[0], prev1[1] - prev0[1]
    print(f"{a.reps} x 2 requests of n={a.n}, {a.steps} steps: median {statistics.median(times[False]):.3f} s "
          f"without previews, {statistics.median(times[True]):.3f} s with ({n_previews} previews); same images")
    print(f"engine: {steps_s / max(steps_n, 1) * 1e3:.2f} ms per step over {steps_n:.0f} steps; previews "
          f"{prev_s * 1e3:.2f} ms in all over {prev_n:.0f} steps that made some "
          f"({prev_s / max(n_previews, 1) * 1e6:.1f} us per preview, {prev_s / max(steps_s, 1e-9) * 100:.3f} % of step time)")


if __name__ == "__main__":
    main()
