#!/usr/bin/env bash
# The memory plan on GPUs (the GPU machine, not CI): run from the repository root with the bundle
# in bundle/, 2 GPUs.   bash tests/gpu/memory_plan.sh
# 1. A run that fits logs the measured budget (the GPU's size through the CUDA driver) and the
#    placement, then trains.
# 2. With [memory] set, training places layers exactly as `ulysses check` says.
# 3. A run that cannot fit stops both ranks before allocating, with one message naming the file.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
W="$(mktemp -d /tmp/ulysses-memplan.XXXXXX)"
fails=0
u() { NGPU="$1" bash bundle/run-gpu.sh "${@:2}"; }
fail() { echo "FAIL $*"; fails=$((fails + 1)); }

u 1 data synth --task random --seq-len 16384 --num 4 --seed 2 --out "$W/rand16k" >/dev/null 2>&1
exp() {  # name activations [memory section]
  cat > "$W/$1.toml" <<TOML
[run]
name = "$1"
output_dir = "$W/runs"
[model]
preset = "llama3.2-1b"
[parallel]
sp = 2
dp = 1
device = "cuda"
activations = "$2"
mlp_tile = 4096
loss_tile = 2048
[data]
paths = ["$W/rand16k"]
seq_len = 16384
[train]
steps = 2
warmup_steps = 0
dtype = "bf16"
[checkpoint]
resume = "none"
save_final = false
$3
TOML
}
exp fit auto ""
exp tight auto $'[memory]\ngpu_gib = 14.0\nhost_gib = 0.3\noffload_dir = "'"$W"'/offload"'
exp nofit device $'[memory]\ngpu_gib = 13.5'
for e in fit tight nofit; do
  u 2 "$W/$e.toml" > "$W/$e.log" 2>&1
  echo "rc=$?" >> "$W/$e.log"
  echo "=== $e"; grep -E "memory budget|memory plan|error|step +[0-9]|aborting|rc=" "$W/$e.log"
done

grep -q "memory budget: GPU 0 has" "$W/fit.log" || fail "fit: no measured GPU budget"
grep -q "memory plan: layer inputs 16 GPU / 0 host / 0 disk; attention kept 16 of 16 layers (16 GPU, 0 host)" "$W/fit.log" \
  || fail "fit: placement"
[ "$(grep -c 'step  *[0-9]/2' "$W/fit.log")" = 2 ] || fail "fit: did not train 2 steps"

want="$(u 1 check "$W/tight.toml" --ranks-per-node 2 | sed -n 's/^placement  \(.*\); GPU ~.*/\1/p')"
got="$(sed -n 's/.*memory plan: \(.*\); GPU ~.*/\1/p' "$W/tight.log")"
echo "tight: check says \"$want\", training \"$got\""
[ -n "$want" ] && [ "$want" = "$got" ] || fail "tight: training's placement differs from check's"

grep -q "rc=0" "$W/nofit.log" && fail "nofit: exit 0"
[ "$(grep -c 'error:' "$W/nofit.log")" = 1 ] || fail "nofit: not exactly one error message"
grep -q "error: $W/nofit.toml: does not fit in memory: the layer inputs need 512.0 MiB but the GPU" "$W/nofit.log" \
  || fail "nofit: message"
grep -q "step  *1/" "$W/nofit.log" && fail "nofit: trained"

[ -n "${OUT:-}" ] && cp "$W"/*.log "$OUT"/
[ "$fails" = 0 ] && echo "PASS memory plan on GPU" || echo "$fails failure(s)"
exit "$fails"
