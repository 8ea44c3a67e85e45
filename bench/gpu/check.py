"""The GPU check, driven by bench/gpu/check.sh on a lent GPU machine (python3 stdlib only).

1. A reference server on the CPU (fp32) answers fixed inputs for the three demo models and
   MiniLM.
2. For fp32, bf16 and fp16, a server with every model on the device answers the same inputs:
   the differences from the CPU's answers are recorded (fp32 must be within 1e-4; bf16 and fp16
   within docs/GPU.md's tolerance: scores 0.02, embeddings cosine >= 0.999 and 0.02 per component).
3. For fp32 and bf16: served throughput and p50/p99 of MiniLM embeddings (/v1/embeddings) and
   image-cnn (PNG bytes) at concurrency 1, 16, 64, 256 (aiaas-bench load), beside the raw
   forward (aiaas-bench raw: the engine alone, no HTTP, no batcher) at batch sizes 1-256 on the
   same device; the ratio served / best raw. GPU memory (aiaas_gpu_memory_bytes) after
   warm-up and after load, and each model's start-up line.
Writes results.json and summary.md under --out.
"""
import argparse
import json
import math
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "docs" / "examples"
TEXTS = [
    "hello world",
    "A GPU serves many concurrent requests when they are batched together.",
    "数据中心的推理服务",
    "the quick brown fox jumps over the lazy dog " * 6,
]
LOAD_TEXT = "Serving sentence embeddings on a GPU should be fast and cheap for everyone."
CONCURRENCY = [1, 16, 64, 256]
RAW_BATCHES = [1, 8, 32, 64, 128, 256]
TOLERANCE = {"fp32": 1e-4, "bf16": 0.02, "fp16": 0.02}
MIN_COSINE = {"fp32": 0.99999, "bf16": 0.999, "fp16": 0.999}


def log(msg):
    print(msg, flush=True)


def http(method, url, body=None, content_type="application/json", timeout=60):
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("content-type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError as e:  # refused, reset, timed out: a server that died
        return 0, str(e).encode()


def repository(work, tag, device, precision, big_batches):
    """The bundled models with `device` and `precision` set (and GPU-sized batches)."""
    repo = work / f"repo-{tag}"
    shutil.rmtree(repo, ignore_errors=True)
    shutil.copytree(work / "models", repo)
    for toml in repo.glob("*/model.toml"):
        text = "\n".join(l for l in toml.read_text().splitlines() if not re.match(r"\s*(device|precision)\s*=", l))
        if big_batches and toml.parent.name in ("image-cnn", "minilm"):
            if re.search(r"^max_batch_size\s*=", text, re.M):
                text = re.sub(r"^max_batch_size\s*=.*$", "max_batch_size = 128", text, flags=re.M)
            else:
                text += "\n[batching]\nmax_batch_size = 128\n"
        toml.write_text(f'device = "{device}"\nprecision = "{precision}"\n' + text)
    return repo


class Server:
    def __init__(self, work, repo, port, out, tag):
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = out / f"server-{tag}.log"
        self.proc = subprocess.Popen(
            [str(work / "bin" / "aiaas"), "--models", str(repo), "--port", str(port), "--log-format", "text"],
            stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT)
        started = time.time()
        while time.time() - started < 240:
            text = self.log_path.read_text(errors="replace")
            # ready, or done trying (a model that failed keeps the server from being ready)
            if re.search(r"INFO ready took_ms|start-up loading finished", text):
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.5)
        self.startup_s = time.time() - started
        self.ready_lines = [l for l in self.log_path.read_text(errors="replace").splitlines()
                            if "model ready" in l or "failed to load" in l]

    def stop(self):
        if self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def models(self):
        status, body = http("GET", self.url + "/v1/models")
        return json.loads(body)["models"] if status == 200 else []

    def gpu_memory(self):
        text = http("GET", self.url + "/metrics")[1].decode(errors="replace")
        return {f"{d}/{k}": int(float(v)) for d, k, v in
                re.findall(r'aiaas_gpu_memory_bytes\{device="([^"]+)",kind="([^"]+)"\} (\S+)', text)}

    def answers(self):
        """Fixed inputs through every model; floats per model, or an error."""
        out = {}
        s, b = http("POST", self.url + "/v1/models/regressor/predict", {"instances": [[0.5], [1.5], [-2.0]]})
        out["regressor"] = [json.loads(b)["predictions"]] if s == 200 else f"{s}: {b[:200]}"
        s, b = http("POST", self.url + "/v1/models/text-classifier/predict",
                    {"instances": ["a wonderful film", "terrible, boring and too long", "ok"]})
        out["text-classifier"] = ([list(p["scores"].values()) for p in json.loads(b)["predictions"]]
                                  if s == 200 else f"{s}: {b[:200]}")
        rows = []
        for png in sorted(EXAMPLES.glob("*.png")):
            s, b = http("POST", self.url + "/v1/models/image-cnn/predict", png.read_bytes(), "image/png")
            if s != 200:
                rows = f"{s}: {b[:200]}"
                break
            rows.append(list(json.loads(b)["predictions"][0]["scores"].values()))
        out["image-cnn"] = rows
        s, b = http("POST", self.url + "/v1/embeddings", {"model": "minilm", "input": TEXTS})
        out["minilm"] = ([d["embedding"] for d in json.loads(b)["data"]] if s == 200 else f"{s}: {b[:200]}")
        return out


def compare(ref, got, precision):
    """Per model: max abs difference (and min cosine for embeddings), and whether within tolerance."""
    result = {}
    for model, rows in ref.items():
        other = got.get(model)
        if isinstance(rows, str) or isinstance(other, str) or other is None:
            result[model] = {"error": other if isinstance(other, str) else rows, "ok": False}
            continue
        # relative beyond 1 (a regressor's outputs are not bounded)
        diff = max(abs(a - b) / max(1.0, abs(a)) for ra, rb in zip(rows, other) for a, b in zip(ra, rb))
        entry = {"max_abs_diff": diff, "ok": diff <= TOLERANCE[precision]}
        if model == "minilm":
            cos = min(sum(a * b for a, b in zip(ra, rb)) /
                      (math.sqrt(sum(a * a for a in ra)) * math.sqrt(sum(b * b for b in rb)))
                      for ra, rb in zip(rows, other))
            entry["min_cosine"] = cos
            entry["ok"] = entry["ok"] and cos >= MIN_COSINE[precision]
        result[model] = entry
    return result


def bench_tool(work, *args):
    r = subprocess.run([str(work / "bin" / "aiaas-bench"), *args], capture_output=True, text=True)
    if r.returncode != 0:
        log(f"aiaas-bench {' '.join(args)} failed: {r.stderr[-1000:]}")
        return []
    return [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]


def served(work, server, seconds):
    bodies = work / "bodies"
    bodies.mkdir(exist_ok=True)
    (bodies / "embed.json").write_text(json.dumps({"model": "minilm", "input": LOAD_TEXT}))
    targets = {
        "minilm": (server.url + "/v1/embeddings", bodies / "embed.json", "application/json"),
        "image-cnn": (server.url + "/v1/models/image-cnn/predict", EXAMPLES / "triangle.png", "image/png"),
    }
    rows = []
    for model, (url, body, ctype) in targets.items():
        for c in CONCURRENCY:
            for r in bench_tool(work, "load", "--url", url, "--body", str(body), "--content-type", ctype,
                                "--concurrency", str(c), "--seconds", str(seconds)):
                r["model"] = model
                rows.append(r)
                log(f"  served {model} c={c}: {r['requests_per_s']:.0f}/s p50 {r['p50_ms']:.2f} ms "
                    f"p99 {r['p99_ms']:.2f} ms ({r['failed']} failed)")
    return rows


def raw(work, device, precision, seq_len, seconds):
    rows = []
    dev = device.split(":")[-1] if device.startswith("cuda") else "cpu"
    for model in ("minilm", "image-cnn"):
        for r in bench_tool(work, "raw", "--model", str(work / "models" / model), "--device", dev,
                            "--precision", precision, "--batch", ",".join(map(str, RAW_BATCHES)),
                            "--seconds", str(max(1.0, seconds / 3)), "--seq-len", str(seq_len),
                            "--instances", "1"):
            r["model"] = model
            rows.append(r)
            log(f"  raw {model} batch {r['batch']}: {r['items_per_s']:.0f} items/s p50 {r['p50_ms']:.2f} ms")
    return rows


def bucket(tokens):
    b = 16
    while b < tokens:
        b = b + b // 2 if (b & (b - 1)) == 0 else (b // 3) * 4
    return b


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--seconds", type=float, default=6.0)
    args = ap.parse_args()
    work, out = args.work, args.out
    results = {"device": args.device, "runs": {}}

    log(">> reference: every model on the CPU in fp32")
    ref_server = Server(work, repository(work, "ref", "cpu", "fp32", False), 18200, out, "ref")
    reference = ref_server.answers()
    s, b = http("POST", ref_server.url + "/v1/embeddings", {"model": "minilm", "input": LOAD_TEXT})
    tokens = json.loads(b)["usage"]["prompt_tokens"] if s == 200 else 16
    ref_server.stop()
    seq_len = bucket(tokens)
    results["load_text_tokens"], results["raw_seq_len"] = tokens, seq_len

    precisions = ["fp32", "bf16"] + (["fp16"] if args.device.startswith("cuda") else [])
    for i, precision in enumerate(precisions):
        log(f">> {precision} on {args.device}")
        try:
            results["runs"][precision] = run_precision(work, out, args, precision, i, reference, seq_len)
        except Exception as e:  # keep what the other precisions measured
            log(f"{precision} failed: {e!r}")
            results["runs"][precision] = {"error": repr(e), "startup_s": 0, "ready_lines": [],
                                          "gpu_memory_after_warmup": {}, "answers": {}}
        (out / "results.json").write_text(json.dumps(results, indent=1))
    write_summary(results, args, out)
    failed = [f"{p}/{m}" for p, run in results["runs"].items() for m, c in run["answers"].items() if not c["ok"]]
    failed += [p for p, run in results["runs"].items() if "error" in run]
    if failed:
        log(f"answers outside tolerance, or runs that failed: {failed}")
        return 1
    return 0


def run_precision(work, out, args, precision, i, reference, seq_len):
    """One precision on the device: answers against the CPU's, then (but for fp16) the served
    load and, with the server stopped, the raw forward."""
    repo = repository(work, precision, args.device, precision, True)
    server = Server(work, repo, 18201 + i, out, precision)
    try:
        run = {"startup_s": server.startup_s, "ready_lines": server.ready_lines,
               "instance_devices": {m["name"]: [v.get("instance_devices") for v in m["versions"]]
                                    for m in server.models()},
               "gpu_memory_after_warmup": server.gpu_memory()}
        run["answers"] = compare(reference, server.answers(), precision)
        for model, c in run["answers"].items():
            log(f"  {model}: {c}")
        if precision != "fp16":
            run["served"] = served(work, server, args.seconds)
            run["gpu_memory_after_load"] = server.gpu_memory()
            metrics = http("GET", server.url + "/metrics")[1].decode(errors="replace")
            run["batch_metrics"] = [l for l in metrics.splitlines() if l.startswith((
                "aiaas_batch_size_sum", "aiaas_batch_size_count",
                "aiaas_compute_duration_seconds_sum", "aiaas_compute_duration_seconds_count"))]
    finally:
        server.stop()
    if precision != "fp16":
        run["raw"] = raw(work, args.device, precision, seq_len, args.seconds)
    return run


def write_summary(results, args, out):
    lines = [f"# GPU check on {args.device}", ""]
    for precision, run in results["runs"].items():
        lines.append(f"## {precision} (start-up {run['startup_s']:.1f} s)")
        lines += [f"- {l.split('model ready: ')[-1][:160]}" for l in run["ready_lines"]]
        lines.append(f"- GPU memory after warm-up: {run['gpu_memory_after_warmup']}")
        for model, c in run["answers"].items():
            lines.append(f"- {model} vs CPU fp32: {c}")
        if "served" in run:
            lines.append("")
            lines.append("| model | concurrency | served req/s | p50 ms | p99 ms | best raw items/s (batch) | served/raw |")
            lines.append("|---|---|---|---|---|---|---|")
            for r in run["served"]:
                raws = [x for x in run["raw"] if x["model"] == r["model"]]
                best = max(raws, key=lambda x: x["items_per_s"]) if raws else None
                ratio = r["requests_per_s"] / best["items_per_s"] if best else float("nan")
                best_text = f"{best['items_per_s']:.0f} ({best['batch']})" if best else "-"
                lines.append(f"| {r['model']} | {r['concurrency']} | {r['requests_per_s']:.0f} | {r['p50_ms']:.2f} | "
                             f"{r['p99_ms']:.2f} | {best_text} | {ratio:.2f} |")
            lines.append(f"- GPU memory after load: {run.get('gpu_memory_after_load')}")
        lines.append("")
    (out / "summary.md").write_text("\n".join(lines))
    log("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
