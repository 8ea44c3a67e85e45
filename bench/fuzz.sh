#!/usr/bin/env bash
# Runs every fuzz target for a bounded time with cargo-fuzz (libFuzzer) and prints executions
# and findings per target. Only the stable toolchain exists here, so RUSTC_BOOTSTRAP=1 lets it
# take cargo-fuzz's -Z flags, and --sanitizer none skips AddressSanitizer (libFuzzer's coverage
# guidance and its crash detection on panics still apply).
#
#   bench/fuzz.sh [seconds per target, default 60]
#
# A crash leaves its input under tests/fuzz/artifacts/<target>/: fix it, then copy the input to
# tests/fuzz/regressions/<target>/ so that `cargo test` replays it forever.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_TARGET="${1:-60}"
export LIBTORCH_USE_PYTORCH=1 PATH="$PWD/.venv/bin:$HOME/.cargo/bin:$PATH" RUSTC_BOOTSTRAP=1
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
# the fuzz binaries are not aiaas's own, so they lack its embedded rpath to libtorch
LD_LIBRARY_PATH="$(.venv/bin/python -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH
TARGETS=(image_decode v2_parse json_instances tokenize)
for t in "${TARGETS[@]}"; do
  cargo fuzz build --fuzz-dir tests/fuzz --sanitizer none "$t" 2>&1 | grep -E "^error" -A5 || true
done
printf '%-16s %12s %10s %8s\n' target executions exec/s crashes
for t in "${TARGETS[@]}"; do
  corpus="tests/fuzz/corpus/$t"
  mkdir -p "$corpus" "tests/fuzz/artifacts/$t"
  cp -n tests/fuzz/regressions/"$t"/* "$corpus"/ 2>/dev/null || true
  log=$(mktemp)
  set +e
  cargo fuzz run --fuzz-dir tests/fuzz --sanitizer none "$t" "$corpus" -- \
    -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb=4096 -print_final_stats=1 \
    -artifact_prefix="tests/fuzz/artifacts/$t/" >"$log" 2>&1
  status=$?
  set -e
  execs=$(grep -m1 'stat::number_of_executed_units' "$log" | awk '{print $2}' || true)
  rate=$(grep -m1 'stat::average_exec_per_sec' "$log" | awk '{print $2}' || true)
  crashes=$(find "tests/fuzz/artifacts/$t" -type f | wc -l)
  printf '%-16s %12s %10s %8s\n' "$t" "${execs:-?}" "${rate:-?}" "$crashes"
  if [ "$status" -ne 0 ] && [ "$crashes" -eq 0 ]; then tail -n 20 "$log"; fi
  rm -f "$log"
done
