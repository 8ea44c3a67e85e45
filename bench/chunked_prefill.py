#!/usr/bin/env python3
"""Chunked prefill: how much long prompts arriving slow down the streams already decoding.

SmolLM2-135M-Instruct (`make llm-fixtures`) served by target/release/aiaas. 16 clients each keep
one streamed completion decoding (greedy, `ignore_eos`, a short prompt, a long `max_tokens`;
when one ends the client starts another) while, once a second, a ~2,000-token prompt arrives
(`max_tokens` 1, random token ids so that no prefix is shared). The figure is the time between
tokens of the 16 running streams (the gap between consecutive SSE chunks, first chunk of each
stream excluded), p50 and p99, over a measured window after a warm-up:

  (a) no arrivals;
  (b) arrivals, chunked at the default step budget (`max_step_tokens` 512) and at 256, 64, 32;
  (c) arrivals, chunked at 512 with `max_decode_slowdown = 2` (beside decoding sequences a
      step carries only the prompt tokens that keep it within 2x a decode-only step);
  (d) arrivals, not chunked (`max_step_tokens` 4096: a whole prompt goes in one step).

Also the arriving prompts' time to answer (their prefill), p50/p99, and how many were answered
within the window. Target (issue 26): p99 with chunking at most 2x the p99 without arrivals.

    make bench-chunked   (or: .venv/bin/python bench/chunked_prefill.py [--window 30])

Writes docs/chunked-prefill-bench.json, docs/bench-chunked.svg and the "chunked-prefill"
section of docs/BENCHMARKS.md (`--plot-only` redraws both from the JSON). About 3 minutes on a quiet machine (six servers, each 5 s of warm-up and 20 s measured).
"""

import argparse
import http.client
import json
import os
import random
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402
from run import ROOT, machine, replace_section, server, svg_chart, write_svg  # noqa: E402

# the binary `make build` made (cargo's CARGO_TARGET_DIR, when set, is where it went)
run.AIAAS = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release" / "aiaas"

FIXTURES = Path(os.environ.get("AIAAS_LLM_FIXTURES", ROOT / ".fixtures" / "llm"))
MODEL = "smollm2-135m-instruct"
JSON = ROOT / "docs" / "chunked-prefill-bench.json"
SVG = ROOT / "docs" / "bench-chunked.svg"
STREAMS = 16
PROMPT_TOKENS = 2000
VOCAB = 49152


def pct(values, q):
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def repo_with(tmp, step_tokens, slowdown=0.0):
    d = tmp / f"step-{step_tokens}" / MODEL
    d.mkdir(parents=True)
    # 16 streams of up to ~1,000 tokens and a few 2,000-token prompts at once
    (d / "model.toml").write_text(
        f'kind = "text-generation"\n[generation]\ncheckpoint = "{FIXTURES / MODEL}"\n'
        f"context_length = 4096\nkv_cache_tokens = 32768\nmax_step_tokens = {step_tokens}\n"
        f"max_decode_slowdown = {slowdown}\n")
    return d.parent


def stream_client(host, k, stop, gaps, counted_from):
    """Keeps one streamed completion decoding until `stop`; records gaps between its chunks."""
    rng = random.Random(k)
    while not stop.is_set():
        body = json.dumps({"model": MODEL, "prompt": [rng.randrange(100, VOCAB) for _ in range(16)],
                           "max_tokens": 1000, "ignore_eos": True, "temperature": 0, "stream": True})
        conn = http.client.HTTPConnection(host, timeout=120)
        try:
            conn.request("POST", "/v1/completions", body, {"content-type": "application/json"})
            r = conn.getresponse()
            last = None
            while not stop.is_set():
                line = r.readline()
                if not line:
                    break
                if not line.startswith(b"data: "):
                    continue
                if line.strip() == b"data: [DONE]":
                    break
                now = time.perf_counter()
                if last is not None and now >= counted_from[0]:
                    gaps.append(now - last)
                last = now
        except Exception as e:  # reported, not hidden
            print(f"stream {k}: {e}", file=sys.stderr)
        finally:
            conn.close()


def arrivals(host, stop, every, done, counted_from, conns):
    """A 2,000-token prompt every `every` seconds, each on its own thread; their latencies.
    `conns` collects the connections, so that those still waiting are cut at the end."""
    rng = random.Random(99)
    threads = []

    def one(prompt):
        t0 = time.perf_counter()
        conn = http.client.HTTPConnection(host, timeout=600)
        conns.append(conn)
        try:
            conn.request("POST", "/v1/completions",
                         json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": 1, "temperature": 0}),
                         {"content-type": "application/json"})
            r = conn.getresponse()
            r.read()
            if t0 >= counted_from[0]:
                done.append((r.status, time.perf_counter() - t0, time.perf_counter() < stop_at[0]))
        except Exception as e:
            if not stop.is_set():  # else cut at the end of the window, on purpose
                done.append((f"error: {e}", time.perf_counter() - t0, False))
        finally:
            conn.close()

    stop_at = [float("inf")]
    next_at = time.perf_counter()
    while not stop.is_set():
        prompt = [rng.randrange(100, VOCAB) for _ in range(PROMPT_TOKENS)]
        t = threading.Thread(target=one, args=(prompt,), daemon=True)
        t.start()
        threads.append(t)
        next_at += every
        stop.wait(max(0.0, next_at - time.perf_counter()))
    stop_at[0] = time.perf_counter()
    return threads


def scenario(step_tokens, with_arrivals, window, warmup, every=1.0, slowdown=0.0):
    tmp = Path(tempfile.mkdtemp(prefix="aiaas-chunked-"))
    with server(repo_with(tmp, step_tokens, slowdown)) as (base, _proc):
        host = base.removeprefix("http://")
        stop, gaps, done, conns = threading.Event(), [], [], []
        counted_from = [time.perf_counter() + warmup]
        clients = [threading.Thread(target=stream_client, args=(host, k, stop, gaps, counted_from))
                   for k in range(STREAMS)]
        for c in clients:
            c.start()
        time.sleep(warmup)
        counted_from[0] = time.perf_counter()
        pending = []
        if with_arrivals:
            feeder = threading.Thread(
                target=lambda: pending.extend(arrivals(host, stop, every, done, counted_from, conns)))
            feeder.start()
        time.sleep(window)
        stop.set()
        if with_arrivals:
            feeder.join()
        for c in clients:
            c.join()
        # the prompts still waiting or being computed: their clients leave, so the server's
        # drain at shutdown does not compute them
        for conn in conns:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except Exception:
                pass
    answered = [d for d in done if d[0] == 200]
    row = {
        "max_step_tokens": step_tokens,
        "max_decode_slowdown": slowdown,
        "arrivals": with_arrivals,
        "window_s": window,
        "gaps": len(gaps),
        "tokens_per_s": len(gaps) / window,
        "gap_p50_ms": pct(gaps, 0.5) * 1e3,
        "gap_p99_ms": pct(gaps, 0.99) * 1e3,
        "gap_max_ms": max(gaps, default=0.0) * 1e3,
        "prompts_sent": round(window / every) if with_arrivals else 0,
        "prompts_answered": len(answered),
        "prompts_failed": [str(d[0]) for d in done if d[0] != 200],
        "prompt_p50_ms": pct([d[1] for d in answered], 0.5) * 1e3,
        "prompt_p99_ms": pct([d[1] for d in answered], 0.99) * 1e3,
        "load_average": os.getloadavg()[0],
    }
    label = (f"step {step_tokens}{f', slowdown {slowdown:g}' if slowdown else ''}, "
             f"{'arrivals' if with_arrivals else 'no arrivals'}")
    print(f"{label}: gap p50 {row['gap_p50_ms']:.0f} ms p99 {row['gap_p99_ms']:.0f} ms "
          f"({row['tokens_per_s']:.0f} stream tok/s); prompts {row['prompts_answered']}/"
          f"{row['prompts_sent']} answered, p50 {row['prompt_p50_ms']:.0f} ms", file=sys.stderr)
    return row


def label(r):
    if not r["arrivals"]:
        return "no arrivals"
    chunked = "not chunked" if r["max_step_tokens"] >= PROMPT_TOKENS else "chunked"
    slowdown = r.get("max_decode_slowdown") or 0
    return f"{chunked} ({r['max_step_tokens']}{f', slowdown {slowdown:g}' if slowdown else ''})"


def write(data):
    rows = data["rows"]
    base = next(r for r in rows if not r["arrivals"])
    bars = [(label(r), r["gap_p50_ms"], r["gap_p99_ms"]) for r in rows]
    colours = ["#2ca02c", "#1f77b4", "#17becf", "#9467bd", "#d62728"]
    series = [(name, colours[i % len(colours)], [(1, p50), (2, p99)])
              for i, (name, p50, p99) in enumerate(bars)]
    write_svg(SVG, [svg_chart(series, "1 = p50, 2 = p99", "time between tokens, ms",
                              "16 decoding streams, 2,000-token prompts arriving",
                              width=560, log_x=False, x_ticks=[1, 2],
                              hlines=[("2x p99 without arrivals", "#d62728", 2 * base["gap_p99_ms"])])],
              width=560)
    lines = [
        f"Measured on {data['machine']} by `make bench-chunked` (bench/chunked_prefill.py), "
        f"commit {data['commit']}: SmolLM2-135M-Instruct fp32, {STREAMS} clients each keeping a streamed "
        f"greedy completion decoding, and (with arrivals) a {PROMPT_TOKENS}-token prompt (random ids, "
        f"`max_tokens` 1) sent every {data['every_s']:g} s; each row its own server, "
        f"{data['warmup_s']:g} s warm-up then {data['window_s']:g} s measured. Time between tokens is "
        "the gap between consecutive SSE chunks of the running streams.",
        "",
        "| max_step_tokens (max_decode_slowdown) | arrivals | time between tokens p50 / p99 / max | stream tokens/s | "
        "prompts answered / sent in the window | prompt answer p50 / p99 | load average |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        prompts = (f"{r['prompts_answered']} / {r['prompts_sent']}" if r["arrivals"] else "-")
        lat = (f"{r['prompt_p50_ms']:.0f} / {r['prompt_p99_ms']:.0f} ms"
               if r["prompts_answered"] else "-")
        slow = f" ({r['max_decode_slowdown']:g})" if r.get("max_decode_slowdown") else ""
        lines.append(f"| {r['max_step_tokens']}{slow} | {'yes' if r['arrivals'] else 'no'} | "
                     f"{r['gap_p50_ms']:.0f} / {r['gap_p99_ms']:.0f} / {r['gap_max_ms']:.0f} ms | "
                     f"{r['tokens_per_s']:.0f} | {prompts} | {lat} | {r['load_average']:.1f} |")
    chunked = [r for r in rows if r["arrivals"] and r["max_step_tokens"] < PROMPT_TOKENS]
    best = min(chunked, key=lambda r: r["gap_p99_ms"]) if chunked else None
    if best:
        ratio = best["gap_p99_ms"] / base["gap_p99_ms"] if base["gap_p99_ms"] else float("inf")
        default = next((r for r in chunked if r["max_step_tokens"] == 512
                        and not r.get("max_decode_slowdown")), best)
        dratio = default["gap_p99_ms"] / base["gap_p99_ms"] if base["gap_p99_ms"] else float("inf")
        verdict = "met" if min(ratio, dratio) <= 2 else "missed"
        lines += ["", f"Target (p99 with chunking at most 2x the p99 without arrivals): **{verdict}** "
                  f"(default budget {dratio:.1f}x, best: {label(best)} {ratio:.1f}x)."]
    lines += ["", "![time between tokens p50 and p99 per configuration](bench-chunked.svg)"]
    replace_section(ROOT / "docs" / "BENCHMARKS.md", "chunked-prefill", "\n".join(lines))


def git_commit():
    import subprocess
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except Exception:
        return "unknown"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--window", type=float, default=20)
    ap.add_argument("--warmup", type=float, default=5)
    ap.add_argument("--every", type=float, default=1.0)
    ap.add_argument("--steps", default="512,256,64,32", help="chunked budgets to measure")
    ap.add_argument("--slowdown", default="2", help="max_decode_slowdown values to measure at step 512")
    ap.add_argument("--plot-only", action="store_true")
    a = ap.parse_args()
    if a.plot_only:
        write(json.loads(JSON.read_text()))
        return
    if not (FIXTURES / MODEL / "config.json").exists():
        sys.exit(f"no SmolLM2 checkpoint in {FIXTURES / MODEL}: run `make llm-fixtures`")
    rows = [scenario(512, False, a.window, a.warmup)]
    for step in [int(s) for s in a.steps.split(",") if s]:
        rows.append(scenario(step, True, a.window, a.warmup, a.every))
    for slowdown in [float(x) for x in a.slowdown.split(",") if x]:
        rows.append(scenario(512, True, a.window, a.warmup, a.every, slowdown))
    rows.append(scenario(4096, True, a.window, a.warmup, a.every))
    data = {"machine": machine(), "commit": git_commit(), "window_s": a.window,
            "warmup_s": a.warmup, "every_s": a.every, "rows": rows}
    JSON.write_text(json.dumps(data, indent=1) + "\n")
    write(data)
    print("wrote docs/chunked-prefill-bench.json, docs/bench-chunked.svg and docs/BENCHMARKS.md")


if __name__ == "__main__":
    main()
