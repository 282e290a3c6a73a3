//! Rotary position embedding at GLOBAL position ids, in the Hugging Face Llama convention
//! (`rotate_half`, cos/sin of `[freqs, freqs]`). Because the angles depend only on the global
//! position, a rank holding the chunk `[c, 2c)` of a sequence rotates its q and k exactly as the
//! whole sequence would be rotated.
use super::spec::{Llama3RopeScaling, ModelSpec, RopeScaling, YarnRopeScaling};
use std::f64::consts::PI;
use tch::{Device, Kind, Tensor};

/// cos and sin of the rotation angles, [b, s, d], in the activation dtype.
pub struct Rope {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl Rope {
    /// Angles for `positions` [b, s] (i64, global). Computed in fp32 with the same operations as
    /// transformers, so checkpoints behave as they did in training, then cast to `kind`. YaRN's
    /// attention factor multiplies cos and sin, as transformers applies it.
    pub fn new(spec: &ModelSpec, positions: &Tensor, kind: Kind) -> Rope {
        let inv_freq = inv_freq(spec, positions.device());
        // [b, s] -> [b, s, 1] * [d/2] -> [b, s, d/2]
        let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * inv_freq;
        // [b, s, d/2] -> [b, s, d]: both halves of a head use the same frequencies.
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        let (cos, sin) = match &spec.rope_scaling {
            Some(RopeScaling::Yarn(y)) => (emb.cos() * y.attention_factor, emb.sin() * y.attention_factor),
            _ => (emb.cos(), emb.sin()),
        };
        Rope { cos: cos.to_kind(kind), sin: sin.to_kind(kind) }
    }
}

/// Inverse frequencies [d/2] in fp32: `1 / theta^(2i/d)`, rescaled as `spec.rope_scaling` says.
/// Mirrors transformers' `_compute_default_rope_parameters`, `_compute_linear_scaling_rope_parameters`,
/// `_compute_llama3_parameters` and `_compute_yarn_parameters` operation by operation (fp32
/// tensors, f64 scalars as Python's floats).
pub fn inv_freq(spec: &ModelSpec, device: Device) -> Tensor {
    let d = spec.head_dim;
    let exponent = Tensor::arange_start_step(0, d, 2, (Kind::Int64, device)).to_kind(Kind::Float) / (d as f64);
    let pos_freqs = Tensor::pow_scalar(spec.rope_theta, &exponent);
    let inv_freq = pos_freqs.reciprocal();
    match &spec.rope_scaling {
        None => inv_freq,
        Some(RopeScaling::Linear { factor }) => inv_freq / *factor,
        Some(RopeScaling::Llama3(s)) => llama3(&inv_freq, s),
        Some(RopeScaling::Yarn(y)) => yarn(&pos_freqs, &inv_freq, y, spec.rope_theta, d, device),
    }
}

/// Llama 3.1's rescaling: long wavelengths stretched by `factor`, short ones kept, in between a
/// smooth blend.
fn llama3(inv_freq: &Tensor, s: &Llama3RopeScaling) -> Tensor {
    let old_context = s.original_max_position_embeddings as f64;
    let low_freq_wavelen = old_context / s.low_freq_factor;
    let high_freq_wavelen = old_context / s.high_freq_factor;
    let wavelen = inv_freq.reciprocal() * (2.0 * PI);
    // Long wavelengths (low frequencies) are stretched by `factor`, short ones kept.
    let stretched = (inv_freq / s.factor).where_self(&wavelen.gt(low_freq_wavelen), inv_freq);
    // In between, interpolate smoothly between the stretched and the original frequency.
    let smooth = (wavelen.reciprocal() * old_context - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
    let smoothed = (1f64 - &smooth) * &stretched / s.factor + &smooth * &stretched;
    let medium = wavelen.lt(high_freq_wavelen).logical_not().logical_and(&wavelen.gt(low_freq_wavelen).logical_not());
    smoothed.where_self(&medium, &stretched)
}

/// YaRN: dimensions that rotate more than `beta_fast` times over the original context keep their
/// frequency (extrapolation), those that rotate less than `beta_slow` times are divided by
/// `factor` (interpolation), with a linear ramp between.
fn yarn(pos_freqs: &Tensor, extrapolation: &Tensor, y: &YarnRopeScaling, base: f64, d: i64, device: Device) -> Tensor {
    let dim = d as f64;
    let original = y.original_max_position_embeddings as f64;
    // The dimension that completes `rotations` turns over the original context.
    let correction_dim = |rotations: f64| (dim * (original / (rotations * 2.0 * PI)).ln()) / (2.0 * base.ln());
    let (mut low, mut high) = (correction_dim(y.beta_fast), correction_dim(y.beta_slow));
    if y.truncate {
        (low, high) = (low.floor(), high.ceil());
    }
    let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
    if low == high {
        high += 0.001; // as transformers: no division by zero
    }
    let interpolation = (pos_freqs * y.factor).reciprocal();
    // [d/2]: 0 below `low`, 1 above `high`
    let ramp = ((Tensor::arange(d / 2, (Kind::Float, device)) - low) / (high - low)).clamp(0.0, 1.0);
    let extrapolation_factor = 1.0 - ramp;
    interpolation * (1.0 - &extrapolation_factor) + extrapolation * extrapolation_factor
}

/// Rotates `x` [b, s, heads, d] by the angles of `rope` ([b, s, d], broadcast over heads):
/// `x * cos + rotate_half(x) * sin`, with `rotate_half([x1, x2]) = [-x2, x1]`. The readable form,
/// differentiable; the step rotates with `rotate` instead.
pub fn apply_rope(x: &Tensor, rope: &Rope) -> Tensor {
    let half = x.size()[3] / 2;
    let (x1, x2) = (x.narrow(3, 0, half), x.narrow(3, half, half));
    // [b, s, heads, d/2] x 2 -> [b, s, heads, d]
    let rotated = Tensor::cat(&[&-x2, &x1], 3);
    // [b, s, d] -> [b, s, 1, d]
    let (cos, sin) = (rope.cos.unsqueeze(2), rope.sin.unsqueeze(2));
    x * cos + rotated * sin
}

/// Which way `rotate` turns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// By the angles: `apply_rope`.
    Forward,
    /// By minus the angles: the transpose of the rotation, so the gradient of `apply_rope`'s input
    /// from its output's gradient.
    Inverse,
}

/// `apply_rope` (or its inverse) without autograd and with half-head temporaries only:
/// `[x1, x2] -> [x1·cos - x2·sin, x2·cos + x1·sin]` (inverse: `+ x2·sin`, `- x1·sin`), cos and
/// sin being the same on both halves, each half written once and added to once in place. Moves
/// 3.5 head-sized tensors where `apply_rope` moves 5 (the negation, the `rotate_half`
/// concatenation, two products and their sum) and its autograd backward 7.5 (each half's gradient
/// padded to the whole head and summed). Each half is the same sum of the same two rounded
/// products as in `apply_rope` (and its backward), so the results are equal bit for bit. Call
/// under `tch::no_grad` (out-variants record no graph).
pub fn rotate(x: &Tensor, rope: &Rope, turn: Turn) -> Tensor {
    let half = x.size()[3] / 2;
    let (x1, x2) = (x.narrow(3, 0, half), x.narrow(3, half, half));
    // [b, s, d] -> [b, s, 1, d/2]: the first half of cos and sin (the second is the same).
    let cos = rope.cos.narrow(2, 0, half).unsqueeze(2);
    let sin = rope.sin.narrow(2, 0, half).unsqueeze(2);
    let minus_sin = -&sin;
    let (sin_1, sin_2) = match turn {
        Turn::Forward => (&minus_sin, &sin),
        Turn::Inverse => (&sin, &minus_sin),
    };
    let out = x.empty_like();
    let (mut out1, mut out2) = (out.narrow(3, 0, half), out.narrow(3, half, half));
    // out1 = x2·(∓sin) + x1·cos
    let _ = x2.mul_out(&out1, sin_1);
    let _ = out1.g_add_(&(&x1 * &cos));
    // out2 = x1·(±sin) + x2·cos
    let _ = x1.mul_out(&out2, sin_2);
    let _ = out2.g_add_(&(&x2 * &cos));
    out
}
