#!/usr/bin/env python3
"""Hardening checks of a live diffit-server (issue 14), driven by tests/ops/run.sh.

Standard library only; reuses ops.py's server harness. Everything talks to 127.0.0.1 only and
every attack is bounded in connections and seconds.

    hardening.py slowloris --bin B   slowloris + descriptor flood while /healthz and generate are timed
    hardening.py drain     --bin B   SIGTERM with held partial requests and long generations
    hardening.py names     --bin B   a 1,860-name model with hostile names, hostile class names
    hardening.py zombie    --bin B   bad metadata / settings: start-up fails fast, never half-alive
"""

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ops  # noqa: E402
from ops import HOST, MODEL, VAE, Checks, Server, percentile, request  # noqa: E402


def raise_fd_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Prober:
    """A well-behaved client: /healthz every 100 ms and a 10-step generate every second, each on
    a new connection, timed; plus the server's RSS and open descriptors."""

    def __init__(self, srv):
        self.srv, self.stop = srv, threading.Event()
        self.health, self.gen, self.rss, self.fds = [], [], [], []
        self.threads = [threading.Thread(target=self.probe_health),
                        threading.Thread(target=self.probe_generate),
                        threading.Thread(target=self.probe_proc)]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join()

    def probe_health(self):
        while not self.stop.is_set():
            st, _, _, dt = request(self.srv.port, "GET", "/healthz", timeout=10)
            self.health.append((st, dt))
            time.sleep(0.1)

    def probe_generate(self):
        i = 0
        while not self.stop.is_set():
            st, _, _, dt = request(self.srv.port, "POST", "/generate",
                                   {"class_label": i % 10, "steps": 10, "seed": i}, timeout=30)
            self.gen.append((st, dt))
            i += 1
            time.sleep(1.0)

    def probe_proc(self):
        while not self.stop.is_set():
            try:
                self.rss.append(self.srv.rss_kb())
                self.fds.append(self.srv.fds())
            except (OSError, KeyError):
                pass
            time.sleep(0.2)

    def summary(self):
        ok = sorted(dt * 1000 for st, dt in self.health if st == 200)
        bad = [st for st, _ in self.health if st != 200]
        gen_ok = sorted(dt * 1000 for st, dt in self.gen if st == 200)
        gen_bad = [st for st, _ in self.gen if st != 200]
        return {
            "healthz": len(self.health), "healthz_failed": len(bad),
            "healthz_p50_ms": round(percentile(ok, 50), 1), "healthz_p99_ms": round(percentile(ok, 99), 1),
            "healthz_max_ms": round(ok[-1], 1) if ok else None,
            "generate": len(self.gen), "generate_failed": len(gen_bad),
            "generate_p50_ms": round(percentile(gen_ok, 50), 1),
            "generate_max_ms": round(gen_ok[-1], 1) if gen_ok else None,
            "rss_peak_kb": max(self.rss) if self.rss else None,
            "fds_peak": max(self.fds) if self.fds else None,
        }


def open_many(n, first_bytes, threads=4):
    """n loopback connections (bounded), each sent `first_bytes`; the sockets and how many
    could not even connect."""
    socks, failed, lock = [], [0], threading.Lock()

    def opener(k):
        mine = []
        for _ in range(k):
            s = socket.socket()
            s.settimeout(5)
            try:
                s.connect((HOST, PORT[0]))
                if first_bytes:
                    s.sendall(first_bytes)
                mine.append(s)
            except OSError:
                s.close()
                with lock:
                    failed[0] += 1
        with lock:
            socks.extend(mine)

    ts = [threading.Thread(target=opener, args=(n // threads,)) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return socks, failed[0]


PORT = [0]


def closed_by_server(s):
    """Whether the server closed this connection (EOF or reset); never blocks."""
    s.setblocking(False)
    try:
        return s.recv(4096) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def at_rest(srv, seconds=3.0):
    time.sleep(seconds)
    rss = sorted(srv.rss_kb() for _ in range(5) if time.sleep(0.1) is None)
    return rss[2], srv.fds()


def cmd_slowloris(a, ck, res):
    limit = raise_fd_limit()
    max_conn, header_to = 512, 3
    srv = Server(a.bin, ["--max-connections", str(max_conn), "--header-read-timeout-secs",
                         str(header_to)], a.workdir, "slowloris-server")
    PORT[0] = srv.port
    try:
        # Warm the allocator the way real traffic does before taking the baseline.
        for i in range(20):
            request(srv.port, "POST", "/generate", {"class_label": i % 10, "steps": 10})
        rss0, fds0 = at_rest(srv, 1.0)
        print(f"    baseline at rest: RSS {rss0 / 1024:.1f} MiB, {fds0} fds (client fd limit {limit})")
        res["baseline"] = {"rss_kb": rss0, "fds": fds0}
        for name, n, first, trickle in (
                ("slowloris", 4000, b"POST /generate HTTP/1.1\r\nHost: x\r\n", True),
                ("descriptor flood", 6000, b"", False)):
            t0 = time.monotonic()
            with Prober(srv) as p:
                time.sleep(1.0)
                socks, failed = open_many(n, first)
                opened = time.monotonic() - t0
                # Hold for 8 s; a slowloris keeps sending a header line a second.
                for _ in range(8):
                    time.sleep(1.0)
                    if trickle:
                        for s in socks:
                            try:
                                s.send(b"X-a: b\r\n")
                            except OSError:
                                pass
                closed = sum(closed_by_server(s) for s in socks)
                for s in socks:
                    s.close()
                time.sleep(1.0)
            summ = p.summary()
            rss1, fds1 = at_rest(srv)
            summ.update(connections=n, connect_failed=failed, closed_by_server=closed,
                        open_s=round(opened, 1), rss_after_kb=rss1, fds_after=fds1)
            res[name] = summ
            print(f"    {name}: {n} connections opened in {opened:.1f} s ({failed} failed to "
                  f"connect), {closed} closed by the server while held; /healthz x{summ['healthz']}: "
                  f"p50 {summ['healthz_p50_ms']} ms, p99 {summ['healthz_p99_ms']} ms, max "
                  f"{summ['healthz_max_ms']} ms, {summ['healthz_failed']} failed; generate "
                  f"x{summ['generate']}: p50 {summ['generate_p50_ms']} ms, max "
                  f"{summ['generate_max_ms']} ms, {summ['generate_failed']} failed; server fds peak "
                  f"{summ['fds_peak']}, RSS peak {summ['rss_peak_kb'] / 1024:.1f} MiB, at rest after "
                  f"{rss1 / 1024:.1f} MiB, {fds1} fds")
            ck.ok(summ["healthz_failed"] == 0 and summ["healthz"] >= 50,
                  f"{name}: every /healthz answered 200 ({summ['healthz']})")
            ck.ok(summ["healthz_p99_ms"] < 1000, f"{name}: /healthz p99 {summ['healthz_p99_ms']} ms < 1 s")
            ck.ok(summ["generate_failed"] == 0 and summ["generate"] >= 5,
                  f"{name}: every generate answered 200 ({summ['generate']})")
            ck.ok(summ["fds_peak"] <= max_conn + 64,
                  f"{name}: server descriptors peaked at {summ['fds_peak']} <= {max_conn} + 64")
            ck.ok(closed >= n - max_conn - failed,
                  f"{name}: the server closed {closed} of {n} held connections")
            ck.ok(fds1 <= fds0 + 2, f"{name}: descriptors back to baseline ({fds0} -> {fds1})")
            ck.ok(rss1 <= rss0 * 1.3 + 4096,
                  f"{name}: RSS back near baseline ({rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MiB, "
                  f"within 30 % + 4 MiB)")
        m = srv.metrics()
        res["server_counters"] = {k: v for k, v in m.items() if "connections" in k}
        print(f"    server: {res['server_counters']}")
    finally:
        srv.stop()


def cmd_drain(a, ck, res):
    # (1) Work that cannot finish in time: a held partial head, a held partial body and two
    # long generations; --drain-timeout-secs 3 must end the process at 3 s, non-zero.
    srv = Server(a.bin, ["--drain-timeout-secs", "3", "--header-read-timeout-secs", "60",
                         "--body-read-timeout-secs", "60", "--max-batch", "4"],
                 a.workdir, "drain-server")
    try:
        head = socket.create_connection((HOST, srv.port))
        head.sendall(b"GET /healthz HTTP/1.1\r\nHo")
        body = socket.create_connection((HOST, srv.port))
        body.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 90\r\n\r\n{\"cl")
        answers = []

        def long_one(i):
            answers.append(request(srv.port, "POST", "/generate",
                                   {"class_label": i, "n": 4, "steps": 1000}, timeout=30))

        ts = [threading.Thread(target=long_one, args=(i,)) for i in range(2)]
        for t in ts:
            t.start()
        ops.wait_until(lambda: srv.metric("diffit_active_samples") >= 4, 20)
        t0 = time.monotonic()
        srv.proc.send_signal(15)
        code = srv.wait(15)
        took = time.monotonic() - t0
        for t in ts:
            t.join(10)
        statuses = sorted(str(st) for st, _, _, _ in answers)
        held_closed = [closed_after(head), closed_after(body)]
        print(f"    held head + held body + 2 x (n 4, 1000 steps), drain timeout 3 s: exit {code} "
              f"after {took:.2f} s; generations answered {statuses}; held connections closed "
              f"{held_closed}")
        log = srv.tail(40)
        ck.ok(code not in (None, 0, 101), f"exit status {code}: non-zero (work was cut off), no panic")
        ck.ok(took <= 3.3, f"exited {took:.2f} s after SIGTERM (<= 3 s + 0.3 s)")
        ck.ok(all(s == "503" for s in statuses) and len(statuses) == 2,
              f"both cut-off generations were answered 503 ({statuses})")
        ck.ok(all(held_closed), "held partial head and body were closed")
        ck.ok("requests cut off" in log, "the cut-off is logged with its count")
        res["cut_off"] = {"exit": code, "seconds": round(took, 2), "answers": statuses}
    finally:
        srv.stop()
    # (2) Only a held partial head and an idle keep-alive connection: nothing was accepted,
    # so the drain ends at once with 0 although its timeout is 30 s.
    srv = Server(a.bin, ["--drain-timeout-secs", "30"], a.workdir, "drain-clean-server")
    try:
        head = socket.create_connection((HOST, srv.port))
        head.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\n")
        idle = socket.create_connection((HOST, srv.port))
        idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        idle.recv(4096)
        t0 = time.monotonic()
        srv.proc.send_signal(15)
        code = srv.wait(35)
        took = time.monotonic() - t0
        print(f"    held head + idle keep-alive, drain timeout 30 s: exit {code} after {took:.2f} s")
        ck.ok(code == 0, f"exit 0 when nothing accepted was cut off ({code})")
        ck.ok(took < 2.0, f"exited {took:.2f} s after SIGTERM (nothing to wait for)")
        ck.ok(closed_after(head) and closed_after(idle), "held and idle connections were closed")
        res["clean"] = {"exit": code, "seconds": round(took, 2)}
    finally:
        srv.stop()


def closed_after(s, wait=1.0):
    s.settimeout(wait)
    try:
        while True:
            if s.recv(4096) == b"":
                return True
    except socket.timeout:
        return False
    except OSError:
        return True


def hostile_names():
    """10 classes x 186 names = 1,860, many of them hostile: long, look-alike, combining marks,
    bidi overrides, quotes and braces, only separators, duplicates across classes."""
    classes = []
    for c in range(10):
        names = [f"class {c}"]
        for k in range(185):
            kind = k % 8
            if kind == 0:
                names.append(f"synonym {c} {k}")
            elif kind == 1:
                names.append(("long name " * 400) + f"{c} {k}")          # ~4 KB
            elif kind == 2:
                names.append("e\u0301" * 50 + f" {c} {k}")                # combining accents
            elif kind == 3:
                names.append(f"\u202eevil {c} {k}\u202c")                 # right-to-left override
            elif kind == 4:
                names.append(f'quote " brace }} {{ {c} {k}')
            elif kind == 5:
                names.append("-_- " * 30 + f"{c}{k}")
            elif kind == 6:
                names.append(f"class {c}")                                # duplicate of its label
            else:
                names.append("\U0001f600" * 40 + f" {c} {k}")
        classes.append(names)
    return classes


def cmd_names(a, ck, res):
    model = os.path.join(a.workdir, "names_model.safetensors")
    os.makedirs(a.workdir, exist_ok=True)
    with open(MODEL, "rb") as f, open(model, "wb") as g:
        g.write(f.read())
    names = hostile_names()
    total = sum(len(n) for n in names)
    with open(os.path.join(a.workdir, "names_model.classes.json"), "w") as f:
        json.dump(names, f)
    srv = Server(a.bin, [], a.workdir, "names-server", model=model)
    try:
        st, _, body, _ = srv.req("GET", "/v1/classes")
        ck.ok(st == 200 and json.loads(body)["num_classes"] == 10,
              f"a model with {total} class names (10 classes) loads; /v1/classes 200")
        st, _, body, _ = srv.req("POST", "/generate", {"class_name": "Synonym 3 8", "steps": 2})
        ck.ok(st == 200 and json.loads(body)["images"][0]["class_label"] == 3,
              f"a synonym resolves ({st})")
        # Each as large as the 64 KiB body limit allows once JSON-escaped (\uXXXX).
        queries = ["x" * 60000, "long name " * 6000, "e\u0301" * 8000, "\u202e" * 9000,
                   '"}{' * 14000, "\U0001f600" * 4500, "synonm 3 8", ""]
        lat, lock = [], threading.Lock()

        def one(q, path):
            body = {"class_name": q, "steps": 2} if path == "/generate" else {"prompt": q, "steps": 2}
            st, _, b, dt = srv.req("POST", path, body, timeout=30)
            with lock:
                lat.append((st, dt, path, len(q), b[:200]))

        with Prober(srv) as p:
            time.sleep(0.5)
            for rnd in range(3):
                ts = [threading.Thread(target=one, args=(q, path)) for q in queries
                      for path in ("/generate", "/v1/images/generations")]
                for t in ts:
                    t.start()
                for t in ts:
                    t.join()
            time.sleep(0.5)
        summ = p.summary()
        statuses = sorted({st for st, *_ in lat}, key=str)
        worst = max(dt for _, dt, *_ in lat)
        med = statistics.median(dt for _, dt, *_ in lat)
        print(f"    {len(lat)} hostile-name requests (16 at a time): statuses {statuses}, median "
              f"{med * 1000:.1f} ms, worst {worst * 1000:.1f} ms; /healthz meanwhile x{summ['healthz']}: "
              f"p50 {summ['healthz_p50_ms']} ms, max {summ['healthz_max_ms']} ms")
        ck.ok(set(statuses) <= {400, 422}, f"every unknown name refused 400/422 ({statuses})")
        ck.ok(worst < 2.0, f"worst hostile-name request {worst * 1000:.0f} ms < 2 s")
        ck.ok(summ["healthz_failed"] == 0 and summ["healthz_max_ms"] < 500,
              f"/healthz never held up (max {summ['healthz_max_ms']} ms < 500 ms)")
        sample = next(b for st, _, path, n, b in lat if n == len("synonm 3 8"))
        ck.ok(b"synonym 3 8" in sample, f"a near miss still lists its close match: {sample[:160]!r}")
        res.update(names=total, requests=len(lat), median_ms=round(med * 1000, 1),
                   worst_ms=round(worst * 1000, 1), healthz=summ)
    finally:
        srv.stop()


def cmd_zombie(a, ck, res):
    raw, hdr, data = ops.safetensors_parts(MODEL)
    cases = []
    for name, defaults, words in (
            ("steps 0, guidance 1e30 (the reported zombie)",
             {"steps": 0, "sampler": "ddpm", "guidance_scale": 1e30, "guidance_schedule": "constant"},
             ["defaults", "steps must be between"]),
            ("guidance -1", {"steps": 10, "sampler": "ddim", "guidance_scale": -1.0,
                             "guidance_schedule": "constant"}, ["defaults", "guidance_scale"]),
            ("unknown sampler", {"steps": 10, "sampler": "euler", "guidance_scale": 2.0,
                                 "guidance_schedule": "constant"}, ["defaults"]),
            ("not JSON", "{steps", ["defaults"])):
        h = json.loads(json.dumps(hdr))
        meta = dict(h.get("__metadata__", {}))
        meta["defaults"] = defaults if isinstance(defaults, str) else json.dumps(defaults)
        h["__metadata__"] = meta
        path = os.path.join(a.workdir, f"zombie-{len(cases)}.safetensors")
        ops.write_safetensors(path, h, data)
        cases.append((name, ["--model", path, "--vae", VAE], words))
    for flag, value in (("--max-request-timeout-secs", "inf"), ("--drain-timeout-secs", "inf"),
                        ("--max-request-timeout-secs", "1.8e19"), ("--request-timeout-secs", "nan"),
                        ("--header-read-timeout-secs", "0"), ("--idle-timeout-secs", "-5")):
        cases.append((f"{flag} {value}", ["--model", MODEL, "--vae", VAE, f"{flag}={value}"], [flag[2:]]))
    os.makedirs(a.workdir, exist_ok=True)
    rows = []
    for name, args, words in cases:
        t0 = time.monotonic()
        p = subprocess.run([a.bin, "serve", "--host", HOST, "--port", "0", "--device", "cpu", *args],
                           capture_output=True, timeout=60, env=dict(os.environ, RUST_LOG="warn"))
        took = time.monotonic() - t0
        err = p.stderr.decode(errors="replace").strip().splitlines()
        last = err[-1] if err else ""
        rows.append((name, p.returncode, round(took, 2), last))
        print(f"    {name}: exit {p.returncode} after {took:.2f} s: {last[:200]}")
        ck.ok(p.returncode not in (0, 101) and p.returncode > 0,
              f"{name}: non-zero exit, not a panic ({p.returncode})")
        ck.ok(b"listening" not in p.stdout, f"{name}: never listened")
        ck.ok(all(w in last for w in words), f"{name}: the message names {words}")
        ck.ok(took < 10, f"{name}: ended in {took:.2f} s")
    res["cases"] = rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("step", choices=["slowloris", "drain", "names", "zombie"])
    ap.add_argument("--bin", required=True)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--results", default=None)
    a = ap.parse_args()
    a.bin = os.path.abspath(a.bin)
    a.workdir = a.workdir or f"/tmp/ops-{a.step}"
    os.makedirs(a.workdir, exist_ok=True)
    ops.run_step(a, globals()["cmd_" + a.step])

if __name__ == "__main__":
    main()
