# Does the layout or the grouping of K/V change cuDNN's causal attention rate? Forward and
# backward apart at one length, bf16, Llama-3.1-8B heads (32 query / 8 KV of 128):
#   bshd  q, k, v are [b, s, h, d] tensors seen as [b, h, s, d] (what the training step passes)
#   bhsd  the same values made contiguous as [b, h, s, d]
#   mha   K/V heads repeated to 32 (what GQA costs against plain multi-head attention), in bshd;
#         its dk/dv would be summed over the 4 query heads of each KV head (not timed here)
#   SEQS="131072" python3 bench/attention_layouts.py
# One JSON object per line: seq, layout, fwd_s, bwd_s, TFLOP/s (causal FLOPs: forward
# 2·s²·n_q·d, backward 2.5× that), and the largest relative difference of o, dq from bshd's.
import json
import os

import torch
from cuda_timing import rel, timed

aten = torch.ops.aten
HQ, HKV, D = 32, 8, 128
SEQS = [int(x) for x in os.environ.get("SEQS", "131072").split()]


def run(q, k, v, g):
    r = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False)
    o, lse, seed, off = r[0], r[1], r[6], r[7]

    def fwd():
        aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False)

    def bwd():
        return aten._scaled_dot_product_cudnn_attention_backward(
            g, q, k, v, o, lse, seed, off, None, None, None, q.shape[2], k.shape[2], 0.0, True)

    return o, bwd()[0], timed(fwd), timed(bwd)


for s in SEQS:
    torch.manual_seed(0)
    shape = lambda h: torch.randn(1, s, h, D, device="cuda", dtype=torch.bfloat16)
    q, k, v, g = shape(HQ), shape(HKV), shape(HKV), shape(HQ)
    bshd = [t.transpose(1, 2) for t in (q, k, v, g)]
    bhsd = [t.contiguous() for t in bshd]
    rep = lambda t: t.repeat_interleave(HQ // HKV, dim=2).transpose(1, 2)
    mha = [bshd[0], rep(k), rep(v), bshd[3]]
    flops = 2 * s * s * HQ * D
    base = None
    for name, args in [("bshd", bshd), ("bhsd", bhsd), ("mha", mha)]:
        o, dq, f, b = run(*args)
        base = base or (o, dq)
        print(json.dumps({"seq": s, "layout": name, "fwd_s": round(f, 4), "bwd_s": round(b, 4),
                          "fwd_tflops": round(flops / f / 1e12, 1), "bwd_tflops": round(2.5 * flops / b / 1e12, 1),
                          "rel_o": rel(o, base[0]), "rel_dq": rel(dq, base[1])}), flush=True)
        del o, dq
        torch.cuda.empty_cache()
