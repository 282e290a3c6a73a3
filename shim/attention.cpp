// Fused causal attention whose forward returns the log-sum-exp and whose backward takes it, so a
// training step can keep attention's output instead of recomputing the forward in backward.
// tch 0.24 has the backward ops but not the forwards that return the log-sum-exp.
#include <ATen/ATen.h>
#include <cstring>

namespace {

enum Kernel { CUDNN = 0, FLASH = 1, CPU_FLASH = 2 };

char *error(const std::exception &e) { return strdup(e.what()); }

at::Tensor *boxed(at::Tensor t) { return new at::Tensor(std::move(t)); }

}  // namespace

extern "C" {

// q [b, n_q, s_q, d], k, v [b, n_kv, s_k, d] (GQA when n_kv < n_q); causal (s_q = s_k) or, for
// ring attention's off-diagonal blocks, `causal` = 0: every query sees every key; scale 1/sqrt(d), no
// dropout. Sets `out` [b, n_q, s, d], `lse` and two kernel-specific tensors the backward needs
// (cuDNN: philox seed/offset; flash: rng state; CPU: undefined). Returns nullptr or a malloc'ed
// message.
char *ulysses_attention_forward(int kernel, int causal, const at::Tensor *q, const at::Tensor *k, const at::Tensor *v,
                                at::Tensor **out, at::Tensor **lse, at::Tensor **aux0, at::Tensor **aux1) {
  try {
    at::Tensor o, l, a0, a1;
    if (kernel == CUDNN) {
      auto r = at::_scaled_dot_product_cudnn_attention(*q, *k, *v, std::nullopt, /*compute_log_sumexp=*/true, 0.0,
                                                       causal != 0, false);
      o = std::get<0>(r), l = std::get<1>(r), a0 = std::get<6>(r), a1 = std::get<7>(r);
    } else if (kernel == FLASH) {
      auto r = at::_scaled_dot_product_flash_attention(*q, *k, *v, 0.0, causal != 0, false);
      o = std::get<0>(r), l = std::get<1>(r), a0 = std::get<6>(r), a1 = std::get<7>(r);
    } else {
      auto r = at::_scaled_dot_product_flash_attention_for_cpu(*q, *k, *v, 0.0, causal != 0);
      o = std::get<0>(r), l = std::get<1>(r);
    }
    *out = boxed(o), *lse = boxed(l), *aux0 = boxed(a0), *aux1 = boxed(a1);
    return nullptr;
  } catch (const std::exception &e) {
    return error(e);
  }
}

// Gradients of q, k, v from the forward's saved tensors; `grad_out` has `out`'s shape and strides.
char *ulysses_attention_backward(int kernel, int causal, const at::Tensor *grad_out, const at::Tensor *q, const at::Tensor *k,
                                 const at::Tensor *v, const at::Tensor *out, const at::Tensor *lse,
                                 const at::Tensor *aux0, const at::Tensor *aux1, at::Tensor **dq, at::Tensor **dk,
                                 at::Tensor **dv) {
  try {
    std::tuple<at::Tensor, at::Tensor, at::Tensor> r;
    const int64_t s_q = q->size(2), s_k = k->size(2);
    if (kernel == CUDNN) {
      r = at::_scaled_dot_product_cudnn_attention_backward(*grad_out, *q, *k, *v, *out, *lse, *aux0, *aux1,
                                                           at::Tensor(), at::Tensor(), at::Tensor(), s_q, s_k, 0.0,
                                                           causal != 0);
    } else if (kernel == FLASH) {
      r = at::_scaled_dot_product_flash_attention_backward(*grad_out, *q, *k, *v, *out, *lse, at::Tensor(),
                                                           at::Tensor(), s_q, s_k, 0.0, causal != 0, *aux0,
                                                           *aux1);
    } else {
      r = at::_scaled_dot_product_flash_attention_for_cpu_backward(*grad_out, *q, *k, *v, *out, *lse, 0.0,
                                                                   causal != 0);
    }
    *dq = boxed(std::get<0>(r)), *dk = boxed(std::get<1>(r)), *dv = boxed(std::get<2>(r));
    return nullptr;
  } catch (const std::exception &e) {
    return error(e);
  }
}

// Block-diagonal causal attention over packed documents: a token attends to the earlier tokens of
// its own document only. cuDNN and flash take the micro batch as varlen: q [total, n_q, d],
// k, v [total, n_kv, d] (samples laid end to end, GQA when n_kv < n_q) with `cu_seqlens` (int32
// [documents + 1], where each document begins) and `max_len` (the longest document). The CPU
// flash kernel takes q [b, n_q, s, d], k, v [b, n_kv, s, d] and `mask`, additive [b, 1, s, s] in
// q's dtype (0: may attend, -inf: may not). Outputs as in ulysses_attention_forward.
char *ulysses_attention_forward_docs(int kernel, const at::Tensor *q, const at::Tensor *k, const at::Tensor *v,
                                     const at::Tensor *cu_seqlens, int64_t max_len, const at::Tensor *mask,
                                     at::Tensor **out, at::Tensor **lse, at::Tensor **aux0, at::Tensor **aux1) {
  try {
    at::Tensor o, l, a0, a1;
    if (kernel == CUDNN) {
      auto r = at::_cudnn_attention_forward(*q, *k, *v, std::nullopt, *cu_seqlens, *cu_seqlens, max_len, max_len,
                                            /*compute_log_sumexp=*/true, 0.0, /*is_causal=*/true, false);
      o = std::get<0>(r), l = std::get<1>(r), a0 = std::get<6>(r), a1 = std::get<7>(r);
    } else if (kernel == FLASH) {
      auto r = at::_flash_attention_forward(*q, *k, *v, *cu_seqlens, *cu_seqlens, max_len, max_len, 0.0,
                                            /*is_causal=*/true, false);
      o = std::get<0>(r), l = std::get<1>(r), a0 = std::get<2>(r), a1 = std::get<3>(r);
    } else {
      auto r = at::_scaled_dot_product_flash_attention_for_cpu(*q, *k, *v, 0.0, /*is_causal=*/false, *mask);
      o = std::get<0>(r), l = std::get<1>(r);
    }
    *out = boxed(o), *lse = boxed(l), *aux0 = boxed(a0), *aux1 = boxed(a1);
    return nullptr;
  } catch (const std::exception &e) {
    return error(e);
  }
}

// The gradients of ulysses_attention_forward_docs, from its saved tensors and the same documents.
char *ulysses_attention_backward_docs(int kernel, const at::Tensor *grad_out, const at::Tensor *q,
                                      const at::Tensor *k, const at::Tensor *v, const at::Tensor *out,
                                      const at::Tensor *lse, const at::Tensor *aux0, const at::Tensor *aux1,
                                      const at::Tensor *cu_seqlens, int64_t max_len, const at::Tensor *mask,
                                      at::Tensor **dq, at::Tensor **dk, at::Tensor **dv) {
  try {
    std::tuple<at::Tensor, at::Tensor, at::Tensor> r;
    if (kernel == CUDNN) {
      r = at::_cudnn_attention_backward(*grad_out, *q, *k, *v, *out, *lse, *aux0, *aux1, at::Tensor(), *cu_seqlens,
                                        *cu_seqlens, max_len, max_len, 0.0, /*is_causal=*/true);
    } else if (kernel == FLASH) {
      r = at::_flash_attention_backward(*grad_out, *q, *k, *v, *out, *lse, *cu_seqlens, *cu_seqlens, max_len, max_len,
                                        0.0, /*is_causal=*/true, *aux0, *aux1);
    } else {
      r = at::_scaled_dot_product_flash_attention_for_cpu_backward(*grad_out, *q, *k, *v, *out, *lse, 0.0,
                                                                   /*is_causal=*/false, *mask);
    }
    *dq = boxed(std::get<0>(r)), *dk = boxed(std::get<1>(r)), *dv = boxed(std::get<2>(r));
    return nullptr;
  } catch (const std::exception &e) {
    return error(e);
  }
}
}
