#!/bin/bash
# Pretrain on TSUBAME 4.0 (Altair Grid Engine): one torchrun per node, 4 H100 SXM5 (94 GB) per node_f.
#   qsub -g GROUP -l node_f=4 -l h_rt=24:00:00 tsubame/pretrain.sh examples/tohoku-bert-500m.yaml [--section.key VALUE ...]
# Without -g GROUP a job is a 10-minute trial. Options on the qsub line override the #$ lines below;
# h_rt is HH:MM:SS. The hosts come from $PE_HOSTFILE; the first one hosts the rendezvous.
#   LAUNCHER=mpirun (default: OpenMPI, `module load openmpi` first) or qrsh (qrsh -inherit per host)
#   GPUS_PER_NODE=4 processes per node (CPU processes for a test); DRY_RUN=1 prints the commands only.
# Bad input (no config, no hosts, an unknown launcher) ends the job at once: one `error:` line, status 2.
#$ -cwd
#$ -N megatron_jp
#$ -l node_f=2
#$ -l h_rt=01:00:00
#$ -j y
#$ -o logs/
set -euo pipefail
die() { echo "error: tsubame/pretrain.sh: $*" >&2; exit 2; }
# Your environment: modules and the virtual environment (qsub -V passes the submitting shell's instead).
# module load cuda/12.4   # e.g.
[ -f .venv/bin/activate ] && [ -z "${VIRTUAL_ENV:-}" ] && . .venv/bin/activate

[ $# -ge 1 ] || die "no config given; usage: qsub -g GROUP tsubame/pretrain.sh CONFIG.yaml [overrides...]"
CONFIG=$1
shift
[ -f "$CONFIG" ] || die "config $CONFIG is not a file (from $PWD)"
GPUS_PER_NODE=${GPUS_PER_NODE:-4}
[[ $GPUS_PER_NODE =~ ^[1-9][0-9]*$ ]] || die "GPUS_PER_NODE=$GPUS_PER_NODE is not a positive number"
LAUNCHER=${LAUNCHER:-mpirun}
case $LAUNCHER in mpirun|qrsh) ;; *) die "LAUNCHER=$LAUNCHER (choose mpirun or qrsh)" ;; esac
[ -n "${PE_HOSTFILE:-}" ] || die "not under Grid Engine: PE_HOSTFILE is not set (submit with qsub -l node_f=N)"
[ -r "$PE_HOSTFILE" ] || die "PE_HOSTFILE $PE_HOSTFILE cannot be read"

# $PE_HOSTFILE: one line per host, "hostname slots queue processors"; a host may appear twice.
mapfile -t HOSTS < <(awk 'NF && !seen[$1]++ {print $1}' "$PE_HOSTFILE")
NNODES=${#HOSTS[@]}
[ "$NNODES" -ge 1 ] || die "$PE_HOSTFILE lists no host"
if [ "$LAUNCHER" = mpirun ] && [ -z "${DRY_RUN:-}" ] && ! command -v mpirun >/dev/null; then
  die "mpirun not found: module load openmpi first, or submit with -v LAUNCHER=qrsh"
fi
MASTER_ADDR=${HOSTS[0]}
MASTER_PORT=${MASTER_PORT:-$((29500 + ${JOB_ID:-0} % 2000))}   # two jobs on one node do not collide
export MASTER_ADDR MASTER_PORT

# The data index cache on node-local scratch ($TMPDIR, per job and node): home and group disks are
# shared file systems, slow for the random reads of a memory-mapped index. Each node works out its own
# $TMPDIR (NODE_LOCAL below) and each job builds the cache again (about 13 s per 100M documents); set
# INDEX_CACHE_DIR to a lasting folder to build it once. Compiled kernels stay in RUN_DIR/compile_cache
# (train.compile_cache_dir), so a chained job does not compile again.
SCRATCH=${TMPDIR:-${TMP:-/tmp}}/megatron_jp
# mpirun drops TMPDIR from the torchrun it starts on its own node (seen with Debian's OpenMPI 4.1): that
# one falls back to this node's scratch, passed along as MEGATRON_JP_TMPDIR
export MEGATRON_JP_TMPDIR=${TMPDIR:-${TMP:-/tmp}}

# gloo takes an interface name (default: the one holding the first host's address), NCCL exclusions.
MASTER_IP=$(getent ahostsv4 "$MASTER_ADDR" | awk 'NR == 1 {print $1}' || true)
GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-${SOCKET_IFNAME:-$(ip -o -4 addr show 2>/dev/null |
  awk -v ip="$MASTER_IP" '{split($4, a, "/")} a[1] == ip {print $2; exit}' || true)}}
[ -n "$GLOO_SOCKET_IFNAME" ] && export GLOO_SOCKET_IFNAME
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-${SOCKET_IFNAME:-^lo,docker}}
export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
# no CUDA_DEVICE_MAX_CONNECTIONS=1: it helps only tensor-parallel comm overlap (none here) and
# serialises the data-parallel gradient sums with compute
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export HF_HUB_OFFLINE=1

TRAIN=(torchrun --nnodes="$NNODES" --nproc-per-node="$GPUS_PER_NODE"
       --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="${JOB_ID:-megatron_jp}"
       -m megatron_jp.train --config "$CONFIG" "$@")
case " $* " in
  *" --data.cache_dir "*) ;;  # the command line names it
  *) NODE_LOCAL='exec "$@" --data.cache_dir "${INDEX_CACHE_DIR:-${TMPDIR:-$MEGATRON_JP_TMPDIR}/megatron_jp/index_cache}"'
     TRAIN=(bash -c "$NODE_LOCAL" bash "${TRAIN[@]}") ;;
esac
# what the remote torchruns need of this environment (mpirun and qrsh start them afresh)
PASS=(PATH LD_LIBRARY_PATH PYTHONPATH VIRTUAL_ENV MASTER_ADDR MASTER_PORT OMP_NUM_THREADS HF_HUB_OFFLINE
      TORCH_NCCL_ASYNC_ERROR_HANDLING INDEX_CACHE_DIR MEGATRON_JP_TMPDIR
      $(compgen -e | grep -E '^(NCCL|GLOO|UCX)_' || true))

echo "rendezvous: $MASTER_ADDR:$MASTER_PORT, $NNODES node(s) (${HOSTS[*]}) of job ${JOB_ID:-?}," \
  "gloo on ${GLOO_SOCKET_IFNAME:-(default)}"
mkdir -p logs "$SCRATCH"
case $LAUNCHER in
  mpirun)
    HOSTFILE=$SCRATCH/hostfile
    printf '%s slots=1\n' "${HOSTS[@]}" > "$HOSTFILE"
    COMMAND=(mpirun -n "$NNODES" -npernode 1 -hostfile "$HOSTFILE" --bind-to none)
    for name in "${PASS[@]}"; do [ -n "${!name+x}" ] && COMMAND+=(-x "$name"); done
    COMMAND+=("${TRAIN[@]}")
    if [ -n "${DRY_RUN:-}" ]; then printf '%q ' "${COMMAND[@]}"; echo; exit 0; fi
    exec "${COMMAND[@]}" ;;
  qrsh)   # Grid Engine's own remote start; the PE must allow it (control_slaves TRUE)
    ENVIRONMENT=(env)
    for name in "${PASS[@]}"; do [ -n "${!name+x}" ] && ENVIRONMENT+=("$name=${!name}"); done
    # qrsh joins its arguments into one line for a shell on the host: hand it one quoted line
    REMOTE="cd $(printf '%q' "$PWD") && exec $(printf '%q ' "${ENVIRONMENT[@]}" "${TRAIN[@]}")"
    pids=()
    for host in "${HOSTS[@]}"; do
      if [ -n "${DRY_RUN:-}" ]; then echo "qrsh -inherit -nostdin $host $REMOTE"; continue; fi
      qrsh -inherit -nostdin "$host" "$REMOTE" & pids+=($!)
    done
    status=0
    for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
    exit $status ;;
esac
