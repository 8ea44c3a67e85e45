#!/usr/bin/env python3
"""Memory soak for text models: all-MiniLM-L6-v2 (.fixtures/hf/minilm) served with its default
token batching (padding buckets), under texts of random lengths (1 to 300 words, English and
Chinese, a new mix each request) from wrk at 16 connections for a bounded time (default 10
minutes), sampling the server's RSS every second. Pass: RSS flat after the first minute (the
largest sample after minute 1 within --margin MiB of the sample at minute 1) and no failed
request.

With `--compare-minutes N`, a second run of N minutes with `sequence_buckets = []` (every batch
padded to its own longest text, so the engine sees every length) shows what the buckets prevent.

    make soak-embeddings        (or: .venv/bin/python bench/embeddings_soak.py [--minutes 10])

Writes docs/embeddings-soak.json, a plot (docs/soak-embeddings-rss.svg) and the
"embeddings-soak" section of docs/BENCHMARKS.md.
"""

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT / "bench"))
from corpus import EN, ZH  # noqa: E402
from embeddings_api import minilm_repo  # noqa: E402
from run import ensure_wrk, machine, replace_section, rss_mib, server, svg_chart, wrk, write_svg  # noqa: E402

DOC = ROOT / "docs" / "BENCHMARKS.md"
OUT = ROOT / "docs" / "embeddings-soak.json"
SVG = ROOT / "docs" / "soak-embeddings-rss.svg"


def bodies(path, n=20000, seed=7):
    """`n` request bodies of one text each, 1 to 300 words: every length the model can see."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            zh = rng.random() < 0.3
            words = [rng.choice(ZH if zh else EN) for _ in range(rng.randint(1, 300 if rng.random() < 0.3 else 40))]
            text = ("" if zh else " ").join(words)
            f.write(json.dumps({"model": "minilm", "input": text}, ensure_ascii=False) + "\n")


def soak(minutes, batching, body_file, label):
    with tempfile.TemporaryDirectory() as tmp:
        with server(minilm_repo(tmp, batching)) as (base, proc):
            samples, stop = [], threading.Event()
            t0 = time.time()

            def sample():
                while not stop.is_set():
                    samples.append((time.time() - t0, rss_mib(proc.pid)))
                    stop.wait(1.0)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            w = wrk(base + "/v1/embeddings", None, None, 16, minutes * 60, bodies_file=body_file,
                    timeout=30)
            stop.set()
            sampler.join()
            with __import__("urllib.request").request.urlopen(base + "/v1/models/minilm", timeout=10) as r:
                stats = json.load(r)["versions"][0]["stats"]
    errors = w["errors"]
    at1 = next((r for t, r in samples if t >= 60), samples[-1][1])
    after = max(r for t, r in samples if t >= 60) if any(t >= 60 for t, _ in samples) else at1
    result = {"label": label, "minutes": minutes, "requests": w["requests"], "errors": errors,
              "texts_per_s": w["rps"], "rss_at_1min": at1,
              "rss_max_after_1min": after, "rss_end": samples[-1][1],
              "padding_waste": stats.get("padding_waste"), "samples": samples}
    print(f"{label}: {w['requests']} requests ({result['texts_per_s']:.1f}/s), {errors} errors; RSS at 1 min "
          f"{at1:.0f} MiB, max after {after:.0f} MiB, end {samples[-1][1]:.0f} MiB; padding "
          f"{stats.get('padding_waste') or 0:.2f}x", flush=True)
    return result


def report(data, margin):
    runs = data["runs"]
    # a point every 5 s
    series = [(r["label"], c, [(t / 60, v) for t, v in r["samples"][::5]])
              for r, c in zip(runs, ["#1f77b4", "#d62728"])]
    ticks = list(range(0, int(max(r["minutes"] for r in runs)) + 1))
    write_svg(SVG, [svg_chart(series, "minutes", "RSS MiB", "minilm RSS under random text lengths",
                              log_x=False, width=640, x_ticks=ticks)], width=640)
    lines = [f"Machine: {data['machine']}. all-MiniLM-L6-v2 (the test fixture), /v1/embeddings, one "
             "text of 1 to 300 words per request (English and Chinese, 20,000 bodies cycled), wrk at "
             "16 connections, RSS sampled every second.", "",
             "| run | minutes | requests | texts/s | errors | RSS at 1 min | max RSS after 1 min | RSS at end | padding waste | flat (within "
             f"{margin} MiB) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        flat = r["rss_max_after_1min"] - r["rss_at_1min"] <= margin
        lines.append(f"| {r['label']} | {r['minutes']:g} | {r['requests']} | {r['texts_per_s']:.1f} | {r['errors']} | "
                     f"{r['rss_at_1min']:.0f} MiB | {r['rss_max_after_1min']:.0f} MiB | {r['rss_end']:.0f} MiB | "
                     f"{(r['padding_waste'] or 0):.2f}x | {'yes' if flat else 'no'} |")
    lines += ["", "![RSS over time](soak-embeddings-rss.svg)"]
    replace_section(DOC, "embeddings-soak", "\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--compare-minutes", type=float, default=0)
    ap.add_argument("--margin", type=float, default=64, help="MiB of growth still called flat")
    ap.add_argument("--plot-only", action="store_true")
    args = ap.parse_args()
    if args.plot_only:
        data = json.loads(OUT.read_text())
    else:
        ensure_wrk()
        with tempfile.NamedTemporaryFile(suffix=".jsonl") as f:
            bodies(f.name)
            runs = [soak(args.minutes, "", f.name, "padding buckets (default)")]
            if args.compare_minutes:
                runs.append(soak(args.compare_minutes, "[batching]\nsequence_buckets = []\n", f.name,
                                 "no buckets (padded to the longest)"))
        data = {"machine": machine(), "runs": runs}
        OUT.write_text(json.dumps(data) + "\n")
    report(data, args.margin)
    first = data["runs"][0]
    ok = first["errors"] == 0 and first["rss_max_after_1min"] - first["rss_at_1min"] <= args.margin
    print(f"wrote {OUT}, {SVG} and the embeddings-soak section of {DOC}: {'PASS' if ok else 'FAIL'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
