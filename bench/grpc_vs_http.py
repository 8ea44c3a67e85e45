#!/usr/bin/env python3
"""KServe v2 over gRPC against HTTP with the binary tensor extension, on image-cnn, in one run.

perf_analyzer cannot be installed here (PyPI's `perf-analyzer` is an empty placeholder), so
the load comes from Triton's own Python clients, asyncio flavour (tritonclient.grpc.aio and
tritonclient.http.aio): `c` requests in flight for `--duration` seconds per level, the same FP32
tensor (a batch of `--batch` 3x64x64 images) for both protocols, against one server that serves
both. Both protocols pay the same Python client, so the comparison is fair, but the absolute
figures are the client's as much as the server's: the client shares the machine's cores.

Usage: .venv-test/bin/python bench/grpc_vs_http.py [--duration 8] [--concurrency 1,8,32] [--no-write]
Writes the table between markers in docs/BENCHMARKS.md and docs/bench-grpc.svg.
"""

import argparse
import asyncio
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import tritonclient.grpc.aio as grpc_aio
import tritonclient.http.aio as http_aio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import AIAAS, DOC, ROOT, log, machine, replace_section, svg_chart, write_svg  # noqa: E402


def start(repo, grpc_port):
    proc = subprocess.Popen([str(AIAAS), "--host", "127.0.0.1", "--port", "0", "--grpc-port",
                             str(grpc_port), "--models", str(repo), "--log-level", "warn,aiaas=info"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        m = re.search(r"listening on (\S+)", line)
        if m:
            http_addr = m.group(1)
            break
    else:
        raise RuntimeError("aiaas did not start")
    # keep reading its log: a full pipe would stop the server
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://{http_addr}/health/ready", timeout=2) as r:
                if r.status == 200:
                    return proc, http_addr
        except Exception:
            time.sleep(0.1)
    raise RuntimeError("aiaas not ready")


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def load(protocol, addr, batch, concurrency, duration):
    if protocol == "grpc":
        client = grpc_aio.InferenceServerClient(addr)
        inp = grpc_aio.InferInput("image", list(batch.shape), "FP32")
        inp.set_data_from_numpy(batch)
        outputs = [grpc_aio.InferRequestedOutput("scores")]
    else:
        client = http_aio.InferenceServerClient(addr, conn_limit=concurrency)
        inp = http_aio.InferInput("image", list(batch.shape), "FP32")
        inp.set_data_from_numpy(batch, binary_data=True)
        outputs = [http_aio.InferRequestedOutput("scores", binary_data=True)]
    latencies, errors = [], 0

    async def worker(until):
        nonlocal errors
        while time.perf_counter() < until:
            t = time.perf_counter()
            try:
                await client.infer("image-cnn", [inp], outputs=outputs)
                latencies.append(time.perf_counter() - t)
            except Exception:
                errors += 1

    try:
        await asyncio.gather(*(worker(time.perf_counter() + 1.0) for _ in range(concurrency)))  # warm
        latencies.clear()
        started = time.perf_counter()
        await asyncio.gather(*(worker(started + duration) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    finally:
        await client.close()
    lat = np.array(latencies) * 1e3
    return {"protocol": protocol, "concurrency": concurrency, "rps": len(latencies) / elapsed,
            "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)), "errors": errors}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=8)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--batch", type=int, default=1, help="images per request")
    ap.add_argument("--rounds", type=int, default=2, help="each level this many times, protocols alternating")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    rng = np.random.default_rng(0)
    batch = rng.random((args.batch, 3, 64, 64), dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix="aiaas-bench-grpc-") as tmp:
        repo = Path(tmp) / "repo"
        repo.mkdir()
        subprocess.run(["cp", "-r", str(ROOT / "models/image-cnn"), str(repo)], check=True)
        port = free_port()
        proc, http_addr = start(repo, port)
        rows = []
        try:
            for c in levels:
                for r in range(args.rounds):
                    order = ["grpc", "http"] if r % 2 == 0 else ["http", "grpc"]
                    for protocol in order:
                        addr = f"127.0.0.1:{port}" if protocol == "grpc" else http_addr
                        row = asyncio.run(load(protocol, addr, batch, c, args.duration))
                        row["round"] = r
                        log(f"  {protocol:<4} c={c:<3} round {r}: {row['rps']:8.1f} infer/s  "
                            f"p50 {row['p50']:7.2f} ms  p99 {row['p99']:7.2f} ms  errors {row['errors']}")
                        rows.append(row)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    best = {}
    for row in rows:
        key = (row["protocol"], row["concurrency"])
        if key not in best or row["rps"] > best[key]["rps"]:
            best[key] = row
    lines = [f"Measured by `make bench-grpc` (`bench/grpc_vs_http.py --duration {args.duration:g} --rounds {args.rounds}`) "
             f"on {machine()}: image-cnn (max_batch_size 32, 2 instances), a {args.batch}x3x64x64 FP32 tensor "
             "per request, Triton's asyncio clients (`tritonclient.grpc.aio`, `tritonclient.http.aio` with "
             "binary tensors) on the same machine, the best of the rounds per cell.", "",
             "| concurrency | gRPC infer/s | HTTP binary infer/s | gRPC / HTTP | gRPC p50 / p99 ms | HTTP p50 / p99 ms | errors |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for c in levels:
        g, h = best[("grpc", c)], best[("http", c)]
        lines.append(f"| {c} | {g['rps']:.0f} | {h['rps']:.0f} | {g['rps'] / h['rps']:.2f}x | "
                     f"{g['p50']:.2f} / {g['p99']:.2f} | {h['p50']:.2f} / {h['p99']:.2f} | "
                     f"{sum(r['errors'] for r in rows if r['concurrency'] == c)} |")
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        replace_section(DOC, "grpc", table + "\n\n![gRPC against HTTP binary](bench-grpc.svg)\n")
        chart = svg_chart([("gRPC", "#1f77b4", [(c, best[("grpc", c)]["rps"]) for c in levels]),
                           ("HTTP binary", "#d62728", [(c, best[("http", c)]["rps"]) for c in levels])],
                          "requests in flight", "infer/s", "image-cnn: KServe v2 over gRPC vs HTTP")
        p99 = svg_chart([("gRPC", "#1f77b4", [(c, best[("grpc", c)]["p99"]) for c in levels]),
                         ("HTTP binary", "#d62728", [(c, best[("http", c)]["p99"]) for c in levels])],
                        "requests in flight", "p99 ms", "p99 latency")
        write_svg(ROOT / "docs/bench-grpc.svg", [chart, p99])
        log("wrote docs/BENCHMARKS.md (grpc) and docs/bench-grpc.svg")


if __name__ == "__main__":
    main()
