#!/usr/bin/env python3
"""Where the time goes: runs the server under wrk load, samples it with `perf record`, and
buckets the samples into stages (HTTP, body read and decode, JSON, copies into the batch,
libtorch forward, allocation, kernel, runtime hand-offs).

Usage: bench/profile.py [--concurrency 32] [--body png|json] [--seconds 10]
Needs perf (Debian linux-perf); prints a table (markdown) of the share of CPU samples per stage.
"""

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import BENCH, ROOT, ensure_wrk, model_repo, server  # noqa: E402

# (stage, regex on "dso symbol"), first match wins
STAGES = [
    ("forward (libtorch)", r"libtorch|libc10|libgomp|mkl_|dnnl|sgemm|at::|c10::|torch::|\[JIT\]"),
    ("image decode + pre-processing", r"png::|fdeflate|zune|image::|ImageCodec|normalise|to_chw|miniz|crc32|adler"),
    ("JSON parse / encode", r"serde_json|serde::|Instance|ryu|itoa|codec::instance"),
    ("batch stacking / splitting / copies", r"assemble::|memmove|memcpy|memset|HostTensor|f32_bytes|slice_rows"),
    ("allocation", r"malloc|_int_free|cfree|free$|_int_malloc|realloc|consolidate|unlink_chunk|mid_memalign|sysmalloc"),
    ("HTTP (hyper, axum, tower)", r"hyper|axum|tower|http::|h1|httparse|bytes::|tracing|aiaas::http"),
    ("queue and hand-offs (tokio, crossbeam, futex)", r"tokio|crossbeam|futex|parking|aiaas::batcher|std::thread|park"),
    ("kernel: network", r"\[k\].*(tcp|skb|sock|ip_|inet|net_|loopback|__dev|nf_|sk_)"),
    ("kernel: other (scheduling, page faults, syscalls)", r"\[k\]"),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--body", choices=["png", "json"], default="png")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--show-other", action="store_true", help="list the unclassified symbols")
    args = ap.parse_args()
    if not shutil.which("perf"):
        sys.exit("perf not found: apt-get install linux-perf")
    ensure_wrk()
    with tempfile.TemporaryDirectory(prefix="aiaas-prof-") as tmp:
        body = Path(tmp) / "body"
        kind = "png" if args.body == "png" else "json-pixels"
        subprocess.run([str(BENCH), kind, "--out", str(body)], check=True)
        ctype = "image/png" if args.body == "png" else "application/json"
        data = Path(tmp) / "perf.data"
        with server(model_repo(tmp, "prof", 32)) as (base, proc):
            env = {"BODY_FILE": str(body), "CONTENT_TYPE": ctype, "PATH": "/usr/bin:/bin"}
            load = subprocess.Popen(["wrk", "-t2", f"-c{args.concurrency}", f"-d{args.seconds + 3:g}s",
                                     "-s", str(ROOT / "bench/wrk_post.lua"), base + "/v1/models/image-cnn/predict"],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
            time.sleep(1.5)
            subprocess.run(["perf", "record", "-F", "997", "-p", str(proc.pid), "-o", str(data), "--",
                            "sleep", str(args.seconds)], check=True, capture_output=True)
            out = load.communicate()[0]
        report = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--sort", "dso,sym",
                                 "--stdio", "--percent-limit", "0"], capture_output=True, text=True).stdout
    shares = {name: 0.0 for name, _ in STAGES}
    shares["other"] = 0.0
    for line in report.splitlines():
        m = re.match(r"\s+([\d.]+)%\s+(\S+)\s+(.*)$", line)
        if not m:
            continue
        pct, dso, sym = float(m.group(1)), m.group(2), m.group(3)
        key = f"{dso} {sym}"
        for name, rx in STAGES:
            if re.search(rx, key):
                shares[name] += pct
                break
        else:
            shares["other"] += pct
            if args.show_other and pct > 0.3:
                print(f"other: {pct:.2f}% {key}")
    total = sum(shares.values())
    if abs(total - 100) > 2:
        print(f"(samples add up to {total:.1f}%; shares below are of that total)")
    rps = re.search(r'"requests": (\d+), "duration_us": (\d+)', out)
    rate = int(rps.group(1)) / (int(rps.group(2)) / 1e6) if rps else float("nan")
    print(f"image-cnn, POST {args.body}, concurrency {args.concurrency}: {rate:.0f} req/s; share of the server's CPU samples:")
    print("| stage | share |")
    print("|---|---:|")
    for name, pct in sorted(shares.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {100 * pct / total:.1f}% |")


if __name__ == "__main__":
    main()
