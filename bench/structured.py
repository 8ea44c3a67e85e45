#!/usr/bin/env python3
"""Structured output's cost: decode tokens/s of SmolLM2-135M-Instruct through /v1/chat/completions
unconstrained and under a JSON schema (the grammar's token mask every step), at concurrency 1 and
16, plus the mask's time per token as the scheduler logs it (debug line "grammar masks").

    make bench-structured   (or: .venv/bin/python bench/structured.py [--binary ...] [--requests 32])

Greedy, max_tokens 64, the same prompts for both modes; unconstrained answers ignore the end of
sequence so that both generate about as many tokens. Each level runs none, schema, schema, none
and reports the mean of each mode. A run takes about three minutes on two cores.
Prints a markdown table.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("AIAAS_LLM_FIXTURES", ROOT / ".fixtures" / "llm"))
MODEL = "smollm2-135m-instruct"

SCHEMA = {
    "type": "object",
    "properties": {
        "people": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "age": {"type": "integer", "minimum": 0, "maximum": 120},
                    "city": {"type": "string"},
                    "role": {"enum": ["admin", "user", "guest"]},
                },
                "required": ["name", "age", "city", "role"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["people"],
    "additionalProperties": False,
}


def start(binary, repo):
    env = {**os.environ, "NO_COLOR": "1", "RUST_LOG": "info,aiaas::generate=debug"}
    proc = subprocess.Popen([binary, "--host", "127.0.0.1", "--port", "0", "--grpc-port", "0", "--models", str(repo)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    log = []
    addr = None
    for line in proc.stdout:
        log.append(line)
        m = re.search(r"listening on ([0-9.:]+)", line)
        if m:
            addr = m.group(1)
            break
    if addr is None:
        sys.exit("the server did not start:\n" + "".join(log))
    threading.Thread(target=lambda: [log.append(line) for line in proc.stdout], daemon=True).start()
    url = f"http://{addr}"
    for _ in range(600):
        try:
            with urllib.request.urlopen(url + "/health/ready", timeout=2) as r:
                if r.status == 200:
                    return proc, url, log
        except Exception:
            time.sleep(0.2)
    sys.exit("the server is not ready")


def ask(url, body):
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)


def level(url, constrained, clients, requests):
    bodies = []
    for i in range(requests):
        body = {"model": MODEL, "temperature": 0, "max_tokens": 64,
                "messages": [{"role": "user", "content": f"List {i % 5 + 2} people with their age, city and role."}]}
        if constrained:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "people", "schema": SCHEMA}}
        else:
            body["ignore_eos"] = True
        bodies.append(body)
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(lambda b: ask(url, b), bodies))
    wall = time.perf_counter() - started
    tokens = sum(a["usage"]["completion_tokens"] for a in answers)
    return tokens / wall, tokens


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--binary", default=str(ROOT / "target" / "release" / "aiaas"))
    p.add_argument("--requests", type=int, default=32)
    args = p.parse_args()
    repo = Path(tempfile.mkdtemp())
    (repo / MODEL).mkdir()
    (repo / MODEL / "model.toml").write_text(
        f'kind = "text-generation"\n[generation]\ncheckpoint = "{FIXTURES / MODEL}"\n')
    proc, url, log = start(args.binary, repo)
    try:
        # warm-up: the first structured request builds the vocabulary's token trie
        level(url, True, 1, 1)
        level(url, False, 1, 1)
        rows = []
        for clients in [1, 16]:
            n = 4 if clients == 1 else args.requests
            # alternated, twice each, so that a drift of the shared machine hits both modes
            runs = {False: [], True: []}
            masks = []
            for constrained in [False, True, True, False]:
                mark = len(log)
                runs[constrained].append(level(url, constrained, clients, n))
                masks += [int(m.group(1)) for line in log[mark:]
                          for m in [re.search(r"mask_us_per_token=(\d+)", line)] if m]
                print(clients, constrained, runs[constrained][-1], file=sys.stderr)
            for constrained in [False, True]:
                tps = sum(r[0] for r in runs[constrained]) / 2
                tokens = sum(r[1] for r in runs[constrained])
                mask = f"{sum(masks) / len(masks):.0f}" if constrained and masks else "-"
                rows.append((clients, "json_schema" if constrained else "none", 2 * n, tokens, tps, mask))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print("| concurrency | constraint | requests | tokens | decode tok/s | mask µs/token |")
    print("|---|---|---|---|---|---|")
    for clients, mode, n, tokens, tps, mask in rows:
        print(f"| {clients} | {mode} | {n} | {tokens} | {tps:.1f} | {mask} |")


if __name__ == "__main__":
    main()
