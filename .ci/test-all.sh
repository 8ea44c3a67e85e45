#!/usr/bin/env bash
# Runs the Rust tests (unit + integration, real server over HTTP) and the Python client tests
# (tritonclient, kserve, schemathesis, deployment checks), then prints one closing line with
# the totals of both.
set -uo pipefail
cd "$(dirname "$0")/.."
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT

# the release profile, as `make run` builds it: the tests run the binary users run, and the
# dependencies are built once for both
# --no-fail-fast: one failing test binary does not hide the results of the others
cargo test --release --all-targets --no-fail-fast 2>&1 | tee "$logs/cargo.log"
cargo_status=${PIPESTATUS[0]}
py_status=1
if cargo build --release --bin aiaas 2>&1 | tail -n 1; then
  # tritonclient.grpc and kserve each load generated code for the same protobuf package
  # (`inference`), which protobuf refuses to load twice in one process: the gRPC tests run in a
  # pytest process of their own
  .venv-test/bin/python -m pytest tests/python -q --ignore=tests/python/test_grpc.py 2>&1 | tee "$logs/pytest.log"
  py_status=${PIPESTATUS[0]}
  .venv-test/bin/python -m pytest tests/python/test_grpc.py -q 2>&1 | tee -a "$logs/pytest.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || py_status=1
fi

sum() { grep -oE "$1" "$2" 2>/dev/null | awk '{s += $1} END {print s + 0}'; }
passed=$(( $(sum '[0-9]+ passed' "$logs/cargo.log") + $(sum '[0-9]+ passed' "$logs/pytest.log") ))
failed=$(( $(sum '[0-9]+ failed' "$logs/cargo.log") + $(sum '[0-9]+ failed' "$logs/pytest.log") ))
if [ "$cargo_status" -ne 0 ] || [ "$py_status" -ne 0 ]; then
  [ "$failed" -eq 0 ] && failed=1
fi
echo "total: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
