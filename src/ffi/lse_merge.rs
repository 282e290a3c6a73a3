//! The log-sum-exp merge of two attention results over the same queries (`parallel::ring::merge`,
//! which attention in query blocks runs once per block past the first) as one CUDA kernel of
//! ulysses' own (`ffi::nvrtc`). Op by op the merge upcasts both outputs to fp32 and makes five
//! fp32 passes over them (~60 bytes of traffic per element); the kernel reads each bf16 output
//! once and writes the merged one once (6 bytes per element), with the same fp32 math.
use super::nvrtc::{arg, Kernel};
use tch::{Device, Kind, Tensor};

/// One warp per (sample, token, head) row: the row's two log-sum-exps give the two weights, then
/// the warp's lanes stride over the head dimension. A row without keys in either part (both
/// −inf) gets 0 with log-sum-exp −inf, and a part without keys (weight 0) adds nothing, whatever
/// its kernel wrote there (0 or NaN), as `ring::merge` does.
const SOURCE: &str = r#"
__device__ __forceinline__ float finite_or_zero(float x) { return x == NEG_INF ? 0.0f : x; }
// Strides are in elements: outputs [b, s, h, d] with d contiguous, log-sum-exps [b, h, s].
extern "C" __global__ void __launch_bounds__(256) lse_merge_bf16(
    const unsigned short *__restrict__ a, long long a_b, long long a_s, long long a_h,
    const unsigned short *__restrict__ b, long long b_b, long long b_s, long long b_h,
    const float *__restrict__ la, long long la_b, long long la_h, long long la_s,
    const float *__restrict__ lb, long long lb_b, long long lb_h, long long lb_s,
    unsigned short *__restrict__ out, long long o_b, long long o_s, long long o_h,
    float *__restrict__ lo, long long lo_b, long long lo_h, long long lo_s,
    long long batch, long long seq, long long heads, long long dim) {
  const long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= batch * seq * heads) return;
  const int lane = threadIdx.x % 32;
  const long long h = row % heads, s = (row / heads) % seq, n = row / (heads * seq);
  const float lse_a = la[n * la_b + h * la_h + s * la_s], lse_b = lb[n * lb_b + h * lb_h + s * lb_s];
  const float m = finite_or_zero(fmaxf(lse_a, lse_b));
  const float merged = m + logf(expf(lse_a - m) + expf(lse_b - m));
  const float base = finite_or_zero(merged);
  const float wa = expf(lse_a - base), wb = expf(lse_b - base);
  const unsigned short *pa = a + n * a_b + s * a_s + h * a_h, *pb = b + n * b_b + s * b_s + h * b_h;
  unsigned short *po = out + n * o_b + s * o_s + h * o_h;
  for (long long j = lane; j < dim; j += 32) {
    const float part_b = wb == 0.0f ? 0.0f : bf16_to_float(pb[j]) * wb;
    po[j] = float_to_bf16(bf16_to_float(pa[j]) * wa + part_b);
  }
  if (lane == 0) lo[n * lo_b + h * lo_h + s * lo_s] = merged;
}
"#;

pub const KERNEL: Kernel = Kernel { source: SOURCE, entry: "lse_merge_bf16" };

const THREADS: u32 = 256;

/// Merges `(b, lse_b)` into `(a, lse_a)` and writes the result to `(out, lse_out)`: outputs
/// `[b, s, h, d]` (bf16, d contiguous), log-sum-exps `[b, h, s]` (fp32), any strides otherwise,
/// `out` may be `a` and `lse_out` `lse_a`. Returns false without touching anything when the kernel
/// does not apply (not bf16 on one GPU, or it does not build there): the caller merges op by op.
pub fn merge_into(out: &Tensor, lse_out: &Tensor, a: &Tensor, lse_a: &Tensor, b: &Tensor, lse_b: &Tensor) -> bool {
    let gpu = match a.device() {
        Device::Cuda(g) => g,
        Device::Cpu | Device::Mps | Device::Vulkan => return false,
    };
    let outputs = [out, a, b];
    let lses = [lse_out, lse_a, lse_b];
    let on_gpu = |t: &&Tensor| t.device() == a.device();
    if !outputs.iter().all(|t| t.kind() == Kind::BFloat16 && on_gpu(t) && t.stride()[3] == 1)
        || !lses.iter().all(|t| t.kind() == Kind::Float && on_gpu(t))
    {
        return false;
    }
    let Ok(f) = KERNEL.function(gpu) else { return false };
    let (batch, seq, heads, dim) = a.size4().expect("attention outputs are [b, s, h, d]");
    let rows = batch * seq * heads;
    if rows == 0 {
        return true;
    }
    // Each tensor's pointer then its strides: [b, s, h] of the outputs, [b, h, s] of the lses.
    let mut ptrs = [a, b, lse_a, lse_b, out, lse_out].map(|t| t.data_ptr());
    let mut strides: Vec<[i64; 3]> = [a, b, lse_a, lse_b, out, lse_out]
        .iter()
        .map(|t| {
            let s = t.stride();
            [s[0], s[1], s[2]]
        })
        .collect();
    let mut dims = [batch, seq, heads, dim];
    let mut args = Vec::with_capacity(28);
    for (p, s) in ptrs.iter_mut().zip(strides.iter_mut()) {
        args.push(arg(p));
        args.extend(s.iter_mut().map(arg));
    }
    args.extend(dims.iter_mut().map(arg));
    let warps = (THREADS / 32) as i64;
    let grid = ((rows + warps - 1) / warps) as u32;
    // SAFETY: the arguments match the kernel's, in order (pointer, three strides) × 6 then the
    // four sizes; every tensor is live on this GPU with the shape and strides passed.
    unsafe { f.launch(gpu, grid, THREADS, &mut args) }.unwrap_or_else(|e| panic!("the log-sum-exp merge kernel: {e}"));
    true
}

#[cfg(test)]
mod tests {
    /// The kernel source compiles for Hopper (a GPU runs it: tests/gpu/run.sh PARTS=blocks).
    #[test]
    fn kernel_compiles_for_hopper() {
        let ptx = super::KERNEL.compile("compute_90").unwrap();
        assert!(String::from_utf8_lossy(&ptx).contains(".entry lse_merge_bf16"), "no kernel entry in the PTX");
    }
}
