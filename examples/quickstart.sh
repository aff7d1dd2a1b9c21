#!/usr/bin/env bash
# The main job of the README: set up .venv (CPU torch), then pretrain a tiny Japanese encoder on the
# bundled sample corpus and export it to Hugging Face (examples/quickstart.py, which gets the arguments:
# e.g. --steps 60 --workdir /tmp/quickstart for a shortened run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_venv.sh
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python examples/quickstart.py "$@"
