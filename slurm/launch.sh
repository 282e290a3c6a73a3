# Sourced by the sbatch scripts beside it (not run on its own): environment, launch, preemption
# and requeue for one ulysses training job. The scripts set the defaults; the environment (or
# `sbatch --export=ALL,NAME=value`) overrides them:
#   EXPERIMENT   experiment TOML
#   ULYSSES      the trainer binary (default target/release/ulysses)
#   LAUNCHER     mpirun: the MPICH mpirun next to the binary's libraries (scripts/env.sh puts it
#                on PATH); under Slurm it starts its proxies with srun. srun: srun --mpi=pmi2.
#   ULYSSES_ENV  a file to source first (default scripts/env.sh when it exists)
#   ULYSSES_ARGS more arguments for ulysses, split at spaces (e.g. `--set parallel.dp=auto`)
# Preemption: Slurm signals the batch shell (`--signal=B:USR1@300`: 5 minutes before the time
# limit; or `scancel --signal=USR1 --batch JOB`); the trap forwards it to the launcher, which
# forwards it to every rank; the ranks agree at the next step boundary, save a checkpoint and exit
# 75 (ulysses' status for "preempted at a checkpoint"; 0 means the run is complete); then the job
# requeues itself and the next start resumes (checkpoint.resume = "auto"). A preemption that
# signals every process (PreemptMode=REQUEUE sends SIGTERM) works the same way.
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$PWD}"
: "${EXPERIMENT:?set EXPERIMENT to an experiment TOML}"
ULYSSES="${ULYSSES:-target/release/ulysses}"
LAUNCHER="${LAUNCHER:-mpirun}"
ULYSSES_ENV="${ULYSSES_ENV:-scripts/env.sh}"
if [ -f "$ULYSSES_ENV" ]; then
  # shellcheck disable=SC1090
  source "$ULYSSES_ENV"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
echo "[slurm] job ${SLURM_JOB_ID:-?} start $((${SLURM_RESTART_COUNT:-0} + 1)) on ${SLURM_JOB_NODELIST:-?}: ${SLURM_NTASKS:-?} ranks, $EXPERIMENT"

case "$LAUNCHER" in
  mpirun) launch=(mpirun -n "$SLURM_NTASKS" -ppn "${SLURM_NTASKS_PER_NODE:-$SLURM_NTASKS}") ;;
  srun) launch=(srun --mpi=pmi2 --kill-on-bad-exit=1 --cpu-bind=none) ;;
  *) echo "[slurm] LAUNCHER must be mpirun or srun, not $LAUNCHER" >&2; exit 2 ;;
esac

forward() {
  echo "[slurm] $1 received: asking the ranks to save a checkpoint and stop"
  kill -USR1 "$pid" 2>/dev/null || true
}
trap 'forward SIGUSR1' USR1
trap 'forward SIGTERM' TERM

# shellcheck disable=SC2086 # ULYSSES_ARGS is a list of words
"${launch[@]}" "$ULYSSES" "$EXPERIMENT" ${ULYSSES_ARGS:-} &
pid=$!
# A trapped signal interrupts `wait` (status > 128) while the launcher still runs: wait again.
while :; do
  rc=0
  wait "$pid" || rc=$?
  if [ "$rc" -gt 128 ] && kill -0 "$pid" 2>/dev/null; then continue; fi
  break
done

if [ "$rc" = 75 ]; then
  echo "[slurm] stopped at a checkpoint; requeueing job $SLURM_JOB_ID to resume"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$rc"
