#!/usr/bin/env python3
"""Prefix caching's effect on time to first token: SmolLM2-135M-Instruct (fp32) through the
streamed OpenAI chat API, every request beginning with the same ~1,000-token system prompt and
asking its own short question, served twice from one server: as `smol` (prefix caching on, the
default) and `smol-nocache` (`prefix_caching = false`).

    make bench-prefix   (or: .venv/bin/python bench/prefix_cache.py [--requests 10])

One client sends the requests one after another (max_tokens 8, greedy), then 4 clients send
16 more; time to first token is measured to the first content chunk. The first request of a
model computes the system prompt either way; the figure is the median over the others. Both
models answer the same questions, and the answers are compared. Prints a table, draws
docs/bench-prefix.svg and rewrites the "prefix" section of docs/BENCHMARKS.md. About two
minutes on two cores.
"""

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import replace_section, svg_chart, write_svg  # noqa: E402
from structured import FIXTURES, MODEL, ROOT, start  # noqa: E402

PARAGRAPH = (
    "You are the assistant of a harbour office. Ships arrive and leave at all hours, and their "
    "captains ask about berths, tides, pilots, fuel, customs forms and the weather. Answer in "
    "one short sentence, name the office that handles the matter, and never invent a schedule. "
)


def system_prompt(words=750):
    text = []
    while sum(len(t.split()) for t in text) < words:
        text.append(PARAGRAPH)
    return "".join(text)


def ttft(url, model, system, question):
    """Seconds to the first content chunk, the answer's text and its prompt tokens."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    body = {"model": model, "stream": True, "max_tokens": 8, "temperature": 0,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]}
    started = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"content-type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200, r.read()
    first, text, prompt = None, [], 0
    for line in r:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            prompt = chunk["usage"]["prompt_tokens"]
        for c in chunk.get("choices", []):
            if c["delta"].get("content"):
                first = first or time.perf_counter() - started
                text.append(c["delta"]["content"])
    conn.close()
    return first, "".join(text), prompt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default=str(ROOT / "target/release/aiaas"))
    ap.add_argument("--requests", type=int, default=10)
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args()
    system = system_prompt()
    questions = [f"Ship number {i} asks: where do I get {w}?" for i, w in
                 enumerate(["fuel", "a pilot", "customs forms", "water", "a berth", "charts"] * 8)]
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        for name, extra in [("smol", ""), ("smol-nocache", "prefix_caching = false\n")]:
            (repo / name).mkdir()
            (repo / name / "model.toml").write_text(
                f'kind = "text-generation"\n[generation]\ncheckpoint = "{FIXTURES / MODEL}"\n{extra}')
        proc, url, _ = start(args.binary, repo)
        try:
            results = {}
            for model in ["smol-nocache", "smol"]:
                seq = [ttft(url, model, system, q) for q in questions[:args.requests]]
                with ThreadPoolExecutor(4) as pool:
                    par = list(pool.map(lambda q: ttft(url, model, system, q),
                                        questions[args.requests:args.requests + 16]))
                results[model] = (seq, par)
                print(f"{model}: sequential {[round(t * 1000) for t, _, _ in seq]} ms", flush=True)
        finally:
            proc.terminate()
            proc.wait()
    prompt_tokens = results["smol"][0][0][2]
    same = all(a[1] == b[1] for a, b in zip(results["smol"][0] + results["smol"][1],
                                              results["smol-nocache"][0] + results["smol-nocache"][1]))
    rows = []
    for label, k in [("1 client, one after another", 0), ("4 clients, 16 requests", 1)]:
        off = [t for t, _, _ in results["smol-nocache"][k][(1 - k):]]
        on = [t for t, _, _ in results["smol"][k][(1 - k):]]
        rows.append((label, statistics.median(off), statistics.median(on),
                     statistics.quantiles(off, n=100)[98] if len(off) > 2 else max(off),
                     statistics.quantiles(on, n=100)[98] if len(on) > 2 else max(on)))
    table = ["| clients | TTFT p50 cache off | TTFT p50 cache on | speed-up | TTFT p99 off / on |",
             "|---|---:|---:|---:|---:|"]
    for label, off, on, off99, on99 in rows:
        table.append(f"| {label} | {off * 1000:,.0f} ms | {on * 1000:,.0f} ms | **{off / on:.1f}x** | "
                     f"{off99 * 1000:,.0f} / {on99 * 1000:,.0f} ms |")
    first_off = results["smol-nocache"][0][0][0]
    first_on = results["smol"][0][0][0]
    print("\n".join(table))
    print(f"prompt tokens {prompt_tokens}; first request {first_off * 1000:.0f} / {first_on * 1000:.0f} ms; "
          f"answers identical: {same}")
    if args.no_doc:
        return
    series = [(name, colour, [(i + 1, t * 1000) for i, (t, _, _) in enumerate(results[model][0])])
              for name, colour, model in [("cache off", "#d62728", "smol-nocache"), ("cache on", "#1f77b4", "smol")]]
    write_svg(ROOT / "docs/bench-prefix.svg",
              [svg_chart(series, "request (one client, one after another)", "time to first token (ms)",
                         f"{prompt_tokens}-token shared system prompt", width=520, log_x=False)], width=520)
    body = f"""`make bench-prefix` (`bench/prefix_cache.py`): SmolLM2-135M-Instruct, fp32, streamed chat; every
request carries the same {prompt_tokens}-token system prompt (chat template included) and its own
question (max_tokens 8, greedy). The same server serves the checkpoint with prefix caching on
(`smol`) and off (`smol-nocache`). The first request computes the system prompt either way
({first_off * 1000:,.0f} ms off, {first_on * 1000:,.0f} ms on); the table is over the others.
Answers with the cache on and off identical: **{same}**.

{chr(10).join(table)}

![time to first token per request](bench-prefix.svg)

With the cache on, a request computes only what follows the cached blocks (its question, the
chat template's tail, and the rest of the last partial block): prompt processing is compute-bound
on a CPU, so time to first token falls with the tokens not computed.
"""
    replace_section(ROOT / "docs/BENCHMARKS.md", "prefix", body)


if __name__ == "__main__":
    main()
