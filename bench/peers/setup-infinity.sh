#!/usr/bin/env bash
# Creates /.venv-bench: a venv holding the `infinity-emb` embedding server,
# used as a benchmark peer (see bench/peers/infinity.py).
#
# torch is NOT downloaded again: the torch wheel of the project's venv
# (.venv, with its triton/nvidia-*/cuda-* companions) is made visible to
# .venv-bench by symlinks in .venv-bench/torch-from-main, which a .pth file
# appends to sys.path (so .venv-bench's own packages win). Only those
# distributions are linked, so .venv's numpy 2 / transformers 5 /
# sentence-transformers 6 do not leak in; infinity-emb needs numpy<2 and
# sentence-transformers<4, which get installed into .venv-bench itself.
# .venv is only read, never changed.
#
# Idempotent: exits at once when the stamp matches the pinned requirements.
# Env: MAIN_VENV (default <repo>/.venv), BENCH_VENV (default <repo>/.venv-bench).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
main_venv=${MAIN_VENV:-$root/.venv}
bench_venv=${BENCH_VENV:-$root/.venv-bench}
req=$here/requirements-infinity.txt
stamp=$bench_venv/.setup-infinity.stamp

main_py=$main_venv/bin/python
[ -x "$main_py" ] || { echo "setup-infinity: no python at $main_py (the project's torch venv)" >&2; exit 1; }
main_sp=$("$main_py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
torch_version=$("$main_py" - <<'EOF'
import importlib.metadata as m
print(m.version("torch"))
EOF
) || { echo "setup-infinity: torch is not installed in $main_venv" >&2; exit 1; }

want=$( { cat "$req" "${BASH_SOURCE[0]}"; echo "torch==$torch_version $main_sp"; } | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$bench_venv/bin/infinity_emb" ]; then
    exit 0
fi

echo "setup-infinity: building $bench_venv (torch $torch_version from $main_venv)" >&2
rm -f "$stamp"
# `python -m venv` run from a venv's python bases the new venv on the same
# base interpreter (python 3.11 here).
[ -x "$bench_venv/bin/python" ] || "$main_py" -m venv "$bench_venv"
bench_py=$bench_venv/bin/python
bench_sp=$("$bench_py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

# Link torch and its binary companions (triton, nvidia-*, cuda-*) from .venv.
link_dir=$bench_venv/torch-from-main
rm -rf "$link_dir"
mkdir -p "$link_dir"
"$main_py" - "$main_sp" "$link_dir" <<'EOF'
import importlib.metadata as m, os, sys
src, dst = sys.argv[1], sys.argv[2]
linked = set()
for dist in m.distributions(path=[src]):
    name = dist.metadata["Name"].lower().replace("_", "-")
    if not (name in ("torch", "triton") or name.startswith(("nvidia-", "cuda-"))):
        continue
    tops = {str(f).split("/")[0] for f in (dist.files or [])}
    for top in sorted(tops):
        if top in ("..", "") or top in linked or top.startswith("__pycache__"):
            continue
        if not os.path.exists(os.path.join(src, top)):
            continue
        os.symlink(os.path.join(src, top), os.path.join(dst, top))
        linked.add(top)
print("setup-infinity: linked", len(linked), "entries from", src, file=sys.stderr)
EOF
# .pth lines are appended to sys.path after site-packages: bench packages win.
echo "$link_dir" > "$bench_sp/zz-torch-from-main.pth"

constraints=$bench_venv/constraints-torch.txt
echo "torch==$torch_version" > "$constraints"
PIP_DISABLE_PIP_VERSION_CHECK=1 "$bench_py" -m pip install --quiet \
    -r "$req" -c "$constraints"

# Fail loudly if the torch seen is not the linked one, or infinity does not import.
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DO_NOT_TRACK=1 "$bench_py" - "$link_dir" "$torch_version" <<'EOF'
import os, sys
import torch, numpy, sentence_transformers, transformers
import infinity_emb, infinity_emb.infinity_server  # noqa: F401
link_dir, want = sys.argv[1], sys.argv[2]
assert torch.__file__.startswith(link_dir), torch.__file__
assert torch.__version__.split("+")[0] == want, torch.__version__
print("setup-infinity: ok: infinity_emb", infinity_emb.__version__, "torch", torch.__version__,
      "numpy", numpy.__version__, "sentence-transformers", sentence_transformers.__version__,
      "transformers", transformers.__version__, file=sys.stderr)
EOF
echo "$want" > "$stamp"
