#!/usr/bin/env bash
# Create (or reuse) a virtual environment with megatron_jp installed in editable mode.
#   VENV=path      where to put it (default .venv)
#   KEEP_TORCH=1   keep the torch already installed (GPU clusters); otherwise the CPU build 2.13.0
#                  is pinned, because an unpinned torch pulls a multi-GB CUDA wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
say() { echo "setup: $*" >&2; }  # the set-up takes a minute or two: say what it is doing
if [ ! -x "$VENV/bin/python" ]; then
  say "creating the virtual environment $VENV"
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
# quiet pip, minus one harmless warning this machine's pip config prints per package; keeps pip's status
pip() { python -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
if [ "${KEEP_TORCH:-0}" != "1" ]; then
  say "installing torch 2.13.0 (the CPU build, ~200 MB; already there: a few seconds)"
  pip install "torch==2.13.0"
fi
say "installing megatron_jp (editable) with its test, plot, eval and fp8 extras, compiling its C++ helpers (about 1-2 min the first time)"
pip install -e ".[test,plot,eval,fp8]"
python -c "import megatron_jp, torch; print(f'megatron_jp {megatron_jp.__version__} with torch {torch.__version__}')"
