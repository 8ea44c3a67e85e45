#!/usr/bin/env python3
"""Several generative models and an embedding model under one memory budget, Zipf traffic.

Three ~135M-parameter decoders (the real SmolLM2-135M-Instruct of `make llm-fixtures`, and two
random-weight checkpoints of the same size built once into .bench/many-generative/ from
transformers configs: a Llama like SmolLM2 and a Qwen2 with biased projections, both with
SmolLM2's tokenizer) plus all-MiniLM-L6-v2 (`make hf-fixtures`) are served with
`--model-control lazy --model-memory-budget B`, B holding about two decoders with their KV caches.
Client threads pick a model per request from a Zipf distribution and send an OpenAI chat
completion (streamed or not, a few dozen tokens) or an embeddings request, for a bounded time.
A sampler reads the server's accounted footprint (`aiaas_model_memory_resident_bytes`) and the
process's VmRSS every 500 ms.

Reports: requests, failures (must be 0; each listed), hit rate (answers with
`x-model-loaded: warm`), cold-load latency p50/p99 (whole request, load included), loads and
evictions, resident memory against the budget. Writes docs/many-generative-bench.json,
docs/bench-many-generative.svg and the "many-generative" section of docs/BENCHMARKS.md.

    make bench-many-generative   (or: .venv/bin/python bench/many_generative.py [--seconds 120])

The random checkpoints need transformers (in .venv after `make llm-fixtures`); about 3 minutes
with the build, 2 for the traffic.
"""

import argparse
import http.client
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from many_models import link_or_copy, metrics, pct  # noqa: E402
import run  # noqa: E402
from run import ROOT, machine, replace_section, rss_mib, server, svg_chart, write_svg  # noqa: E402

# the binary `make build` made (cargo's CARGO_TARGET_DIR, when set, is where it went)
run.AIAAS = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release" / "aiaas"

FIXTURES = Path(os.environ.get("AIAAS_LLM_FIXTURES", ROOT / ".fixtures" / "llm"))
HF = ROOT / ".fixtures" / "hf"
SMOL = FIXTURES / "smollm2-135m-instruct"
CACHE = ROOT / ".bench" / "many-generative"
KV_TOKENS = 4096
QUESTIONS = ["What is the capital of France?", "Name three colours.", "Write a haiku about rain.",
             "How do plants grow?", "Explain a queue in one sentence.", "What is 12 times 7?"]
SENTENCES = ["a cat sat on the mat", "serving many models from one process", "the weather is fine",
             "memory budgets and least recently used eviction", "zipf traffic is skewed"]

BUILD = r'''
import json, os, shutil, sys, torch
os.environ["TQDM_DISABLE"] = "1"
from pathlib import Path
from transformers import AutoConfig, AutoModelForCausalLM
smol, out, family, seed = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
base = json.loads((smol / "config.json").read_text())
common = {k: base[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads", "num_key_value_heads", "bos_token_id",
                               "eos_token_id", "pad_token_id", "rms_norm_eps", "tie_word_embeddings")}
common["max_position_embeddings"] = 8192
cfg = AutoConfig.for_model(family, **common)
torch.manual_seed(seed)
model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
tmp = out.with_name(out.name + ".tmp")
shutil.rmtree(tmp, ignore_errors=True)
model.save_pretrained(str(tmp))
for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
    if (smol / f).exists():
        shutil.copy(smol / f, tmp / f)
tmp.rename(out)
'''


def random_checkpoints():
    """The two random-weight decoders, built once (about a minute, 1 GiB of disk)."""
    made = {}
    for name, family, seed in (("llama-random-135m", "llama", 1), ("qwen2-random-135m", "qwen2", 2)):
        d = CACHE / name
        if not (d / "config.json").exists():
            print(f"building {d} (random weights, {family})", file=sys.stderr)
            CACHE.mkdir(parents=True, exist_ok=True)
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
            subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-c", BUILD, str(SMOL), str(d),
                            family, str(seed)], check=True, env=env)
        made[name] = d
    return made


def build_repo(dest):
    """The four models: three decoders with a KV cache of KV_TOKENS, and MiniLM."""
    decoders = {"smollm2": SMOL, **random_checkpoints()}
    for name, ckpt in decoders.items():
        (dest / name).mkdir(parents=True)
        (dest / name / "model.toml").write_text(
            f'kind = "text-generation"\n[generation]\ncheckpoint = "{ckpt}"\n'
            f"kv_cache_tokens = {KV_TOKENS}\nmax_sequences = 16\n")
    (dest / "minilm").mkdir()
    for f in (HF / "minilm").iterdir():
        if f.name != "reference.json":
            (shutil.copy if f.name == "model.toml" else link_or_copy)(f, dest / "minilm" / f.name)
    return list(decoders) + ["minilm"]


def one_request(conn, model, rng):
    """One request for `model`; returns (status, x-model-loaded)."""
    if model == "minilm":
        body = {"model": model, "input": rng.sample(SENTENCES, rng.randint(1, 3))}
        conn.request("POST", "/v1/embeddings", json.dumps(body), {"content-type": "application/json"})
        r = conn.getresponse()
        data = r.read()
        ok = r.status == 200 and len(json.loads(data)["data"]) == len(body["input"])
        return (r.status if ok or r.status != 200 else "bad answer"), r.getheader("x-model-loaded", "")
    stream = rng.random() < 0.5
    body = {"model": model, "messages": [{"role": "user", "content": rng.choice(QUESTIONS)}],
            "max_tokens": rng.randint(16, 48), "temperature": 0.7, "seed": rng.randrange(1000),
            "stream": stream}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"content-type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    status = r.status
    if status == 200 and stream and not data.rstrip().endswith(b"data: [DONE]"):
        status = "stream cut short"
    if status == 200 and stream and b'"error"' in data:
        status = "error event in stream"
    return status, r.getheader("x-model-loaded", "")


def scenario(seconds=120, concurrency=8, budget_mib=1600, zipf_s=1.1, seed=5):
    tmp = Path(tempfile.mkdtemp(prefix="aiaas-many-gen-"))
    try:
        names = build_repo(tmp / "repo")
        order = list(names)
        random.Random(seed).shuffle(order)
        weights = [1 / (rank ** zipf_s) for rank in range(1, len(order) + 1)]
        args = ("--model-control", "lazy", "--model-memory-budget", f"{budget_mib}MiB",
                "--poll-interval", "60")
        with server(tmp / "repo", *args) as (base, proc):
            host = base.removeprefix("http://")
            results, samples, stop = [], [], threading.Event()
            started = time.time()

            def sample():
                conn = http.client.HTTPConnection(host, timeout=10)
                while not stop.is_set():
                    try:
                        m = metrics(conn)
                    except Exception:
                        conn = http.client.HTTPConnection(host, timeout=10)
                        continue
                    samples.append({"t": time.time() - started, "resident_mib": m["resident"] / 2**20,
                                    "rss_mib": rss_mib(proc.pid)})
                    stop.wait(0.5)

            def client(k):
                rng = random.Random(seed * 1000 + k)
                conn = http.client.HTTPConnection(host, timeout=300)
                out = []
                while time.time() - started < seconds:
                    model = rng.choices(order, weights)[0]
                    t0 = time.perf_counter()
                    try:
                        status, loaded = one_request(conn, model, rng)
                    except Exception as e:  # a failure to count, not to hide
                        status, loaded = f"error: {e}", ""
                        conn.close()
                        conn = http.client.HTTPConnection(host, timeout=300)
                    out.append((model, status, loaded, time.perf_counter() - t0, time.time() - started))
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
        return summarise(results, samples, final, seconds, concurrency, budget_mib, order, zipf_s)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def summarise(results, samples, final, seconds, concurrency, budget_mib, order, zipf_s):
    ok = [r for r in results if r[1] == 200]
    failed = [r for r in results if r[1] != 200]
    cold = [r[3] * 1e3 for r in ok if r[2] == "cold"]
    per_model = {}
    for m in order:
        mine = [r for r in ok if r[0] == m]
        per_model[m] = {"requests": sum(r[0] == m for r in results),
                        "hit_rate": sum(r[2] == "warm" for r in mine) / len(mine) if mine else 0.0,
                        "cold": sum(r[2] == "cold" for r in mine)}
    return {
        "popularity": order,
        "seconds": seconds,
        "concurrency": concurrency,
        "zipf_s": zipf_s,
        "budget_mib": budget_mib,
        "requests": len(results),
        "failed": len(failed),
        "failures": [f"{m} at {t:.0f}s: {s}" for m, s, _, _, t in failed[:20]],
        "hit_rate": sum(r[2] == "warm" for r in ok) / len(ok) if ok else 0.0,
        "per_model": per_model,
        "cold": len(cold),
        "cold_p50_ms": pct(cold, 0.5),
        "cold_p99_ms": pct(cold, 0.99),
        "warm_p50_ms": pct([r[3] * 1e3 for r in ok if r[2] == "warm"], 0.5),
        "loads": final["loads"],
        "evictions": final["evictions"],
        "max_resident_mib": max((s["resident_mib"] for s in samples), default=0.0),
        "max_rss_mib": max((s["rss_mib"] for s in samples), default=0.0),
        "samples": samples,
    }


def report(r):
    return (f"{r['requests']} requests in {r['seconds']} s, {r['failed']} failed; hit rate {r['hit_rate']:.1%}; "
            f"cold ({r['cold']}) p50 {r['cold_p50_ms']:.0f} ms p99 {r['cold_p99_ms']:.0f} ms; warm p50 "
            f"{r['warm_p50_ms']:.0f} ms; {r['loads']:.0f} loads, {r['evictions']:.0f} evictions; resident max "
            f"{r['max_resident_mib']:.0f} of {r['budget_mib']} MiB, RSS max {r['max_rss_mib']:.0f} MiB; "
            + ", ".join(f"{m} {v['requests']} req {v['hit_rate']:.0%} warm" for m, v in r["per_model"].items()))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--budget-mib", type=int, default=1600)
    a = ap.parse_args()
    for need in (SMOL / "config.json", HF / "minilm" / "model.pt"):
        if not need.exists():
            sys.exit(f"{need} missing: run `make llm-fixtures hf-fixtures`")
    r = scenario(a.seconds, a.concurrency, a.budget_mib)
    print(report(r))
    (ROOT / "docs/many-generative-bench.json").write_text(json.dumps(r, indent=1) + "\n")
    pts = r["samples"][::max(1, len(r["samples"]) // 160)]
    write_svg(ROOT / "docs/bench-many-generative.svg", [
        svg_chart([("accounted model footprint", "#1f77b4", [(s["t"], s["resident_mib"]) for s in pts]),
                   ("process RSS", "#ff7f0e", [(s["t"], s["rss_mib"]) for s in pts])],
                  "seconds", "MiB", "3 decoders + MiniLM, lazy, Zipf traffic",
                  width=640, log_x=False, x_ticks=[round(r["seconds"] * i / 6) for i in range(7)],
                  hlines=[("budget", "#d62728", r["budget_mib"])]),
    ], width=640)
    per_model = "; ".join(f"`{m}` {v['requests']} requests, {v['hit_rate']:.0%} warm"
                          for m, v in r["per_model"].items())
    rows = [
        f"Measured on {machine()} by `make bench-many-generative` (bench/many_generative.py): "
        "SmolLM2-135M-Instruct, two random-weight decoders of its size (Llama, Qwen2), each with a "
        f"{KV_TOKENS}-token KV cache, and all-MiniLM-L6-v2, served with `--model-control lazy "
        f"--model-memory-budget {r['budget_mib']}MiB` (about two decoders); {r['concurrency']} clients "
        f"choosing a model per request from a Zipf distribution (s = {r['zipf_s']}; popularity "
        f"{', '.join(r['popularity'])}) for {r['seconds']:.0f} s: chat completions (16-48 tokens, half "
        "streamed) and embeddings.",
        "",
        "| requests | failed | hit rate | cold answers | cold p50 / p99 (load included) | warm p50 | loads | evictions | max footprint / budget | max RSS |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {r['requests']} | {r['failed']} | {r['hit_rate']:.1%} | {r['cold']} | "
        f"{r['cold_p50_ms']:.0f} / {r['cold_p99_ms']:.0f} ms | {r['warm_p50_ms']:.0f} ms | {r['loads']:.0f} | "
        f"{r['evictions']:.0f} | {r['max_resident_mib']:.0f} / {r['budget_mib']} MiB | {r['max_rss_mib']:.0f} MiB |",
        "",
        f"Per model: {per_model}.",
    ]
    if r["failures"]:
        rows += ["", "Failures: " + "; ".join(r["failures"])]
    rows += ["", "![accounted model footprint and process RSS over time, with the budget](bench-many-generative.svg)"]
    replace_section(ROOT / "docs/BENCHMARKS.md", "many-generative", "\n".join(rows))
    print("wrote docs/many-generative-bench.json, docs/bench-many-generative.svg and docs/BENCHMARKS.md")


if __name__ == "__main__":
    main()
