#!/usr/bin/env python3
"""Many more models than memory: lazy loading under a memory budget, with Zipf-distributed traffic.

A repository of 50 copies of the demo image CNN and 10 copies of the demo text classifier
(model files hard-linked, so the disk holds one of each) is served with
`--model-control lazy --model-memory-budget B`, B holding about 8 CNNs. Client threads pick a
model per request from a Zipf distribution (a few models hot, a long tail cold) for a bounded
time. A sampler reads the server's accounted footprint (`aiaas_model_memory_resident_bytes`)
and the process's resident memory every 200 ms.

Reports: requests, failures (must be 0), hit rate (answers with `x-model-loaded: warm`), latency
p50/p99 of warm and cold answers, loads and evictions, and the resident footprint's maximum
against the budget. `main` writes docs/many-models-bench.json, docs/bench-many-models.svg and
the "many-models" section of docs/BENCHMARKS.md; tests/python/test_many_models.py runs a
shorter `scenario` and asserts on it.

Usage: bench/many_models.py [--seconds 90] [--concurrency 4] [--budget-mib 160]
"""

import argparse
import http.client
import json
import os
import random
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import ROOT, machine, replace_section, rss_mib, server, svg_chart, write_svg  # noqa: E402

TEXTS = ["what a wonderful film", "this was a terrible waste of time", "the plot was fine",
         "great acting and a moving story", "boring and far too long", "i would watch it again"]


def link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy(src, dst)


def build_repo(dest, cnns=50, classifiers=10, models=ROOT / "models"):
    """`cnn-00`.. and `text-00`..: copies of the demo models, their files hard-linked."""
    names = []
    for prefix, source, count in (("cnn", "image-cnn", cnns), ("text", "text-classifier", classifiers)):
        for i in range(count):
            name = f"{prefix}-{i:02d}"
            d = dest / name
            d.mkdir(parents=True)
            for f in (models / source).iterdir():
                (shutil.copy if f.name == "model.toml" else link_or_copy)(f, d / f.name)
            names.append(name)
    return names


def zipf_order(names, seed):
    """The models in popularity order (rank 1 first): CNNs and classifiers shuffled together."""
    order = list(names)
    random.Random(seed).shuffle(order)
    return order


def metrics(conn):
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()

    def one(pattern):
        m = re.search(pattern + r" ([0-9.e+]+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    def total(name):
        return sum(float(v) for v in re.findall(rf"^{name}{{[^}}]*}} ([0-9.e+]+)$", text, re.M))

    return {
        "resident": one(r'aiaas_model_memory_resident_bytes\{device="cpu"\}'),
        "budget": one(r'aiaas_model_memory_budget_bytes\{device="cpu"\}'),
        "loads": total("aiaas_model_loads_total"),
        "evictions": total("aiaas_model_evictions_total"),
    }


def scenario(seconds=90, concurrency=4, budget_mib=160, zipf_s=1.1, seed=11, cnns=50, classifiers=10):
    """Runs the load for `seconds`; returns the summary and the memory samples."""
    png = (ROOT / "docs/examples/circle.png").read_bytes()
    tmp = Path(tempfile.mkdtemp(prefix="aiaas-many-"))
    try:
        names = build_repo(tmp / "repo", cnns, classifiers)
        order = zipf_order(names, seed)
        weights = [1 / (rank ** zipf_s) for rank in range(1, len(order) + 1)]
        args = ("--model-control", "lazy", "--model-memory-budget", f"{budget_mib}MiB",
                "--poll-interval", "60", "--max-connections", "256")
        with server(tmp / "repo", *args) as (base, proc):
            host = base.removeprefix("http://")
            results, samples, stop = [], [], threading.Event()
            started = time.time()

            def sample():
                conn = http.client.HTTPConnection(host, timeout=10)
                while not stop.is_set():
                    m = metrics(conn)
                    samples.append({"t": time.time() - started, "resident_mib": m["resident"] / 2**20,
                                    "rss_mib": rss_mib(proc.pid)})
                    stop.wait(0.2)

            def client(k):
                rng = random.Random(seed * 1000 + k)
                conn = http.client.HTTPConnection(host, timeout=60)
                out = []
                while time.time() - started < seconds:
                    model = rng.choices(order, weights)[0]
                    if model.startswith("cnn"):
                        body, ctype = png, "image/png"
                    else:
                        body, ctype = json.dumps({"instances": [rng.choice(TEXTS)]}), "application/json"
                    t0 = time.perf_counter()
                    try:
                        conn.request("POST", f"/v1/models/{model}/predict", body, {"content-type": ctype})
                        r = conn.getresponse()
                        r.read()
                        status, loaded = r.status, r.getheader("x-model-loaded", "")
                    except Exception as e:  # a failure to count, not to hide
                        status, loaded = f"error: {e}", ""
                        conn.close()
                        conn = http.client.HTTPConnection(host, timeout=60)
                    out.append((model, status, loaded, time.perf_counter() - t0))
                results.extend(out)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            stop.set()
            sampler.join()
            final = metrics(http.client.HTTPConnection(host, timeout=10))
        return summarise(results, samples, final, seconds, concurrency, budget_mib, len(names), zipf_s, order[0])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def pct(values, q):
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def summarise(results, samples, final, seconds, concurrency, budget_mib, models, zipf_s, top):
    ok = [r for r in results if r[1] == 200]
    top_ok = [r for r in ok if r[0] == top]
    failed = [r for r in results if r[1] != 200]
    warm = [r[3] * 1e3 for r in ok if r[2] == "warm"]
    cold = [r[3] * 1e3 for r in ok if r[2] == "cold"]
    return {
        "models": models,
        "seconds": seconds,
        "concurrency": concurrency,
        "zipf_s": zipf_s,
        "budget_mib": budget_mib,
        "requests": len(results),
        "failed": len(failed),
        "failures": [f"{m}: {s}" for m, s, _, _ in failed[:10]],
        "distinct_models": len({r[0] for r in results}),
        "hit_rate": len(warm) / len(ok) if ok else 0.0,
        "top_model": top,
        "top_model_requests": len(top_ok),
        "top_model_hit_rate": sum(r[2] == "warm" for r in top_ok) / len(top_ok) if top_ok else 0.0,
        "warm_p50_ms": pct(warm, 0.5),
        "warm_p99_ms": pct(warm, 0.99),
        "cold": len(cold),
        "cold_p50_ms": pct(cold, 0.5),
        "cold_p99_ms": pct(cold, 0.99),
        "loads": final["loads"],
        "evictions": final["evictions"],
        "max_resident_mib": max((s["resident_mib"] for s in samples), default=0.0),
        "max_rss_mib": max((s["rss_mib"] for s in samples), default=0.0),
        "samples": samples,
    }


def report(r):
    return (f"{r['requests']} requests in {r['seconds']} s over {r['distinct_models']} of {r['models']} models, "
            f"{r['failed']} failed; hit rate {r['hit_rate']:.1%} (most popular model {r['top_model_hit_rate']:.1%} "
            f"of {r['top_model_requests']}); warm p50 {r['warm_p50_ms']:.1f} ms "
            f"p99 {r['warm_p99_ms']:.1f} ms; cold ({r['cold']}) p50 {r['cold_p50_ms']:.0f} ms "
            f"p99 {r['cold_p99_ms']:.0f} ms; {r['loads']:.0f} loads, {r['evictions']:.0f} evictions; "
            f"resident max {r['max_resident_mib']:.0f} of {r['budget_mib']} MiB budget, "
            f"process RSS max {r['max_rss_mib']:.0f} MiB")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=90)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--budget-mib", type=int, default=160)
    a = ap.parse_args()
    r = scenario(a.seconds, a.concurrency, a.budget_mib)
    print(report(r))
    (ROOT / "docs/many-models-bench.json").write_text(json.dumps(r, indent=1) + "\n")
    pts = r["samples"][::max(1, len(r["samples"]) // 120)]
    write_svg(ROOT / "docs/bench-many-models.svg", [
        svg_chart([("accounted model footprint", "#1f77b4", [(s["t"], s["resident_mib"]) for s in pts]),
                   ("process RSS", "#ff7f0e", [(s["t"], s["rss_mib"]) for s in pts])],
                  "seconds", "MiB", f"{r['models']} models, lazy, Zipf traffic",
                  width=640, log_x=False, x_ticks=[round(r["seconds"] * i / 6) for i in range(7)],
                  hlines=[("budget", "#d62728", r["budget_mib"])]),
    ], width=640)
    rows = [
        f"Measured on {machine()} by `make bench-many-models` (bench/many_models.py): "
        f"{r['models']} models (50 copies of the demo image CNN, 10 of the text classifier) served with "
        f"`--model-control lazy --model-memory-budget {r['budget_mib']}MiB`, {r['concurrency']} clients "
        f"choosing a model per request from a Zipf distribution (s = {r['zipf_s']}) for {r['seconds']:.0f} s.",
        "",
        "| requests | failed | models hit | hit rate (top model) | warm p50 / p99 | cold answers | cold p50 / p99 | loads | evictions | max footprint / budget | max RSS |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {r['requests']} | {r['failed']} | {r['distinct_models']} | {r['hit_rate']:.1%} ({r['top_model_hit_rate']:.1%}) | "
        f"{r['warm_p50_ms']:.1f} / {r['warm_p99_ms']:.1f} ms | {r['cold']} | "
        f"{r['cold_p50_ms']:.0f} / {r['cold_p99_ms']:.0f} ms | {r['loads']:.0f} | {r['evictions']:.0f} | "
        f"{r['max_resident_mib']:.0f} / {r['budget_mib']} MiB | {r['max_rss_mib']:.0f} MiB |",
        "",
        "![accounted model footprint and process RSS over time, with the budget](bench-many-models.svg)",
    ]
    replace_section(ROOT / "docs/BENCHMARKS.md", "many-models", "\n".join(rows))
    print("wrote docs/many-models-bench.json, docs/bench-many-models.svg and docs/BENCHMARKS.md")


if __name__ == "__main__":
    main()
