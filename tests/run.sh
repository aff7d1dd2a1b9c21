#!/usr/bin/env bash
# The test command of the README: set up .venv, then run unit, distributed and (where CUDA exists)
# GPU tests. Extra arguments go to pytest (e.g. `bash tests/run.sh tests/unit -k parity`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_venv.sh
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m pytest -q -p no:cacheprovider --durations=15 "${@:-tests}"
