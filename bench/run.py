#!/usr/bin/env python3
"""aiaas benchmark: raw TorchScript forward vs the served HTTP path, on image-cnn.

Measures
  (a) raw forward throughput through the engine, no server, at batch 1, 8, 32;
  (b) served throughput and p50/p99 latency at concurrency 1, 8, 32, 64, posting PNG bytes with
      wrk, with dynamic batching on (max_batch_size 32) and off (max_batch_size 1).
Writes the tables between markers in docs/BENCHMARKS.md and a plot to docs/bench-core.svg, and
prints everything it measures. Bounded in time: about 2 minutes with the defaults.

Usage: bench/run.py [--duration 10] [--concurrency 1,8,32,64] [--quick]
"""

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
AIAAS = ROOT / "target/release/aiaas"
BENCH = ROOT / "target/release/aiaas-bench"
DOC = ROOT / "docs/BENCHMARKS.md"


def log(*a):
    print(*a, flush=True)


def ensure_wrk():
    if shutil.which("wrk"):
        return
    log(">> installing wrk (Debian package)")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    subprocess.run(sudo + ["apt-get", "install", "-y", "-qq", "wrk"], check=True,
                   stdout=subprocess.DEVNULL)


def raw_forward(model_dir, batches, seconds, instances=1):
    out = subprocess.run([str(BENCH), "raw", "--model", str(model_dir), "--batch",
                          ",".join(map(str, batches)), "--seconds", str(seconds),
                          "--instances", str(instances)],
                         check=True, capture_output=True, text=True).stdout
    return [json.loads(l) for l in out.splitlines() if l.startswith("{")]


@contextlib.contextmanager
def server(repo, *extra):
    """Starts aiaas on a free port over `repo`; yields its base URL once ready."""
    proc = subprocess.Popen([str(AIAAS), "--host", "127.0.0.1", "--port", "0", "--models",
                             str(repo), "--log-level", "warn,aiaas=info", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "NO_COLOR": "1"})
    base = None
    try:
        for line in proc.stdout:
            m = re.search(r"listening on (\S+)", line)
            if m:
                base = "http://" + m.group(1)
                break
        if base is None:
            raise RuntimeError("server did not start")
        # keep draining the log so the pipe never blocks the server
        import threading
        threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(base + "/health/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except Exception:
                time.sleep(0.1)
        yield base, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def wrk(url, body_file, content_type, concurrency, duration):
    env = {**os.environ, "BODY_FILE": str(body_file), "CONTENT_TYPE": content_type}
    threads = min(2, concurrency)
    out = subprocess.run(["wrk", "-t", str(threads), "-c", str(concurrency), "-d", f"{duration}s",
                          "--timeout", "10s", "-s", str(ROOT / "bench/wrk_post.lua"), url],
                         check=True, capture_output=True, text=True, env=env).stdout
    line = next(l for l in out.splitlines() if l.startswith("WRK_JSON "))
    r = json.loads(line[len("WRK_JSON "):])
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
    r["errors"] = r["non2xx"] + r["connect"] + r["read"] + r["write"] + r["timeout"]
    return r


def metric_sum(base, name, model):
    with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
        text = r.read().decode()
    total = 0.0
    for l in text.splitlines():
        if l.startswith(name) and f'model="{model}"' in l:
            total += float(l.rsplit(" ", 1)[1])
    return total


def model_repo(tmp, name, max_batch):
    """A repository with one copy of the bundled image-cnn whose max_batch_size is `max_batch`."""
    repo = Path(tmp) / name
    dst = repo / "image-cnn"
    shutil.copytree(ROOT / "models/image-cnn", dst)
    toml = dst / "model.toml"
    text = re.sub(r"max_batch_size = \d+", f"max_batch_size = {max_batch}", toml.read_text())
    toml.write_text(text)
    return repo


def served(repo, body, ctype, concurrency, duration, label):
    rows = []
    with server(repo) as (base, _):
        url = base + "/v1/models/image-cnn/predict"
        wrk(url, body, ctype, 4, 2)  # warm the connection pool and allocator
        for c in concurrency:
            before = (metric_sum(base, "aiaas_inferences_total", "image-cnn"),
                      metric_sum(base, "aiaas_executions_total", "image-cnn"))
            r = wrk(url, body, ctype, c, duration)
            inf = metric_sum(base, "aiaas_inferences_total", "image-cnn") - before[0]
            exe = metric_sum(base, "aiaas_executions_total", "image-cnn") - before[1]
            r["mean_batch"] = inf / exe if exe else 0.0
            r["concurrency"] = c
            r["mode"] = label
            log(f"  {label:<12} c={c:<3} {r['rps']:8.1f} req/s  p50 {r['p50_us']/1e3:7.2f} ms  "
                f"p99 {r['p99_us']/1e3:7.2f} ms  mean batch {r['mean_batch']:5.1f}  errors {r['errors']}")
            rows.append(r)
    return rows


# ---------------------------------------------------------------- plots (plain SVG, no deps)

def svg_chart(series, x_label, y_label, title, width=420, height=300, hlines=(), log_x=True, x_ticks=None):
    """series: [(name, colour, [(x, y), ...])]; x on a log2 axis unless log_x is False."""
    import math
    pad_l, pad_r, pad_t, pad_b = 60, 15, 30, 45
    xs = sorted({x for _, _, pts in series for x, _ in pts})
    ymax = max([y for _, _, pts in series for _, y in pts] + [h[2] for h in hlines]) * 1.1 or 1
    fx = math.log2 if log_x else float
    lx = [fx(x) for x in xs]
    x0, x1 = min(lx), max(lx) if max(lx) > min(lx) else min(lx) + 1

    def px(x):
        return pad_l + (fx(x) - x0) / (x1 - x0) * (width - pad_l - pad_r)

    def py(y):
        return height - pad_b - y / ymax * (height - pad_t - pad_b)

    out = [f'<g><text x="{width/2}" y="18" text-anchor="middle" font-size="13" '
           f'font-weight="bold">{title}</text>']
    out.append(f'<line x1="{pad_l}" y1="{height-pad_b}" x2="{width-pad_r}" y2="{height-pad_b}" stroke="#333"/>')
    out.append(f'<line x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{height-pad_b}" stroke="#333"/>')
    for x in (x_ticks if x_ticks is not None else xs):
        out.append(f'<text x="{px(x):.1f}" y="{height-pad_b+16}" text-anchor="middle" font-size="11">{x:g}</text>')
    for i in range(5):
        y = ymax * i / 4
        out.append(f'<line x1="{pad_l}" y1="{py(y):.1f}" x2="{width-pad_r}" y2="{py(y):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{pad_l-5}" y="{py(y)+4:.1f}" text-anchor="end" font-size="11">{y:.0f}</text>')
    out.append(f'<text x="{width/2}" y="{height-8}" text-anchor="middle" font-size="11">{x_label}</text>')
    out.append(f'<text x="14" y="{height/2}" text-anchor="middle" font-size="11" '
               f'transform="rotate(-90 14 {height/2})">{y_label}</text>')
    for name, colour, y in hlines:
        out.append(f'<line x1="{pad_l}" y1="{py(y):.1f}" x2="{width-pad_r}" y2="{py(y):.1f}" '
                   f'stroke="{colour}" stroke-dasharray="5,4"/>')
        out.append(f'<text x="{width-pad_r-2}" y="{py(y)-4:.1f}" text-anchor="end" font-size="10" fill="{colour}">{name}</text>')
    for k, (name, colour, pts) in enumerate(series):
        d = " ".join(f"{'M' if i == 0 else 'L'}{px(x):.1f},{py(y):.1f}" for i, (x, y) in enumerate(pts))
        out.append(f'<path d="{d}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for x, y in pts:
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{colour}"/>')
        out.append(f'<text x="{pad_l+10}" y="{pad_t+14+14*k}" font-size="11" fill="{colour}">{name}</text>')
    out.append("</g>")
    return out


def write_svg(path, charts, width=420, height=300):
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width*len(charts)}" height="{height}" '
             f'font-family="sans-serif"><rect width="100%" height="100%" fill="white"/>']
    for i, chart in enumerate(charts):
        parts.append(f'<g transform="translate({i*width},0)">')
        parts.extend(chart)
        parts.append("</g>")
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")


def replace_section(doc, name, body):
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)


def machine():
    cpu = "unknown CPU"
    with contextlib.suppress(Exception):
        for l in open("/proc/cpuinfo"):
            if l.startswith("model name"):
                cpu = l.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores ({cpu}), {platform.system()} {platform.machine()}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=10, help="seconds per load level")
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--raw-seconds", type=float, default=5)
    ap.add_argument("--quick", action="store_true", help="3 s per level (a smoke run)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    args = ap.parse_args()
    if args.quick:
        args.duration, args.raw_seconds = 3, 2
    conc = [int(c) for c in args.concurrency.split(",")]
    for b in (AIAAS, BENCH):
        if not b.exists():
            sys.exit(f"{b} missing: run `make build` first")
    ensure_wrk()
    log(f"machine: {machine()}")

    log("raw TorchScript forward (engine only, no HTTP):")
    raw = []
    for instances in (1, 2):
        raw += raw_forward(ROOT / "models/image-cnn", [1, 8, 32], args.raw_seconds, instances)
    for r in raw:
        log(f"  {r['instances']} x {r['threads']} thread(s)  batch {r['batch']:<3} "
            f"{r['items_per_s']:8.1f} images/s  p50 {r['p50_ms']:.2f} ms per pass")
    # the reference at each batch size is the better of the two layouts
    raw_by_batch = {}
    for r in raw:
        if r["items_per_s"] > raw_by_batch.get(r["batch"], {"items_per_s": 0})["items_per_s"]:
            raw_by_batch[r["batch"]] = r

    with tempfile.TemporaryDirectory(prefix="aiaas-bench-") as tmp:
        png = Path(tmp) / "body.png"
        subprocess.run([str(BENCH), "png", "--out", str(png)], check=True)
        log(f"served, POST image/png ({png.stat().st_size} bytes) with wrk:")
        batching = served(model_repo(tmp, "batching", 32), png, "image/png", conc, args.duration, "batching")
        # This machine's speed drifts by tens of percent over minutes (shared host), so the
        # reference is measured again right after the served run and the two are averaged.
        log("raw forward at batch 32 again, right after the served run:")
        after = [raw_forward(ROOT / "models/image-cnn", [32], args.raw_seconds, i)[0] for i in (1, 2)]
        for r in after:
            log(f"  {r['instances']} x {r['threads']} thread(s)  batch 32  {r['items_per_s']:8.1f} images/s")
        single = served(model_repo(tmp, "single", 1), png, "image/png", conc, args.duration, "max_batch 1")

    at32 = next((r for r in batching if r["concurrency"] == 32), None)
    best_after = max(after, key=lambda r: r["items_per_s"])
    reference = (raw_by_batch[32]["items_per_s"] + best_after["items_per_s"]) / 2
    ratio = at32["rps"] / reference if at32 else float("nan")
    log(f"served at c=32 with batching / best raw forward at batch 32 (mean of before and after, "
        f"{reference:.0f} images/s) = {ratio:.1%}")
    if args.no_write:
        return

    lines = [f"Measured {time.strftime('%Y-%m-%d')} on {machine()}; torch 2.11.0 (CPU), "
             f"`bench/run.py --duration {args.duration:g}`. wrk shares the machine's cores with the server.",
             "", "**Raw TorchScript forward** (engine only, no HTTP, no decoding; one engine with "
             "two libtorch threads, or two single-threaded engines side by side):", "",
             "| engines x threads | batch | images/s | p50 per forward pass |", "|---|---:|---:|---:|"]
    for r in raw:
        lines.append(f"| {r['instances']} x {r['threads']} | {r['batch']} | {r['items_per_s']:.0f} | {r['p50_ms']:.2f} ms |")
    lines += ["", "**Served** (`POST /v1/models/image-cnn/predict`, PNG body, wrk):", "",
              "| mode | concurrency | req/s | p50 | p99 | mean batch | errors |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in batching + single:
        lines.append(f"| {r['mode']} | {r['concurrency']} | {r['rps']:.0f} | {r['p50_us']/1e3:.2f} ms | "
                     f"{r['p99_us']/1e3:.2f} ms | {r['mean_batch']:.1f} | {r['errors']} |")
    one = (next(r for r in raw if r["instances"] == 1 and r["batch"] == 32)["items_per_s"]
           + next(r for r in after if r["instances"] == 1)["items_per_s"]) / 2
    lines += ["", f"Raw forward at batch 32 measured again right after the served batching run: "
              + ", ".join(f"{r['instances']} x {r['threads']}: {r['items_per_s']:.0f} images/s" for r in after)
              + " (this shared machine's speed drifts between runs, so the reference is the mean of the two).",
              "", f"At concurrency 32 with batching the server delivers **{ratio:.0%}** of the best raw "
              f"forward throughput at batch 32 ({at32['rps']:.0f} vs {reference:.0f} images/s); against one "
              f"engine with libtorch's default threading ({one:.0f} images/s) it is {at32['rps'] / one:.0%}.",
              "", "![throughput and p99 latency vs concurrency](bench-core.svg)"]
    replace_section(DOC, "core", "\n".join(lines))
    write_svg(ROOT / "docs/bench-core.svg", [
        svg_chart([("batching", "#1f77b4", [(r["concurrency"], r["rps"]) for r in batching]),
                   ("max_batch 1", "#d62728", [(r["concurrency"], r["rps"]) for r in single])],
                  "concurrent clients", "requests/s", "image-cnn throughput",
                  hlines=[("best raw forward, batch 32", "#2ca02c", raw_by_batch[32]["items_per_s"]),
                          ("best raw forward, batch 1", "#999", raw_by_batch[1]["items_per_s"])]),
        svg_chart([("batching", "#1f77b4", [(r["concurrency"], r["p99_us"] / 1e3) for r in batching]),
                   ("max_batch 1", "#d62728", [(r["concurrency"], r["p99_us"] / 1e3) for r in single])],
                  "concurrent clients", "p99 latency (ms)", "image-cnn p99 latency"),
    ])
    log(f"wrote {DOC.relative_to(ROOT)} and docs/bench-core.svg")


if __name__ == "__main__":
    main()
