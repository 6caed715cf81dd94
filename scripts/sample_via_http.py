#!/usr/bin/env python3
"""Generate images through a running diffit-server's HTTP API (loopback only).

Writes OUT/c{class}_s{seed}.png for `--per-class` images of every class (default settings unless
given), a manifest OUT/manifest.json {file: requested class} for training/evaluate.py, and
optionally a grid (rows = classes, columns = the first `--grid-cols` seeds) as one PNG.
Reports the wall time per image. Needs Pillow only for --grid.

usage: sample_via_http.py --url http://127.0.0.1:8080 --out eval/ [--per-class 100] [--grid grid.png]
"""
import argparse
import base64
import concurrent.futures as cf
import json
import os
import sys
import time
import urllib.parse
import urllib.request


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=3600) as r:
        return json.load(r)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--out", required=True)
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--batch", type=int, default=10, help="images per request")
    ap.add_argument("--seed-base", type=int, default=1_000_000)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--grid", help="write a classes x seeds grid PNG here")
    ap.add_argument("--grid-cols", type=int, default=10)
    ap.add_argument("--extra", default="{}", help="JSON merged into every request (steps, sampler, ...)")
    a = ap.parse_args()
    host = urllib.parse.urlparse(a.url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        sys.exit(f"refusing non-loopback target {host}")
    os.makedirs(a.out, exist_ok=True)
    classes = json.load(urllib.request.urlopen(a.url + "/v1/classes"))["num_classes"]
    extra = json.loads(a.extra)
    jobs = []
    for c in range(classes):
        for start in range(0, a.per_class, a.batch):
            n = min(a.batch, a.per_class - start)
            jobs.append((c, a.seed_base + c * a.per_class + start, n))
    manifest = {}
    t0 = time.time()

    def run(job):
        c, seed, n = job
        body = {"class_label": c, "seed": seed, "n": n, **extra}
        resp = post(a.url + "/generate", body)
        files = []
        for img in resp["images"]:
            name = f"c{c}_s{img['seed']}.png"
            with open(os.path.join(a.out, name), "wb") as f:
                f.write(base64.b64decode(img["b64_png"]))
            files.append((name, c))
        return files

    with cf.ThreadPoolExecutor(a.workers) as ex:
        for files in ex.map(run, jobs):
            manifest.update(dict(files))
    wall = time.time() - t0
    with open(os.path.join(a.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=0, sort_keys=True)
    print(f"{len(manifest)} images in {wall:.1f} s: {wall / len(manifest) * 1000:.0f} ms per image (wall, {a.workers} client workers)")
    if a.grid:
        from PIL import Image

        tiles = [[Image.open(os.path.join(a.out, f"c{c}_s{a.seed_base + c * a.per_class + j}.png"))
                  for j in range(a.grid_cols)] for c in range(classes)]
        w, h = tiles[0][0].size
        grid = Image.new(tiles[0][0].mode, (w * a.grid_cols, h * classes))
        for c, row in enumerate(tiles):
            for j, t in enumerate(row):
                grid.paste(t, (j * w, c * h))
        grid.save(a.grid)
        print(f"grid {a.grid}: {classes} classes x {a.grid_cols} seeds")


if __name__ == "__main__":
    main()
