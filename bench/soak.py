#!/usr/bin/env python3
"""Soak test: the server at saturation for a bounded time (default 10 minutes) with a mix of
valid and invalid requests (bench/soak.lua), sampling its RSS. Pass: zero unexpected statuses,
zero socket errors, RSS flat (end within --rss-margin MiB of the level after warm-up).

Usage: bench/soak.py [--minutes 10] [--connections 32] [--no-write]
Writes the figures to docs/BENCHMARKS.md (section "soak") and an RSS plot to docs/soak-rss.svg.
"""

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import AIAAS, BENCH, ROOT, DOC, ensure_wrk, machine, replace_section, rss_mib, server, svg_chart, write_svg  # noqa: E402


def warm_every_batch_size(base, max_batch):
    """Two concurrent v2 requests of n rows for every n, so both engine instances run it."""
    import concurrent.futures
    import urllib.request

    def post(n):
        body = json.dumps({"inputs": [{"name": "image", "shape": [n, 3, 64, 64], "datatype": "FP32",
                                       "data": [0.5] * (n * 3 * 64 * 64)}]}).encode()
        req = urllib.request.Request(base + "/v2/models/image-cnn/infer", data=body)
        with urllib.request.urlopen(req, timeout=60) as r:
            r.read()

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for n in range(1, max_batch + 1):
            list(pool.map(post, [n, n]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--rss-margin", type=float, default=30, help="MiB the RSS may drift")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    ensure_wrk()
    if not AIAAS.exists():
        sys.exit(f"{AIAAS} missing: run `make build` first")
    seconds = max(10, int(args.minutes * 60))
    with tempfile.TemporaryDirectory(prefix="aiaas-soak-") as tmp:
        png = Path(tmp) / "body.png"
        subprocess.run([str(BENCH), "png", "--out", str(png)], check=True)
        with server(ROOT / "models") as (base, proc):
            env = {"SOAK_PNG": str(png), "PATH": "/usr/bin:/bin"}
            # warm-up: allocator pools and libtorch caches settle; oneDNN keeps compiled kernels
            # per input shape, so every batch size image-cnn can see is run on both instances
            subprocess.run(["wrk", "-t2", f"-c{args.connections}", "-d15s", "-s", str(ROOT / "bench/soak.lua"), base],
                           check=True, capture_output=True, env=env)
            warm_every_batch_size(base, 32)
            samples = [(0.0, rss_mib(proc.pid))]
            stop = threading.Event()
            started = time.time()

            def sample():
                while not stop.wait(5):
                    samples.append((time.time() - started, rss_mib(proc.pid)))
            threading.Thread(target=sample, daemon=True).start()
            print(f"soak: {seconds} s at {args.connections} connections, RSS after warm-up {samples[0][1]:.1f} MiB", flush=True)
            out = subprocess.run(["wrk", "-t2", f"-c{args.connections}", f"-d{seconds}s", "--timeout", "10s",
                                  "-s", str(ROOT / "bench/soak.lua"), base],
                                 check=True, capture_output=True, text=True, env=env).stdout
            stop.set()
            samples.append((time.time() - started, rss_mib(proc.pid)))
            line = next(l for l in out.splitlines() if l.startswith("SOAK_JSON "))
            r = json.loads(line[len("SOAK_JSON "):])
    start, end = samples[0][1], samples[-1][1]
    peak = max(s[1] for s in samples)
    rps = r["requests"] / (r["duration_us"] / 1e6)
    passed = r["unexpected"] == 0 and r["socket_errors"] == 0 and abs(end - start) <= args.rss_margin
    print(f"requests {r['requests']} ({rps:.0f}/s), expected statuses {r['expected']}, unexpected {r['unexpected']}, "
          f"socket errors {r['socket_errors']}, p50 {r['p50_us']/1e3:.1f} ms, p99 {r['p99_us']/1e3:.1f} ms")
    print(f"RSS start {start:.1f} MiB, end {end:.1f} MiB, peak {peak:.1f} MiB -> {'PASS' if passed else 'FAIL'}")
    if r["examples"]:
        print("unexpected examples:", r["examples"])
    if not args.no_write:
        body = "\n".join([
            f"Measured {time.strftime('%Y-%m-%d')} on {machine()}: `bench/soak.py --minutes {args.minutes:g}`, wrk with "
            f"{args.connections} connections, a rotation of 5 valid requests (PNG to image-cnn, JSON to the regressor "
            "and text classifier, v2 JSON) and 5 invalid ones (malformed JSON, wrong shape, unknown model, undecodable "
            "image, unsupported v2 datatype), each checked against its expected status.", "",
            "| duration | requests | req/s | unexpected statuses | socket errors | p50 | p99 | RSS after warm-up | RSS at end | peak |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| {seconds} s | {r['requests']} | {rps:.0f} | {r['unexpected']} | {r['socket_errors']} | "
            f"{r['p50_us']/1e3:.1f} ms | {r['p99_us']/1e3:.1f} ms | {start:.1f} MiB | {end:.1f} MiB | {peak:.1f} MiB |",
            "", "![RSS during the soak](soak-rss.svg)"])
        replace_section(DOC, "soak", body)
        write_svg(ROOT / "docs/soak-rss.svg", [svg_chart(
            [("RSS (MiB)", "#1f77b4", [(t, m) for t, m in samples])],
            "seconds", "MiB", "RSS during the soak", width=640, log_x=False,
            x_ticks=[round(seconds * k / 5) for k in range(6)])], width=640)
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
