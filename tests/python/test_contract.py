"""The OpenAPI contract, tested by schemathesis against the live server: no 5xx (but the 504 or 503
of a passed deadline), and every response's status, content type and body conform to openapi.yaml."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, Server

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
CONFIG = Path(__file__).with_name("schemathesis.toml")
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


def schemathesis(server, *extra):
    # the config file allows a passed deadline's 504 (/v1) and 503 (/v2) on prediction routes:
    # generated x-request-timeout-ms headers include 1 ms
    # one worker: with two, hypothesis's ast.parse in threads trips CPython 3.11's "AST
    # constructor recursion depth mismatch" SystemError now and then (cf. python/cpython#106905)
    cmd = [str(SCHEMATHESIS), "--config-file", str(CONFIG), "run", str(ROOT / "openapi.yaml"),
           "--url", server.url,
           "--checks", CHECKS, "--phases", "examples,coverage,fuzzing", "--max-examples", "10",
           "--workers", "1", "--seed", "20261130", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    text = out.stdout + out.stderr
    m = re.search(r"(\d+) generated", text)
    generated = int(m.group(1)) if m else 0
    print(f"schemathesis {' '.join(extra) or '(all operations)'}: {generated} test cases")
    return out.returncode, generated, text


def test_every_operation_conforms(server):
    # the session server runs --model-control explicit: management operations are exercised too
    # (on the bundled models: loading a model again from unchanged files changes nothing)
    code, generated, text = schemathesis(server, "--exclude-path-regex", "/(unload|reload)$|^/v1/models/\\{name\\}$")
    assert code == 0, text[-6000:]
    assert generated > 300, text[-3000:]


def test_unload_and_reload_conform(temp_repo):
    # destructive operations on a throw-away copy of the repository
    for m in ["regressor", "text-classifier"]:
        shutil.copytree(ROOT / "models" / m, temp_repo / m)
    server = Server(temp_repo, "--model-control", "explicit")
    try:
        code, generated, text = schemathesis(server, "--include-path-regex", "/(unload|reload)$|^/v1/models/\\{name\\}$")
        assert code == 0, text[-6000:]
        assert generated > 10, text[-3000:]
    finally:
        server.stop()
