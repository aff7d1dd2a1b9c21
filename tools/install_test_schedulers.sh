#!/usr/bin/env bash
# Install what tests/cluster runs on this host, from Debian's packages, with --no-install-recommends:
#   slurmctld slurmd slurm-client munge      SLURM: a controller, a node daemon per test node, sbatch/srun
#   gridengine-master gridengine-exec        Son of Grid Engine (qsub, qrsh): TSUBAME 4.0's scheduler family
#     gridengine-client
#   openmpi-bin                              mpirun, tsubame/pretrain.sh's default launcher
#   msmtp-mta                                only if no mail transport is installed: Grid Engine needs a mail
#                                            client (bsd-mailx) that needs one; msmtp is a relay-only sendmail
#                                            with no daemon, in place of Debian's default, the exim4 mail server
#   bash tools/install_test_schedulers.sh [slurm|gridengine|mpi|all]     (default all)
# It says what it installs before it does. Nothing is configured or started: the tests write their own
# configuration into a temporary folder and start and stop the daemons themselves; package scripts are
# kept from starting services. MEGATRON_JP_CLUSTER_TESTS=skip installs nothing (the cluster tests then skip).
# Exit status: 0 installed (or already there), 3 not root and something is missing, 4 apt failed,
# 5 skipped by MEGATRON_JP_CLUSTER_TESTS=skip.
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
if [ "$WHAT" = mpi ] || [ "$WHAT" = gridengine ] || [ "$WHAT" = all ]; then
  need mpirun openmpi-bin
fi
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "${MEGATRON_JP_CLUSTER_TESTS:-}" = skip ]; then
  echo "install_test_schedulers: MEGATRON_JP_CLUSTER_TESTS=skip: not installing ${missing[*]}" >&2
  exit 5
fi
# a mail transport for Grid Engine's mail client, without a mail server (never replacing one that is there)
if [[ " ${missing[*]} " == *" gridengine-"* ]] && [ ! -e /usr/sbin/sendmail ]; then missing+=(msmtp-mta); fi
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
if [ "$(id -u)" != 0 ]; then
  echo "install_test_schedulers: not root; as root: apt-get install --no-install-recommends ${missing[*]}" >&2
  exit 3
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_test_schedulers: no apt-get here; install ${missing[*]} with this system's packages" >&2
  exit 4
fi
echo "install_test_schedulers: installing ${missing[*]} (and what they depend on) from Debian with" \
  "--no-install-recommends, for the cluster tests (real SLURM, Grid Engine and mpirun on this host; see the" \
  "top of tools/install_test_schedulers.sh). MEGATRON_JP_CLUSTER_TESTS=skip skips this and those tests." >&2
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
