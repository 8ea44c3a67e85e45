"""Fixtures: a real aiaas server (the binary cargo built) on an ephemeral loopback port."""

import io
import os
import re
import socket
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[2]
BINARY = Path(os.environ.get("AIAAS_BIN", ROOT / "target" / "release" / "aiaas"))


def free_port():
    """A port nothing listens on now (for --grpc-port, which has no 'pick one' value)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, models, *args, grpc=False):
        if not BINARY.exists():
            raise RuntimeError(f"{BINARY} missing: run `cargo build --release` (make test does)")
        # gRPC off unless asked for: servers run side by side
        self.grpc_port = free_port() if grpc else 0
        self.proc = subprocess.Popen(
            [str(BINARY), "--host", "127.0.0.1", "--port", "0", "--models", str(models),
             "--grpc-port", str(self.grpc_port), *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "NO_COLOR": "1", "RUST_LOG": "info"})
        self.grpc_addr = f"127.0.0.1:{self.grpc_port}" if grpc else None
        self.log = []
        addr = None
        for line in self.proc.stdout:
            self.log.append(line)
            m = re.search(r"listening on ([0-9.:]+)", line)
            if m:
                addr = m.group(1)
                break
        if addr is None:
            raise RuntimeError("server did not start:\n" + "".join(self.log))
        threading.Thread(target=self._drain, daemon=True).start()
        self.addr = addr
        self.url = f"http://{addr}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except Exception:
                time.sleep(0.1)
        raise RuntimeError("server not ready:\n" + "".join(self.log))

    def _drain(self):
        for line in self.proc.stdout:
            self.log.append(line)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="session")
def server():
    """The bundled models, with model control explicit (for the repository extension)."""
    s = Server(ROOT / "models", "--model-control", "explicit")
    yield s
    s.stop()


@pytest.fixture
def temp_repo():
    d = tempfile.mkdtemp(prefix="aiaas-py-")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


def draw_shape(kind, seed):
    """A 64x64 RGB image of a circle, square or triangle (PIL, independent of the server)."""
    rng = np.random.default_rng(seed)
    bg = tuple(int(v) for v in rng.integers(0, 256, 3))
    fg = tuple(int(255 - v) for v in bg)
    img = Image.new("RGB", (64, 64), bg)
    d = ImageDraw.Draw(img)
    r = int(rng.integers(14, 24))
    cx, cy = (int(v) for v in rng.integers(r + 2, 62 - r, 2))
    if kind == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif kind == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fg)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    return img


def png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def pixels_chw(img):
    """The model's FP32 input for an image: CHW, scaled to 0..1 (model.toml's scale)."""
    a = np.asarray(img, dtype=np.float32) / 255.0
    return np.transpose(a, (2, 0, 1))
