#!/usr/bin/env bash
# Checkpoint benchmark (docs/checkpoints.md): on one job, format 1 (rank 0 gathers and writes)
# against format 2 synchronous and asynchronous (what the step waits for; the write to the end),
# and the format-2 load (checked bit for bit), with each rank's peak memory (`ulysses
# bench-checkpoint`). Random values, Llama-3.1-8B's dimensions with LAYERS decoder layers.
#   GPU machine, from the repository root with the bundle in bundle/:
#     bash bench/checkpoint.sh                          # NGPU ranks (default 1), LAYERS=8
#   CPU, with the binary built here:
#     DEVICE=cpu NRANKS=8 HIDDEN=1024 INTER=4096 VOCAB=32000 HEADS=16 KV=8 LAYERS=8 bash bench/checkpoint.sh
# DIR is where the checkpoints go (default /tmp; each is removed after its measurement; the
# largest needs 12 bytes per parameter: 34 GB at the default dimensions). REPEAT times each
# operation; OUT gets checkpoint_bench.json and the log.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEVICE="${DEVICE:-cuda}"
LAYERS="${LAYERS:-8}"
HIDDEN="${HIDDEN:-4096}" INTER="${INTER:-14336}" VOCAB="${VOCAB:-128256}" HEADS="${HEADS:-32}" KV="${KV:-8}"
REPEAT="${REPEAT:-1}"
DIR="${DIR:-/tmp}"
OUTD="${OUT:-/tmp/ulysses-bench}"
mkdir -p "$OUTD"
WORK="$(mktemp -d "$DIR/ulysses-ckpt-bench.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
if [ "$DEVICE" = cuda ]; then
  NRANKS="${NRANKS:-${NGPU:-1}}"
  run() { NGPU="$NRANKS" bash bundle/run-gpu.sh "$@"; }
else
  NRANKS="${NRANKS:-8}"
  BIN="${ULYSSES:-target/debug/ulysses}"
  MPIRUN="${MPIRUN:-$(readlink -f .venv)/bin/mpirun}"
  run() { OMP_NUM_THREADS=1 "$MPIRUN" -n "$NRANKS" "$BIN" "$@"; }
fi
cat > "$WORK/config.json" <<JSON
{"model_type": "llama", "vocab_size": $VOCAB, "hidden_size": $HIDDEN, "intermediate_size": $INTER,
 "num_hidden_layers": $LAYERS, "num_attention_heads": $HEADS, "num_key_value_heads": $KV,
 "head_dim": $(( HIDDEN / HEADS )), "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
 "max_position_embeddings": 131072, "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2}
JSON
cat > "$WORK/bench.toml" <<TOML
[run]
name = "checkpoint-bench"
output_dir = "$WORK/runs"
[model]
config = "$WORK/config.json"
[parallel]
sp = 1
dp = $NRANKS
zero_stage = 3
device = "$DEVICE"
[data]
paths = ["unused"]
seq_len = 1024
TOML
echo "== checkpoint bench $(date -u +%FT%TZ): $DEVICE, $NRANKS rank(s), hidden $HIDDEN x $LAYERS layers, vocab $VOCAB, checkpoints in $DIR ($(df -h "$DIR" | awk 'NR==2 {print $4}') free)"
run bench-checkpoint "$WORK/bench.toml" --repeat "$REPEAT" --json "$OUTD/checkpoint_bench.json" 2>&1 | tee "$OUTD/checkpoint_bench.log"
exit "${PIPESTATUS[0]}"
