#!/usr/bin/env bash
# Issue 32 on one GPU: Llama-3.1-8B (32 layers, random weights, random tokens) with LoRA rank 16
# (alpha 32) on every projection, one rank, bf16, the base frozen on the GPU. Run on the GPU
# machine from the repository root with the bundle in bundle/ (make bundle):
#   bash bench/lora.sh              # about 6-8 minutes on an H100
#   PART=fit bash bench/lora.sh     # about 4 minutes
# Both first print `ulysses check` of the run for issue 32's box (76 GiB GPU, 116 GiB host, 58 GiB
# disk): the longest fit with LoRA and with every parameter trained. Then
#   PART=step (default): SEQ tokens (262144), step 1 warm-up, step 2 timed (no time split, so
#     the whole command stays within 10 minutes): s/step, tokens/s, TFLOP/s and MFU on the FLOPs a
#     LoRA step does (plan/flops.rs: the base's weight gradients are skipped), peak GPU and host;
#   PART=fit: one memory-fit step (train.memory_fit: attention in the last layer only) at the
#     longest fit `ulysses check` printed, or FIT_SEQ: the peaks at that length, no speed.
# Exits non-zero unless every step completed without running out of memory; the JSON rows
# (bench/run.sh's summary) and the logs go to $OUT.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PART="${PART:-step}"
SEQ="${SEQ:-262144}"
OUTD="${OUT:-/tmp/ulysses-bench}/lora-$PART"
mkdir -p "$OUTD"
exp="$OUTD/check.toml"
cat > "$exp" <<TOML
[model]
preset = "llama3.1-8b"
[parallel]
sp = 1
device = "cuda"
mlp_tile = 16384
loss_tile = 2048
[data]
paths = ["unused-by-check"]
seq_len = $SEQ
[train]
dtype = "bf16"
[lora]
rank = 16
alpha = 32.0
TOML
bash bundle/run-gpu.sh --exec bundle/ulysses check "$exp" --gpu-mem-gib 76 --host-mem-gib 116 --disk-gib 58 \
  | tee "$OUTD/check.txt" || { echo "lora.sh: ulysses check failed" >&2; exit 1; }
fit="$(sed -n 's/^fits *up to \([0-9]*\) tokens.*/\1/p' "$OUTD/check.txt")"
echo "== plan: LoRA rank 16 fits ${fit:-nothing} tokens on 76/116/58 GiB; $(grep -o 'without it.*' "$OUTD/check.txt")"
case "$PART" in
  step) OUT="$OUTD" LORA=16 NGPU=1 SP=1 SEQS="$SEQ" STEPS=2 SPLIT=0 RUN_TIMEOUT_S="${RUN_TIMEOUT_S:-520}" bash bench/run.sh ;;
  fit) OUT="$OUTD" LORA=16 NGPU=1 SP=1 SEQS="${FIT_SEQ:-$fit}" STEPS=1 MEMORY_FIT=1 RUN_TIMEOUT_S="${RUN_TIMEOUT_S:-400}" bash bench/run.sh ;;
  *) echo "lora.sh: PART=$PART: use step or fit" >&2; exit 2 ;;
esac
python3 - "$OUTD/ulysses_results.jsonl" "$PART" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])] if sys.argv[1] else []
ok = bool(rows) and all(r["completed_steps"] >= (2 if sys.argv[2] == "step" else 1) and not r["oom"] for r in rows)
for r in rows:
    if sys.argv[2] == "step":
        print(f"LoRA r16 {r['seq_len']} tokens: {r.get('step_time_s')} s/step, {r.get('tokens_per_s')} tokens/s, "
              f"{r.get('tflops_per_gpu')} TFLOP/s, MFU {r.get('mfu_pct')}%, peak GPU {r.get('peak_gib')} GiB, host {r.get('peak_host_gib')} GiB")
    else:
        print(f"LoRA r16 memory-fit {r['seq_len']} tokens: peak GPU {r.get('peak_gib')} GiB, host {r.get('peak_host_gib')} GiB")
print("lora.sh: PASS" if ok else f"lora.sh: FAIL {rows}")
sys.exit(0 if ok else 1)
PY
