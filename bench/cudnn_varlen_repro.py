# Is cuDNN varlen attention's wrong result (tests/masked_attention.rs, 2026-12-01: differences of
# 1e35, libtorch 2.11 + cuDNN 9.19) a mistake in how ulysses calls it, or cuDNN's / libtorch's?
#   python3 bench/cudnn_varlen_repro.py            # one JSON object per case, then a verdict line
# ulysses calls aten._cudnn_attention_forward / _backward exactly as below (shim/attention.cpp,
# ulysses_attention_*_docs): q [total, n_q, d], k/v [total, n_kv, d] contiguous, the samples end
# to end; cum_seq_q = cum_seq_k = int32 [docs + 1] starting at 0; max_q = max_k = the longest
# document; compute_log_sumexp, dropout 0, causal, no bias (an undefined tensor: None here). That
# is the call torch 2.11's own torch.nn.attention.varlen makes on its cuDNN branch, a branch it
# never takes (`_should_use_cudnn` returns False: the public API runs flash varlen), which the
# first line reports.
# Each case runs cuDNN varlen and torch's public `varlen_attn` (flash) against fp32 attention
# over each document alone (output, log-sum-exp, and the q/k/v gradients), and varies what
# could be a calling mistake: heads (1 query head, equal heads, GQA), document lengths (multiples
# of 128 or not, one document), max_len (the longest document or the whole length), cu_seqlens
# int32 or int64, the bias undefined or an empty tensor, and cuDNN's backward fed the reference
# log-sum-exp instead of its own (tells a wrong forward statistic from a wrong backward).
import inspect
import json

import torch
from torch.nn.attention import varlen as tv

aten = torch.ops.aten
dev = "cuda"
D = 128
TOL = 2e-2  # of the reference's largest entry, bf16 (tests/masked_attention.rs)
torch.manual_seed(0)


def reference(lens, q, k, v, g):
    """fp32 output, log-sum-exp [total, n_q] and q/k/v gradients of attention within each document."""
    leaf = lambda t: t.float().detach().requires_grad_()
    qf, kf, vf = leaf(q), leaf(k), leaf(v)
    rep = q.shape[1] // k.shape[1]
    outs, lses, at = [], [], 0
    for n in lens:
        qs, ks, vs = (t[at:at + n].transpose(0, 1) for t in (qf, kf, vf))  # [heads, n, d]
        ks, vs = ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0)
        scores = qs @ ks.transpose(1, 2) / D ** 0.5
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool, device=dev).triu(1), float("-inf"))
        lses.append(scores.logsumexp(-1).transpose(0, 1))  # [n, heads]
        outs.append((scores.softmax(-1) @ vs).transpose(0, 1))
        at += n
    out, lse = torch.cat(outs), torch.cat(lses)
    (out * g.float()).sum().backward()
    return out.detach(), lse.detach(), qf.grad, kf.grad, vf.grad


def rel(got, want):
    return ((got.float() - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


def case(name, lens, n_q, n_kv, max_len=None, cu_kind=torch.int32, bias=None, ref_lse_in_backward=False):
    total = sum(lens)
    q = torch.randn(total, n_q, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(total, n_kv, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn(total, n_kv, D, device=dev, dtype=torch.bfloat16)
    g = torch.randn(total, n_q, D, device=dev, dtype=torch.bfloat16)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), device=dev, dtype=cu_kind)
    m = max_len or max(lens)
    want = reference(lens, q, k, v, g)
    r = {"case": name, "lens": lens if len(lens) <= 8 else f"{len(lens)} documents", "heads": [n_q, n_kv], "max_len": m,
         "cu_seqlens": str(cu_kind).replace("torch.", ""), "bias": "undefined" if bias is None else "empty tensor"}
    try:
        f = aten._cudnn_attention_forward(q, k, v, None, cu, cu, m, m, True, 0.0, True, False)
        o, lse, seed, off = f[0], f[1], f[6], f[7]
        r["cudnn_lse_shape"] = list(lse.shape)
        r["cudnn_out"] = round(rel(o, want[0]), 5)
        lse_rows = lse.reshape(total, n_q) if lse.numel() == total * n_q else None
        r["cudnn_lse"] = round(rel(lse_rows, want[1]), 5) if lse_rows is not None else "shape differs"
        lse_in = want[1].reshape(lse.shape).contiguous() if ref_lse_in_backward else lse
        grads = aten._cudnn_attention_backward(g, q, k, v, o, lse_in, seed, off, bias, cu, cu, m, m, 0.0, True)
        for gname, got, w in zip(["dq", "dk", "dv"], grads, want[2:]):
            r[f"cudnn_{gname}"] = round(rel(got, w), 5)
        r["cudnn_right"] = all(r[x] < TOL for x in ["cudnn_out", "cudnn_dq", "cudnn_dk", "cudnn_dv"])
    except Exception as e:  # noqa: BLE001 - a refusal is a finding
        r["cudnn_error"] = repr(e)[:300]
        r["cudnn_right"] = False
    try:
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        o, lse = tv.varlen_attn(qq, kk, vv, cu.int(), cu.int(), m, m, return_aux=tv.AuxRequest(lse=True), window_size=(-1, 0))
        o.backward(g)
        r["torch_varlen_out"] = round(rel(o, want[0]), 5)
        r["torch_varlen_lse"] = round(rel(lse.transpose(0, 1) if lse.shape[0] == n_q else lse, want[1]), 5)
        for gname, t, w in zip(["dq", "dk", "dv"], (qq, kk, vv), want[2:]):
            r[f"torch_varlen_{gname}"] = round(rel(t.grad, w), 5)
    except Exception as e:  # noqa: BLE001
        r["torch_varlen_error"] = repr(e)[:300]
    print(json.dumps(r), flush=True)
    return r


uses_cudnn = tv._should_use_cudnn(0)
print(json.dumps({"torch": torch.__version__, "cudnn": torch.backends.cudnn.version(), "device": torch.cuda.get_device_name(),
                  "torch_varlen_uses_cudnn_here": uses_cudnn,
                  "torch_varlen_should_use_cudnn_source": inspect.getsource(tv._should_use_cudnn).strip().splitlines()[-1].strip()}),
      flush=True)
mixed = [1, 2, 500, 37, 1000, 2556]
rows = [
    case("mixed lengths, GQA (as ulysses)", mixed, 8, 2),
    case("mixed lengths, equal heads", mixed, 8, 8),
    case("mixed lengths, one head", mixed, 1, 1),
    case("multiples of 128, GQA", [1024, 512, 2560], 8, 2),
    case("one document, GQA", [4096], 8, 2),
    case("mixed, max_len = total", mixed, 8, 2, max_len=sum(mixed)),
    case("mixed, int64 cu_seqlens", mixed, 8, 2, cu_kind=torch.int64),
    case("mixed, bias an empty tensor (bench/varlen_probe.py's call)", mixed, 8, 2, bias=torch.Tensor().to(dev)),
    case("mixed, backward fed the reference LSE", mixed, 8, 2, ref_lse_in_backward=True),
    case("Llama-8B heads, documents of 4096", [4096] * 4, 32, 8),
]
right = [r["case"] for r in rows if r.get("cudnn_right")]
wrong = [r["case"] for r in rows if not r.get("cudnn_right")]
print(json.dumps({"verdict": "cuDNN varlen right in every case" if not wrong else "cuDNN varlen wrong in some cases",
                  "right": right, "wrong": wrong}), flush=True)
