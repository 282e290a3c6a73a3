#!/usr/bin/env bash
# The passkey demonstration (experiments/passkey_tiny.toml, docs/eval.md) over several seeds:
# trains it with run.seed = each seed, JOBS runs at a time, scores each checkpoint with
# `ulysses eval` at the trained length and prints one line per seed (final answer loss, first step
# with answer loss < 0.5, exact match by depth, per-digit accuracy, wall time).
#   bash scripts/passkey_seeds.sh [SEED ...]                        # here: default seeds 1..5, one at a time
#   ONE_RANK=1 JOBS=2 bash scripts/passkey_seeds.sh 1 3 4 5          # one process per seed, micro batch
#       16 (the same 16 sequences a step as sp = 2 × dp = 2 × 8): on 2 cores, two seeds at a time
#   JOBS=4 LAUNCH="env NGPU=4 bash bundle/run-gpu.sh" \
#     SINGLE="bash bundle/run-gpu.sh --exec bundle/ulysses" bash scripts/passkey_seeds.sh 1 2 3 4 5 6 7 8
#       (the GPU machine's CPU cores, from the bundle: 4 CPU ranks per run, parallel.device = "cpu")
#   ONE_RANK=1 THREADS=2 JOBS=8 SINGLE="bash bundle/run-gpu.sh --exec bundle/ulysses" \
#     bash scripts/passkey_seeds.sh 1 2 3 4 5 6 7 8 9 10
#       (how docs/eval.md's ten seeds were measured on its 16 cores: ~230 s for eight at once)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
LAUNCH="${LAUNCH:-$ROOT/.venv/bin/mpirun -n 4 $ROOT/target/debug/ulysses}"
SINGLE="${SINGLE:-$ROOT/target/debug/ulysses}"
JOBS="${JOBS:-1}"
ONE_RANK="${ONE_RANK:-0}"
if [ "$ONE_RANK" = 1 ]; then
  LAUNCH="$SINGLE"
  LAYOUT=(--set parallel.sp=1 --set parallel.dp=1 --set train.micro_batch=16)
else
  LAYOUT=()
fi
OUT="${OUT:-runs/passkey-seeds}"
EXP=experiments/passkey_tiny.toml
[ $# -gt 0 ] && SEEDS=("$@") || SEEDS=(1 2 3 4 5)
export OMP_NUM_THREADS="${THREADS:-1}"
mkdir -p "$OUT"
# The experiment's data, as its header comment makes it.
DATA="$(sed -n 's/^paths = \["\(.*\)"\]/\1/p' "$EXP")"
[ -d "$DATA" ] || $SINGLE data synth --task passkey --seq-len 256 --num 2048 --seed 7 --key-digits 10 --out "$DATA"

one() {
  local s=$1 start=$SECONDS
  local set=(--set "run.seed=$s" --set "run.name=seed-$s" --set "run.output_dir=$OUT" "${LAYOUT[@]}")
  $LAUNCH train "$EXP" "${set[@]}" > "$OUT/seed-$s.log" 2>&1 || { echo "seed $s: training failed, see $OUT/seed-$s.log"; return; }
  local took=$(( SECONDS - start ))
  $LAUNCH eval "$EXP" "${set[@]}" --task passkey --lengths 256 --samples 20 --key-digits 10 > "$OUT/seed-$s.eval" 2>&1 \
    || { echo "seed $s: eval failed, see $OUT/seed-$s.eval"; return; }
  local final first row
  final="$(grep -E 'step +[0-9]+/' "$OUT/seed-$s.log" | tail -1 | sed -E 's/.*loss ([0-9.]+).*/\1/')"
  first="$(grep -E 'step +[0-9]+/' "$OUT/seed-$s.log" | sed -E 's/.*step +([0-9]+)\/[0-9]+ +loss ([0-9.]+).*/\1 \2/' | awk '$2 < 0.5 {print $1; exit}')"
  row="$(grep -E 'length +256' "$OUT/seed-$s.eval" | sed -E 's/ +length +256 +//')"
  echo "seed $s: final answer loss $final, < 0.5 from step ${first:-never}, exact match by depth $row, ${took}s"
}

running=0
for s in "${SEEDS[@]}"; do
  one "$s" &
  running=$((running + 1))
  if [ "$running" -ge "$JOBS" ]; then wait -n; running=$((running - 1)); fi
done
wait
