#!/usr/bin/env bash
# GPU tests (the GPU machine, not CI): run from the repository root with the bundle in bundle/.
#   bash tests/gpu/run.sh
# 0. The activation store's side-stream copies (tests/store.rs gpu_* tests, bundled).
# SP (default 4) is the sequence-parallel degree of the sharded runs: one rank per GPU, so SP=2 on a
# two-GPU machine; the run names and the logs keep "sp4" whatever SP is.
# 1. SP = 4 equals SP = 1 in bf16: Llama-3.2-1B dimensions (tied embeddings, 32/8 heads), 16K
#    tokens, 3 steps; every step's loss and gradient norm within rtol 1.6e-2 (bf16 rounding in a
#    different order; fp32 equality to 1e-6 is tested on CPU by tests/train_equivalence.rs).
# 2. Kept attention (the fused backward from the kept output and log-sum-exp) gives the losses and
#    gradient norms of recomputed attention. The "device" variant has room for everything, so its
#    plan also runs segment 1 once in backward and keeps the MLP's gate and up projections (the
#    faster paths); "host" and "disk" spill and take neither, so they compare the fast paths with
#    the plain ones. Layer inputs in pinned host memory or on disk,
#    and the optimizer state in host memory (gradients streamed there), give those of GPU-resident
#    ones, within the same rtol (GPU runs are not bitwise reproducible
#    run to run: cuDNN attention backward and embedding backward use atomics), with less GPU
#    memory.
# 3. Training works on GPU: the tiny model on the passkey set, sp = 4, loss falls by 20% in 30 steps.
# 4. The masked attention kernels (tests/masked_attention.rs gpu_* tests, bundled): cuDNN and flash
#    varlen within documents against an fp32 attention over each document alone, bf16, within 2e-2
#    of the reference's largest entry (the plain causal kernels are held to the same bound).
# 5. Packed documents train alike: Llama-3.2-1B dimensions, 16K tokens of 3000-token documents
#    (crossing the SP chunks), data.documents = "mask", positions restarting: SP = 4 equals SP = 1
#    and recomputed attention equals kept, losses and gradient norms within rtol 1.6e-2.
# 6. Qwen3 on the GPU (q/k norms, head_dim 64 = 2 × hidden / heads, YaRN at 4× its original
#    context): a small Qwen3 config (4 layers, hidden 256, 8 / 2 heads), 4096 tokens, 3 steps, the
#    same seeded weights and samples: the GPU bf16 run at sp = SP against the CPU fp32 run at
#    sp = 1, every step's loss within rtol 2e-2 and gradient norm within rtol 5e-2 (bf16 against
#    fp32; fp32 equality of every layout is tested on CPU by tests/model_families.rs). PARTS=qwen3
#    runs it alone (about a minute).
# 7. The held-out loss during training (data.eval_paths, train.eval_every = 2) on the GPU: the
#    step's forward without its backward, kept attention released layer by layer. SP = 4 (kept
#    attention and recomputed) equals SP = 1: the held-out loss after steps 2 and 3 within rtol
#    1.6e-2, finite, NaN-free. PARTS=heldout runs it alone.
# 8. (PARTS=oom only) CUDA out of memory is one message naming the phase, the numbers and what to
#    change, exit != 0, no C++ backtrace; bench-checkpoint of Llama-3.1-8B dims × 8 layers plans
#    its memory on one GPU and finishes.
# 9. PARTS=colocated (not in the default set): the sharded parts with 2 and 4 ranks sharing one
#    GPU (ULYSSES_RANKS_PER_GPU); see the part below for what it checks. From the repository root
#    after `make bundle`:  PARTS=colocated bash tests/gpu/run.sh
# 10. PARTS=ring (not in the default set; needs ULYSSES_RANKS_PER_GPU, the several-ranks-per-GPU
#    switch): ring attention on one GPU with co-located ranks. `comm-check --backend nccl` on 4
#    ranks (ring_shift exact and ring attention within 2e-2 of local attention in bf16 for every
#    ring degree; a matmul queued behind a ring shift still waiting for its peer finishes first:
#    the shifts run on their own stream); a small Llama (4 layers, hidden 512, 8 / 4 heads of 64) at 8192 tokens, bf16,
#    3 steps: ulysses 2 × ring 2 (4 ranks) with kept attention (cuDNN), recomputed attention and
#    flash, each against sp = 1, losses and gradient norms within rtol 1.6e-2; then one step of
#    Llama-3.1-8B dimensions with 8 layers at 65536 tokens at ulysses 1 × ring 2 (2 ranks sharing
#    the GPU) against sp = 1 on the same GPU: the loss within rtol 1.6e-2 and each run's peak GPU
#    memory printed (a correctness and memory figure, not a speed one).
#    From the repository root after `make bundle`:  PARTS=ring bash tests/gpu/run.sh
# 11. PARTS=lora (not in the default set; one GPU): LoRA on the GPU in bf16 (docs/lora.md). Llama-3.2-1B
#    dimensions, 16K tokens, 3 steps at sp = 1: with B = 0 at the start the adapters add nothing,
#    so step 1's loss equals the full fine-tuning run's on the same weights and sample (rtol
#    1e-3), every LoRA loss and gradient norm is finite and the LoRA run's peak GPU memory is below
#    the full run's (no fp32 master, gradient or moments for the base); both runs' s/step and peaks
#    are printed. Then the tiny model on the passkey set with rank 16 adapters on every projection
#    and the LM head trained in full: the loss falls by 10% in 30 steps. Dropout: the masks drawn on
#    CUDA equal the CPU's bit for bit (tests/lora_step.rs gpu_*), and the 1B LoRA run with
#    lora.dropout = 0.1 has LoRA's step 1 (B = 0: nothing to drop yet), other losses after it,
#    finite; its s/step and peak are printed beside the run without dropout (the cost of the draw).
#    From the repository root after `make bundle`:  PARTS=lora bash tests/gpu/run.sh
# 12. PARTS=blocks (not in the default set; one GPU): kept cuDNN attention past 64K tokens runs
#    its forward in query blocks merged by log-sum-exp (src/parallel/blocks.rs). A 2-layer model
#    with heads of 128 at 163840 tokens (two blocks of 64K and one of 32K), 2 steps: losses and
#    gradient norms equal recomputed attention's (libtorch SDPA on the whole sequence, no blocks)
#    within rtol 1.6e-2, like the variants part.
# 13. PARTS=head (in the default set; seconds): the LM head and loss by hand
#    (model::head::tile_loss, what the step runs) against autograd through head_token_losses in
#    bf16 at Llama-3.1-8B's head and a 2048-token tile (tests/head_loss.rs gpu_*): the loss within
#    1e-4 relative, the input's, norm's and LM head's gradients within 2e-2 of their largest entry,
#    ignored labels' rows without gradient; each path's ms per tile printed.
# 14. PARTS=fused (in the default set; seconds): the fused elementwise kernels (src/ffi/elementwise.rs,
#    NVRTC through libtorch's jiterator) against the op-by-op forms they replace
#    (tests/fused_elementwise.rs gpu_*): SwiGLU and its backward on a [16384, 14336] bf16 tile (and
#    strided views of kept projections), the same in fp32 at a smaller size: every output equal bit
#    for bit; the log-sum-exp merge kernel of attention in query blocks against ring::merge. One MLP tile (16384 tokens, Llama-3.1-8B) backpropagated as the step does
#    (SwiGLU by hand; projections recomputed, and kept) against autograd through the MLP: h's, the
#    norm's and the three projections' gradients within 1e-2 of their largest entry. Each form's
#    ms printed; the log is $OUT/fused.log.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
WORK="$(mktemp -d /tmp/ulysses-gputest.XXXXXX)"
OUTD="${OUT:-$WORK}"
mkdir -p "$OUTD"
fails=0
SP="${SP:-4}"
u() { NGPU="$1" bash bundle/run-gpu.sh "${@:2}"; }
# llama_config FILE hidden intermediate layers heads kv_heads head_dim max_positions: a Llama
# (vocabulary 4096, untied) as a Hugging Face config.json.
llama_config() {
  cat > "$1" <<JSON
{"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 4096, "hidden_size": $2,
 "intermediate_size": $3, "num_hidden_layers": $4, "num_attention_heads": $5, "num_key_value_heads": $6,
 "head_dim": $7, "rms_norm_eps": 1e-05, "max_position_embeddings": $8, "rope_theta": 500000.0,
 "tie_word_embeddings": false}
JSON
}
# small_llama FILE: the small Llama (4 layers, hidden 512, 8 / 4 heads of 64) that the co-located
# and ring parts train.
small_llama() { llama_config "$1" 512 1536 4 8 4 64 8192; }

rexp() {  # name model-lines sp ring seq data steps [extra [parallel] lines] (${8:-}: set -u): writes $R/name.toml
  cat > "$R/$1.toml" <<TOML
[run]
name = "$1"
output_dir = "$R/runs"
seed = 5
[model]
$2
[parallel]
sp = $3
ring = $4
dp = 1
device = "cuda"
mlp_tile = 4096
loss_tile = 2048
${8:-}
[data]
paths = ["$6"]
seq_len = $5
shuffle = false
[train]
steps = $7
lr = 1e-4
min_lr = 1e-4
warmup_steps = 0
dtype = "bf16"
[checkpoint]
resume = "none"
save_final = false
TOML
}

# PARTS picks parts (a short check before a benchmark in the same device call); default all.
want() { [[ " ${PARTS:-store head fused varlen sp variants packed qwen3 heldout learn} " == *" $1 "* ]]; }

exp() {  # name model sp seq steps lr data [extra data line]
  cat > "$WORK/$1.toml" <<TOML
[run]
name = "$1"
output_dir = "$WORK/runs"
seed = 5
[model]
preset = "$2"
[parallel]
sp = $3
dp = 1
device = "cuda"
mlp_tile = 4096
loss_tile = 2048
[data]
paths = ["$7"]
seq_len = $4
shuffle = false
[train]
steps = $5
lr = $6
min_lr = $6
warmup_steps = 0
dtype = "bf16"
[checkpoint]
resume = "none"
save_final = false
TOML
}

# 0. The activation store's side-stream copies on the GPU (tests/store.rs, gpu_*).
if want store; then
bash bundle/run-gpu.sh --exec bundle/tests/store --ignored gpu_ --test-threads 1 2>&1 | tee "$WORK/store.log"
grep -q "test result: ok. 5 passed" "$WORK/store.log" && echo "PASS activation store on the GPU" || fails=$((fails + 1))
fi

# 13. The LM head and loss by hand against autograd in bf16 (tests/head_loss.rs, gpu_*).
if want head; then
bash bundle/run-gpu.sh --exec bundle/tests/head_loss --ignored gpu_ --test-threads 1 --nocapture 2>&1 | tee "$WORK/head.log"
grep -q "test result: ok. 1 passed" "$WORK/head.log" && echo "PASS LM head and loss by hand on the GPU" || fails=$((fails + 1))
fi

# 14. The fused elementwise kernels against op by op, and the MLP tile's backward against autograd
# (tests/fused_elementwise.rs, gpu_*).
if want fused; then
bash bundle/run-gpu.sh --exec bundle/tests/fused_elementwise --ignored gpu_ --test-threads 1 --nocapture 2>&1 | tee "$OUTD/fused.log"
grep -q "test result: ok. 2 passed" "$OUTD/fused.log" && echo "PASS fused elementwise kernels on the GPU" || fails=$((fails + 1))
fi

# 4. The masked attention kernels on the GPU (tests/masked_attention.rs, gpu_*).
if want varlen; then
bash bundle/run-gpu.sh --exec bundle/tests/masked_attention --ignored gpu_ --test-threads 1 --nocapture 2>&1 | tee "$WORK/varlen.log"
grep -q "test result: ok. 4 passed" "$WORK/varlen.log" && echo "PASS varlen attention within documents on the GPU" || fails=$((fails + 1))
fi

u 1 data synth --task random --seq-len 16384 --num 3 --seed 2 --out "$WORK/rand16k" >/dev/null
exp sp1 llama3.2-1b 1 16384 3 1e-4 "$WORK/rand16k"
exp sp4 llama3.2-1b "$SP" 16384 3 1e-4 "$WORK/rand16k"
if want sp; then
u 1 "$WORK/sp1.toml" 2>&1 | tee "$OUTD/gputest-sp1.log"
u "$SP" "$WORK/sp4.toml" 2>&1 | tee "$OUTD/gputest-sp4.log"
python3 - "$OUTD/gputest-sp1.log" "$OUTD/gputest-sp4.log" <<'PY' || fails=$((fails + 1))
import re, sys
def steps(p):
    return [(float(l), float(g)) for l, g in re.findall(r"step +\d+/\d+ +loss (\S+) +lr \S+ +grad_norm (\S+)", open(p).read())]
a, b = steps(sys.argv[1]), steps(sys.argv[2])
assert len(a) == len(b) == 3, f"steps completed: sp1 {len(a)}, sp4 {len(b)}"
worst = 0.0
for i, ((la, ga), (lb, gb)) in enumerate(zip(a, b), 1):
    rl, rg = abs(la - lb) / abs(la), abs(ga - gb) / abs(ga)
    worst = max(worst, rl, rg)
    print(f"step {i}: loss sp1 {la:.5f} sp4 {lb:.5f} (rel {rl:.2e})  grad_norm sp1 {ga:.5f} sp4 {gb:.5f} (rel {rg:.2e})")
    assert rl <= 1.6e-2 and rg <= 1.6e-2, "SP=4 differs from SP=1 beyond rtol 1.6e-2"
print(f"PASS sp4 == sp1 in bf16 (worst relative difference {worst:.2e})")
PY
fi

# Variants of the SP = 4 run against it ("device": layer inputs on the GPU, attention kept).
variant() {  # name, lines for [parallel]
  sed "s/^mlp_tile/$2\nmlp_tile/; s/name = \"sp4\"/name = \"sp4$1\"/" "$WORK/sp4.toml" > "$WORK/sp4$1.toml"
  u "$SP" "$WORK/sp4$1.toml" 2>&1 | tee "$OUTD/gputest-sp4$1.log"
}
# VARIANTS picks which run beside "device" (a re-check of one tier); default all.
VARIANTS="${VARIANTS:-recompute host disk offload statedisk}"
if want variants; then
variant device 'activations = "device"'
[[ " $VARIANTS " == *" recompute "* ]] && variant recompute 'activations = "device"\nkeep_attention = false'
[[ " $VARIANTS " == *" host "* ]] && variant host 'activations = "host"'
[[ " $VARIANTS " == *" disk "* ]] && variant disk 'activations = "disk"'
[[ " $VARIANTS " == *" offload "* ]] && variant offload 'activations = "device"\noffload_optimizer = true'
[[ " $VARIANTS " == *" statedisk "* ]] && variant statedisk 'activations = "device"\noffload_optimizer = "disk"'
python3 - "$OUTD" $VARIANTS <<'PY' || fails=$((fails + 1))
import re, sys
chosen = sys.argv[2:]
def run(name):
    t = open(f"{sys.argv[1]}/gputest-sp4{name}.log").read()
    steps = [(float(l), float(g)) for l, g in re.findall(r"step +\d+/\d+ +loss (\S+) +lr \S+ +grad_norm (\S+)", t)]
    return steps, max([float(x) for x in re.findall(r"peak (\S+) GiB", t)] or [0.0])
base, peak = {}, {}
for name in ["device"] + chosen:
    base[name], peak[name] = run(name)
    assert len(base[name]) == 3, f"{name}: {len(base[name])} steps completed"
for name, what in [("recompute", "recomputed attention"), ("host", "inputs in host memory"), ("disk", "inputs on disk"),
                   ("offload", "the optimizer in host memory (gradients streamed there)"),
                   ("statedisk", "the optimizer state on disk (streamed through host memory)")]:
    if name not in chosen:
        continue
    for (ld, gd), (lv, gv) in zip(base["device"], base[name]):
        rl, rg = abs(ld - lv) / abs(ld), abs(gd - gv) / abs(gd)
        print(f"{name}: loss {lv:.5f} vs {ld:.5f} (rel {rl:.1e})  grad_norm {gv:.5f} vs {gd:.5f} (rel {rg:.1e})")
        assert rl <= 1.6e-2 and rg <= 1.6e-2, f"{what} changed the numbers beyond rtol 1.6e-2"
print("peak GPU memory GiB: " + ", ".join(f"{k} {v}" for k, v in peak.items()))
assert all(peak[k] < peak["device"] for k in ["host", "disk", "offload", "statedisk"] if k in chosen), "offloading did not lower peak GPU memory"
assert "recompute" not in chosen or peak["recompute"] < peak["device"], "kept attention should cost GPU memory (it is kept on the GPU here)"
print(f"PASS {' '.join(chosen)}: the numbers of the all-on-GPU run (kept attention == recomputed; inputs and optimizer state off the GPU), with less GPU memory")
PY
fi

# 5. Packed documents: SP = 4 vs SP = 1, and recomputed vs kept attention, within documents.
if want packed; then
u 1 data synth --task random --seq-len 16384 --num 3 --seed 2 --doc-len 3000 --out "$WORK/docs16k" >/dev/null
for name in sp1 sp4; do
  sed "s|$WORK/rand16k|$WORK/docs16k|; s/name = \"$name\"/name = \"packed-$name\"/; s/^shuffle = false/shuffle = false\ndocuments = \"mask\"\npositions = \"document\"/" \
    "$WORK/$name.toml" > "$WORK/packed-$name.toml"
done
sed 's/^mlp_tile/keep_attention = false\nmlp_tile/; s/name = "packed-sp4"/name = "packed-sp4recompute"/' "$WORK/packed-sp4.toml" > "$WORK/packed-sp4recompute.toml"
u 1 "$WORK/packed-sp1.toml" 2>&1 | tee "$OUTD/gputest-packed-sp1.log"
u "$SP" "$WORK/packed-sp4.toml" 2>&1 | tee "$OUTD/gputest-packed-sp4.log"
u "$SP" "$WORK/packed-sp4recompute.toml" 2>&1 | tee "$OUTD/gputest-packed-sp4recompute.log"
python3 - "$OUTD" <<'PY' || fails=$((fails + 1))
import re, sys
def run(name):
    t = open(f"{sys.argv[1]}/gputest-packed-{name}.log").read()
    assert "attention within documents" in t, f"{name}: the run did not attend within documents"
    print(f"{name}: " + re.findall(r"attention within documents: ([^(]+)", t)[0].strip())
    return [(float(l), float(g)) for l, g in re.findall(r"step +\d+/\d+ +loss (\S+) +lr \S+ +grad_norm (\S+)", t)]
a, b, c = run("sp1"), run("sp4"), run("sp4recompute")
assert len(a) == len(b) == len(c) == 3, f"steps completed: {len(a)}, {len(b)}, {len(c)}"
for what, other in [("sp4 vs sp1", b), ("recomputed vs kept (sp4)", None)]:
    ref, got = (a, b) if other is not None else (b, c)
    for i, ((la, ga), (lb, gb)) in enumerate(zip(ref, got), 1):
        rl, rg = abs(la - lb) / abs(la), abs(ga - gb) / abs(ga)
        print(f"{what} step {i}: loss {la:.5f} / {lb:.5f} (rel {rl:.2e})  grad_norm {ga:.5f} / {gb:.5f} (rel {rg:.2e})")
        assert rl <= 1.6e-2 and rg <= 1.6e-2, f"{what} differs beyond rtol 1.6e-2"
print("PASS packed documents: sp4 == sp1 and recomputed == kept within documents")
PY
fi

# 7. The held-out loss on the GPU: SP = 4, kept and recomputed attention, against SP = 1.
if want heldout; then
for name in sp1 sp4; do
  sed "s/name = \"$name\"/name = \"heldout-$name\"/; s|^shuffle = false|shuffle = false\neval_paths = [\"$WORK/rand16k\"]|; s/^dtype = \"bf16\"/dtype = \"bf16\"\neval_every = 2/" \
    "$WORK/$name.toml" > "$WORK/heldout-$name.toml"
done
sed 's/^mlp_tile/keep_attention = false\nmlp_tile/; s/name = "heldout-sp4"/name = "heldout-sp4recompute"/' "$WORK/heldout-sp4.toml" > "$WORK/heldout-sp4recompute.toml"
for name in sp1 sp4 sp4recompute; do
  n=1; [ $name = sp1 ] || n="$SP"
  u "$n" "$WORK/heldout-$name.toml" 2>&1 | tee "$OUTD/gputest-heldout-$name.log"
done
python3 - "$OUTD" <<'PY' || fails=$((fails + 1))
import math, re, sys
def run(name):
    t = open(f"{sys.argv[1]}/gputest-heldout-{name}.log").read()
    return {int(s): float(l) for s, l in re.findall(r"step +(\d+)/\d+ +loss \S+  eval_loss (\S+)", t)}
a, b, c = run("sp1"), run("sp4"), run("sp4recompute")
assert sorted(a) == sorted(b) == sorted(c) == [2, 3], f"held-out steps: {sorted(a)}, {sorted(b)}, {sorted(c)}"
for what, got in [("sp4 (kept)", b), ("sp4 (recomputed)", c)]:
    for step in (2, 3):
        assert math.isfinite(got[step]), f"{what} step {step}: held-out loss {got[step]}"
        rel = abs(got[step] - a[step]) / abs(a[step])
        print(f"{what} step {step}: held-out loss sp1 {a[step]:.5f} vs {got[step]:.5f} (rel {rel:.2e})")
        assert rel <= 1.6e-2, f"{what} held-out loss differs from sp1 beyond rtol 1.6e-2"
print("PASS held-out loss on the GPU: sp4 (kept, recomputed) == sp1")
PY
fi

# 6. Qwen3 in bf16 on the GPU against the CPU fp32 run (its config serves part 9 too).
cat > "$WORK/qwen3-config.json" <<JSON
{"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "vocab_size": 512, "hidden_size": 256,
 "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
 "head_dim": 64, "rms_norm_eps": 1e-06, "max_position_embeddings": 4096, "tie_word_embeddings": false,
 "rope_parameters": {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
                     "original_max_position_embeddings": 1024}}
JSON
if want qwen3; then
u 1 data synth --task random --seq-len 4096 --num 3 --seed 4 --out "$WORK/rand4k" >/dev/null
for dev in cpu cuda; do
  [ $dev = cpu ] && { sp=1; dtype=fp32; } || { sp="$SP"; dtype=bf16; }
  cat > "$WORK/qwen3-$dev.toml" <<TOML
[run]
name = "qwen3-$dev"
output_dir = "$WORK/runs"
seed = 5
[model]
config = "$WORK/qwen3-config.json"
[parallel]
sp = $sp
device = "$dev"
[data]
paths = ["$WORK/rand4k"]
seq_len = 4096
shuffle = false
[train]
steps = 3
lr = 1e-4
min_lr = 1e-4
warmup_steps = 0
dtype = "$dtype"
[checkpoint]
resume = "none"
save_final = false
TOML
  u "$sp" "$WORK/qwen3-$dev.toml" 2>&1 | tee "$OUTD/gputest-qwen3-$dev.log"
done
python3 - "$OUTD/gputest-qwen3-cpu.log" "$OUTD/gputest-qwen3-cuda.log" <<'PY' || fails=$((fails + 1))
import re, sys
def steps(p):
    return [(float(l), float(g)) for l, g in re.findall(r"step +\d+/\d+ +loss (\S+) +lr \S+ +grad_norm (\S+)", open(p).read())]
a, b = steps(sys.argv[1]), steps(sys.argv[2])
assert len(a) == len(b) == 3, f"steps completed: cpu {len(a)}, cuda {len(b)}"
for i, ((la, ga), (lb, gb)) in enumerate(zip(a, b), 1):
    rl, rg = abs(la - lb) / abs(la), abs(ga - gb) / abs(ga)
    print(f"step {i}: loss cpu fp32 {la:.5f} gpu bf16 {lb:.5f} (rel {rl:.2e})  grad_norm {ga:.5f} vs {gb:.5f} (rel {rg:.2e})")
    assert rl <= 2e-2 and rg <= 5e-2, "Qwen3 on the GPU in bf16 differs from the CPU fp32 run beyond rtol 2e-2 (loss) / 5e-2 (grad norm)"
print("PASS qwen3: GPU bf16 == CPU fp32 within rtol 2e-2 (loss), 5e-2 (grad norm)")
PY
fi

if want oom; then
  # CUDA out of memory is one message (phase, asked and free, the plan's estimate, what to change):
  # Llama-3.1-8B whole on one GPU with every tier forced onto it and a budget claimed far above the
  # card, so the plan lets it start and CUDA refuses (the state at setup on an H100, the step on
  # an H200). Then bench-checkpoint at 8 layers, which panicked on an H100, plans its memory.
  u 1 data synth --task random --seq-len 65536 --num 2 --seed 4 --out "$WORK/rand64k" >/dev/null
  cat > "$WORK/oom.toml" <<TOML
[run]
name = "oom"
output_dir = "$WORK/runs"
[model]
preset = "llama3.1-8b"
[parallel]
device = "cuda"
offload_optimizer = "device"
activations = "device"
[data]
paths = ["$WORK/rand64k"]
seq_len = 65536
[train]
steps = 1
dtype = "bf16"
[checkpoint]
resume = "none"
save_final = false
[memory]
gpu_gib = 2000.0
TOML
  u 1 "$WORK/oom.toml" > "$OUTD/gputest-oom.log" 2>&1
  rc=$?
  python3 - "$OUTD/gputest-oom.log" "$rc" <<'PY' || fails=$((fails + 1))
import sys
text, rc = open(sys.argv[1]).read(), int(sys.argv[2])
lines = [l for l in text.splitlines() if "CUDA out of memory in" in l]
print("\n".join(lines) or text[-3000:])
assert rc != 0, "the run did not fail"
assert len(lines) == 1, f"{len(lines)} out-of-memory messages"
for want in ("asked for", "free of its", "the memory plan expected", "memory.gpu_gib", "data.seq_len"):
    assert want in lines[0], want
for bad in ("frame #", "panicked at", "Exception raised from"):
    assert bad not in text, f"{bad!r} in the output"
print("PASS oom: one message, exit", rc)
PY
  if bash bench/checkpoint.sh > "$OUTD/gputest-bench-checkpoint.log" 2>&1 && grep -q "units' state on the GPU" "$OUTD/gputest-bench-checkpoint.log"; then
    grep "units' state on the GPU" "$OUTD/gputest-bench-checkpoint.log"
    echo "PASS bench-checkpoint (Llama-3.1-8B dims, 8 layers) planned its memory and finished"
  else
    tail -20 "$OUTD/gputest-bench-checkpoint.log"; echo "FAIL bench-checkpoint"; fails=$((fails + 1))
  fi
fi

# 9. Several ranks on one GPU (PARTS=colocated; ULYSSES_RANKS_PER_GPU, docs/multinode.md): the
#    sharded paths with 2 and 4 ranks sharing GPU 0, NCCL between them over its network
#    transport. A small Llama (4 layers, hidden 512, 8 / 4 heads of 64, vocab 4096) at 8192 tokens,
#    bf16, 3 steps, every comparison on losses and gradient norms within rtol 1.6e-2 (bf16 summed in
#    another order): sp = 4 against sp = 1; sp = 2 × dp = 2 against sp = 1 × dp = 2; packed
#    documents at sp = 4 against sp = 1; Qwen3 (the config of part 6) at sp = 4 against sp = 1;
#    at sp = 2, recomputed attention, layer inputs in host memory and on disk, and the optimizer
#    state in host memory and on disk against kept attention all on the GPU; a format-2
#    checkpoint written by 4 ranks (sp = 4, step 3 of 6) resumed by 1 rank and by 2 (steps 4-6
#    against the uninterrupted run). bench-checkpoint on 2 ranks sharing the GPU plans with half
#    of memory.gpu_gib each. Then the watchdog: a 4-rank job (collective_timeout_s = 20) whose
#    rank 2 gets SIGSTOP must end within the timeout + 20 s, its message naming the collective
#    the live ranks wait in (enqueued on their GPUs) and rank 2 as the one that did not arrive. Prints a
#    summary (each check, the worst relative difference, the watchdog's time); about 5 minutes
#    on one H100.
if want colocated; then
colocated_start=$SECONDS
C="$WORK/colocated"
mkdir -p "$C"
SUMMARY="$C/summary.txt"
: > "$SUMMARY"
cu() {  # ranks name: runs $C/name.toml on one GPU, `ranks` ranks sharing it
  ULYSSES_RANKS_PER_GPU="$1" NGPU="$1" bash bundle/run-gpu.sh "$C/$2.toml" > "$OUTD/gputest-colocated-$2.log" 2>&1
  echo "ran $2 on $1 rank(s) sharing one GPU: exit $?"
}
cexp() {  # name model-config sp dp data steps [extra [parallel] lines]
  cat > "$C/$1.toml" <<TOML
[run]
name = "$1"
output_dir = "$C/runs"
seed = 5
[model]
config = "$2"
[parallel]
sp = $3
dp = $4
device = "cuda"
${7:-}
[data]
paths = ["$5"]
seq_len = $(cat "$5.seq")
shuffle = false
$(cat "$5.extra" 2>/dev/null)
[train]
steps = $6
lr = 1e-4
min_lr = 1e-4
warmup_steps = 0
dtype = "bf16"
[checkpoint]
every = ${EVERY:-100000}
resume = "auto"
save_final = false
TOML
}
small_llama "$C/llama.json"
u 1 data synth --task random --seq-len 8192 --num 12 --seed 2 --out "$C/rand8k" >/dev/null
echo 8192 > "$C/rand8k.seq"
u 1 data synth --task random --seq-len 8192 --num 12 --seed 2 --doc-len 1500 --out "$C/docs8k" >/dev/null
echo 8192 > "$C/docs8k.seq"
printf 'documents = "mask"\npositions = "document"\n' > "$C/docs8k.extra"
u 1 data synth --task random --seq-len 4096 --num 12 --seed 4 --out "$C/rand4k" >/dev/null
echo 4096 > "$C/rand4k.seq"
L="$C/llama.json"
cexp sp1 "$L" 1 1 "$C/rand8k" 3
cexp sp4 "$L" 4 1 "$C/rand8k" 3
cexp sp1dp2 "$L" 1 2 "$C/rand8k" 3
cexp sp2dp2 "$L" 2 2 "$C/rand8k" 3
cexp packed-sp1 "$L" 1 1 "$C/docs8k" 3
cexp packed-sp4 "$L" 4 1 "$C/docs8k" 3
cexp qwen3-sp1 "$WORK/qwen3-config.json" 1 1 "$C/rand4k" 3
cexp qwen3-sp4 "$WORK/qwen3-config.json" 4 1 "$C/rand4k" 3
cexp sp2-device "$L" 2 1 "$C/rand8k" 3 'activations = "device"'
cexp sp2-recompute "$L" 2 1 "$C/rand8k" 3 $'activations = "device"\nkeep_attention = false'
cexp sp2-host "$L" 2 1 "$C/rand8k" 3 'activations = "host"'
cexp sp2-disk "$L" 2 1 "$C/rand8k" 3 'activations = "disk"'
cexp sp2-offload "$L" 2 1 "$C/rand8k" 3 $'activations = "device"\noffload_optimizer = true'
cexp sp2-statedisk "$L" 2 1 "$C/rand8k" 3 $'activations = "device"\noffload_optimizer = "disk"'
EVERY=3 cexp ckpt-sp4 "$L" 4 1 "$C/rand8k" 6
EVERY=3 cexp ckpt-sp1 "$L" 1 1 "$C/rand8k" 6
EVERY=3 cexp ckpt-sp2 "$L" 2 1 "$C/rand8k" 6
for run in sp1:1 sp4:4 sp1dp2:2 sp2dp2:4 packed-sp1:1 packed-sp4:4 qwen3-sp1:1 qwen3-sp4:4 \
           sp2-device:2 sp2-recompute:2 sp2-host:2 sp2-disk:2 sp2-offload:2 sp2-statedisk:2 ckpt-sp4:4; do
  cu "${run#*:}" "${run%%:*}"
done
# The 4-rank checkpoint of step 3, resumed by 1 rank and by 2.
for n in 1 2; do
  mkdir -p "$C/runs/ckpt-sp$n/checkpoints"
  cp -r "$C/runs/ckpt-sp4/checkpoints/step-000003" "$C/runs/ckpt-sp$n/checkpoints/"
  cu "$n" "ckpt-sp$n"
done
python3 - "$OUTD" "$SUMMARY" <<'PY' || fails=$((fails + 1))
import re, sys
out, summary = sys.argv[1], open(sys.argv[2], "a")
def steps(name):
    t = open(f"{out}/gputest-colocated-{name}.log").read()
    return {int(s): (float(l), float(g)) for s, l, g in re.findall(r"step +(\d+)/\d+ +loss (\S+) +lr \S+ +grad_norm (\S+)", t)}, t
failed = []
def compare(what, ref, got, want_steps, needle=None):
    (a, ta), (b, tb) = steps(ref), steps(got)
    problems = []
    if needle and not (needle in ta and needle in tb):
        problems.append(f"no '{needle}' in both logs")
    if "ULYSSES_RANKS_PER_GPU=" not in tb and "ULYSSES_RANKS_PER_GPU=" not in ta:
        problems.append("no run said it shares its GPU")
    worst = 0.0
    for s in want_steps:
        if s not in a or s not in b:
            problems.append(f"step {s} missing ({ref}: {sorted(a)}, {got}: {sorted(b)})")
            continue
        (la, ga), (lb, gb) = a[s], b[s]
        rl, rg = abs(la - lb) / abs(la), abs(ga - gb) / abs(ga)
        worst = max(worst, rl, rg)
        print(f"{what} step {s}: loss {la:.5f} / {lb:.5f} (rel {rl:.1e})  grad_norm {ga:.4f} / {gb:.4f} (rel {rg:.1e})")
    if worst > 1.6e-2:
        problems.append(f"worst relative difference {worst:.2e} > 1.6e-2")
    verdict = "PASS" if not problems else "FAIL"
    line = f"{verdict} {what}: worst relative difference {worst:.2e}" + ("" if not problems else " (" + "; ".join(problems) + ")")
    print(line)
    summary.write(line + "\n")
    if problems:
        failed.append(what)
three = [1, 2, 3]
compare("sp=4 (4 ranks on one GPU) == sp=1", "sp1", "sp4", three)
compare("sp=2 x dp=2 (4 ranks) == sp=1 x dp=2 (2 ranks)", "sp1dp2", "sp2dp2", three)
compare("packed documents sp=4 == sp=1", "packed-sp1", "packed-sp4", three, "attention within documents")
compare("qwen3 sp=4 == sp=1", "qwen3-sp1", "qwen3-sp4", three)
for v, what in [("recompute", "recomputed attention"), ("host", "layer inputs in host memory"), ("disk", "layer inputs on disk"),
                ("offload", "optimizer state in host memory"), ("statedisk", "optimizer state on disk")]:
    compare(f"sp=2 {what} == kept attention on the GPU", "sp2-device", f"sp2-{v}", three)
for n in (1, 2):
    _, t = steps(f"ckpt-sp{n}")
    if "resuming from" not in t or "step-000003" not in t:
        failed.append(f"resume by {n}")
        summary.write(f"FAIL format-2 checkpoint of 4 ranks resumed by {n}: did not resume from step 3\n")
        continue
    compare(f"format-2 checkpoint of 4 ranks resumed by {n} rank(s), steps 4-6", "ckpt-sp4", f"ckpt-sp{n}", [4, 5, 6])
sys.exit(1 if failed else 0)
PY

# bench-checkpoint plans with each co-located rank's share of the GPU, as train does: 2 ranks
# on one GPU with memory.gpu_gib = 8 get 4 GiB each.
cexp bench-shared "$L" 2 1 "$C/rand8k" 3
printf '[memory]\ngpu_gib = 8\n' >> "$C/bench-shared.toml"
ULYSSES_RANKS_PER_GPU=2 NGPU=2 bash bundle/run-gpu.sh bench-checkpoint "$C/bench-shared.toml" > "$OUTD/gputest-colocated-bench.log" 2>&1
grep "units' state on the GPU" "$OUTD/gputest-colocated-bench.log"
if grep -q "the GPU budget is 4.0 GiB)" "$OUTD/gputest-colocated-bench.log"; then
  echo "PASS bench-checkpoint on 2 ranks sharing a GPU plans with 4.0 GiB each (memory.gpu_gib = 8 / 2)" | tee -a "$SUMMARY"
else
  tail -20 "$OUTD/gputest-colocated-bench.log"
  echo "FAIL bench-checkpoint on 2 ranks sharing a GPU: no 'the GPU budget is 4.0 GiB' (memory.gpu_gib = 8 / 2)" | tee -a "$SUMMARY"
  fails=$((fails + 1))
fi

# The watchdog on NCCL: rank 2 of a 4-rank job stopped. The live ranks' NCCL calls return once
# enqueued; the watchdog names the oldest one their GPUs have not finished (comm::queued). It
# aborts after the timeout plus at most 4 looks (timeout / 20 each: 4 s here), plus the time the
# live ranks take to block after the stop (part of a step) and MPI_Abort: BOUND = 20 s.
TIMEOUT=20
BOUND=20
cexp watchdog "$L" 4 1 "$C/rand8k" 100000 "collective_timeout_s = $TIMEOUT"
log="$OUTD/gputest-colocated-watchdog.log"
ULYSSES_RANKS_PER_GPU=4 NGPU=4 bash bundle/run-gpu.sh "$C/watchdog.toml" > "$log" 2>&1 &
job=$!
for _ in $(seq 600); do grep -q "step     3/" "$log" 2>/dev/null && break; kill -0 $job 2>/dev/null || break; sleep 0.2; done
# Rank 2: the third ulysses process of this job (mpirun starts them in rank order; PMI_RANK says).
victim=""
for p in $(pgrep -f "ulysses $C/watchdog.toml"); do
  tr '\0' '\n' < /proc/$p/environ 2>/dev/null | grep -qx "PMI_RANK=2" && victim=$p
done
if [ -z "$victim" ] || ! grep -q "step     3/" "$log"; then
  echo "FAIL watchdog: the job did not reach step 3 or rank 2 was not found" | tee -a "$SUMMARY"
  fails=$((fails + 1))
  kill $job 2>/dev/null
else
  kill -STOP "$victim"
  t0=$(date +%s.%N)
  while kill -0 $job 2>/dev/null; do
    sleep 0.2
    if [ "$(awk "BEGIN { print ($(date +%s.%N) - $t0 > $TIMEOUT + $BOUND + 30) }")" = 1 ]; then kill -9 $job; break; fi
  done
  took=$(awk "BEGIN { printf \"%.1f\", $(date +%s.%N) - $t0 }")
  wait $job; rc=$?
  kill -CONT "$victim" 2>/dev/null; kill -9 "$victim" 2>/dev/null
  grep -A8 "collective watchdog" "$log" | head -12
  python3 - "$log" "$took" "$TIMEOUT" "$BOUND" "$rc" "$SUMMARY" <<'PY' || fails=$((fails + 1))
import re, sys
log, took, timeout, bound, rc = open(sys.argv[1]).read(), float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
problems = []
if rc == 0: problems.append("the job exited 0")
if took > timeout + bound: problems.append(f"took {took:.1f} s > timeout {timeout:.0f} + {bound:.0f} s")
if log.count("collective watchdog: no progress for") != 1: problems.append("no single watchdog message")
if "rank 2: did not arrive" not in log: problems.append("rank 2 not named as the one that did not arrive")
named = re.findall(r"waiting in (all_to_all|all_gather|reduce_scatter|all_reduce|broadcast|ring_shift|barrier) on the (\w+) group \(its call (\d+)(, enqueued on the GPU)?", log)
if not named: problems.append("no collective named (live ranks not inside a collective)")
where = f", waiting in {named[0][0]} on the {named[0][1]} group (call {named[0][2]}{', on the GPU' if named[0][3] else ', on the host'})" if named else ""
line = f"{'PASS' if not problems else 'FAIL'} watchdog: 4 ranks on one GPU, rank 2 stopped, the job ended in {took:.1f} s (timeout {timeout:.0f} s, bound +{bound:.0f} s), exit {rc}" + where + ("" if not problems else " (" + "; ".join(problems) + ")")
print(line)
open(sys.argv[6], "a").write(line + "\n")
sys.exit(1 if problems else 0)
PY
fi
echo "== colocated summary (one GPU, ULYSSES_RANKS_PER_GPU = 2 and 4):"
cat "$SUMMARY"
echo "colocated: $(grep -c '^PASS' "$SUMMARY") passed, $(grep -c '^FAIL' "$SUMMARY") failed, $((SECONDS - colocated_start)) s"
fi

# 10. Ring attention with co-located ranks (PARTS=ring; docs/ring.md).
if want ring; then
R="$WORK/ring"
mkdir -p "$R"
ru() {  # ranks name: runs $R/name.toml with `ranks` ranks sharing GPU 0; a failed run's log end is printed
  local log="$OUTD/gputest-ring-$2.log" rc
  ULYSSES_RANKS_PER_GPU="$1" NGPU="$1" bash bundle/run-gpu.sh "$R/$2.toml" > "$log" 2>&1
  rc=$?
  echo "ran $2 on $1 rank(s) sharing one GPU: exit $rc"
  if [ "$rc" != 0 ]; then
    echo "--- FAIL $2: the last 40 lines of gputest-ring-$2.log:"
    tail -40 "$log"
    echo "--- end of $2"
  fi
}
ULYSSES_RANKS_PER_GPU=4 NGPU=4 bash bundle/run-gpu.sh comm-check --backend nccl 2>&1 | tee "$OUTD/gputest-ring-commcheck.log"
grep -q "ring attention matches it for every ring degree" "$OUTD/gputest-ring-commcheck.log" \
  && echo "PASS comm-check on 4 co-located NCCL ranks: ring_shift exact, ring attention == local attention" \
  || { echo "FAIL comm-check (see above)"; fails=$((fails + 1)); }
# The shifts leave the compute stream free (comm-check's overlap check; it prints both times).
grep -q "comm-check: ring shifts overlap compute" "$OUTD/gputest-ring-commcheck.log" \
  && echo "PASS ring shifts overlap compute on NCCL (the communication stream)" \
  || { echo "FAIL no overlap line from comm-check"; fails=$((fails + 1)); }
small_llama "$R/llama.json"
u 1 data synth --task random --seq-len 8192 --num 3 --seed 2 --out "$R/rand8k" >/dev/null
u 1 data synth --task random --seq-len 65536 --num 1 --seed 2 --out "$R/rand64k" >/dev/null
L="config = \"$R/llama.json\""
rexp sp1 "$L" 1 1 8192 "$R/rand8k" 3
rexp u2r2 "$L" 4 2 8192 "$R/rand8k" 3
rexp u2r2-recompute "$L" 4 2 8192 "$R/rand8k" 3 'keep_attention = false'
rexp u2r2-flash "$L" 4 2 8192 "$R/rand8k" 3 'attention = "flash"'
B=$'preset = "llama3.1-8b"\nlayers = 8'
# The optimizer state in host memory for both (the same numerics): on the GPU the sp = 1 step
# alone plans 74.8 of 76 GiB, too close to the real ceiling.
rexp 8b-sp1 "$B" 1 1 65536 "$R/rand64k" 1 'offload_optimizer = "host"'
rexp 8b-u1r2 "$B" 2 2 65536 "$R/rand64k" 1 'offload_optimizer = "host"'
# Every experiment passes `ulysses check` before anything runs (an unset $8 once left four of
# these files empty under set -u, and the runs failed with nothing said).
for name in sp1 u2r2 u2r2-recompute u2r2-flash 8b-sp1 8b-u1r2; do
  u 1 check "$R/$name.toml" > "$OUTD/gputest-ring-check-$name.log" 2>&1 \
    || { echo "FAIL ulysses check $name.toml:"; tail -20 "$OUTD/gputest-ring-check-$name.log"; fails=$((fails + 1)); }
done
ru 1 sp1; ru 4 u2r2; ru 4 u2r2-recompute; ru 4 u2r2-flash; ru 1 8b-sp1; ru 2 8b-u1r2
python3 - "$OUTD" <<'PY' || fails=$((fails + 1))
import re, sys
def run(name, steps):
    t = open(f"{sys.argv[1]}/gputest-ring-{name}.log").read()
    got = [(float(l), float(g)) for l, g in re.findall(r"step +\d+/\d+ +loss (\S+) +lr \S+ +grad_norm (\S+)", t)]
    assert len(got) == steps, f"{name}: {len(got)} of {steps} steps completed (see gputest-ring-{name}.log)"
    assert name.endswith("sp1") or "ring attention: ulysses" in t, f"{name}: the run did not say it ran ring attention"
    return got, max([float(x) for x in re.findall(r"peak (\S+) GiB", t)] or [0.0])
base, _ = run("sp1", 3)
worst = 0.0
for name in ["u2r2", "u2r2-recompute", "u2r2-flash"]:
    got, _ = run(name, 3)
    for i, ((la, ga), (lb, gb)) in enumerate(zip(base, got), 1):
        rl, rg = abs(la - lb) / abs(la), abs(ga - gb) / abs(ga)
        worst = max(worst, rl, rg)
        print(f"{name} step {i}: loss sp1 {la:.5f} ring {lb:.5f} (rel {rl:.2e})  grad_norm {ga:.5f} / {gb:.5f} (rel {rg:.2e})")
        assert rl <= 1.6e-2 and rg <= 1.6e-2, f"{name} differs from sp = 1 beyond rtol 1.6e-2"
print(f"PASS ulysses 2 x ring 2 == sp 1 in bf16 (kept cuDNN, recomputed, flash; worst relative difference {worst:.2e})")
(a, pa), (b, pb) = run("8b-sp1", 1), run("8b-u1r2", 1)
rl = abs(a[0][0] - b[0][0]) / abs(a[0][0])
print(f"8B dims, 8 layers, 65536 tokens, one step: loss sp1 {a[0][0]:.5f} (peak {pa} GiB), ulysses 1 x ring 2 on 2 co-located ranks {b[0][0]:.5f} (rel {rl:.2e}; peak {pb} GiB per rank)")
assert rl <= 1.6e-2, "the 8B-dims ring step differs from sp = 1 beyond rtol 1.6e-2"
print("PASS 8B dims 64K step at ulysses 1 x ring 2 (a correctness and memory figure, not speed)")
PY
fi

# 11. LoRA on the GPU (PARTS=lora; docs/lora.md).
if want lora; then
exp lora-full llama3.2-1b 1 16384 3 1e-4 "$WORK/rand16k"
exp lora-1b llama3.2-1b 1 16384 3 1e-3 "$WORK/rand16k"
printf '[lora]\nrank = 16\nalpha = 32.0\n' >> "$WORK/lora-1b.toml"
u 1 "$WORK/lora-full.toml" 2>&1 | tee "$OUTD/gputest-lora-full.log"
u 1 "$WORK/lora-1b.toml" 2>&1 | tee "$OUTD/gputest-lora-1b.log"
exp lora-drop-1b llama3.2-1b 1 16384 3 1e-3 "$WORK/rand16k"
printf '[lora]\nrank = 16\nalpha = 32.0\ndropout = 0.1\n' >> "$WORK/lora-drop-1b.toml"
u 1 "$WORK/lora-drop-1b.toml" 2>&1 | tee "$OUTD/gputest-lora-drop-1b.log"
bash bundle/run-gpu.sh --exec bundle/tests/lora_step --ignored gpu_ --test-threads 1 --nocapture 2>&1 | tee "$WORK/lora-dropout-mask.log"
grep -q "test result: ok. 1 passed" "$WORK/lora-dropout-mask.log" && echo "PASS LoRA dropout masks on CUDA" || fails=$((fails + 1))
u 1 data synth --task passkey --seq-len 4096 --num 64 --seed 3 --out "$WORK/pk4k-lora" >/dev/null
exp lora-learn tiny 1 4096 30 1e-2 "$WORK/pk4k-lora"
printf '[lora]\nrank = 16\nalpha = 32.0\ntrain_fully = ["lm_head"]\n' >> "$WORK/lora-learn.toml"
u 1 "$WORK/lora-learn.toml" 2>&1 | tee "$OUTD/gputest-lora-learn.log"
python3 - "$OUTD/gputest-lora-full.log" "$OUTD/gputest-lora-1b.log" "$OUTD/gputest-lora-learn.log" "$OUTD/gputest-lora-drop-1b.log" <<'PY' || fails=$((fails + 1))
import math, re, sys
def steps(p):
    pat = r"step +\d+/\d+ +loss (\S+) +lr \S+ +grad_norm (\S+) .*? (\S+) s/step .*?peak (\S+) GiB"
    return [tuple(map(float, m)) for m in re.findall(pat, open(p).read())]
full, lora, learn, drop = steps(sys.argv[1]), steps(sys.argv[2]), steps(sys.argv[3]), steps(sys.argv[4])
assert len(full) == len(lora) == 3, f"steps completed: full {len(full)}, lora {len(lora)}"
for name, run in (("full", full), ("lora", lora)):
    for i, (l, g, s, p) in enumerate(run, 1):
        print(f"{name} step {i}: loss {l:.5f} grad_norm {g:.4f} {s:.2f} s/step peak {p:.1f} GiB")
assert all(math.isfinite(l) and math.isfinite(g) for l, g, _, _ in lora), "a non-finite LoRA loss or norm"
rel = abs(full[0][0] - lora[0][0]) / abs(full[0][0])
print(f"step 1 loss: full {full[0][0]:.5f}, LoRA {lora[0][0]:.5f} (rel {rel:.2e})")
assert rel <= 1e-3, "LoRA's step 1 (B = 0) differs from the base model's loss"
peak_full, peak_lora = max(r[3] for r in full), max(r[3] for r in lora)
assert peak_lora < peak_full, f"LoRA peak {peak_lora} GiB not below full fine-tuning's {peak_full} GiB"
print(f"PASS LoRA on Llama-3.2-1B dims, 16K, bf16: step 1 = the base's loss, peak {peak_lora:.1f} GiB vs full {peak_full:.1f} GiB")
assert len(learn) == 30, f"{len(learn)} LoRA steps completed"
print(f"tiny LoRA loss {learn[0][0]:.4f} -> {learn[-1][0]:.4f}")
assert learn[-1][0] < 0.9 * learn[0][0], "the LoRA loss did not fall by 10%"
print("PASS LoRA trains on GPU (tiny, passkey 4K, rank 16 + lm_head, bf16)")
assert len(drop) == 3, f"{len(drop)} LoRA dropout steps completed"
for i, ((l, g, s, p), (l0, _, s0, p0)) in enumerate(zip(drop, lora), 1):
    print(f"dropout 0.1 step {i}: loss {l:.5f} (without {l0:.5f}) {s:.2f} s/step (without {s0:.2f}) peak {p:.1f} GiB (without {p0:.1f})")
assert all(math.isfinite(l) and math.isfinite(g) for l, g, _, _ in drop), "a non-finite dropout loss or norm"
assert abs(drop[0][0] - lora[0][0]) <= 1e-3 * abs(lora[0][0]), "dropout changed step 1, where B = 0"
assert any(abs(d[0] - n[0]) > 1e-4 * abs(n[0]) for d, n in zip(drop[1:], lora[1:])), "dropout changed nothing"
print("PASS LoRA dropout 0.1 on GPU (Llama-3.2-1B dims, 16K, bf16)")
PY
fi

# 12. Kept attention's forward in query blocks (PARTS=blocks) == recomputed attention.
if want blocks; then
R="$WORK/blocks"
mkdir -p "$R"
llama_config "$R/model.json" 1024 2048 2 8 2 128 262144
u 1 data synth --task random --seq-len 163840 --num 2 --seed 3 --out "$R/rand160k" >/dev/null
for name in kept recomputed; do
  keep=true; [ "$name" = recomputed ] && keep=false
  rexp "$name" "config = \"$R/model.json\"" 1 1 163840 "$R/rand160k" 2 $'attention = "cudnn"\nkeep_attention = '"$keep"
  u 1 "$R/$name.toml" > "$OUTD/gputest-blocks-$name.log" 2>&1 || { echo "FAIL blocks-$name:"; tail -30 "$OUTD/gputest-blocks-$name.log"; }
done
python3 - "$OUTD" <<'PY' || fails=$((fails + 1))
import re, sys
def run(name):
    t = open(f"{sys.argv[1]}/gputest-blocks-{name}.log").read()
    got = [(float(l), float(g)) for l, g in re.findall(r"step +\d+/\d+ +loss (\S+) +lr \S+ +grad_norm (\S+)", t)]
    assert len(got) == 2, f"{name}: {len(got)} of 2 steps completed (see gputest-blocks-{name}.log)"
    return got
for i, ((la, ga), (lb, gb)) in enumerate(zip(run("recomputed"), run("kept")), 1):
    rl, rg = abs(la - lb) / abs(la), abs(ga - gb) / abs(ga)
    print(f"step {i}: loss recomputed {la:.5f} kept in blocks {lb:.5f} (rel {rl:.2e})  grad_norm {ga:.5f} / {gb:.5f} (rel {rg:.2e})")
    assert rl <= 1.6e-2 and rg <= 1.6e-2, "attention in query blocks differs from recomputed beyond rtol 1.6e-2"
print("PASS kept cuDNN attention with its forward in 64K query blocks == recomputed attention at 163840 tokens")
PY
fi

want learn || { echo "gpu tests ($PARTS): $fails failed"; exit $fails; }
u 1 data synth --task passkey --seq-len 4096 --num 64 --seed 3 --out "$WORK/pk4k" >/dev/null
exp learn tiny "$SP" 4096 30 3e-3 "$WORK/pk4k"
u "$SP" "$WORK/learn.toml" 2>&1 | tee "$OUTD/gputest-learn.log"
python3 - "$OUTD/gputest-learn.log" <<'PY' || fails=$((fails + 1))
import re, sys
loss = [float(x) for x in re.findall(r"step +\d+/\d+ +loss (\S+)", open(sys.argv[1]).read())]
assert len(loss) == 30, f"{len(loss)} steps completed"
print(f"loss {loss[0]:.4f} -> {loss[-1]:.4f}")
assert loss[-1] < 0.8 * loss[0], "loss did not fall by 20%"
print("PASS loss goes down on GPU (tiny, passkey 4K, sp=4, bf16)")
PY
echo "gpu tests: $fails failed"
exit $fails
