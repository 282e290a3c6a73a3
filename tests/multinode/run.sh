#!/usr/bin/env bash
# Two nodes on one machine, for real over a network (make test; needs root): two network
# namespaces with their own host names and a veth pair between them (tests/multinode/fake_nodes.sh)
# hold a 4-rank CPU job as 2 nodes × 2 ranks, started by mpirun with a host list, whose "ssh"
# into a node is tests/multinode/netns-ssh. Asserts:
# 1. each node's ranks find their node-local rank, and the start-up printout says which node
#    holds which rank; SP groups that would span the nodes are refused before training;
#    the hosts come from a host list (-hosts) and, for one job, a hostfile (-f);
# 2. the losses equal the same job on one node bit for bit (sp = 2 within each node, dp = 2
#    across them: the same ranks do the same arithmetic);
# 3. a checkpoint written on two nodes resumes on one, and one written on one resumes on two,
#    the losses again bit for bit;
# 4. killing the ranks of one node (kill -9) ends the whole job within KILL_BOUND_S seconds;
# 5. the watchdog with a run folder the nodes do not share (node-b's ranks write their reports
#    where node-a's cannot read them): the job still ends, and the message names the other node's
#    ranks as unseen, among the causes a node that does not see the run folder (docs/multinode.md);
# 6. `sbatch -N 2 slurm/multinode.sh` under a local Slurm with one slurmd in each fake node
#    (slurmctld on node-a, munged's socket shared as a file) trains with the one-node losses.
# Every namespace and process it starts is removed on exit, failed or not.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
START=$(date +%s)
say() { echo "[multinode-test $(($(date +%s) - START))s] $*"; }
BIN="$ROOT/target/debug/ulysses"
[ -x "$BIN" ] || { echo "missing $BIN: build first (make build)" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "run as root (it makes network namespaces)" >&2; exit 1; }
source scripts/env.sh
MPIRUN="$(command -v mpirun)"
PY="$ROOT/.venv/bin/python"
KILL_BOUND_S=30

WORK="$(mktemp -d /tmp/ulysses-multinode.XXXXXX)"
source tests/multinode/fake_nodes.sh
cleanup() {
  fake_nodes_down
  rm -rf "$WORK"
}
trap cleanup EXIT
fail() {
  say "FAILED: $*"
  for f in "$WORK"/*.log; do
    [ -f "$f" ] && { echo "----- $f"; tail -n 40 "$f"; }
  done
  exit 1
}
fake_nodes_up
export FAKE_NODES="$NODE_A=$NS_A $NODE_B=$NS_B"
say "fake nodes $NODE_A ($ADDR_A, namespace $NS_A) and $NODE_B ($ADDR_B, namespace $NS_B)"

# mpirun on node A over both nodes, 2 ranks each; MPI's traffic between them goes over the veth
# (TCP through libfabric: the namespaces have no other way between them). The nodes come from a
# host list, or with HOSTFILE=FILE from that hostfile.
two_nodes() {  # log, ulysses args...
  local log="$1" hosts=(-hosts "$NODE_A:2,$NODE_B:2")
  shift
  [ -z "${HOSTFILE:-}" ] || hosts=(-f "$HOSTFILE")
  on_node "$NODE_A" env OMP_NUM_THREADS=1 RUST_LOG=info MPIR_CVAR_CH4_NETMOD=ofi FI_PROVIDER=tcp \
    "$MPIRUN" -launcher ssh -launcher-exec "$ROOT/tests/multinode/netns-ssh" \
    "${hosts[@]}" -n 4 "$BIN" "$@" >"$log" 2>&1
}
one_node() {  # log, ulysses args...
  local log="$1"
  shift
  env OMP_NUM_THREADS=1 "$MPIRUN" -n 4 "$BIN" "$@" >"$log" 2>&1
}

"$BIN" data synth --task passkey --seq-len 128 --num 32 --seed 3 --out "$WORK/data" >/dev/null
exp() {  # name steps
  cat >"$WORK/$1.toml" <<TOML
[run]
name = "$1"
output_dir = "$WORK/runs"
seed = 11
[model]
preset = "tiny"
[parallel]
sp = 2
dp = 2
[data]
paths = ["$WORK/data"]
seq_len = 128
[train]
steps = $2
lr = 2e-3
min_lr = 2e-4
warmup_steps = 1
[checkpoint]
every = 2
keep = 3
resume = "auto"
TOML
}
losses() {  # run folder -> "step loss" lines, the loss as its exact bits
  "$PY" - "$1/metrics.h5" <<'PY'
import sys, h5py
with h5py.File(sys.argv[1], "r") as f:
    for s, l in zip(f["steps/step"][:], f["steps/loss"][:]):
        print(int(s), float(l).hex())
PY
}

say "1. the job on one node (reference), then on two"
exp one 6
exp two 6
one_node "$WORK/one.log" "$WORK/one.toml" || fail "the one-node job failed"
two_nodes "$WORK/two.log" "$WORK/two.toml" || fail "the two-node job failed"
grep -q "^nodes      $NODE_A holds ranks 0-1$" "$WORK/two.log" || fail "the printout does not say that $NODE_A holds ranks 0-1"
grep -q "^           $NODE_B holds ranks 2-3$" "$WORK/two.log" || fail "the printout does not say that $NODE_B holds ranks 2-3"
for r in 0 1 2 3; do
  node=$([ $r -lt 2 ] && echo "$NODE_A" || echo "$NODE_B")
  grep -q "^\[rank $r\] INFO: on node $node: node-local rank $((r % 2)) of 2" "$WORK/two.log" ||
    fail "rank $r did not find itself as node-local rank $((r % 2)) on $node"
done
[ "$(losses "$WORK/runs/one")" = "$(losses "$WORK/runs/two")" ] || {
  paste <(losses "$WORK/runs/one") <(losses "$WORK/runs/two")
  fail "the losses on two nodes differ from those on one"
}
[ "$(losses "$WORK/runs/one" | wc -l)" = 6 ] || fail "the reference run has not 6 steps"
say "   losses equal bit for bit over 6 steps"

say "2. SP groups that would span the nodes are refused"
if two_nodes "$WORK/span.log" "$WORK/two.toml" --set parallel.sp=4 --set parallel.dp=1 --set run.name=span; then
  fail "sp = 4 over two nodes of 2 ranks trained"
fi
grep -q "parallel.sp = 4 puts world ranks 0..3 in one SP group, but they lie on 2 nodes ($NODE_A holds 0-1; $NODE_B holds 2-3)" "$WORK/span.log" ||
  fail "no clear error for SP groups spanning nodes"
! grep -q "panicked" "$WORK/span.log" || fail "a panic instead of an error"
[ ! -e "$WORK/runs/span/metrics.h5" ] || fail "the refused job wrote metrics"

say "3. checkpoints cross between two nodes and one (the two-node resume with a hostfile)"
printf '%s:2\n%s:2\n' "$NODE_A" "$NODE_B" >"$WORK/hosts.txt"
for pair in "two one two-on-one" "one two one-on-two"; do
  read -r from layout name <<<"$pair"
  mkdir -p "$WORK/runs/$name/checkpoints"
  cp -a "$WORK/runs/$from/checkpoints/step-000002" "$WORK/runs/$name/checkpoints/"
  exp "$name" 6
  if [ "$layout" = one ]; then one_node "$WORK/$name.log" "$WORK/$name.toml"; else
    HOSTFILE="$WORK/hosts.txt" two_nodes "$WORK/$name.log" "$WORK/$name.toml"; fi ||
    fail "$name: the resumed job failed"
  [ "$layout" = one ] || grep -q "^           $NODE_B holds ranks 2-3$" "$WORK/$name.log" ||
    fail "$name: the hostfile's job does not say that $NODE_B holds ranks 2-3"
  grep -q "resuming from $WORK/runs/$name/checkpoints/step-000002" "$WORK/$name.log" || fail "$name did not resume from step 2"
  [ "$(losses "$WORK/runs/$name")" = "$(losses "$WORK/runs/one" | tail -n 4)" ] || {
    paste <(losses "$WORK/runs/one" | tail -n 4) <(losses "$WORK/runs/$name")
    fail "$name: steps 3-6 differ from the uninterrupted run"
  }
  say "   $name: written by the $from-node job's step 2, steps 3-6 equal bit for bit"
done

say "4. killing one node's ranks ends the whole job"
exp long 100000
two_nodes "$WORK/long.log" "$WORK/long.toml" &
job=$!
for _ in $(seq 600); do
  grep -q "step     3/" "$WORK/long.log" 2>/dev/null && break
  kill -0 "$job" 2>/dev/null || fail "the long job ended early"
  sleep 0.2
done
grep -q "step     3/" "$WORK/long.log" || fail "the long job did not reach step 3"
victims="$(for p in $(ip netns pids "$NS_B"); do [ "$(cat /proc/"$p"/comm 2>/dev/null)" = ulysses ] && echo "$p"; done)"
[ "$(echo "$victims" | wc -w)" = 2 ] || fail "expected 2 ranks on $NODE_B, found: $victims"
killed=$(date +%s.%N)
kill -9 $victims
rc=0
for _ in $(seq $((KILL_BOUND_S * 10))); do kill -0 "$job" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$job" 2>/dev/null; then
  fail "the job still runs $KILL_BOUND_S s after $NODE_B's ranks were killed"
fi
wait "$job" || rc=$?
took=$(awk "BEGIN { printf \"%.1f\", $(date +%s.%N) - $killed }")
[ "$rc" != 0 ] || fail "the job exited 0 after losing a node's ranks"
# mpirun may return while the ranks it killed are still being torn down: a few seconds' grace.
ranks_left() { for p in $(ip netns pids "$NS_A") $(ip netns pids "$NS_B"); do [ "$(cat /proc/"$p"/comm 2>/dev/null)" = ulysses ] && echo "$p"; done; }
for _ in $(seq 50); do [ -z "$(ranks_left)" ] && break; sleep 0.2; done
[ -z "$(ranks_left)" ] || fail "ranks $(ranks_left) outlived the job by 10 s"
say "   the job ended (exit $rc) ${took} s after $NODE_B's ranks were killed (bound ${KILL_BOUND_S} s)"

say "5. the watchdog when the nodes do not share the run folder"
# node-b's ranks get their own empty RUN_DIR/watchdog: each node sees only its own reports.
exp private 100000
mkdir -p "$WORK/runs/private/watchdog"
FAKE_PRIVATE="$WORK/runs/private/watchdog" two_nodes "$WORK/private.log" "$WORK/private.toml" \
  --set parallel.collective_timeout_s=4 &
job=$!
for _ in $(seq 600); do
  grep -q "step     3/" "$WORK/private.log" 2>/dev/null && break
  kill -0 "$job" 2>/dev/null || fail "the job ended early"
  sleep 0.2
done
victim="$(for p in $(ip netns pids "$NS_B"); do
  [ "$(cat /proc/"$p"/comm 2>/dev/null)" = ulysses ] && tr '\0' '\n' </proc/"$p"/environ | grep -qx PMI_RANK=3 && echo "$p"
done)"
[ -n "$victim" ] || fail "rank 3 not found on $NODE_B"
kill -STOP "$victim"
stopped=$(date +%s.%N)
for _ in $(seq 300); do kill -0 "$job" 2>/dev/null || break; sleep 0.1; done
kill -0 "$job" 2>/dev/null && fail "the job still runs 30 s after rank 3 was stopped"
rc=0
wait "$job" || rc=$?
took=$(awk "BEGIN { printf \"%.1f\", $(date +%s.%N) - $stopped }")
kill -9 "$victim" 2>/dev/null || true
[ "$rc" != 0 ] || fail "the job exited 0"
grep -q "collective watchdog: no progress for" "$WORK/private.log" || fail "no watchdog message"
# The lowest rank each node sees prints (rank 0, or rank 2 of node-b, whichever aborts first):
# the stopped rank and the other node's live ones as unseen, with the unshared folder as a cause.
grep -E "^\[rank (0\] +ranks 2, 3|2\] +ranks 0, 1, 3): did not arrive, and sent no report \(.*a node that does not see the run folder\)" "$WORK/private.log" >/dev/null ||
  fail "no message names the other node's ranks and rank 3 as unseen, with the unshared run folder as a cause"
say "   the job ended (exit $rc) ${took} s after rank 3 was stopped (timeout 4 s): $(grep -o "ranks [0-9, ]*: did not arrive, and sent no report" "$WORK/private.log" | head -1)"

say "6. sbatch -N 2 slurm/multinode.sh: a local Slurm with one slurmd per fake node"
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi
[ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p "$WORK/munge" /var/lib/munge /var/log/munge /run/munge && chown munge "$WORK/munge" /var/lib/munge /var/log/munge /run/munge
chmod 755 "$WORK"
SOCKET="$WORK/munge/munge.socket"
# munged stays in this namespace: its socket is a file, which both nodes see.
runuser -u munge -- munged --socket="$SOCKET" --pid-file="$WORK/munge/munged.pid" --log-file="$WORK/munge/munged.log" --force
cleanup() {
  [ -f "$WORK/munge/munged.pid" ] && kill "$(cat "$WORK/munge/munged.pid")" 2>/dev/null || true
  fake_nodes_down
  rm -rf "$WORK"
}
export SLURM_CONF="$WORK/slurm.conf"
CPUS="$(nproc)"
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 4 ))
mkdir -p "$WORK/state"
cat > "$SLURM_CONF" <<CONF
ClusterName=ulysses-two-nodes
SlurmctldHost=$NODE_A($ADDR_A)
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$WORK/state
SlurmdSpoolDir=$WORK/spool-%n
SlurmctldPidFile=$WORK/slurmctld.pid
SlurmdPidFile=$WORK/slurmd-%n.pid
SlurmctldLogFile=$WORK/slurmctld.log
SlurmdLogFile=$WORK/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=600
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=$NODE_A NodeAddr=$ADDR_A CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
NodeName=$NODE_B NodeAddr=$ADDR_B CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=ci Nodes=$NODE_A,$NODE_B Default=YES MaxTime=INFINITE State=UP
CONF
on_node "$NODE_A" slurmctld -c -f "$SLURM_CONF" || fail "slurmctld did not start"
for node in "$NODE_A" "$NODE_B"; do
  mkdir -p "$WORK/spool-$node"
  on_node "$node" sh -c "$(cgroup_mounts) exec slurmd -f $SLURM_CONF -N $node" || fail "slurmd of $node did not start"
done
for _ in $(seq 60); do
  on_node "$NODE_A" sinfo -h -o "%D %T" 2>/dev/null | grep -qx "2 idle" && break
  sleep 1
done
on_node "$NODE_A" sinfo -h -o "%D %T" | grep -qx "2 idle" || fail "the two nodes did not become idle: $(on_node "$NODE_A" sinfo 2>&1)"
exp slurm 6
JOB=$(on_node "$NODE_A" env MPIR_CVAR_CH4_NETMOD=ofi FI_PROVIDER=tcp OMP_NUM_THREADS=1 \
  sbatch --parsable --nodes=2 --ntasks-per-node=2 --cpus-per-task=1 --gpus-per-node=0 --mem=0 --time=10 \
  --output="$WORK/slurm-%j.log" \
  --export=ALL,EXPERIMENT="$WORK/slurm.toml",ULYSSES="$BIN",ULYSSES_ENV="$ROOT/scripts/env.sh" \
  slurm/multinode.sh) || fail "sbatch refused the job"
state() { on_node "$NODE_A" scontrol show job "$JOB" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p'; }
for _ in $(seq 300); do
  case "$(state)" in COMPLETED | FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY) break ;; esac
  sleep 0.5
done
[ "$(state)" = COMPLETED ] || fail "job $JOB ended $(state)"
grep -q "^nodes      $NODE_A holds ranks 0-1$" "$WORK/slurm-$JOB.log" || fail "the Slurm job's printout does not say that $NODE_A holds ranks 0-1"
grep -q "^           $NODE_B holds ranks 2-3$" "$WORK/slurm-$JOB.log" || fail "the Slurm job's printout does not say that $NODE_B holds ranks 2-3"
[ "$(losses "$WORK/runs/one")" = "$(losses "$WORK/runs/slurm")" ] || {
  paste <(losses "$WORK/runs/one") <(losses "$WORK/runs/slurm")
  fail "the losses of the Slurm job on two nodes differ from those on one"
}
say "   job $JOB ran on $(on_node "$NODE_A" scontrol show job "$JOB" | grep -o ' NodeList=[^ ]*' | cut -d= -f2); losses equal the one-node job bit for bit"

say "passed"
echo "multinode: 1 passed, 0 failed"
