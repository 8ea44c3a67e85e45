#!/usr/bin/env python3
"""Embedding throughput: the traced all-MiniLM-L6-v2 fixture served by aiaas (/v1 predict,
requests of 1, 8 and 32 texts) against its raw forward in the same libtorch (torch.jit.load in
this process, the same padded batches, the same threads), loopback only, bounded in time.

    .venv/bin/python bench/embeddings.py [--seconds 5]     (needs .fixtures/hf: make hf-fixtures)

Prints a table (texts/s, p50/p99 per request, served / raw), writes it to
docs/embeddings-bench.json and plots it to docs/bench-embeddings.svg (`--plot-only` redraws the
plot from the JSON).
"""

import argparse
import json
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from run import svg_chart, write_svg  # noqa: E402  (the benchmark's own SVG helpers)
FIXTURE = ROOT / ".fixtures" / "hf" / "minilm"


def corpus(long):
    """The reference texts of 5 to 25 tokens (sentences and queries, English and Chinese); with
    `long`, also the one of 256 tokens (after truncation), so that a batch pays for padding."""
    items = json.loads((FIXTURE / "reference.json").read_text())["items"]
    return [i["text"] for i in items if long or i["num_tokens"] <= 64]


def raw_forward(texts, batch, seconds, threads):
    import torch
    from tokenizers import Tokenizer

    torch.set_num_threads(threads)
    model = torch.jit.load(str(FIXTURE / "model.pt")).eval()
    tok = Tokenizer.from_file(str(FIXTURE / "tokenizer.json"))
    tok.enable_truncation(256)
    tok.no_padding()
    encs = [tok.encode(t) for t in texts]
    batches = []
    for start in range(0, len(encs), batch):
        chunk = [encs[(start + k) % len(encs)] for k in range(batch)]
        n = max(len(e.ids) for e in chunk)
        ids = torch.zeros(batch, n, dtype=torch.long)
        mask = torch.zeros(batch, n, dtype=torch.long)
        for r, e in enumerate(chunk):
            ids[r, : len(e.ids)] = torch.tensor(e.ids)
            mask[r, : len(e.ids)] = 1
        batches.append((ids, mask, torch.zeros_like(ids)))
    done, t0 = 0, time.perf_counter()
    with torch.no_grad():
        while time.perf_counter() - t0 < seconds:
            for b in batches:
                model(*b)
                done += batch
    return done / (time.perf_counter() - t0)


class Server:
    def __init__(self):
        self.proc = subprocess.Popen(
            [str(ROOT / "target/release/aiaas"), "--host", "127.0.0.1", "--port", "0", "--grpc-port", "0", "--models",
             str(FIXTURE.parent), "--load-model", "minilm", "--log-level", "warn,aiaas=info"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in self.proc.stdout:
            m = re.search(r"listening on ([0-9.:]+)", line)
            if m:
                self.url = f"http://{m.group(1)}"
                break
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except Exception:
                time.sleep(0.2)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


def served(url, texts, batch, seconds, clients):
    body_for = lambda k: json.dumps({"instances": [texts[(k + j) % len(texts)] for j in range(batch)]}).encode()
    latencies, forward_ms, lock, stop = [], [], threading.Lock(), time.perf_counter() + seconds

    def client(c):
        k = c
        while time.perf_counter() < stop:
            req = urllib.request.Request(url + "/v1/models/minilm/predict", data=body_for(k),
                                         headers={"content-type": "application/json"})
            t = time.perf_counter()
            with urllib.request.urlopen(req, timeout=60) as r:
                r.read()
                inference = float(r.headers.get("x-inference-time-ms", "nan"))
            with lock:
                latencies.append(time.perf_counter() - t)
                forward_ms.append(inference)
            k += batch

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    latencies.sort()
    return {
        "texts_per_s": len(latencies) * batch / elapsed,
        "p50_ms": statistics.median(latencies) * 1e3,
        "p99_ms": latencies[int(0.99 * (len(latencies) - 1))] * 1e3,
        "requests": len(latencies),
        "forward_p50_ms": statistics.median(forward_ms),
    }


def plot(rows, path):
    short = [r for r in rows if r["corpus"] == "short"]
    series = [("raw forward", "#7f7f7f", [(r["batch"], r["raw_texts_per_s"]) for r in short]),
              ("served, 1 client", "#1f77b4", [(r["batch"], r["served_c1"]["texts_per_s"]) for r in short]),
              ("served, 4 clients", "#2ca02c", [(r["batch"], r["served_c4"]["texts_per_s"]) for r in short])]
    latency = [("served, 1 client", "#1f77b4", [(r["batch"], r["served_c1"]["p50_ms"]) for r in short]),
               ("its forward pass", "#ff7f0e", [(r["batch"], r["served_c1"]["forward_p50_ms"]) for r in short])]
    write_svg(path, [
        svg_chart(series, "texts per request (= raw batch)", "texts/s",
                  "all-MiniLM-L6-v2 on 2 cores: throughput"),
        svg_chart(latency, "texts per request", "p50 ms", "request latency vs its forward"),
    ])


def write_table(rows, path):
    """Rewrites the table between the embeddings markers of docs/BENCHMARKS.md."""
    def line(r):
        s1, s4, raw = r["served_c1"], r["served_c4"], r["raw_texts_per_s"]
        return (f"| {r['corpus']} | {r['batch']} | {raw:.1f} | {s1['texts_per_s']:.1f} "
                f"({s1['texts_per_s'] / raw:.0%}) | {s1['p50_ms']:.1f} / {s1['p99_ms']:.1f} | "
                f"{s1['forward_p50_ms']:.1f} | {s4['texts_per_s']:.1f} ({s4['texts_per_s'] / raw:.0%}) | "
                f"{s4['p50_ms']:.0f} / {s4['p99_ms']:.0f} |")
    block = "\n".join([
        "<!-- BEGIN embeddings -->",
        "| corpus | texts / request | raw texts/s | served, 1 client: texts/s (of raw) | p50 / p99 ms "
        "| its forward p50 ms | served, 4 clients: texts/s (of raw) | p50 / p99 ms |",
        "|---|---|---|---|---|---|---|---|",
        *[line(r) for r in rows],
        "",
        "![throughput and latency of all-MiniLM-L6-v2, raw vs served](bench-embeddings.svg)",
        "<!-- END embeddings -->",
    ])
    text = path.read_text()
    start, end = text.index("<!-- BEGIN embeddings -->"), text.index("<!-- END embeddings -->")
    path.write_text(text[:start] + block + text[end + len("<!-- END embeddings -->"):])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--plot-only", action="store_true")
    args = ap.parse_args()
    out = ROOT / "docs" / "embeddings-bench.json"
    svg = ROOT / "docs" / "bench-embeddings.svg"
    if args.plot_only:
        rows = json.loads(out.read_text())["rows"]
        plot(rows, svg)
        write_table(rows, ROOT / "docs" / "BENCHMARKS.md")
        print(f"wrote {svg} and docs/BENCHMARKS.md")
        return
    rows = []
    server = Server()
    try:
        for corpus_name, texts, batches in [("short", corpus(False), [1, 8, 32]),
                                            ("with a 256-token text", corpus(True), [8, 32])]:
            for batch in batches:
                raw = raw_forward(texts, batch, args.seconds, threads=2)
                s1 = served(server.url, texts, batch, args.seconds, clients=1)
                s4 = served(server.url, texts, batch, args.seconds, clients=4)
                rows.append({"corpus": corpus_name, "batch": batch, "raw_texts_per_s": raw,
                             "served_c1": s1, "served_c4": s4})
                print(f"{corpus_name}, batch {batch:2d}: raw {raw:7.1f} texts/s | served c=1 "
                      f"{s1['texts_per_s']:7.1f} texts/s (p50 {s1['p50_ms']:.1f} ms, p99 {s1['p99_ms']:.1f}, "
                      f"forward p50 {s1['forward_p50_ms']:.1f}) {s1['texts_per_s'] / raw:.0%} | c=4 "
                      f"{s4['texts_per_s']:7.1f} texts/s (p50 {s4['p50_ms']:.1f} ms, p99 {s4['p99_ms']:.1f}) "
                      f"{s4['texts_per_s'] / raw:.0%}", flush=True)
    finally:
        server.stop()
    out.write_text(json.dumps({"corpus": "short: the 7 reference texts of .fixtures/hf/minilm of 5 to 25 "
                               "tokens (English and Chinese); with a 256-token text: those and one "
                               "truncated at 256 tokens; cycled", "rows": rows}, indent=1) + "\n")
    plot(rows, svg)
    write_table(rows, ROOT / "docs" / "BENCHMARKS.md")
    print(f"wrote {out}, {svg} and docs/BENCHMARKS.md")


if __name__ == "__main__":
    main()
