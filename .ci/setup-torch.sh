#!/usr/bin/env bash
# Installs libtorch from PyPI (torch==2.11.0) into the project-local .venv, once.
# Idempotent: a .venv that already has the right torch is reused as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="${TORCH_VERSION:-2.11.0}"
PYTHON="${PYTHON:-python3}"

have_torch() {
  [ -x .venv/bin/python ] &&
    .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null
}

if have_torch; then
  exit 0
fi
echo ">> installing torch==$TORCH_VERSION into .venv (libtorch for tch; about 5 GB with the CUDA runtime wheels)"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==$TORCH_VERSION"
have_torch || { echo "torch $TORCH_VERSION did not install into .venv" >&2; exit 1; }
