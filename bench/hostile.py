#!/usr/bin/env python3
"""Hostile clients at scale against a release binary, loopback only, bounded in time (about two
minutes a binary). Four scenarios of the hostile-clients issue, each printing its figure:

  slowloris   1,500 connections that send half a request head and stall, against a server
              whose open-file limit is 1,024; then a well-behaved client (a new connection
              every 100 ms for 10 s): how many of its requests fail (clients locked out)
  burst       24 PNGs of 6000x6000 pixels (uniform colour, ~100 KB each) posted at once to
              image-cnn: the server's peak RSS while it decodes them
  sigterm     16 keep-alive clients (a connection each, reused) on the regressor, SIGTERM with
              --shutdown-delay 1: requests lost on connections the server closed (3 runs)
  hangup      512 texts of 20,000 characters to text-classifier, the client hangs up after
              0.3 s: CPU seconds the server spends in the next 5 s

    python3 bench/hostile.py [--binary target/release/aiaas] [--label after] [--out FILE.json]

Standard library only; the server runs with its defaults but for the flags named above.
"""

import argparse
import http.client
import json
import os
import re
import resource
import socket
import struct
import subprocess
import threading
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def png(width, height, rgb=(200, 30, 60)):
    """A uniform RGB PNG, written by hand (rows compress to almost nothing)."""
    row = b"\x00" + bytes(rgb) * width
    comp = zlib.compressobj(9)
    data = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


class Server:
    def __init__(self, binary, models, args=(), fd_limit=None):
        def limit():
            if fd_limit:
                resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, fd_limit))

        self.proc = subprocess.Popen(
            [binary, "--host", "127.0.0.1", "--port", "0", "--grpc-port", "0", "--models", str(models), *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=limit,
            env={**os.environ, "RUST_LOG": "warn,aiaas=info"})
        for line in self.proc.stdout:
            m = re.search(r"listening on ([0-9.]+):(\d+)", line)
            if m:
                self.host, self.port = m.group(1), int(m.group(2))
                break
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if self.get("/health/ready") == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server not ready")

    def get(self, path, timeout=2):
        c = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            c.request("GET", path)
            return c.getresponse().status
        finally:
            c.close()

    def cpu_seconds(self):
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mib(self):
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self, timeout=30):
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def slowloris(binary):
    # the client side needs room for its own sockets too
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    s = Server(binary, ROOT / "models", ["--load-model", "regressor"], fd_limit=1024)
    held = []
    try:
        for _ in range(1500):
            try:
                t = socket.create_connection((s.host, s.port), timeout=2)
                t.sendall(b"GET /health/live HTTP/1.1\r\nhost: x\r\nx-slow: ")
                held.append(t)
            except OSError:
                break
        ok = failed = 0
        stop = time.time() + 10
        while time.time() < stop:
            try:
                ok += s.get("/health/live", timeout=2) == 200
            except OSError:
                failed += 1
            time.sleep(0.1)
        # how many stalled connections the server still holds open after 20 s in all
        time.sleep(10)
        still_open = 0
        for t in held:
            t.settimeout(0.01)
            try:
                still_open += t.recv(1) != b"" and 1 or 0
            except socket.timeout:
                still_open += 1
            except OSError:
                pass
        return {"stalled_connections": len(held), "probe_ok": ok, "probe_failed": failed,
                "locked_out_pct": 100.0 * failed / max(1, ok + failed),
                "stalled_still_open_after_20s": still_open}
    finally:
        for t in held:
            t.close()
        s.stop()


def burst(binary):
    s = Server(binary, ROOT / "models", ["--load-model", "image-cnn"])
    body = png(6000, 6000)
    statuses, lock = [], threading.Lock()
    base = s.rss_mib()
    peak = base
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, s.rss_mib())
            time.sleep(0.01)

    def post():
        c = http.client.HTTPConnection(s.host, s.port, timeout=120)
        try:
            c.request("POST", "/v1/models/image-cnn/predict", body, {"content-type": "image/png"})
            status = c.getresponse().status
        except OSError as e:
            status = str(e)
        with lock:
            statuses.append(status)

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.time()
    clients = [threading.Thread(target=post) for _ in range(24)]
    for t in clients:
        t.start()
    for t in clients:
        t.join()
    took = time.time() - started
    done.set()
    sampler.join()
    s.stop()
    return {"images": 24, "png_bytes": len(body), "rss_before_mib": round(base),
            "peak_rss_mib": round(peak), "seconds": round(took, 2),
            "statuses": {str(k): statuses.count(k) for k in set(statuses)}}


def sigterm_once(binary):
    s = Server(binary, ROOT / "models", ["--load-model", "regressor", "--shutdown-delay", "1"])
    body = json.dumps({"instances": [[0.5]]})
    counts = {"ok": 0, "refused": 0, "lost": 0}
    lock = threading.Lock()
    stop = threading.Event()

    def client():
        conn = None
        while not stop.is_set():
            fresh = conn is None
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(s.host, s.port, timeout=10)
                    conn.connect()
                conn.request("POST", "/v1/models/regressor/predict", body,
                             {"content-type": "application/json"})
                r = conn.getresponse()
                r.read()
                with lock:
                    counts["ok"] += 1
                if r.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except ConnectionRefusedError:
                with lock:
                    counts["refused"] += 1
                conn = None
                time.sleep(0.02)
            except (http.client.RemoteDisconnected, http.client.BadStatusLine,
                    ConnectionResetError, BrokenPipeError) as e:
                # on a fresh connection: the listener closed with it in the accept queue (never
                # accepted); on a reused one: a request sent down a connection being closed
                with lock:
                    counts["refused" if fresh else "lost"] += 1
                conn = None
                time.sleep(0.02)
            except OSError:
                with lock:
                    counts["refused"] += 1
                conn = None
                time.sleep(0.02)

    threads = [threading.Thread(target=client) for _ in range(16)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    s.proc.terminate()
    s.proc.wait(timeout=30)
    stop.set()
    for t in threads:
        t.join()
    return counts


def sigterm(binary):
    runs = [sigterm_once(binary) for _ in range(3)]
    return {"runs": runs, "lost": sum(r["lost"] for r in runs),
            "answered": sum(r["ok"] for r in runs)}


def hangup(binary):
    s = Server(binary, ROOT / "models", ["--load-model", "text-classifier"])
    text = "我爱你 this is great " * 1000
    body = json.dumps({"instances": [text] * 512}).encode()
    t = socket.create_connection((s.host, s.port))
    t.sendall(b"POST /v1/models/text-classifier/predict HTTP/1.1\r\nhost: x\r\n"
              b"content-type: application/json\r\ncontent-length: " + str(len(body)).encode()
              + b"\r\n\r\n" + body)
    time.sleep(0.3)
    t.close()
    before = s.cpu_seconds()
    time.sleep(5)
    spent = s.cpu_seconds() - before
    s.stop()
    return {"texts": 512, "cpu_seconds_in_5s_after_hangup": round(spent, 2)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default=str(ROOT / "target/release/aiaas"))
    ap.add_argument("--label", default="after")
    ap.add_argument("--out")
    ap.add_argument("--only", nargs="*", default=["slowloris", "burst", "sigterm", "hangup"])
    args = ap.parse_args()
    results = {"label": args.label, "binary": args.binary}
    for name in args.only:
        started = time.time()
        results[name] = globals()[name](args.binary)
        print(f"[{args.label}] {name} ({time.time() - started:.0f} s): {json.dumps(results[name])}",
              flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
