//! The loss tile's softmax cross-entropy in one CUDA kernel of our own, compiled at run time by
//! NVRTC (through cudarc) for the GPU it runs on and launched on torch's current stream.
//!
//! Why: per logit, libtorch needs a bf16 -> fp32 copy, an fp32 log-softmax and an exp back to
//! bf16 (its one-kernel half-to-float log-softmax takes fp16 only): ~20 bytes of traffic and two
//! fp32 [tile, V] buffers. This kernel reads each row of bf16 logits twice (a running max and
//! sum of exponentials in fp32, then the softmax) and writes the gradient over the logits in
//! place: 6 bytes per logit and no fp32 buffer. The math is the fp32 log-softmax's; only the
//! order of the row's sum differs.
use super::nvrtc::{arg, Kernel};
use crate::model::head::LogitsLoss;
use tch::{Device, Kind, Tensor};

/// One block per row. Pass 1: each thread keeps a running max m and sum s of exp(x - m) over its
/// columns (8 at a time with 16-byte loads when the row allows), the block merges them into the
/// row's log-sum-exp. Pass 2 writes exp(x - lse), rounded to bf16 as c10::BFloat16 rounds, over
/// x; the target column then gets p_t - 1 (from fp32) and the row's loss is lse - x_t.
const SOURCE: &str = r#"
// (m, s) of two parts -> (m, s) of both: s is the sum of exp(x - m) over a part.
__device__ __forceinline__ void merge(float &m, float &s, float m2, float s2) {
  float mm = fmaxf(m, m2);
  if (mm == NEG_INF) return;
  s = s * expf(m - mm) + s2 * expf(m2 - mm);
  m = mm;
}
__device__ __forceinline__ void add8(float &m, float &s, uint4 v) {
  unsigned int w[4] = {v.x, v.y, v.z, v.w};
  float f[8];
  float mx = m;
  for (int j = 0; j < 4; ++j) {
    f[2 * j] = bf16_to_float((unsigned short)(w[j] & 0xffffu));
    f[2 * j + 1] = bf16_to_float((unsigned short)(w[j] >> 16));
    mx = fmaxf(mx, fmaxf(f[2 * j], f[2 * j + 1]));
  }
  if (mx == NEG_INF) return;
  float acc = s * expf(m - mx);
  for (int j = 0; j < 8; ++j) acc += expf(f[j] - mx);
  m = mx;
  s = acc;
}
__device__ __forceinline__ uint4 softmax8(uint4 v, float lse) {
  unsigned int w[4] = {v.x, v.y, v.z, v.w};
  for (int j = 0; j < 4; ++j) {
    unsigned int lo = float_to_bf16(expf(bf16_to_float((unsigned short)(w[j] & 0xffffu)) - lse));
    unsigned int hi = float_to_bf16(expf(bf16_to_float((unsigned short)(w[j] >> 16)) - lse));
    w[j] = lo | (hi << 16);
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}
extern "C" __global__ void __launch_bounds__(512) softmax_xent_bf16(
    unsigned short *__restrict__ logits, const long long *__restrict__ target, float *__restrict__ loss,
    long long cols) {
  __shared__ float part_m[32], part_s[32], row_lse, target_logit;
  unsigned short *x = logits + (long long)blockIdx.x * cols;
  const long long t = target[blockIdx.x];
  const bool in_range = t >= 0 && t < cols;
  if (threadIdx.x == 0) target_logit = in_range ? bf16_to_float(x[t]) : 0.0f;
  const bool wide = (cols % 8 == 0) && (((unsigned long long)x) % 16 == 0);
  float m = NEG_INF, s = 0.0f;
  if (wide) {
    const uint4 *x8 = reinterpret_cast<const uint4 *>(x);
    for (long long i = threadIdx.x; i < cols / 8; i += blockDim.x) add8(m, s, x8[i]);
  } else {
    for (long long i = threadIdx.x; i < cols; i += blockDim.x) merge(m, s, bf16_to_float(x[i]), 1.0f);
  }
  for (int off = 16; off > 0; off >>= 1) {
    float m2 = __shfl_xor_sync(0xffffffffu, m, off), s2 = __shfl_xor_sync(0xffffffffu, s, off);
    merge(m, s, m2, s2);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  if (lane == 0) { part_m[warp] = m; part_s[warp] = s; }
  __syncthreads();
  if (warp == 0) {
    m = lane < warps ? part_m[lane] : NEG_INF;
    s = lane < warps ? part_s[lane] : 0.0f;
    for (int off = 16; off > 0; off >>= 1) {
      float m2 = __shfl_xor_sync(0xffffffffu, m, off), s2 = __shfl_xor_sync(0xffffffffu, s, off);
      merge(m, s, m2, s2);
    }
    if (lane == 0) row_lse = m + logf(s);
  }
  __syncthreads();
  const float lse = row_lse;
  if (wide) {
    uint4 *x8 = reinterpret_cast<uint4 *>(x);
    for (long long i = threadIdx.x; i < cols / 8; i += blockDim.x) x8[i] = softmax8(x8[i], lse);
  } else {
    for (long long i = threadIdx.x; i < cols; i += blockDim.x) x[i] = float_to_bf16(expf(bf16_to_float(x[i]) - lse));
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    // A target outside the row leaves a NaN loss, never a write outside the tile.
    loss[blockIdx.x] = in_range ? lse - target_logit : __int_as_float(0x7fc00000);
    if (in_range) x[t] = float_to_bf16(expf(target_logit - lse) - 1.0f);
  }
}
"#;

const THREADS: u32 = 512;

pub const KERNEL: Kernel = Kernel { source: SOURCE, entry: "softmax_xent_bf16" };

/// `LogitsLoss` by the kernel for bf16 logits on a GPU where it builds; anything else (another
/// dtype, the CPU, a GPU without NVRTC) goes op by op (`head::OpByOp`).
pub struct FusedLogitsLoss;

impl LogitsLoss for FusedLogitsLoss {
    fn loss_and_grad(&self, logits: Tensor, target: &Tensor) -> (Tensor, Tensor) {
        let kernel = match logits.device() {
            Device::Cuda(g) if logits.kind() == Kind::BFloat16 => KERNEL.function(g).ok().map(|f| (g, f)),
            _ => None,
        };
        let Some((gpu, f)) = kernel else {
            return crate::model::head::OpByOp.loss_and_grad(logits, target);
        };
        let (rows, cols) = logits.size2().expect("logits are [n, V]");
        let logits = logits.contiguous();
        let target = target.reshape([rows]).to_kind(Kind::Int64).contiguous();
        let loss = Tensor::empty([rows], (Kind::Float, logits.device()));
        if rows > 0 {
            let (mut x, mut t, mut l, mut c) = (logits.data_ptr(), target.data_ptr(), loss.data_ptr(), cols);
            // SAFETY: the arguments match the kernel's (bf16*, i64*, f32*, i64) and point into
            // live contiguous tensors of rows × cols, rows and rows elements on this GPU.
            unsafe { f.launch(gpu, rows as u32, THREADS, &mut [arg(&mut x), arg(&mut t), arg(&mut l), arg(&mut c)]) }
                .unwrap_or_else(|e| panic!("the fused softmax cross-entropy kernel: {e}"));
        }
        (loss, logits)
    }
}

#[cfg(test)]
mod tests {
    /// The kernel source compiles for Hopper (the GPU tests run it: tests/head_loss.rs).
    #[test]
    fn kernel_compiles_for_hopper() {
        let ptx = super::KERNEL.compile("compute_90").unwrap();
        let text = String::from_utf8_lossy(&ptx);
        assert!(text.contains(".entry softmax_xent_bf16"), "no kernel entry in the PTX");
    }
}
