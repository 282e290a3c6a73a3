#!/usr/bin/env bash
# ulysses side of the benchmark against DeepSpeed-ALST (bench/README.md): a preset's dimensions
# (Llama-3.1-8B by default), random init, random tokens, SP over every GPU, one sample per step.
# Run on the GPU machine from the repository root with the bundle (scripts/make-bundle.sh) in
# bundle/:
#   SEQS="32768 131072 262144" STEPS=4 bash bench/run.sh
# Each length: STEPS steps; step 1 is warm-up, the last is the synchronised time-split step, the
# ones between are the timed steps (figures from them only); SPLIT=0 leaves the time split out
# (every step after the first is timed). With STEPS=1 the one step is timed
# (single step, no warm-up, no time split: say so wherever the figure goes). MEMORY_FIT=1 makes
# memory-fit runs (train.memory_fit: attention in the last layer only), which prove a length fits
# and give no speed. EXTRA goes into [parallel], MEMORY into [memory]. MODEL is a preset
# (llama3.1-8b, qwen3-8b, qwen2.5-7b, mistral-7b, ...); LAYERS=N keeps its dimensions with N
# decoder layers (`[model] layers`), as the peer's `--model M --layers N`: side by side with it on
# one GPU, e.g. MODEL=qwen3-8b LAYERS=8 SEQS="131072 262144" STEPS=3, or to measure the per-token
# working set of one layer's backward (memory calibration). DOC_LEN=N packs the random tokens into
# documents of N tokens (data synth --doc-len) trained with data.documents = "mask" and positions
# restarting per document: attention within documents, a different workload from full causal (its
# FLOPs count only the documents' causal squares). LORA=R trains LoRA adapters of rank R (alpha
# 2R) on every projection of a frozen bf16 base instead of every parameter (MFU then counts the
# FLOPs done: no weight gradients of the base, plan/flops.rs). Logs and a JSON summary go to $OUT.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SEQS="${SEQS:-32768 131072 262144}"
STEPS="${STEPS:-4}"
NGPU="${NGPU:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')}"
SP="${SP:-$NGPU}"
MODEL="${MODEL:-llama3.1-8b}"
ATTN="${ATTN:-auto}"
EXTRA="${EXTRA:-}"
MEMORY="${MEMORY:-}"
MEMORY_FIT="${MEMORY_FIT:-0}"
LAYERS="${LAYERS:-}"
LORA="${LORA:-}"
LORA_LINES=""
[ -n "$LORA" ] && LORA_LINES=$'[lora]\nrank = '"$LORA"$'\nalpha = '"$(( 2 * LORA ))"'.0'
DOC_LEN="${DOC_LEN:-}"
DOC_ARGS=""
DOC_LINES=""
if [ -n "$DOC_LEN" ]; then
  DOC_ARGS="--doc-len $DOC_LEN"
  DOC_LINES=$'documents = "mask"\npositions = "document"'
fi
FIT_LINE=""
[ "$MEMORY_FIT" = 1 ] && FIT_LINE="memory_fit = true"
SPLIT="${SPLIT:-1}"
SPLIT_EVERY="$STEPS"
[ "$STEPS" = 1 ] || [ "$SPLIT" = 0 ] && SPLIT_EVERY=0
RUN_TIMEOUT_S="${RUN_TIMEOUT_S:-400}"
OUTD="${OUT:-/tmp/ulysses-bench}"
mkdir -p "$OUTD"
WORK="$(mktemp -d /tmp/ulysses-bench.XXXXXX)"
MODEL_LINE="preset = \"$MODEL\""
if [ -n "$LAYERS" ]; then
  MODEL_LINE="$MODEL_LINE
layers = $LAYERS"
  MODEL="$MODEL-${LAYERS}-layers"
fi
[ -n "$LORA" ] && MODEL="$MODEL-lora-r$LORA"
echo "== ulysses bench $(date -u +%FT%TZ): $MODEL, NGPU=$NGPU SP=$SP, SEQS=$SEQS, STEPS=$STEPS, attention=$ATTN, documents=${DOC_LEN:-none (full causal)}"
for S in $SEQS; do
  data="$WORK/data-$S"
  # shellcheck disable=SC2086  # DOC_ARGS is two words or none
  NGPU=1 bash bundle/run-gpu.sh data synth --task random --seq-len "$S" --num "$STEPS" --seed 1 $DOC_ARGS --out "$data" >/dev/null || exit 1
  exp="$WORK/bench-$S.toml"
  cat > "$exp" <<TOML
[run]
name = "bench-$S"
output_dir = "$WORK/runs"
seed = 1
[model]
$MODEL_LINE
[parallel]
sp = $SP
dp = $(( NGPU / SP ))
zero_stage = 3
device = "cuda"
attention = "$ATTN"
mlp_tile = 16384
loss_tile = 2048
$EXTRA
[data]
paths = ["$data"]
seq_len = $S
shuffle = false
$DOC_LINES
[train]
steps = $STEPS
lr = 1e-5
min_lr = 1e-6
warmup_steps = 1
dtype = "bf16"
$FIT_LINE
[memory]
$MEMORY
[checkpoint]
resume = "none"
save_final = false
[metrics]
time_split_every = $SPLIT_EVERY
$LORA_LINES
TOML
  log="$OUTD/ulysses-$S.log"
  echo "--- $S tokens: $exp"
  # SIGINT, not timeout's SIGTERM: SIGTERM asks ulysses to checkpoint and stop (preemption),
  # which for Llama-8B means gathering and writing ~96 GB before the kill; a benchmark cut short
  # should just stop.
  timeout --signal=INT --kill-after=20 "$RUN_TIMEOUT_S" env NGPU="$NGPU" bash bundle/run-gpu.sh "$exp" 2>&1 | tee "$log"
  echo "--- $S tokens: exit ${PIPESTATUS[0]}"
done
python3 - "$OUTD" "$STEPS" "$SPLIT_EVERY" "${DOC_LEN:-0}" "${LAYERS:-32}" "$SP" "${MODEL%-"${LAYERS}"-layers}" <<'PY'
import glob, json, re, sys
out, steps, split_every, doc_len, layers, sp = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
preset = sys.argv[7]
# Projection widths of the presets whose matmul work is counted (hidden, q, k + v, intermediate, vocab).
DIMS = {"llama3.1-8b": (4096, 4096, 2048, 14336, 128256)}
def matmul_flops_per_gpu(seq, text):
    """The step's matmul FLOPs as the step runs them (src/train/layer.rs): forward, backward
    (input and weight gradients, 2x), and what backward recomputes: the O projection, the gate
    and up projections where the forward did not keep them, q/k/v once where segment 1 runs once
    with kept attention, else twice; the LM head forward and backward."""
    if preset not in DIMS:
        return None
    h, q, kv, inter, vocab = DIMS[preset]
    qkv, o, gate_up, down = 2 * h * (q + kv), 2 * q * h, 4 * h * inter, 2 * inter * h
    kept = re.findall(r"attention kept (\d+) of (\d+) layers", text)
    kept_attn = int(kept[-1][0]) if kept else layers
    mlp = re.findall(r"MLP projections kept in (\d+) of", text)
    kept_mlp = int(mlp[-1]) if mlp else 0
    once = "segment 1 runs once in backward" in text
    per_token = (layers * (3 * (qkv + o + gate_up + down) + o) + qkv * (kept_attn * (1 if once else 2) + (layers - kept_attn) * 2)
                 + gate_up * (layers - kept_mlp) + 3 * 2 * h * vocab)
    return per_token * seq / sp
def attention_fwd_flops_per_gpu(seq):
    # 2·Σ len²·n_q·d·L (plan/flops.rs), Llama-3.1-8B's 32 query heads of 128, split over SP.
    lens = [doc_len] * (seq // doc_len) + ([seq % doc_len] if seq % doc_len else []) if doc_len else [seq]
    return 2.0 * sum(l * l for l in lens) * 32 * 128 * layers / sp
rows = []
for log in sorted(glob.glob(f"{out}/ulysses-*.log"), key=lambda p: int(re.findall(r"(\d+)\.log", p)[0])):
    seq = int(re.findall(r"(\d+)\.log", log)[0])
    text = open(log).read()
    steps_seen = {int(m[0]): m for m in re.findall(r"step +(\d+)/\d+ +loss (\S+) .*?(\S+) tok/s +(\S+) s/step +(\S+) TFLOP/s/GPU +MFU (\S+)% +ALST (\S+) TFLOP/s/GPU +peak (\S+) GiB", text)}
    split = re.findall(r"time split \(synchronised\): attention (\S+) s +other compute (\S+) s +communication (\S+) s +waiting (\S+) s", text)
    # Step 1 is warm-up and a time-split step runs slower: neither is timed (unless it is the only one).
    last = steps if split_every == 0 else steps - 1
    timed = [steps_seen[k] for k in (range(2, last + 1) if steps > 1 else [1]) if k in steps_seen]
    fit = re.findall(r"memory-fit step (\d+)/\d+ completed .*?peak GPU (\S+) GiB +peak host (\S+) GiB", text)
    row = {"seq_len": seq, "completed_steps": len(steps_seen) or len(fit), "oom": "out of memory" in text.lower()}
    row["doc_len"] = doc_len or None
    kernel = re.findall(r"attention within documents: (.+?) \(a micro batch", text)
    row["attention_kernel"] = kernel[-1] if kernel else "full causal (parallel.attention)"
    recomputed = re.findall(r"attention kept (\d+) of (\d+) layers", text)
    if steps == 1:
        row["timing"] = "single step, no warm-up"
    if fit:
        row.update(memory_fit=True, peak_gib=max(float(f[1]) for f in fit), peak_host_gib=max(float(f[2]) for f in fit))
    host = re.findall(r"peak \S+ GiB +host (\S+) GiB", text)
    if host:
        row["peak_host_gib"] = max(map(float, host))
    if timed:
        mean = lambda i: sum(float(t[i]) for t in timed) / len(timed)
        row.update(step_time_s=mean(3), tokens_per_s=mean(2), tflops_per_gpu=mean(4), mfu_pct=mean(5), alst_tflops_per_gpu=mean(6),
                   peak_gib=max(float(t[7]) for t in steps_seen.values()), loss=[float(steps_seen[k][1]) for k in sorted(steps_seen)])
    if split:
        row["time_split_s"] = dict(zip(["attention", "other_compute", "communication", "waiting"], map(float, split[-1])))
        # The attention kernels' own TFLOP/s in the measured step, on the FLOPs they do (within
        # documents: Σ len²): forward + backward = 3 × the forward where attention is kept, a
        # layer that recomputes runs the forward twice. Kernel time from libtorch's profiler
        # (the "GPU kernels" line), else the synchronised attention region.
        kept, total = map(int, recomputed[-1]) if recomputed else (layers, layers)
        work = attention_fwd_flops_per_gpu(seq) * (3 + (total - kept) / total)
        kernels = re.findall(r"GPU kernels: matmul \S+ s +attention (\S+) s", text)
        split_k = re.findall(r"GPU kernels: matmul (\S+) s +attention (\S+) s +elementwise (\S+) s +copies (\S+) s +NCCL (\S+) s", text)
        if split_k:
            # The profiled step's GPU kernel seconds by kind (src/metrics/profile.rs).
            row["kernel_split_s"] = dict(zip(["matmul", "attention", "elementwise", "copies", "nccl"], map(float, split_k[-1])))
            # The longest kernels by name (the "kernel" lines of the profiled step) and the matmul
            # floor: the step's matmul FLOPs at the matmul kernels' own rate and at 650 TFLOP/s
            # (an H100's dense bf16 GEMM rate at these shapes, an estimate); elementwise + copies
            # is what sits above it outside attention.
            top = re.findall(r"^step +\d+ kernel +(\S+) s +(\d+) calls  (\S+) +(.*)$", text, re.M)
            row["top_kernels"] = [{"s": float(t[0]), "calls": int(t[1]), "kind": t[2], "name": t[3][:120]} for t in top]
            flops = matmul_flops_per_gpu(seq, text)
            if flops:
                k = row["kernel_split_s"]
                row["matmul_floor"] = {"tflop": round(flops / 1e12, 1), "matmul_tflops_per_s": round(flops / k["matmul"] / 1e12, 1) if k["matmul"] else None,
                                       "at_650_tflops_s": round(flops / 650e12, 3), "elementwise_plus_copies_s": round(k["elementwise"] + k["copies"], 3)}
        seconds = float(kernels[-1]) if kernels else row["time_split_s"]["attention"]
        row["attention_seconds_source"] = "profiler kernels" if kernels else "synchronised region"
        row["attention_tflops_per_gpu"] = round(work / seconds / 1e12, 1)
    rows.append(row)
    print(json.dumps(row))
open(f"{out}/ulysses_results.jsonl", "w").write("".join(json.dumps(r) + "\n" for r in rows))
PY
