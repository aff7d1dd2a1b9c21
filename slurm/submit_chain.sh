#!/bin/bash
# Submit N jobs that run one after another, each resuming from the previous one's checkpoint
# (the trainer resumes from CKPT_DIR/latest by itself): --dependency=afterany, so that a job that
# hit its time limit, failed or was preempted still hands over to the next one.
#   slurm/submit_chain.sh N [SBATCH_OPTIONS...] SCRIPT.sbatch CONFIG.yaml [--section.key VALUE ...]
#   slurm/submit_chain.sh 5 --nodes=4 --time=24:00:00 slurm/pretrain_srun.sbatch examples/tohoku-bert-500m.yaml
# sbatch options go before the script, in --option=value form. Prints the job ids, one a line.
# Preemption and node failures: add --requeue (and --open-mode=append to keep each start's log):
#   slurm/submit_chain.sh 5 --requeue --open-mode=append --nodes=4 slurm/pretrain_srun.sbatch CONFIG.yaml
# SLURM then puts a preempted job, or one whose node failed, back in the queue under the same id (it
# gets SIGTERM first: the run saves after the current step); it resumes from CKPT_DIR/latest, with the
# losses of an uninterrupted run (tests/cluster/test_requeue.py).
# A job that starts after training is complete prints "nothing to do" and ends at once.
set -euo pipefail
N=${1:?usage: slurm/submit_chain.sh N [SBATCH_OPTIONS...] SCRIPT.sbatch CONFIG.yaml [overrides...]}
shift
[[ $N =~ ^[1-9][0-9]*$ ]] || { echo "submit_chain.sh: N must be a positive number of jobs, got '$N'" >&2; exit 2; }
options=()
while [ $# -gt 0 ] && [[ $1 == -* ]]; do options+=("$1"); shift; done
SCRIPT=${1:?submit_chain.sh: no sbatch script given}
if [ ! -f "$SCRIPT" ]; then
  echo "submit_chain.sh: $SCRIPT is not a file (sbatch options take the --option=value form)" >&2
  exit 2
fi
shift
previous=""
for _ in $(seq "$N"); do
  dependency=()
  [ -n "$previous" ] && dependency=(--dependency="afterany:$previous")
  previous=$(sbatch --parsable "${dependency[@]}" "${options[@]}" "$SCRIPT" "$@")
  previous=${previous%%;*}   # --parsable prints "id" or "id;cluster"
  echo "$previous"
done
