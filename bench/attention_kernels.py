# Attention kernels forward and backward apart, at the lengths and heads of a Llama-3.1-8B step
# on one GPU (32 query / 8 KV heads of 128, bf16): the ops ulysses calls (shim/attention.cpp),
# each timed alone with CUDA events after a warm-up call.
#   python3 bench/attention_kernels.py > attention_kernels.jsonl      # 32K-256K, docs of 8K and 32K
#   SEQS=65536 DOCS=8192 REPEAT=3 python3 bench/attention_kernels.py
# Kernels:
#   causal_cudnn, causal_flash    full causal over the whole sequence (one document);
#   per_doc_cudnn, per_doc_flash  documents of DOC tokens by the causal kernel, the documents as its
#                                 batch: one call on a view [S/DOC, DOC, heads, d], as ulysses runs
#                                 a run of equal-length documents of >= parallel.per_document_min_len;
#   varlen_flash, varlen_cudnn    the same documents by the varlen kernels (cumulative lengths);
#                                 cuDNN varlen's output is checked (its results were wrong here on
#                                 2026-12-01, bench/cudnn_varlen_repro.py) and its row says so.
# One JSON object per line: seq, doc (null: full causal), kernel, fwd_s, bwd_s, and TFLOP/s on the
# FLOPs each does: forward 2·Σ len²·n_q·d (QKᵀ and PV over the causal half, src/plan/flops.rs),
# backward 2.5× the forward (dQ, dK, dV and the recomputed QKᵀ: the hardware's work, as
# flash-attention's benchmarks count it); `fwd_vs_causal` / `bwd_vs_causal` are the rates over
# causal cuDNN's at the same length. The last line names the GPU kernels each op ran (profiler).
import json
import os

import torch
from cuda_timing import REPEAT, rel, timed

aten = torch.ops.aten
dev = "cuda"
HQ, HKV, D = int(os.environ.get("HQ", 32)), int(os.environ.get("HKV", 8)), 128
SEQS = [int(x) for x in os.environ.get("SEQS", "32768 65536 131072 262144").split()]
DOCS = [int(x) for x in os.environ.get("DOCS", "32768 8192").split()]


def causal(kind, q, k, v):
    """Forward and backward closures of the causal kernel; q [b, s, n_q, d], k/v [b, s, n_kv, d]."""
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [b, heads, s, d]
    s = q.shape[2]
    if kind == "cudnn":
        r = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False)
        o, lse, seed, off = r[0], r[1], r[6], r[7]
        g = torch.randn_like(o)
        fwd = lambda: aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False)
        bwd = lambda: aten._scaled_dot_product_cudnn_attention_backward(g, q, k, v, o, lse, seed, off, None, None, None, s, s, 0.0, True)
    else:
        r = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False)
        o, lse, seed, off = r[0], r[1], r[6], r[7]
        g = torch.randn_like(o)
        fwd = lambda: aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False)
        bwd = lambda: aten._scaled_dot_product_flash_attention_backward(g, q, k, v, o, lse, None, None, s, s, 0.0, True, seed, off)
    return fwd, bwd, o.transpose(1, 2)


def varlen(kind, q, k, v, cu, max_len):
    """Forward and backward closures of the varlen kernel on q [total, n_q, d], k/v [total, n_kv, d]."""
    if kind == "cudnn":
        call = lambda: aten._cudnn_attention_forward(q, k, v, None, cu, cu, max_len, max_len, True, 0.0, True, False)
        r = call()
        o, lse, seed, off = r[0], r[1], r[6], r[7]
        g = torch.randn_like(o)
        bwd = lambda: aten._cudnn_attention_backward(g, q, k, v, o, lse, seed, off, None, cu, cu, max_len, max_len, 0.0, True)
    else:
        call = lambda: aten._flash_attention_forward(q, k, v, cu, cu, max_len, max_len, 0.0, True, False)
        r = call()
        o, lse, seed, off = r[0], r[1], r[2], r[3]
        g = torch.randn_like(o)
        bwd = lambda: aten._flash_attention_backward(g, q, k, v, o, lse, cu, cu, max_len, max_len, 0.0, True, seed, off)
    return call, bwd, o


def fwd_flops(lens):
    return 2.0 * sum(l * l for l in lens) * HQ * D


def row(seq, doc, kernel, lens, fwd, bwd, base, **extra):
    t_f, t_b = timed(fwd), timed(bwd)
    f = fwd_flops(lens)
    r = {"seq": seq, "doc": doc, "kernel": kernel, "fwd_s": round(t_f, 4), "bwd_s": round(t_b, 4),
         "fwd_tflops": round(f / t_f / 1e12, 1), "bwd_tflops": round(2.5 * f / t_b / 1e12, 1)}
    if base:
        r["fwd_vs_causal"] = round(r["fwd_tflops"] / base["fwd_tflops"], 3)
        r["bwd_vs_causal"] = round(r["bwd_tflops"] / base["bwd_tflops"], 3)
    r.update(extra)
    print(json.dumps(r), flush=True)
    return r


print(json.dumps({"torch": torch.__version__, "cudnn": torch.backends.cudnn.version(), "device": torch.cuda.get_device_name(),
                  "heads_q": HQ, "heads_kv": HKV, "head_dim": D, "repeat": REPEAT}), flush=True)
torch.manual_seed(0)
for seq in SEQS:
    q = torch.randn(1, seq, HQ, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, seq, HKV, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn(1, seq, HKV, D, device=dev, dtype=torch.bfloat16)
    base = None
    for kind in ["cudnn", "flash"]:
        fwd, bwd, _ = causal(kind, q, k, v)
        r = row(seq, None, f"causal_{kind}", [seq], fwd, bwd, base)
        base = base or r
        del fwd, bwd
    for doc in [d for d in DOCS if d < seq and seq % d == 0]:
        n, lens = seq // doc, [doc] * (seq // doc)
        view = lambda t: t.view(n, doc, t.shape[2], D)  # [1, seq, heads, d] -> [n, doc, heads, d]: no copy
        outs = {}
        for kind in ["cudnn", "flash"]:
            fwd, bwd, outs[kind] = causal(kind, view(q), view(k), view(v))
            row(seq, doc, f"per_doc_{kind}", lens, fwd, bwd, base)
            del fwd, bwd
        flat = lambda t: t.view(seq, t.shape[2], D)
        cu = torch.arange(0, seq + 1, doc, device=dev, dtype=torch.int32)
        for kind in ["flash", "cudnn"]:
            try:
                fwd, bwd, o = varlen(kind, flat(q), flat(k), flat(v), cu, doc)
                # Against the per-document causal kernel of the same family (bf16 both).
                err = rel(o, outs["cudnn"].reshape(seq, HQ, D))
                row(seq, doc, f"varlen_{kind}", lens, fwd, bwd, base, max_rel_diff_vs_per_doc=round(err, 5),
                    right=err < 2e-2)
                del fwd, bwd, o
            except Exception as e:  # noqa: BLE001 - a refusal is the finding
                print(json.dumps({"seq": seq, "doc": doc, "kernel": f"varlen_{kind}", "error": repr(e)[:300]}), flush=True)
        del outs
    del q, k, v
    torch.cuda.empty_cache()

# Which GPU kernels each op runs (names as the step's profiler classes them), on 32K tokens.
from torch.profiler import ProfilerActivity, profile  # noqa: E402

seq, doc = 32768, 8192
q = torch.randn(1, seq, HQ, D, device=dev, dtype=torch.bfloat16)
k = torch.randn(1, seq, HKV, D, device=dev, dtype=torch.bfloat16)
v = torch.randn(1, seq, HKV, D, device=dev, dtype=torch.bfloat16)
names = {}
for kind in ["cudnn", "flash"]:
    fwd, bwd, _ = causal(kind, q, k, v)
    for what, fn in [("fwd", fwd), ("bwd", bwd)]:
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as p:
            fn()
            torch.cuda.synchronize()
        names[f"causal_{kind}_{what}"] = sorted({e.name[:120] for e in p.events() if e.device_type == torch.autograd.DeviceType.CUDA})
print(json.dumps({"kernel_names": names}), flush=True)
