#!/usr/bin/env bash
# Install the schedulers that tests/cluster starts on this host: SLURM (slurmctld, slurmd, munge) and,
# where Debian ships it, Son of Grid Engine (gridengine-master/-exec/-client), from Debian's packages.
#   bash tools/install_test_schedulers.sh [slurm|gridengine|all]     (default all)
# Nothing is configured or started here: the tests write their own configuration into a temporary
# folder and start and stop the daemons themselves. Package scripts are kept from starting services.
# Exit status: 0 installed (or already there), 3 not root and something is missing, 4 apt failed.
set -uo pipefail
WHAT=${1:-all}
missing=()
need() { command -v "$1" >/dev/null 2>&1 || missing+=("$2"); }
if [ "$WHAT" = slurm ] || [ "$WHAT" = all ]; then
  need slurmctld slurmctld; need slurmd slurmd; need sbatch slurm-client; need munged munge
fi
if [ "$WHAT" = gridengine ] || [ "$WHAT" = all ]; then
  # Debian installs the SGE binaries under /usr/lib/gridengine and /usr/sbin
  need sge_qmaster gridengine-master; need sge_execd gridengine-exec; need qsub gridengine-client
fi
[ ${#missing[@]} -eq 0 ] && exit 0
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
if [ "$(id -u)" != 0 ]; then
  echo "install_test_schedulers: not root; install them with: apt-get install ${missing[*]}" >&2
  exit 3
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_test_schedulers: no apt-get here; install ${missing[*]} with this system's packages" >&2
  exit 4
fi
# Keep the packages' maintainer scripts from starting system-wide daemons (a test host is no cluster):
# a policy-rc.d that refuses every start, removed afterwards if it was ours.
ours=""
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && ours=1
fi
log=$(mktemp)
export DEBIAN_FRONTEND=noninteractive
# gridengine-master asks debconf questions; the defaults (cell "default", no automatic configuration)
# leave the configuration to the tests
echo "gridengine-common shared/gridenginemaster string $(hostname -f 2>/dev/null || hostname)" | debconf-set-selections 2>/dev/null
echo "gridengine-common shared/gridengineconfig boolean false" | debconf-set-selections 2>/dev/null
status=0
if ! apt-get install -y -q --no-install-recommends "${missing[@]}" >"$log" 2>&1; then
  # the package lists may be missing or stale on a fresh machine
  if ! { apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}"; } >>"$log" 2>&1; then
    echo "install_test_schedulers: apt-get install ${missing[*]} failed:" >&2
    tail -n 15 "$log" >&2
    status=4
  fi
fi
[ -n "$ours" ] && rm -f /usr/sbin/policy-rc.d
rm -f "$log"
exit $status
