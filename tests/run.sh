#!/usr/bin/env bash
# The test command of the README: set up .venv, then run unit, distributed and (where CUDA exists)
# GPU tests, and the cluster tests under real schedulers (as root; tools/install_test_schedulers.sh installs
# them from Debian's packages, saying which and why; MEGATRON_JP_CLUSTER_TESTS=skip skips both).
# Extra arguments go to pytest (e.g. `bash tests/run.sh tests/unit -k parity`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_venv.sh
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# tests/cluster runs real schedulers: install them first, saying what and why, unless the user says
# MEGATRON_JP_CLUSTER_TESTS=skip (those tests then skip, saying how to run them)
case " ${*:-tests} " in
  *" tests "*|*" tests/ "*|*" tests/cluster"*)
    bash tools/install_test_schedulers.sh all || echo "tests/run.sh: the cluster tests will skip (see above)" >&2 ;;
esac
python -m pytest -q -p no:cacheprovider --durations=15 "${@:-tests}"
