#!/usr/bin/env python3
"""Text generation through OpenAI's chat API, against what a user would run instead, loopback
only, bounded in time (`make bench-generate`):

  - llama-server-f32:  llama.cpp's llama-server (built by bench/peers/setup-llama-server.sh from
                       the llama-cpp-python 0.3.36 sdist) serving SmolLM2-135M-Instruct's Q4_1
                       GGUF requantised to F32: the very weights of the dequantised checkpoint
                       aiaas serves; `-t 2 --parallel <clients>`;
  - llama-server-q4_1: the same server on the original Q4_1 file, for reference (with
                       --no-repack: see LLAMA_EXTRA);
  - transformers:      `AutoModelForCausalLM.generate(do_sample=False)` on the checkpoint, fp32,
                       one request at a time in its own process (the raw baseline, no server);
  - aiaas-fp32, aiaas-bf16: target/release/aiaas over a repository holding the checkpoint as
                       kind "text-generation" (precision fp32 / bf16, max_sequences 64);
  - aiaas-int8, aiaas-int4: the same with `quantization = "int8"` / `"int4"` (groups of 32;
                       precision fp32 for the embeddings, output head and KV cache);
  - llama-server-q8_0, llama-server-q4_0: llama-server on the F32 GGUF quantised by
                       llama-quantize to Q8_0 / Q4_0 (the matching bit widths; with repacking,
                       as llama-server runs them by default, unless it crashes: see LLAMA_EXTRA).
Every server is started afresh for every level (no level sees another's caches) on 127.0.0.1 and
an ephemeral port. A target that does not start or answers errors is reported as failed and the
run goes on.

The same seeded chat prompts for every target (a system line and a user message built from a
fixed text: about 24 to 400 prompt tokens through the chat template, log-uniform), greedy
(`temperature: 0`), `max_tokens` fixed, streamed (SSE, `stream_options.include_usage`) by an
asyncio client of its own (raw HTTP/1.1, no third-party package), at concurrency 1, 4, 16, 64.
A level sends max(2 x clients, 8) requests (the i-th always prompt i), stops sending after
--level-seconds and cuts what is left at 1.5x that. Per level: output tokens/s (completion tokens
of the finished requests over the level's wall time), time to first token p50/p99 (to the first
chunk with content), time between tokens p50/p99 (gaps between content chunks), requests done /
failed, the server's peak RSS (VmRSS sampled every 50 ms), how many answers are the text
transformers generates for the same prompt, and the CPU that other processes took meanwhile (the
machine is shared: before each level the script waits, at most --max-wait s, until fewer than
--max-busy cores are busy, and runs a level again when others took more than --max-disturbed
cores during it, keeping the less disturbed run). Also the machine's memory read bandwidth (torch sums
of a 1 GiB array on 2 threads), and from it the decode limit of one sequence: weight bytes read
per step over that bandwidth.

    make bench-generate            (or: .venv/bin/python bench/generate.py [--targets a,b] ...)

Prints a markdown table, writes docs/generate-bench.json (targets and levels not run this time
keep their previous rows), plots docs/bench-generate.svg and rewrites the "generate" section of
docs/BENCHMARKS.md (`--plot-only` redraws both from the JSON).
"""

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bench/ goes last on the path, not first (where Python puts a script's folder): bench/profile.py
# must not shadow the standard library's profile module, which torch imports
sys.path = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"] + [str(ROOT / "bench")]
from run import machine, replace_section, svg_chart, write_svg  # noqa: E402

CHECKPOINT = ROOT / ".fixtures" / "llm" / "smollm2-135m-instruct"
MODEL = "smollm2-135m-instruct"
BENCH = ROOT / ".bench"
LLAMA_SERVER = BENCH / "bin" / "llama-server"
GGUF = {"f32": BENCH / "models" / "SmolLM2-135M-Instruct.F32.gguf",
        "q4_1": BENCH / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf",
        "q8_0": BENCH / "models" / "SmolLM2-135M-Instruct.Q8_0.gguf",
        "q4_0": BENCH / "models" / "SmolLM2-135M-Instruct.Q4_0.gguf"}
# Q4_1 with weight repacking (the default) goes to ggml's AMX kernels on a CPU that has AMX, and
# this build (GGML_NATIVE) then segfaults in ggml_backend_amx_mul_mat at the first forward pass
# on this machine kind (Xeon with AMX, under KVM): --no-repack keeps it on the AVX-512 kernels.
LLAMA_EXTRA = {"f32": [], "q4_1": ["--no-repack"], "q8_0": [], "q4_0": []}
# the binary `make build` made (cargo's CARGO_TARGET_DIR, when set, is where it went)
AIAAS = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release" / "aiaas"
PYTHON = ROOT / ".venv" / "bin" / "python"
DOC = ROOT / "docs" / "BENCHMARKS.md"
OUT = ROOT / "docs" / "generate-bench.json"
SVG = ROOT / "docs" / "bench-generate.svg"
TARGETS = ["transformers", "llama-server-f32", "llama-server-q4_1", "aiaas-fp32", "aiaas-bf16",
           "aiaas-int8", "aiaas-int4", "llama-server-q8_0", "llama-server-q4_0"]
SEED = 20261206
CONCURRENCY = [1, 4, 16, 64]

# The prompts' material: plain notes on everyday subjects, cut into windows of whole sentences.
NOTES = """\
The town council met on Tuesday to discuss the new bus routes that will connect the northern \
suburbs with the central station. Residents asked for more frequent buses in the early morning, \
when most people travel to work. The council agreed to run a six-month trial before making any \
permanent change. A bakery on the main square has started selling bread made from flour milled \
in the valley. Its owner says the bread keeps longer because the dough rests for a whole night. \
The local school plans to plant a garden where pupils will grow beans, carrots and sunflowers. \
Teachers hope the garden will help children understand where food comes from and how long it \
takes to grow. A storm last week brought down several old trees along the river path, and \
volunteers spent the weekend clearing branches so that walkers and cyclists could use it again. \
The library will extend its opening hours in winter and offer free courses on using computers, \
writing letters and managing household budgets. Many older residents have already signed up. \
A small company near the harbour repairs fishing boats and has recently begun building electric \
ferries for short trips across the bay. The first ferry carries forty passengers and charges its \
batteries at the pier while people get on and off. Engineers measured the water quality of the \
lake in spring and found that it had improved after farms reduced the fertiliser they spread \
near the shore. Birds that had not been seen for years have returned to the reeds. The museum \
opened an exhibition about the railway that was built through the mountains a century ago. It \
shows tools, photographs and letters written by the workers who dug the tunnels by hand. A \
cycling club organises rides every Sunday, with a slow group for beginners and a faster one for \
those training for races. Riders are asked to bring water, a spare tube and a working light. \
The hospital has opened a new wing for children, with brighter rooms and a play area where \
families can wait together. Nurses say the quieter corridors help patients sleep. Farmers in the \
hills report a good harvest of apples this year, although a late frost damaged some of the \
cherry trees. Cider makers expect prices to stay stable. A group of students built a weather \
station on the roof of their school and publish its readings every hour on a public website. \
They compare the readings with forecasts to learn how accurate the forecasts are. The market \
hall will close for two months while its roof is repaired, and traders will move to tents in \
the car park until the work is done. The fire brigade reminds everyone to test smoke alarms once \
a month and to keep a clear path to the door. A new footbridge over the canal will let people \
walk from the station to the park without crossing the busy road. Builders expect to finish it \
before the summer festival, which last year drew visitors from all over the region.\
"""
TASKS = [
    "Summarise the following notes in a few sentences, then explain each point in detail.",
    "Read the notes below and write a long newspaper article based on them.",
    "Turn these notes into a detailed letter to a friend who has moved away.",
    "List the main facts in these notes and say why each one matters to the town.",
]
QUESTIONS = [
    "Explain how a bicycle gear system works.",
    "Write a short story about a lighthouse keeper.",
    "Describe how bread is made, step by step.",
    "What should I pack for a week of hiking?",
    "Explain why the sky is blue.",
    "Give me ten ideas for a rainy afternoon.",
    "How do trains stay on their tracks?",
    "Write a poem about the sea in winter.",
]
SYSTEM = "You are a helpful assistant."
PROMPT_TOKENS = (24, 400)
WARMUP = [{"role": "user", "content": "Hello!"}]


def log(*a):
    print(*a, flush=True)


# ----------------------------------------------------------------------------------------------
# Prompts


def build_prompts(n, tokenizer):
    """`n` chat prompts whose lengths through the chat template are log-uniform in
    PROMPT_TOKENS; the same list for every target and every run (seeded)."""
    rng = random.Random(SEED)
    sentences = [s.strip() + "." for s in NOTES.split(". ") if s.strip()]
    sentences[-1] = sentences[-1].rstrip(".") + "."

    def count(messages):
        return len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"])

    def chat(user):
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]

    out = []
    for _ in range(n):
        lo, hi = PROMPT_TOKENS
        target = round(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        question = rng.choice(QUESTIONS)
        messages = chat(question)
        task = rng.choice(TASKS)
        start = rng.randrange(len(sentences))
        notes = []
        # a question alone is about 24-30 tokens; longer prompts get notes until they reach target
        while count(messages) < target and len(notes) < len(sentences):
            notes.append(sentences[(start + len(notes)) % len(sentences)])
            messages = chat(task + "\n\n" + " ".join(notes))
        out.append({"messages": messages, "tokens": count(messages)})
    return out


# ----------------------------------------------------------------------------------------------
# The streaming client: HTTP/1.1 over asyncio streams, one connection per request


class HttpError(Exception):
    pass


async def _body_pieces(reader, headers):
    """The response body as it arrives: chunked transfer decoded, else up to EOF or
    Content-Length."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
                return
            piece = await reader.readexactly(size)
            await reader.readexactly(2)
            yield piece
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        while piece := await reader.read(65536):
            yield piece


async def chat_stream(host, port, body):
    """POSTs one streamed chat completion; returns what it measured: send time, the arrival
    time of every chunk that carried content, usage, finish reason, text. Raises HttpError on a
    non-200 answer (with the server's message) and OSError when the connection fails."""
    payload = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        sent = time.perf_counter()
        writer.write(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
                     f"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
                     f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload)
        await writer.drain()
        status_line = await reader.readline()
        if not status_line:
            raise HttpError("connection closed before a status line")
        status = int(status_line.split()[1])
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            k, _, v = line.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        if status != 200:
            text = b"".join([p async for p in _body_pieces(reader, headers)]).decode("utf-8", "replace")
            with contextlib.suppress(Exception):
                err = json.loads(text).get("error", text)
                text = err.get("message", json.dumps(err)) if isinstance(err, dict) else str(err)
            raise HttpError(f"HTTP {status}: {text.strip()[:300]}")
        r = {"sent": sent, "chunks": [], "text": [], "usage": None, "finish_reason": None, "done": False}
        buf = b""
        async for piece in _body_pieces(reader, headers):
            now = time.perf_counter()
            buf += piece.replace(b"\r\n", b"\n")
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                for line in event.split(b"\n"):
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        r["done"] = True
                        continue
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise HttpError(f"error in stream: {json.dumps(chunk['error'])[:300]}")
                    if chunk.get("usage"):
                        r["usage"] = chunk["usage"]
                    for choice in chunk.get("choices") or []:
                        content = (choice.get("delta") or {}).get("content")
                        if content:
                            r["chunks"].append(now)
                            r["text"].append(content)
                        if choice.get("finish_reason"):
                            r["finish_reason"] = choice["finish_reason"]
        if not r["done"]:
            raise HttpError("stream ended without data: [DONE]")
        r["text"] = "".join(r["text"])
        return r
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def chat_body(model, messages, max_tokens):
    return {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}


# ----------------------------------------------------------------------------------------------
# Measuring


def pct(values, q):
    """The q-th percentile (nearest rank) of `values`, or None."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def proc_status_mib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


class CpuWatch:
    """CPU time the machine spent outside the measured server and this script between start and
    stop, in cores: how much the figures were disturbed by other work on a shared machine."""

    TICK = os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _busy():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v) - v[3] - v[4]  # all but idle and iowait

    @staticmethod
    def _proc(pid, reaped_children=False):
        """utime + stime of `pid` (0 once it is gone), plus its reaped children's if asked."""
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/stat") as f:
                fields = [int(x) for x in f.read().rsplit(")", 1)[1].split()[11:15]]
            return sum(fields if reaped_children else fields[:2])
        return 0

    def __init__(self, pid):
        """`pid`: the server, a child of this process or not (a child's time still counts once
        it has exited and been waited for)."""
        self.pid = pid
        self.t, self.busy, self.own = time.monotonic(), self._busy(), self._own()

    def _own(self):
        return self._proc(self.pid) + self._proc(os.getpid(), reaped_children=True)

    def other_cores(self):
        own = self._own() - self.own
        other = max(0, self._busy() - self.busy - own)
        return other / self.TICK / max(1e-9, time.monotonic() - self.t)


async def sample_rss(pid, peak, stop):
    """Keeps peak[0] at the largest VmRSS of `pid` seen, every 50 ms, until `stop` is set."""
    while not stop.is_set():
        with contextlib.suppress(OSError):
            peak[0] = max(peak[0], proc_status_mib(pid, "VmRSS"))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.05)


async def run_level(host, port, model, pid, prompts, clients, n_requests, args):
    """`n_requests` streamed chats from `clients` concurrent clients; the level's summary."""
    todo = list(range(n_requests))
    done, failed = [], []
    start = time.perf_counter()
    stop_sending = start + args.level_seconds

    async def client():
        while todo and time.perf_counter() < stop_sending:
            i = todo.pop(0)
            try:
                r = await chat_stream(host, port, chat_body(model, prompts[i]["messages"], args.max_tokens))
                r["index"] = i
                done.append(r)
            except (HttpError, OSError, ValueError, asyncio.IncompleteReadError) as e:
                failed.append({"index": i, "error": str(e) or type(e).__name__})

    cpu = CpuWatch(pid)
    peak, stop = [0.0], asyncio.Event()
    sampler = asyncio.create_task(sample_rss(pid, peak, stop))
    tasks = [asyncio.create_task(client()) for _ in range(clients)]
    _, pending = await asyncio.wait(tasks, timeout=args.level_seconds * 1.5)
    for t in pending:
        t.cancel()
    cut = len(pending)
    await asyncio.gather(*pending, return_exceptions=True)
    stop.set()
    await sampler
    with contextlib.suppress(OSError):
        peak[0] = max(peak[0], proc_status_mib(pid, "VmRSS"))
    end = max([r["chunks"][-1] if r["chunks"] else r["sent"] for r in done], default=time.perf_counter())
    return {**summarise(done, failed, cut, n_requests, clients, end - start, peak[0]),
            "other_cpu_cores": cpu.other_cores()}


def summarise(done, failed, cut, n_requests, clients, wall, rss_mib):
    ttft = [r["chunks"][0] - r["sent"] for r in done if r["chunks"]]
    tbt = [b - a for r in done for a, b in zip(r["chunks"], r["chunks"][1:])]
    tokens = [(r["usage"] or {}).get("completion_tokens", len(r["chunks"])) for r in done]
    ms = lambda v: None if v is None else v * 1e3  # noqa: E731
    return {
        "clients": clients, "requests": n_requests, "done": len(done),
        "failed": len(failed) + cut, "cut": cut, "not_sent": n_requests - len(done) - len(failed) - cut,
        "errors": sorted({f["error"] for f in failed})[:3],
        "wall_s": wall, "output_tokens": sum(tokens),
        "output_tokens_per_s": sum(tokens) / wall if wall > 0 and done else 0.0,
        "mean_output_tokens": statistics.mean(tokens) if tokens else None,
        "prompt_tokens": [(r["usage"] or {}).get("prompt_tokens") for r in sorted(done, key=lambda r: r["index"])],
        "finish_length": sum(r["finish_reason"] == "length" for r in done),
        "ttft_p50_ms": ms(pct(ttft, 50)), "ttft_p99_ms": ms(pct(ttft, 99)),
        "tbt_p50_ms": ms(pct(tbt, 50)), "tbt_p99_ms": ms(pct(tbt, 99)),
        "peak_rss_mib": rss_mib,
        "texts": {str(r["index"]): text_digest(r["text"]) for r in done},
    }


def text_digest(text):
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Servers


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TargetFailed(Exception):
    pass


@contextlib.contextmanager
def server_process(cmd, ready_url, name, timeout=180):
    """Starts `cmd` (its log in a temporary file) and waits until `ready_url` answers 200;
    yields the process. TargetFailed, with the log's tail, when it exits or is not ready in time."""
    logf = tempfile.NamedTemporaryFile("w+", prefix=f"bench-{name}-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env={**os.environ, "NO_COLOR": "1"})

    def tail():
        logf.flush()
        return " | ".join(Path(logf.name).read_text(errors="replace").strip().splitlines()[-6:])

    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise TargetFailed(f"{name} exited ({proc.returncode}) before it was ready: {tail()}")
            with contextlib.suppress(Exception):
                with urllib.request.urlopen(ready_url, timeout=2) as r:
                    if r.status == 200:
                        break
            if time.time() > deadline:
                raise TargetFailed(f"{name} not ready after {timeout} s: {tail()}")
            time.sleep(0.2)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        logf.close()
        Path(logf.name).unlink()


def llama_server(quant, clients, ctx_per_slot, threads):
    port = free_port()
    cmd = [str(LLAMA_SERVER), "-m", str(GGUF[quant]), "--host", "127.0.0.1", "--port", str(port),
           "-t", str(threads), "--parallel", str(clients), "-c", str(clients * ctx_per_slot),
           *LLAMA_EXTRA[quant]]
    return port, server_process(cmd, f"http://127.0.0.1:{port}/health", "llama-server")


def aiaas_repo(tmp, variant, max_sequences):
    """`variant`: a precision (fp32, bf16) or a quantization (int8, int4: fp32 otherwise)."""
    quantized = variant in ("int8", "int4")
    precision = "fp32" if quantized else variant
    folder = Path(tmp) / "repo" / MODEL
    folder.mkdir(parents=True)
    (folder / "model.toml").write_text(
        f'kind = "text-generation"\nprecision = "{precision}"\n\n[generation]\n'
        f'checkpoint = "{CHECKPOINT.resolve()}"\nmax_sequences = {max_sequences}\n'
        + (f'quantization = "{variant}"\n' if quantized else ""))
    return folder.parent


def aiaas_server(repo):
    if not AIAAS.exists():
        shown = AIAAS.relative_to(ROOT) if AIAAS.is_relative_to(ROOT) else AIAAS
        raise TargetFailed(f"no {shown}: run `make build`")
    port = free_port()
    cmd = [str(AIAAS), "--host", "127.0.0.1", "--port", str(port), "--grpc-port", "0", "--models", str(repo),
           "--log-level", "warn,aiaas=info"]
    return port, server_process(cmd, f"http://127.0.0.1:{port}/health/ready", "aiaas")


def busy_cores(seconds=3.0):
    """How many cores the whole machine kept busy over the next `seconds`."""
    t, busy = time.monotonic(), CpuWatch._busy()
    time.sleep(seconds)
    return (CpuWatch._busy() - busy) / CpuWatch.TICK / (time.monotonic() - t)


def wait_for_quiet(max_busy, max_wait):
    """Waits (at most max_wait s) until the machine is quiet: less than `max_busy` cores busy
    over 3 s (this script's servers idle between levels). Returns the 1-minute load average."""
    t = time.monotonic()
    while (busy := busy_cores()) > max_busy and time.monotonic() - t < max_wait:
        log(f"   {busy:.2f} cores busy elsewhere (> {max_busy}): waiting, at most {max_wait:.0f} s")
        time.sleep(7)
    return os.getloadavg()[0]


def level_requests(clients, args):
    return max(args.requests_per_client * clients, args.min_requests)


def serve_levels(name, start, prompts, args):
    """Every level against one server kind, each on a fresh server (`start(clients)` gives the
    port and a context manager of the process), so that no level sees another's caches. A level
    that other processes disturbed (more than --max-disturbed cores of theirs) is run once more
    and the less disturbed run kept. A level whose requests all fail, or a server that does not
    start or answer, ends the target."""
    levels = []
    try:
        for clients in args.concurrency:
            runs = []
            while not runs or (runs[-1]["other_cpu_cores"] > args.max_disturbed and len(runs) <= args.retries):
                if runs:
                    log(f"   disturbed ({runs[-1]['other_cpu_cores']:.2f} cores elsewhere): once more")
                wait_for_quiet(args.max_busy, args.max_wait)
                port, server = start(clients)
                with server as proc:
                    asyncio.run(chat_stream("127.0.0.1", port, chat_body(MODEL, WARMUP, 8)))
                    load = os.getloadavg()[0]
                    row = asyncio.run(run_level("127.0.0.1", port, MODEL, proc.pid, prompts, clients,
                                                level_requests(clients, args), args))
                row["load_before"], row["load_after"] = load, os.getloadavg()[0]
                print_row(name, row)
                if row["done"] == 0:
                    levels.append(row)
                    raise TargetFailed(f"every request failed at {clients} clients: " + "; ".join(row["errors"]))
                runs.append(row)
            levels.append(min(runs, key=lambda r: r["other_cpu_cores"]))
    except (TargetFailed, HttpError, OSError, ValueError, asyncio.IncompleteReadError) as e:
        return {"status": "failed", "error": str(e)[:600], "levels": levels}
    return {"status": "ok", "levels": levels}


def print_row(name, r):
    f = lambda v, d=0: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    log(f"{name:>18} c={r['clients']:<3} {r['output_tokens_per_s']:7.1f} tok/s  TTFT p50/p99 "
        f"{f(r['ttft_p50_ms'])}/{f(r['ttft_p99_ms'])} ms  TBT p50/p99 {f(r['tbt_p50_ms'], 1)}/"
        f"{f(r['tbt_p99_ms'], 1)} ms  done {r['done']}/{r['requests']} failed {r['failed']}  "
        f"RSS {r['peak_rss_mib']:.0f} MiB  load {r['load_before']:.1f}->{r['load_after']:.1f}, "
        f"others' CPU {r['other_cpu_cores']:.2f} cores")


# ----------------------------------------------------------------------------------------------
# transformers, in a process of its own (so that its memory and threads are its own)


def hf_worker(args):
    """--hf-worker: reads the prompts (JSON) on stdin, generates greedily one at a time, writes
    one JSON line per request and a last line with the process's VmHWM."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(args.threads)
    prompts = json.load(sys.stdin)
    tok = AutoTokenizer.from_pretrained(str(CHECKPOINT))
    model = AutoModelForCausalLM.from_pretrained(str(CHECKPOINT), dtype=torch.float32).eval()

    class Times(BaseStreamer):
        """The time of every put(): the first is the prompt, each later one a new token."""

        def __init__(self):
            self.t = []

        def put(self, value):
            self.t.append(time.perf_counter())

        def end(self):
            pass

    def generate(messages, max_new_tokens, streamer=None):
        enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)
        with torch.inference_mode():
            out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, streamer=streamer,
                                 pad_token_id=tok.eos_token_id)
        return enc["input_ids"].shape[1], out[0, enc["input_ids"].shape[1]:]

    generate(WARMUP, 8)
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        if time.perf_counter() - start > args.level_seconds:
            break
        times = Times()
        sent = time.perf_counter()
        n_prompt, new = generate(p["messages"], args.max_tokens, times)
        eos = new.tolist()[-1] == tok.eos_token_id
        print(json.dumps({"index": i, "sent": sent, "chunks": times.t[1:], "usage": {
            "prompt_tokens": n_prompt, "completion_tokens": len(new)},
            "finish_reason": "stop" if eos else "length",
            "text": tok.decode(new, skip_special_tokens=True)}), flush=True)
    print(json.dumps({"vmhwm_mib": proc_status_mib(os.getpid(), "VmHWM")}), flush=True)


def run_transformers(prompts, args):
    n = level_requests(1, args)
    load = wait_for_quiet(args.max_busy, args.max_wait)
    proc = subprocess.Popen([str(PYTHON), __file__, "--hf-worker", "--threads", str(args.threads),
                             "--max-tokens", str(args.max_tokens), "--level-seconds", str(args.level_seconds)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/tmp",
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    cpu = CpuWatch(proc.pid)
    proc.stdin.write(json.dumps(prompts[:n]))
    proc.stdin.close()
    done, hwm = [], 0.0
    first = None
    for line in proc.stdout:
        if not line.startswith("{"):
            continue
        r = json.loads(line)
        if "vmhwm_mib" in r:
            hwm = r["vmhwm_mib"]
            continue
        first = r["sent"] if first is None else first
        done.append(r)
    if proc.wait() != 0 or not done:
        return {"status": "failed", "error": f"transformers worker exited {proc.returncode}", "levels": []}
    wall = done[-1]["chunks"][-1] - first if done[-1]["chunks"] else 0
    row = {**summarise(done, [], 0, n, 1, wall, hwm), "other_cpu_cores": cpu.other_cores()}
    row["load_before"], row["load_after"] = load, os.getloadavg()[0]
    print_row("transformers", row)
    return {"status": "ok", "levels": [row], "texts": {r["index"]: r["text"] for r in done}}


# ----------------------------------------------------------------------------------------------
# Memory bandwidth


def bandwidth(threads):
    """Memory read bandwidth in GB/s: torch summing a 1 GiB float32 array on `threads` threads
    (best and median of 7), in a process of its own."""
    code = f"""
import json, time, torch
torch.set_num_threads({threads})
a = torch.ones(1 << 28)
a.sum()
t = []
for _ in range(7):
    s = time.perf_counter(); a.sum(); t.append(time.perf_counter() - s)
t.sort()
print(json.dumps({{"best_gbps": (1 << 30) / t[0] / 1e9, "median_gbps": (1 << 30) / t[3] / 1e9}}))
"""
    out = subprocess.run([str(PYTHON), "-c", code], check=True, capture_output=True, text=True, cwd="/tmp")
    return {**json.loads(out.stdout), "threads": threads, "method": "torch.sum over a 1 GiB float32 array"}


def weight_bytes():
    """Bytes of weights read per decode step (every weight once; the tied embedding matrix is
    read whole as the output projection) per precision."""
    fp32 = (CHECKPOINT / "model.safetensors").stat().st_size
    out = {"fp32": fp32, "bf16": fp32 // 2}
    # int8 / int4 (groups of 32): the blocks' linear layers at 1 and 0.5 + 4/32 bytes a
    # weight, the rest fp32 (as the server's memory budget counts them)
    c = json.loads((CHECKPOINT / "config.json").read_text())
    h, i, d = c["hidden_size"], c["intermediate_size"], c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    linear = c["num_hidden_layers"] * ((q + 2 * kv) * h + h * q + 2 * i * h + h * i)
    rest = fp32 - 4 * linear
    out["int8"] = rest + linear
    out["int4"] = rest + int(linear * (0.5 + 4 / 32))
    for k, p in GGUF.items():
        if p.exists():
            out["gguf_" + k] = p.stat().st_size
    return out


TARGET_BYTES = {"transformers": "fp32", "llama-server-f32": "gguf_f32", "llama-server-q4_1": "gguf_q4_1",
                "aiaas-fp32": "fp32", "aiaas-bf16": "bf16", "aiaas-int8": "int8", "aiaas-int4": "int4",
                "llama-server-q8_0": "gguf_q8_0", "llama-server-q4_0": "gguf_q4_0"}


# ----------------------------------------------------------------------------------------------
# Report


COLOURS = {"aiaas-fp32": "#1f77b4", "aiaas-bf16": "#17becf", "llama-server-f32": "#d62728",
           "llama-server-q4_1": "#ff9896", "transformers": "#7f7f7f",
           "aiaas-int8": "#2ca02c", "aiaas-int4": "#98df8a",
           "llama-server-q8_0": "#9467bd", "llama-server-q4_0": "#c5b0d5"}


def git_commit():
    """HEAD's short id, with "+changes" when bench/ differs from it (the code measured is not
    HEAD's)."""
    git = ["git", "-C", str(ROOT)]
    with contextlib.suppress(Exception):
        head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], check=True, capture_output=True,
                              text=True).stdout.strip()
        changed = subprocess.run(git + ["status", "--porcelain", "--", "bench"], check=True,
                                 capture_output=True, text=True).stdout.strip()
        return head + ("+changes" if changed else "")
    return None


def plot(data):
    ok = {n: t for n, t in data["targets"].items() if t["status"] == "ok" and t["levels"]}
    if not set(ok) - {"transformers"}:
        return
    series = lambda key: [(n, COLOURS[n], [(r["clients"], r[key] or 0) for r in t["levels"]])  # noqa: E731
                          for n, t in ok.items() if n != "transformers"]
    hlines = []
    if "transformers" in ok:
        hlines.append(("transformers generate, sequential", COLOURS["transformers"],
                       ok["transformers"]["levels"][0]["output_tokens_per_s"]))
    limit = data["decode_limit_tok_s"].get("fp32")
    if limit:
        hlines.append(("fp32 bandwidth limit, 1 sequence", "#2ca02c", limit))
    write_svg(SVG, [
        svg_chart(series("output_tokens_per_s"), "concurrent clients", "output tokens/s",
                  "SmolLM2-135M, 2 cores: throughput", hlines=hlines, width=460),
        svg_chart(series("ttft_p99_ms"), "concurrent clients", "TTFT p99, ms", "time to first token, p99",
                  width=460),
    ], width=460)


def table(data):
    f = lambda v, d=0: "–" if v is None else f"{v:,.{d}f}"  # noqa: E731
    unsent = lambda r: f" ({r['not_sent']} not sent)" if r["not_sent"] else ""  # noqa: E731
    bw = data["bandwidth"]
    limits = ", ".join(f"{k}: {v:.0f} tok/s ({data['weight_bytes'][k] / 1e6:.0f} MB)"
                       for k, v in data["decode_limit_tok_s"].items())
    lines = [
        f"Machine: {data['machine']}; memory read bandwidth {bw['best_gbps']:.1f} GB/s (best of 7; median "
        f"{bw['median_gbps']:.1f}; {bw['method']}, {bw['threads']} threads). Decode limit of one "
        f"sequence (weight bytes read per step / bandwidth): {limits}.",
        "",
        f"Prompts: {data['prompts']['description']}. `max_tokens` {data['max_tokens']}, greedy, streamed; "
        "requests per level (clients: requests): "
        + ", ".join(f"{c}: {n}" for c, n in data["requests_per_level"].items()) + "; a level stops sending after "
        f"{data['level_seconds']:.0f} s. Whole run: {data['wall_s'] / 60:.1f} min.",
        "",
        "| target | clients | output tok/s | TTFT p50 / p99 ms | TBT p50 / p99 ms | done / failed | "
        "mean out tokens | peak RSS MiB | same text as transformers | others' CPU, cores |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in TARGETS:
        t = data["targets"].get(name)
        if t is None:
            continue
        for r in t["levels"]:
            same = r.get("same_as_transformers")
            lines.append(
                f"| {name} | {r['clients']} | **{f(r['output_tokens_per_s'], 1)}** | "
                f"{f(r['ttft_p50_ms'])} / {f(r['ttft_p99_ms'])} | {f(r['tbt_p50_ms'], 1)} / "
                f"{f(r['tbt_p99_ms'], 1)} | {r['done']} / {r['failed']}{unsent(r)} | {f(r['mean_output_tokens'])} | "
                f"{f(r['peak_rss_mib'])} | {same or '–'} | {f(r.get('other_cpu_cores'), 2)} |")
        if t["status"] != "ok":
            lines.append(f"| {name} | – | failed | {t['error'][:200].replace('|', '/')} | | | | | | |")
    runs = sorted({(r.get("measured", t["measured"]), r.get("commit", t["commit"]) or "?")
                   for t in data["targets"].values() for r in t["levels"] or [t]})
    lines += ["", "Measured " + "; ".join(f"{m} at {c}" for m, c in runs) + ".", "",
              "![output tokens/s and p99 time to first token against concurrency](bench-generate.svg)"]
    replace_section(DOC, "generate", "\n".join(lines))


def mark_same_text(data, hf_texts):
    """Each level's count of answers identical to transformers' for the same prompt."""
    ref = data.setdefault("transformers_texts", {})
    if hf_texts:
        ref.clear()
        ref.update({str(i): text_digest(t) for i, t in hf_texts.items()})
    for name, t in data["targets"].items():
        for r in t["levels"] if name != "transformers" else []:
            common = [i for i in r.get("texts", {}) if i in ref]
            if common:
                r["same_as_transformers"] = f"{sum(r['texts'][i] == ref[i] for i in common)}/{len(common)}"


# ----------------------------------------------------------------------------------------------


def measure(args):
    from transformers import AutoTokenizer

    t0 = time.time()
    wanted = [t for t in args.targets if t in TARGETS]
    log(f">> prompts, load {os.getloadavg()[0]:.2f}")
    # the whole default set even when fewer levels run, so that every run describes the same prompts
    n = max(level_requests(c, args) for c in set(args.concurrency) | set(CONCURRENCY))
    prompts = build_prompts(n, AutoTokenizer.from_pretrained(str(CHECKPOINT)))
    lengths = [p["tokens"] for p in prompts]
    max_prompt = max(lengths)
    ctx_per_slot = math.ceil((max_prompt + args.max_tokens + 64) / 256) * 256
    log(f"   {n} prompts, {min(lengths)} to {max_prompt} tokens (median {statistics.median(lengths):.0f}); "
        f"llama-server context per slot {ctx_per_slot}")
    log(">> memory bandwidth")
    wait_for_quiet(args.max_busy, args.max_wait)
    bw = bandwidth(args.threads)
    wb = weight_bytes()
    limit = {k: bw["best_gbps"] * 1e9 / v for k, v in wb.items()}
    log(f"   {bw['best_gbps']:.1f} GB/s (median {bw['median_gbps']:.1f}); one sequence at most "
        + ", ".join(f"{k} {v:.0f} tok/s" for k, v in limit.items()))

    previous = json.loads(OUT.read_text()) if OUT.exists() else {}
    data = {
        "machine": machine(), "bandwidth": bw, "weight_bytes": wb, "decode_limit_tok_s": limit,
        "max_tokens": args.max_tokens, "concurrency": args.concurrency, "level_seconds": args.level_seconds,
        "requests_per_level": {str(c): level_requests(c, args) for c in args.concurrency},
        "prompts": {"seed": SEED, "tokens": lengths, "description": (
            f"{n} chat prompts (bench/generate.py, seed {SEED}): a system line and a question, or a task "
            f"over a window of fixed notes; {min(lengths)} to {max_prompt} tokens through the chat template, "
            f"median {statistics.median(lengths):.0f}, log-uniform; request i of every level is prompt i")},
        "targets": {k: v for k, v in previous.get("targets", {}).items() if k not in wanted},
        "transformers_texts": previous.get("transformers_texts", {}),
    }
    stamp = {"measured": time.strftime("%Y-%m-%d %H:%M"), "commit": git_commit()}
    hf_texts = None
    for name in wanted:
        log(f">> {name}")
        if name == "transformers":
            result = run_transformers(prompts, args)
            hf_texts = result.pop("texts", None)
        elif name.startswith("llama-server-"):
            quant = name.removeprefix("llama-server-")
            if not (LLAMA_SERVER.exists() and GGUF[quant].exists()):
                result = {"status": "failed", "levels": [],
                          "error": "no llama-server or GGUF in .bench: run bench/peers/setup-llama-server.sh"}
            else:
                result = serve_levels(name, lambda c, q=quant: llama_server(q, c, ctx_per_slot, args.threads),
                                      prompts, args)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                repo = aiaas_repo(tmp, name.removeprefix("aiaas-"), max(args.concurrency))
                result = serve_levels(name, lambda c, r=repo: aiaas_server(r), prompts, args)
        if result["status"] != "ok":
            log(f"   {name} failed: {result['error']}")
        for r in result["levels"]:
            r.update(stamp)
        old = previous.get("targets", {}).get(name)
        if old and result["status"] == "ok":  # levels not run this time keep their previous rows
            kept = [r for r in old["levels"] if r["clients"] not in args.concurrency]
            result["levels"] = sorted(kept + result["levels"], key=lambda r: r["clients"])
        data["targets"][name] = {**result, **stamp}
    mark_same_text(data, hf_texts)
    data["wall_s"] = time.time() - t0
    log(f">> whole run {data['wall_s']:.0f} s")
    return data


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", type=lambda s: s.split(","), default=TARGETS,
                    help=f"comma-separated, of {','.join(TARGETS)} (default: all)")
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=CONCURRENCY)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--min-requests", type=int, default=8)
    ap.add_argument("--level-seconds", type=float, default=120.0,
                    help="a level stops sending after this and cuts what is left at 1.5x")
    ap.add_argument("--threads", type=int, default=2, help="llama-server -t, torch threads")
    ap.add_argument("--max-busy", type=float, default=0.3,
                    help="before each level, wait until fewer cores than this are busy elsewhere")
    ap.add_argument("--max-wait", type=float, default=300.0, help="the longest wait for a quiet machine, s")
    ap.add_argument("--max-disturbed", type=float, default=0.2,
                    help="a level during which other processes took more cores than this is run again")
    ap.add_argument("--retries", type=int, default=1, help="how many times a disturbed level is run again")
    ap.add_argument("--plot-only", action="store_true")
    ap.add_argument("--hf-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.hf_worker:
        return hf_worker(args)
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        sys.exit(f"unknown targets {sorted(unknown)}; known: {TARGETS}")
    if not (CHECKPOINT / "model.safetensors").exists():
        sys.exit(f"no {CHECKPOINT.relative_to(ROOT)}: run `make llm-fixtures` first")
    if args.plot_only:
        data = json.loads(OUT.read_text())
    else:
        data = measure(args)
        OUT.write_text(json.dumps(data, indent=1) + "\n")
    plot(data)
    table(data)
    log(f"wrote {OUT.relative_to(ROOT)}, {SVG.relative_to(ROOT)} and the generate section of "
        f"{DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
