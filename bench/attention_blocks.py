# Causal attention over one long sequence, whole or cut into key/query blocks, forward and
# backward apart (bf16, Llama-3.1-8B heads: 32 query / 8 KV of 128), by libtorch's cuDNN kernel.
# The question: does cutting a long causal attention into blocks that stay in the kernel's fast
# range (the kernel's rate falls with length: 676/628/561 TFLOP/s forward at 32K/64K/128K on an
# H100 on 2026-12-06) win back more than the blocks' log-sum-exp merges cost?
#   python3 bench/attention_blocks.py > attention_blocks.jsonl
#   SEQS="131072" BLOCKS="65536 32768" REPEAT=3 python3 bench/attention_blocks.py
# For blocks of C tokens, query block i attends to keys [0, i·C) without a mask (one call) and to
# its own block causally (one call); the two are merged by the log-sum-exp update in fp32 (as
# src/parallel/ring.rs merges hops). Backward runs each call's backward with the merged output
# and log-sum-exp, accumulating dq, dk, dv in fp32, as ring attention's backward does.
# One JSON object per line: seq, block (null: whole), fwd_s, bwd_s, TFLOP/s on the causal FLOPs
# (forward 2·s²·n_q·d, backward 2.5× that, as bench/attention_kernels.py counts), the speed-up
# over the whole kernel, and the largest relative difference of o, dq, dk, dv from the whole.
import json
import os

import torch
from cuda_timing import REPEAT, rel, timed

aten = torch.ops.aten
dev = "cuda"
HQ, HKV, D = int(os.environ.get("HQ", 32)), int(os.environ.get("HKV", 8)), 128
SEQS = [int(x) for x in os.environ.get("SEQS", "65536 131072 262144").split()]
BLOCKS = [int(x) for x in os.environ.get("BLOCKS", "65536 32768 16384").split()]


def fwd_call(q, k, v, causal):
    """o [b, h, s, d], lse [b, h, s] (fp32), and what the backward needs."""
    r = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False)
    lse = r[1]
    return r[0], (lse.squeeze(-1) if lse.dim() == 4 else lse), r[1].dim(), r[6], r[7]


def bwd_call(g, q, k, v, o, lse, dims, seed, off, causal):
    lse = lse.unsqueeze(-1).contiguous() if dims == 4 else lse.contiguous()
    return aten._scaled_dot_product_cudnn_attention_backward(
        g, q, k, v, o, lse, seed, off, None, None, None, q.shape[2], k.shape[2], 0.0, causal)


def merge(o, lse, o_b, lse_b):
    new = torch.logaddexp(lse, lse_b)
    return o * (lse - new).exp().unsqueeze(-1) + o_b.float() * (lse_b - new).exp().unsqueeze(-1), new


def blocked_forward(q, k, v, c):
    """Whole-sequence output [b, h, s, d] (bf16) and merged lse [b, h, s] by blocks of c tokens."""
    outs, lses, extra = [], [], None
    for i in range(q.shape[2] // c):
        qi = q[:, :, i * c:(i + 1) * c]
        o, lse, dims, seed, off = fwd_call(qi, k[:, :, i * c:(i + 1) * c], v[:, :, i * c:(i + 1) * c], True)
        extra = (dims, seed, off)
        if i > 0:
            o_p, lse_p, *_ = fwd_call(qi, k[:, :, :i * c], v[:, :, :i * c], False)
            o, lse = merge(o.float(), lse, o_p, lse_p)
        outs.append(o.to(q.dtype))
        lses.append(lse)
    return torch.cat(outs, 2), torch.cat(lses, 2), extra


def blocked_backward(g, q, k, v, o, lse, extra, c):
    dims, seed, off = extra
    dq = torch.zeros(q.shape, device=dev, dtype=torch.float32)
    dk = torch.zeros(k.shape, device=dev, dtype=torch.float32)
    dv = torch.zeros(v.shape, device=dev, dtype=torch.float32)
    for i in range(q.shape[2] // c):
        s = slice(i * c, (i + 1) * c)
        args = (g[:, :, s], q[:, :, s])
        a, b_, c_ = bwd_call(*args, k[:, :, s], v[:, :, s], o[:, :, s], lse[:, :, s], dims, seed, off, True)
        dq[:, :, s] += a
        dk[:, :, s] += b_
        dv[:, :, s] += c_
        if i > 0:
            p = slice(0, i * c)
            a, b_, c_ = bwd_call(*args, k[:, :, p], v[:, :, p], o[:, :, s], lse[:, :, s], dims, seed, off, False)
            dq[:, :, s] += a
            dk[:, :, p] += b_
            dv[:, :, p] += c_
    return dq, dk, dv


print(json.dumps({"torch": torch.__version__, "cudnn": torch.backends.cudnn.version(), "device": torch.cuda.get_device_name(),
                  "heads_q": HQ, "heads_kv": HKV, "head_dim": D, "repeat": REPEAT}), flush=True)
torch.manual_seed(0)
for seq in SEQS:
    q = torch.randn(1, HQ, seq, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, HKV, seq, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn(1, HKV, seq, D, device=dev, dtype=torch.bfloat16)
    g = torch.randn(1, HQ, seq, D, device=dev, dtype=torch.bfloat16)
    flops = 2.0 * seq * seq * HQ * D
    o, lse, dims, seed, off = fwd_call(q, k, v, True)
    t_f = timed(lambda: fwd_call(q, k, v, True))
    ref = bwd_call(g, q, k, v, o, lse, dims, seed, off, True)
    t_b = timed(lambda: bwd_call(g, q, k, v, o, lse, dims, seed, off, True))
    whole = {"fwd_s": t_f, "bwd_s": t_b}
    print(json.dumps({"seq": seq, "block": None, "fwd_s": round(t_f, 4), "bwd_s": round(t_b, 4),
                      "fwd_tflops": round(flops / t_f / 1e12, 1), "bwd_tflops": round(2.5 * flops / t_b / 1e12, 1)}), flush=True)
    for c in [c for c in BLOCKS if c < seq and seq % c == 0]:
        try:
            o_b, lse_b, extra = blocked_forward(q, k, v, c)
            t_fb = timed(lambda: blocked_forward(q, k, v, c))
            grads = blocked_backward(g, q, k, v, o_b, lse_b, extra, c)
            t_bb = timed(lambda: blocked_backward(g, q, k, v, o_b, lse_b, extra, c))
            errs = {"o": rel(o_b, o), "dq": rel(grads[0], ref[0]), "dk": rel(grads[1], ref[1]), "dv": rel(grads[2], ref[2])}
            print(json.dumps({"seq": seq, "block": c, "fwd_s": round(t_fb, 4), "bwd_s": round(t_bb, 4),
                              "fwd_tflops": round(flops / t_fb / 1e12, 1), "bwd_tflops": round(2.5 * flops / t_bb / 1e12, 1),
                              "fwd_speedup": round(whole["fwd_s"] / t_fb, 3), "bwd_speedup": round(whole["bwd_s"] / t_bb, 3),
                              "step_speedup": round((t_f + t_b) / (t_fb + t_bb), 3),
                              "max_rel_diff": {k_: round(e, 5) for k_, e in errs.items()}}), flush=True)
            del o_b, lse_b, grads
        except Exception as e:  # noqa: BLE001 - a refusal is the finding
            print(json.dumps({"seq": seq, "block": c, "error": repr(e)[:300]}), flush=True)
        torch.cuda.empty_cache()
    # The unmasked kernel alone on one square block, for its rate (counted on the full block's
    # FLOPs, twice the causal ones).
    c = min(seq // 2, 65536)
    qs, ks, vs, gs = q[:, :, :c], k[:, :, :c], v[:, :, :c], g[:, :, :c]
    o2, lse2, d2, s2, f2 = fwd_call(qs, ks, vs, False)
    tf = timed(lambda: fwd_call(qs, ks, vs, False))
    tb = timed(lambda: bwd_call(gs, qs, ks, vs, o2, lse2, d2, s2, f2, False))
    full = 4.0 * c * c * HQ * D
    print(json.dumps({"seq": c, "block": "unmasked", "fwd_s": round(tf, 4), "bwd_s": round(tb, 4),
                      "fwd_tflops": round(full / tf / 1e12, 1), "bwd_tflops": round(2.5 * full / tb / 1e12, 1)}), flush=True)
    del q, k, v, g, o, lse, ref, o2, lse2
    torch.cuda.empty_cache()
