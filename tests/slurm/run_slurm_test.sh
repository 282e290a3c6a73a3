#!/usr/bin/env bash
# The Slurm path for real, on this machine alone (as root, fresh Debian 12 or the dev box):
# installs munge and Slurm (Debian's slurm-wlm), starts munged, slurmctld and slurmd on
# localhost with a minimal slurm.conf, then `sbatch slurm/train_1m.sh` with a tiny CPU
# experiment (2 ranks). While it trains, `scancel --signal=USR1 --batch` plays the time-limit
# warning: the ranks must checkpoint and exit 75, the job must requeue itself and the second start
# must resume and finish. Checks the job's metrics.h5 (every step exactly once) and checkpoints.
# Needs target/debug/ulysses (make test builds it). Every daemon it starts is stopped on exit.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
START=$(date +%s)
say() { echo "[slurm-test $(($(date +%s) - START))s] $*"; }
BIN="$ROOT/target/debug/ulysses"
[ -x "$BIN" ] || { echo "missing $BIN: build first (make build)" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "run as root (it starts munged, slurmctld and slurmd)" >&2; exit 1; }

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
  say "installing munge and Slurm"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi

WORK="$(mktemp -d /tmp/ulysses-slurm.XXXXXX)"
chmod 755 "$WORK"
HOST="$(hostname -s)"
export SLURM_CONF="$WORK/slurm.conf"
# Stops the daemons this script started (by their pid files), then removes the work folder.
cleanup() {
  for pidfile in "$WORK/slurmd.pid" "$WORK/slurmctld.pid" "$WORK/munge/munged.pid"; do
    if [ -f "$pidfile" ]; then kill "$(cat "$pidfile")" 2>/dev/null || true; fi
  done
  sleep 1
  rm -rf "$WORK"
}
trap cleanup EXIT
fail() {
  say "FAILED: $*"
  for f in "$WORK"/job-*.out "$WORK/slurmctld.log" "$WORK/slurmd.log" "$WORK/munge/munged.log"; do
    [ -f "$f" ] && { echo "----- $f"; tail -n 60 "$f"; }
  done
  exit 1
}

# munge: a key, and munged as the munge user on its own socket.
if [ ! -s /etc/munge/munge.key ]; then
  mungekey --create --keyfile=/etc/munge/munge.key
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/lib/munge /var/log/munge
chown munge:munge /run/munge /var/lib/munge /var/log/munge
mkdir -p "$WORK/munge" && chown munge "$WORK/munge"
SOCKET="$WORK/munge/munge.socket"
runuser -u munge -- munged --socket="$SOCKET" --pid-file="$WORK/munge/munged.pid" --log-file="$WORK/munge/munged.log" --force

CPUS="$(nproc)"
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))
mkdir -p "$WORK/state" "$WORK/spool"
cat > "$SLURM_CONF" <<CONF
ClusterName=ulysses-ci
SlurmctldHost=$HOST(127.0.0.1)
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$WORK/state
SlurmdSpoolDir=$WORK/spool
SlurmctldPidFile=$WORK/slurmctld.pid
SlurmdPidFile=$WORK/slurmd.pid
SlurmctldLogFile=$WORK/slurmctld.log
SlurmdLogFile=$WORK/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
MinJobAge=600
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=ci Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
say "starting slurmctld and slurmd ($HOST, $CPUS CPUs)"
slurmctld -c -f "$SLURM_CONF" || fail "slurmctld did not start"
slurmd -f "$SLURM_CONF" || fail "slurmd did not start"
for _ in $(seq 60); do
  sinfo -h -o %T 2>/dev/null | grep -qx idle && break
  sleep 1
done
sinfo -h -o %T | grep -qx idle || fail "the node did not become idle: $(sinfo 2>&1)"

say "making a tiny CPU experiment"
DATA="$WORK/data"
"$BIN" data synth --task passkey --seq-len 256 --num 32 --seed 5 --out "$DATA" >/dev/null
STEPS=80
cat > "$WORK/tiny.toml" <<TOML
[run]
name = "slurm"
output_dir = "$WORK/runs"
seed = 3
[model]
preset = "tiny"
[parallel]
sp = 2
dp = 1
[data]
paths = ["$DATA"]
seq_len = 256
[train]
steps = $STEPS
lr = 2e-3
warmup_steps = 2
[checkpoint]
every = 20
keep = 2
resume = "auto"
[metrics]
position_loss_every = 10
position_bins = 8
TOML
RUN="$WORK/runs/slurm"

say "sbatch slurm/train_1m.sh (2 ranks, CPU)"
JOB=$(sbatch --parsable --nodes=1 --ntasks-per-node=2 --cpus-per-task=1 --gpus-per-node=0 \
  --time=10 --output="$WORK/job-%j.out" \
  --export=ALL,EXPERIMENT="$WORK/tiny.toml",ULYSSES="$BIN",ULYSSES_ENV="$ROOT/scripts/env.sh" \
  slurm/train_1m.sh) || fail "sbatch refused the job"
OUT="$WORK/job-$JOB.out"
state() { scontrol show job "$JOB" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p'; }

for _ in $(seq 240); do
  grep -q "step     5/$STEPS" "$OUT" 2>/dev/null && break
  sleep 0.5
done
grep -q "step     5/$STEPS" "$OUT" 2>/dev/null || fail "the job did not reach step 5 (state $(state))"
say "job $JOB is training; sending the time-limit signal (SIGUSR1 to the batch shell)"
scancel --signal=USR1 --batch "$JOB"
for _ in $(seq 120); do
  grep -q "requeueing job $JOB" "$OUT" 2>/dev/null && [ "$(state)" = PENDING ] && break
  sleep 0.5
done
[ "$(state)" = PENDING ] || fail "job $JOB did not requeue itself (state $(state))"
# Slurm holds a requeued job back for a while (Reason=BeginTime, about two minutes); a test
# need not wait for that, but past the second of the first start's end it must: slurmd refuses
# a credential issued in the same second as the revocation of the old one ("Job credential
# revoked", the job FAILED). A start time in the future would wait for the scheduler's next
# periodic pass (a minute); now, two seconds on, starts it at once.
sleep 2
scontrol update JobId="$JOB" StartTime=now
say "job $JOB requeued itself ($(scontrol show job "$JOB" | grep -o 'Restarts=[0-9]*')); waiting for it to resume and finish"

for _ in $(seq 240); do
  s="$(state)"
  [ "$s" = COMPLETED ] && grep -q "resuming from" "$OUT" && break
  case "$s" in FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY) fail "job $JOB ended $s" ;; esac
  sleep 0.5
done
[ "$(state)" = COMPLETED ] || fail "job $JOB did not complete (state $(state))"

say "checking the run"
grep -q "preempted (SIGTERM/SIGUSR1): stopped after step" "$OUT" || fail "no preemption stop in the job log"
grep -q "requeueing job $JOB" "$OUT" || fail "the job did not requeue itself"
grep -q "resuming from $RUN/checkpoints/step-" "$OUT" || fail "the second start did not resume"
[ -f "$RUN/checkpoints/step-0000$STEPS/COMPLETE" ] || fail "no final checkpoint"
[ -f "$RUN/final/model.safetensors" ] || fail "no final model"
[ -f "$RUN/final/ulysses-export.json" ] || fail "final is not the export of the last checkpoint"
ls "$RUN/checkpoints/step-0000$STEPS"/rank-*-of-*.safetensors >/dev/null || fail "no rank files (shards and optimizer state) in the last checkpoint"
"$ROOT/.venv/bin/python" - "$RUN/metrics.h5" "$STEPS" <<'PY' || fail "metrics.h5 is not as expected"
import sys, h5py, numpy as np
path, steps = sys.argv[1], int(sys.argv[2])
with h5py.File(path, "r") as f:
    s = f["steps/step"][:]
    assert list(s) == list(range(1, steps + 1)), f"steps {list(s)}"
    loss = f["steps/loss"][:]
    assert np.isfinite(loss).all() and loss[-1] < loss[0], f"loss {loss[0]} -> {loss[-1]}"
    assert f["steps/peak_host_mem"].shape == (steps, 2), f["steps/peak_host_mem"].shape
    assert (f["steps/peak_host_mem"][:] > 0).all()
    assert list(f["position_loss/step"][:]) == list(range(10, steps + 1, 10))
    print(f"metrics.h5: {len(s)} steps, loss {loss[0]:.3f} -> {loss[-1]:.3f}")
PY
"$BIN" report "$RUN" >/dev/null || fail "ulysses report failed"
say "passed: preempted at step $(sed -n 's/.*stopped after step \([0-9]*\).*/\1/p' "$OUT" | head -1), requeued, resumed, finished $STEPS steps"
echo "slurm: 1 passed, 0 failed"
