//! RoPE's rotation of bf16 q or k (`model::rope::rotate`, either way) as one CUDA kernel of
//! ulysses' own (`ffi::nvrtc`). Why not jiterator: its kernel needs the two halves of a head as
//! two broadcast views and reads them through strided index arithmetic (2.6 ms for q at 128K
//! tokens on an H200, a quarter of the memory rate); here each thread takes four consecutive
//! elements of both halves with 8-byte loads. Each output is rounded as `rope::rotate` rounds it
//! (each product to bf16, then their sum), so the results are equal bit for bit.
use super::nvrtc::{arg, Kernel};
use crate::model::rope::{Rope, Turn};
use tch::{Device, Kind, Tensor};

/// Thread i takes elements c..c+4 of both halves of one (sample, token, head) row, c = 4·(i mod
/// d/8): x1 = x[c..c+4], x2 = x[d/2 + c..], cos and sin of the row's token (their first half; the
/// second is the same). Forward: [x1·cos − x2·sin, x2·cos + x1·sin]; inverse: the sin terms'
/// signs swapped.
const SOURCE: &str = r#"
__device__ __forceinline__ float rounded(float x) { return bf16_to_float(float_to_bf16(x)); }
__device__ __forceinline__ void load4(const unsigned short *p, float *f) {
  const uint2 v = *reinterpret_cast<const uint2 *>(p);
  f[0] = bf16_to_float(v.x & 0xffffu); f[1] = bf16_to_float(v.x >> 16);
  f[2] = bf16_to_float(v.y & 0xffffu); f[3] = bf16_to_float(v.y >> 16);
}
__device__ __forceinline__ void store4(unsigned short *p, const float *f) {
  uint2 v;
  v.x = (unsigned int)float_to_bf16(f[0]) | ((unsigned int)float_to_bf16(f[1]) << 16);
  v.y = (unsigned int)float_to_bf16(f[2]) | ((unsigned int)float_to_bf16(f[3]) << 16);
  *reinterpret_cast<uint2 *>(p) = v;
}
// Strides in elements: x [b, s, h] (d contiguous), cos/sin [b, s] (d contiguous); out contiguous.
extern "C" __global__ void __launch_bounds__(256) rope_bf16(
    const unsigned short *__restrict__ x, long long x_b, long long x_s, long long x_h,
    const unsigned short *__restrict__ cos, const unsigned short *__restrict__ sin, long long c_b, long long c_s,
    unsigned short *__restrict__ out, long long batch, long long seq, long long heads, long long dim, int inverse) {
  const long long quarter = dim / 8;  // 4-element groups per half
  const long long total = batch * seq * heads * quarter;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
    const long long row = i / quarter, c = (i % quarter) * 4;
    const long long h = row % heads, s = (row / heads) % seq, n = row / (heads * seq);
    const unsigned short *xr = x + n * x_b + s * x_s + h * x_h;
    const long long angle = n * c_b + s * c_s + c;
    float x1[4], x2[4], co[4], si[4], o1[4], o2[4];
    load4(xr + c, x1); load4(xr + dim / 2 + c, x2); load4(cos + angle, co); load4(sin + angle, si);
    for (int j = 0; j < 4; ++j) {
      const float s1 = inverse ? si[j] : -si[j];  // the first half's sin term: x2·s1
      o1[j] = rounded(x2[j] * s1) + rounded(x1[j] * co[j]);
      o2[j] = rounded(x1[j] * -s1) + rounded(x2[j] * co[j]);
    }
    unsigned short *orow = out + row * dim;
    store4(orow + c, o1); store4(orow + dim / 2 + c, o2);
  }
}
"#;

pub const KERNEL: Kernel = Kernel { source: SOURCE, entry: "rope_bf16" };

const THREADS: u32 = 256;

/// `x` [b, s, heads, d] (bf16 on a GPU, d contiguous, d a multiple of 8, other strides and the
/// data 4-element aligned) rotated by `rope` (bf16 cos/sin [b, s, d], d contiguous) into a new
/// contiguous tensor; None where that does not hold or the kernel does not build: the caller
/// rotates another way.
pub fn rotate(x: &Tensor, rope: &Rope, turn: Turn) -> Option<Tensor> {
    let gpu = match x.device() {
        Device::Cuda(g) => g,
        Device::Cpu | Device::Mps | Device::Vulkan => return None,
    };
    let (batch, seq, heads, dim) = x.size4().ok()?;
    let (cos, sin) = (&rope.cos, &rope.sin);
    let bf16_here = |t: &Tensor| t.kind() == Kind::BFloat16 && t.device() == x.device();
    let aligned = |t: &Tensor| {
        let s = t.stride();
        s.last() == Some(&1) && s.iter().all(|&v| v % 4 == 0 || v == 1) && (t.data_ptr() as usize) % 8 == 0
    };
    if !(bf16_here(x) && bf16_here(cos) && bf16_here(sin) && dim % 8 == 0)
        || !(aligned(x) && aligned(cos) && aligned(sin))
        || cos.size() != [batch, seq, dim]
        || cos.stride() != sin.stride()
    {
        return None;
    }
    let f = KERNEL.function(gpu).ok()?;
    let out = Tensor::empty([batch, seq, heads, dim], (Kind::BFloat16, x.device()));
    let groups = batch * seq * heads * (dim / 8);
    if groups == 0 {
        return Some(out);
    }
    let (xs, cs) = (x.stride(), cos.stride());
    let (mut px, mut x_b, mut x_s, mut x_h) = (x.data_ptr(), xs[0], xs[1], xs[2]);
    let (mut pc, mut ps, mut c_b, mut c_s) = (cos.data_ptr(), sin.data_ptr(), cs[0], cs[1]);
    let (mut po, mut b, mut s, mut h, mut d) = (out.data_ptr(), batch, seq, heads, dim);
    let mut inverse = i32::from(turn == Turn::Inverse);
    let mut args = [
        arg(&mut px),
        arg(&mut x_b),
        arg(&mut x_s),
        arg(&mut x_h),
        arg(&mut pc),
        arg(&mut ps),
        arg(&mut c_b),
        arg(&mut c_s),
        arg(&mut po),
        arg(&mut b),
        arg(&mut s),
        arg(&mut h),
        arg(&mut d),
        arg(&mut inverse),
    ];
    // Enough blocks to fill the GPU several times over; the kernel strides over the rest.
    let grid = ((groups + THREADS as i64 - 1) / THREADS as i64).min(65536) as u32;
    // SAFETY: the arguments match the kernel's, in order; x, cos, sin and out are live on this GPU
    // with the sizes and strides passed, 8-byte aligned where the kernel loads 4 elements.
    unsafe { f.launch(gpu, grid, THREADS, &mut args) }.unwrap_or_else(|e| panic!("the RoPE kernel: {e}"));
    Some(out)
}

#[cfg(test)]
mod tests {
    /// The kernel source compiles for Hopper (a GPU runs it: tests/fused_elementwise.rs).
    #[test]
    fn kernel_compiles_for_hopper() {
        let ptx = super::KERNEL.compile("compute_90").unwrap();
        assert!(String::from_utf8_lossy(&ptx).contains(".entry rope_bf16"), "no kernel entry in the PTX");
    }
}
