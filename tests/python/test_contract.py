"""The OpenAPI contract, tested by schemathesis against the live server: no 5xx, and every
response's status, content type and body conform to openapi.yaml."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, Server

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


def schemathesis(server, *extra):
    cmd = [str(SCHEMATHESIS), "run", str(ROOT / "openapi.yaml"), "--url", server.url,
           "--checks", CHECKS, "--phases", "examples,coverage,fuzzing", "--max-examples", "10",
           "--workers", "2", "--seed", "20261130",
           # deadlines are tested on their own; a generated 0 ms deadline is a 504 by design
           "-H", "x-request-timeout-ms: 60000", *extra]
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
