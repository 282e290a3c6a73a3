# Which libtorch fused attention ops attend within packed documents (varlen: cumulative sequence
# lengths) on this GPU, whether they take grouped-query heads natively (fewer KV heads than query
# heads) and return the log-sum-exp, how close they come to attention over each document alone,
# and their TFLOP/s against full causal attention at the same length. The ops are the ones
# ulysses calls (shim/attention.cpp): aten._flash_attention_forward/_backward and
# aten._cudnn_attention_forward/_backward with cum_seq_q = cum_seq_k.
#   python3 bench/varlen_probe.py                 # 256K tokens, 32 query / 8 KV heads of 128
#   S=65536 HQ=8 HKV=2 python3 bench/varlen_probe.py
# Prints one JSON object. FLOPs: forward 2·Σ len²·n_q·d (causal half of QKᵀ and PV, as
# src/plan/flops.rs), forward + backward 3.5× that (the backward recomputes QKᵀ); full causal
# has one document of S tokens. Adapted from ../shared/probes/varlen_probe.py.
import json
import os
import time

import torch

torch.manual_seed(0)
dev = "cuda"
S = int(os.environ.get("S", 262144))
HQ, HKV, D = int(os.environ.get("HQ", 32)), int(os.environ.get("HKV", 8)), 128
DOCS = [int(x) for x in os.environ.get("DOCS", "8192,32768").split(",")]
F = torch.nn.functional
aten = torch.ops.aten
out = {"torch": torch.__version__, "cudnn": torch.backends.cudnn.version(), "device": torch.cuda.get_device_name(),
       "S": S, "heads_q": HQ, "heads_kv": HKV, "head_dim": D}


def bench(fn, n=3):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n


def flops(lens):
    return 2.0 * sum(l * l for l in lens) * HQ * D


def varlen(kind, q, k, v, cu, max_len):
    """Forward and backward of one varlen op; returns (out, lse, grads)."""
    if kind == "flash":
        o, lse, rng, unused, _ = aten._flash_attention_forward(q, k, v, cu, cu, max_len, max_len, 0.0, True, False)
        g = torch.ones_like(o)
        grads = aten._flash_attention_backward(g, q, k, v, o, lse, cu, cu, max_len, max_len, 0.0, True, rng, unused)
    else:
        r = aten._cudnn_attention_forward(q, k, v, None, cu, cu, max_len, max_len, True, 0.0, True, False)
        o, lse, seed, offset = r[0], r[1], r[6], r[7]
        g = torch.ones_like(o)
        grads = aten._cudnn_attention_backward(g, q, k, v, o, lse, seed, offset, torch.Tensor(), cu, cu, max_len,
                                               max_len, 0.0, True)
    return o, lse, grads


def cu_seqlens(lens):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), device=dev, dtype=torch.int32)


def accuracy(kind, hkv):
    """Largest difference from fp32 attention over each document alone, relative to its largest entry."""
    lens = [1, 2, 500, 37, 1000, 2556]
    s = sum(lens)
    q = torch.randn(s, HQ, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(s, hkv, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn(s, hkv, D, device=dev, dtype=torch.bfloat16)
    o, lse, _ = varlen(kind, q, k, v, cu_seqlens(lens), max(lens))
    parts, at = [], 0
    for l in lens:
        t = lambda x: x[at:at + l].float().transpose(0, 1)[None]
        parts.append(F.scaled_dot_product_attention(t(q), t(k), t(v), is_causal=True, enable_gqa=hkv != HQ)[0].transpose(0, 1))
        at += l
    ref = torch.cat(parts)
    return (o.float() - ref).abs().max().item() / ref.abs().max().item(), list(lse.shape)


for kind in ["flash", "cudnn"]:
    for hkv, label in [(HKV, "gqa"), (HQ, "repeated_kv")]:
        key = f"varlen_{kind}_{label}"
        try:
            err, lse_shape = accuracy(kind, hkv)
            out[key] = {"accepts": True, "max_rel_error_vs_each_document": round(err, 5), "lse_shape": lse_shape}
        except Exception as e:  # noqa: BLE001 - a refusal is the finding
            out[key] = {"accepts": False, "error": repr(e)[:300]}

q = torch.randn(S, HQ, D, device=dev, dtype=torch.bfloat16)
k = torch.randn(S, HKV, D, device=dev, dtype=torch.bfloat16)
v = torch.randn(S, HKV, D, device=dev, dtype=torch.bfloat16)
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

for name, backend in [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)]:
    qq, kk, vv = (x.detach().transpose(0, 1)[None].requires_grad_() for x in (q, k, v))

    def full():
        with sdpa_kernel([backend]):
            o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True)
        o.backward(torch.ones_like(o))

    try:
        t = bench(full, 2)
        out[f"full_causal_{name}"] = {"s": round(t, 4), "tflops": round(3.5 * flops([S]) / t / 1e12, 1)}
    except Exception as e:  # noqa: BLE001
        out[f"full_causal_{name}"] = {"error": repr(e)[:300]}

for doc in DOCS:
    lens = [doc] * (S // doc) + ([S % doc] if S % doc else [])
    cu = cu_seqlens(lens)
    for kind in ["flash", "cudnn"]:
        for hkv, label in [(HKV, "gqa"), (HQ, "repeated_kv")]:
            if not out.get(f"varlen_{kind}_{label}", {}).get("accepts"):
                continue
            kk = k if hkv == HKV else k.repeat_interleave(HQ // HKV, 1)
            vv = v if hkv == HKV else v.repeat_interleave(HQ // HKV, 1)
            try:
                t = bench(lambda: varlen(kind, q, kk, vv, cu, max(lens)))
                out[f"varlen_{kind}_{label}_doc{doc}"] = {"s": round(t, 4), "tflops": round(3.5 * flops(lens) / t / 1e12, 1)}
            except Exception as e:  # noqa: BLE001
                out[f"varlen_{kind}_{label}_doc{doc}"] = {"error": repr(e)[:300]}
print(json.dumps(out, indent=1))
