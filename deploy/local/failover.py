#!/usr/bin/env python3
"""Local proof of the load-balancing story: two aiaas replicas behind nginx, one of them stopped
under load, first gracefully (SIGTERM), then brutally (kill -9).

Everything runs on 127.0.0.1 and stops by itself: about 25 s by default, about 10 s with --quick.

  1. start two aiaas instances (`--host 127.0.0.1 --port 0 --load-model regressor`, the port is
     read from the "listening on" log line) and nginx with a generated config in a temp dir that
     includes deploy/nginx/proxy.conf (the same retry policy docker compose uses);
  2. drive load through nginx: --clients threads, each POSTing predictions back to back;
  3. phase "sigterm": SIGTERM replica A mid-load. Expected: zero failed requests (A drains its
     in-flight requests, nginx retries anything refused or reset on B);
  4. restart A on the same port, wait until nginx routes to it again;
  5. phase "kill9": kill -9 replica B mid-load. Reported: failed requests (nginx retries
     `non_idempotent` requests, so usually none) and that requests after the kill succeed.

Prints a human summary, then the counts as JSON (also written to --json-out). Exit status 0 when
the SIGTERM phase had no failure and service continued after the kill, else 1.

Standard library only: runs with the system python3. Needs nginx (Debian package `nginx`).
"""

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def log(msg):
    print(f"[failover {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Replica:
    """One aiaas process on 127.0.0.1; `port` 0 picks a free one (read back from its log)."""

    def __init__(self, name, binary, models, model, port, shutdown_timeout, logdir, extra=()):
        self.name = name
        self.logfile = open(Path(logdir) / f"{name}.log", "a", buffering=1)
        self.lines = []
        cmd = [str(binary), "--host", "127.0.0.1", "--port", str(port), "--grpc-port", "0",
               "--models", str(models),
               "--load-model", model, "--log-format", "text",
               "--shutdown-timeout", str(shutdown_timeout), *extra]
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("AIAAS_") and k != "RUST_LOG"}
        env.update(NO_COLOR="1", RUST_LOG="info")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env, start_new_session=True)
        self.port = None
        deadline = time.monotonic() + 60
        for line in self.proc.stdout:
            self._keep(line)
            m = re.search(r"listening on 127\.0\.0\.1:(\d+)", ANSI.sub("", line))
            if m:
                self.port = int(m.group(1))
                break
            if time.monotonic() > deadline:
                break
        if self.port is None:
            self.proc.kill()
            raise RuntimeError(f"{name} did not start:\n" + "".join(self.lines[-20:]))
        threading.Thread(target=self._drain, daemon=True).start()
        self.wait_ready(60)
        self.ready_s = time.monotonic() - self.started

    def _keep(self, line):
        self.lines.append(line)
        self.logfile.write(ANSI.sub("", line))

    def _drain(self):
        for line in self.proc.stdout:
            self._keep(line)

    @property
    def addr(self):
        return f"127.0.0.1:{self.port}"

    def wait_ready(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n"
                                   + "".join(self.lines[-20:]))
            try:
                with urllib.request.urlopen(f"http://{self.addr}/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready within {timeout} s")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_nginx(explicit):
    for cand in [explicit, shutil.which("nginx"), "/usr/sbin/nginx"]:
        if cand and Path(cand).exists():
            return cand
    raise SystemExit("nginx not found: apt-get install nginx (or pass --nginx PATH)")


NGINX_CONF = """\
# Generated by deploy/local/failover.py: like deploy/nginx/nginx.conf, on loopback, with the
# replicas' addresses instead of compose's DNS names.
worker_processes 1;
error_log {tmp}/error.log warn;
pid {tmp}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream aiaas {{
        least_conn;
{servers}
        keepalive 32;
        keepalive_timeout 10s;
    }}
    server {{
        listen 127.0.0.1:{port};
        location = /nginx-health {{ return 200 "ok\\n"; }}
        location / {{
            include {proxy_conf};
            add_header X-Upstream $upstream_addr always;
            add_header X-Upstream-Status $upstream_status always;
        }}
    }}
}}
"""


class Nginx:
    def __init__(self, binary, tmp, port, proxy_conf, replicas):
        self.binary, self.tmp, self.port, self.proxy_conf = binary, Path(tmp), port, proxy_conf
        self.conf = self.tmp / "nginx.conf"
        self.write_conf(replicas)
        self.proc = subprocess.Popen(
            [binary, "-p", str(self.tmp), "-e", str(self.tmp / "error.log"), "-c", str(self.conf),
             "-g", "daemon off;"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("nginx exited: " + self.proc.stderr.read() + self.error_log())
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/nginx-health", timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("nginx did not start: " + self.error_log())

    def write_conf(self, replicas):
        servers = "\n".join(f"        server {r.addr} max_fails=1 fail_timeout=2s;"
                            for r in replicas)
        self.conf.write_text(NGINX_CONF.format(tmp=self.tmp, port=self.port, servers=servers,
                                               proxy_conf=self.proxy_conf))

    def reload(self, replicas):
        self.write_conf(replicas)
        self.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)

    def error_log(self):
        try:
            return (self.tmp / "error.log").read_text()[-4000:]
        except OSError:
            return ""

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: finish what is in flight
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Load:
    """--clients threads POSTing predictions through nginx back to back (keep-alive)."""

    def __init__(self, port, model, clients, timeout):
        self.port, self.model, self.timeout = port, model, timeout
        self.stop_event = threading.Event()
        self.results = [[] for _ in range(clients)]
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                        for i in range(clients)]

    def start(self):
        for t in self.threads:
            t.start()

    def stop(self):
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=self.timeout + 5)

    def _run(self, i):
        out = self.results[i]
        conn = None
        n = 0
        path = f"/v1/models/{self.model}/predict"
        while not self.stop_event.is_set():
            n += 1
            body = json.dumps({"instances": [[(i * 7919 + n) % 1000 / 1000.0]]})
            t0 = time.monotonic()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
                conn.request("POST", path, body, {"content-type": "application/json"})
                resp = conn.getresponse()
                data = resp.read()
                status, upstream = resp.status, resp.getheader("X-Upstream", "")
                ok = status == 200 and b"predictions" in data
                err = None if ok else f"HTTP {status} via {upstream}"
                if resp.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as e:
                ok, upstream, err = False, "", f"{type(e).__name__}: {e}"
                if conn is not None:
                    conn.close()
                conn = None
            out.append((t0, time.monotonic(), ok, upstream, err))
        if conn is not None:
            conn.close()

    def between(self, t_from, t_to):
        return [r for rs in self.results for r in rs if t_from <= r[0] < t_to]


def summarize(reqs, names, t_event=None):
    """Counts for requests that started within a phase; `names` maps "127.0.0.1:PORT" to a
    replica name. Upstream "A, B" means nginx tried A, then B (a retry)."""
    lat = sorted(r[1] - r[0] for r in reqs)
    failed = [r for r in reqs if not r[2]]
    errors = {}
    for r in failed:
        errors[r[4]] = errors.get(r[4], 0) + 1

    def served(rs):
        by = {}
        for r in rs:
            if r[2] and r[3]:
                last = names.get(r[3].split(",")[-1].strip(), r[3].split(",")[-1].strip())
                by[last] = by.get(last, 0) + 1
        return dict(sorted(by.items()))

    out = {
        "requests": len(reqs),
        "ok": len(reqs) - len(failed),
        "failed": len(failed),
        "retried_on_other_replica": sum(1 for r in reqs if r[2] and "," in r[3]),
        "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:5]),
        "latency_ms": {
            "p50": round(statistics.median(lat) * 1000, 2) if lat else None,
            "p99": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000, 2) if lat else None,
            "max": round(lat[-1] * 1000, 2) if lat else None,
        },
    }
    if t_event is not None:
        before = [r for r in reqs if r[0] < t_event]
        after = [r for r in reqs if r[0] >= t_event]
        out["served_by_before"] = served(before)
        out["served_by_after"] = served(after)
        out["ok_after"] = sum(1 for r in after if r[2])
        out["failed_after"] = sum(1 for r in after if not r[2])
        late = [r for r in after if r[0] >= t_event + 1.0]
        out["ok_from_1s_after"] = sum(1 for r in late if r[2])
        out["failed_from_1s_after"] = sum(1 for r in late if not r[2])
    else:
        out["served_by"] = served(reqs)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=os.environ.get("AIAAS_BIN", str(REPO / "target/release/aiaas")),
                    help="aiaas binary (default: $AIAAS_BIN or target/release/aiaas)")
    ap.add_argument("--models", default=str(REPO / "models"), help="model repository")
    ap.add_argument("--model", default="regressor", help="model to load and predict with")
    ap.add_argument("--nginx", default=None, help="nginx binary (default: from PATH or /usr/sbin)")
    ap.add_argument("--nginx-port", type=int, default=0, help="nginx port on 127.0.0.1 (0: free)")
    ap.add_argument("--proxy-conf", default=str(REPO / "deploy/nginx/proxy.conf"),
                    help="nginx proxy directives to include (default: deploy/nginx/proxy.conf)")
    ap.add_argument("--without-non-idempotent", action="store_true",
                    help="drop `non_idempotent` from proxy_next_upstream (shows what it buys)")
    ap.add_argument("--clients", type=int, default=8, help="client threads")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds of load before phase 1")
    ap.add_argument("--phase", type=float, default=10.0, help="seconds of each phase")
    ap.add_argument("--signal-at", type=float, default=None,
                    help="seconds into each phase to send the signal (default: phase / 3)")
    ap.add_argument("--settle", type=float, default=6.0,
                    help="most seconds to wait for nginx to route to the restarted replica")
    ap.add_argument("--shutdown-timeout", type=float, default=10.0,
                    help="the replicas' --shutdown-timeout")
    ap.add_argument("--shutdown-delay", type=float, default=None,
                    help="pass --shutdown-delay to the replicas (binaries that have the flag)")
    ap.add_argument("--request-timeout", type=float, default=10.0, help="client timeout, seconds")
    ap.add_argument("--quick", action="store_true",
                    help="short run (about 10 s): warm-up 1 s, phases 3 s, settle up to 6 s")
    ap.add_argument("--json-out", default=None, help="also write the JSON result here")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, nginx.conf)")
    args = ap.parse_args()
    if args.quick:
        args.warmup, args.phase, args.settle = 1.0, 3.0, 6.0
    signal_at = args.signal_at if args.signal_at is not None else args.phase / 3

    binary = Path(args.bin)
    if not binary.exists():
        raise SystemExit(f"{binary} missing: build it (cargo build [--release] --bin aiaas)")
    nginx_bin = find_nginx(args.nginx)
    proxy_conf = Path(args.proxy_conf).resolve()
    tmp = Path(tempfile.mkdtemp(prefix="aiaas-failover-"))
    os.chmod(tmp, 0o755)  # nginx workers may run as an unprivileged user when started as root
    if args.without_non_idempotent:
        text = proxy_conf.read_text()
        if " non_idempotent" not in text:
            raise SystemExit(f"{proxy_conf} has no non_idempotent to drop")
        proxy_conf = tmp / "proxy-idempotent-only.conf"
        proxy_conf.write_text(text.replace(" non_idempotent", ""))

    replicas, nginx, load = {}, None, None
    result = {"binary": str(binary), "model": args.model, "clients": args.clients,
              "phase_s": args.phase, "signal_at_s": signal_at,
              "shutdown_timeout_s": args.shutdown_timeout, "shutdown_delay_s": args.shutdown_delay,
              "proxy_conf": str(args.proxy_conf) + (" without non_idempotent"
                                                    if args.without_non_idempotent else "")}
    t_begin = time.monotonic()
    try:
        extra = [] if args.shutdown_delay is None else ["--shutdown-delay", str(args.shutdown_delay)]
        mk = lambda name, port=0: Replica(name, binary, args.models, args.model, port,  # noqa: E731
                                          args.shutdown_timeout, tmp, extra)
        replicas["A"], replicas["B"] = mk("A"), mk("B")
        log(f"replicas: A on {replicas['A'].addr}, B on {replicas['B'].addr} "
            f"(ready in {replicas['A'].ready_s:.1f} s / {replicas['B'].ready_s:.1f} s)")
        port = args.nginx_port or free_port()
        nginx = Nginx(nginx_bin, tmp, port, proxy_conf, [replicas["A"], replicas["B"]])
        log(f"nginx {nginx_bin} on 127.0.0.1:{port} (config {nginx.conf})")
        names = {r.addr: n for n, r in replicas.items()}

        load = Load(port, args.model, args.clients, args.request_timeout)
        load.start()
        time.sleep(args.warmup)

        # Phase 1: SIGTERM replica A mid-load.
        a = replicas["A"]
        p1 = time.monotonic()
        time.sleep(signal_at)
        t_term = time.monotonic()
        log(f"phase sigterm: SIGTERM to A (pid {a.proc.pid})")
        a.proc.send_signal(signal.SIGTERM)
        try:
            code = a.proc.wait(timeout=args.shutdown_timeout + 10)
        except subprocess.TimeoutExpired:
            code = None
        drain_s = time.monotonic() - t_term
        log(f"A exited with {code} after {drain_s:.2f} s")
        time.sleep(max(0.0, p1 + args.phase - time.monotonic()))
        p1_end = time.monotonic()
        sig = summarize(load.between(p1, p1_end), names, t_term)
        sig.update(exit_code=code, exit_after_s=round(drain_s, 3))
        result["sigterm"] = sig

        # Restart A (same port, so nginx's config stays as it is) and wait for nginx to use it.
        old_port = a.port
        try:
            replicas["A"] = mk("A", old_port)
        except RuntimeError as e:
            log(f"restart on port {old_port} failed ({str(e).splitlines()[0]}); new port + reload")
            replicas["A"] = mk("A", 0)
            nginx.reload([replicas["A"], replicas["B"]])
        names = {r.addr: n for n, r in replicas.items()}
        t_restart = time.monotonic()
        log(f"A restarted on {replicas['A'].addr} (ready in {replicas['A'].ready_s:.2f} s)")
        back = None
        while time.monotonic() < t_restart + args.settle:
            recent = load.between(t_restart, time.monotonic())
            if any(r[2] and r[3].split(",")[-1].strip() == replicas["A"].addr for r in recent):
                back = time.monotonic() - t_restart
                break
            time.sleep(0.1)
        restart = summarize(load.between(p1_end, time.monotonic()), names)
        restart.update(ready_s=round(replicas["A"].ready_s, 3),
                       routed_again_after_s=round(back, 3) if back is not None else None)
        result["restart"] = restart
        log("nginx routes to A again" + (f" after {back:.2f} s" if back is not None
                                          else f": not within {args.settle} s"))

        # Phase 2: kill -9 replica B mid-load.
        b = replicas["B"]
        p2 = time.monotonic()
        time.sleep(signal_at)
        t_kill = time.monotonic()
        log(f"phase kill9: SIGKILL to B (pid {b.proc.pid})")
        b.proc.kill()
        b.proc.wait()
        time.sleep(max(0.0, p2 + args.phase - time.monotonic()))
        load.stop()
        p2_end = time.monotonic()
        result["kill9"] = summarize(load.between(p2, p2_end), names, t_kill)
        k = result["kill9"]
        result["service_continued_after_kill"] = k["ok_from_1s_after"] > 0 and \
            k["failed_from_1s_after"] == 0
        result["total_s"] = round(time.monotonic() - t_begin, 1)
    finally:
        if load is not None:
            load.stop()
        if nginx is not None:
            nginx.stop()
        for r in replicas.values():
            r.stop()
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    s, r, k = result["sigterm"], result["restart"], result["kill9"]
    print(f"""
failover: 2 x aiaas ({args.model}) behind nginx, {args.clients} clients, {result['total_s']} s
  SIGTERM A mid-load : {s['requests']} requests, {s['failed']} failed, {s['retried_on_other_replica']} retried on B;
                       A exited {s['exit_code']} after {s['exit_after_s']} s; served before {s['served_by_before']}, after {s['served_by_after']}
  restart A          : {r['requests']} requests, {r['failed']} failed; A ready in {r['ready_s']} s, routed again after {r['routed_again_after_s']} s
  kill -9 B mid-load : {k['requests']} requests, {k['failed']} failed, {k['retried_on_other_replica']} retried on A;
                       after the kill {k['ok_after']} ok / {k['failed_after']} failed; served after {k['served_by_after']}
  verdict            : SIGTERM phase {'zero failures' if s['failed'] == 0 else 'HAD FAILURES'}; service {'continued' if result['service_continued_after_kill'] else 'DID NOT continue'} after kill -9
""")
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    ok = s["failed"] == 0 and s["exit_code"] == 0 and result["service_continued_after_kill"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
