//! Rotary position embedding at GLOBAL position ids, in the Hugging Face Llama convention
//! (`rotate_half`, cos/sin of `[freqs, freqs]`). Because the angles depend only on the global
//! position, a rank holding the chunk `[c, 2c)` of a sequence rotates its q and k exactly as the
//! whole sequence would be rotated.
use super::spec::ModelSpec;
use std::f64::consts::PI;
use tch::{Device, Kind, Tensor};

/// cos and sin of the rotation angles, [b, s, d], in the activation dtype.
pub struct Rope {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl Rope {
    /// Angles for `positions` [b, s] (i64, global). Computed in fp32 with the same operations as
    /// transformers, so checkpoints behave as they did in training, then cast to `kind`.
    pub fn new(spec: &ModelSpec, positions: &Tensor, kind: Kind) -> Rope {
        let inv_freq = inv_freq(spec, positions.device());
        // [b, s] -> [b, s, 1] * [d/2] -> [b, s, d/2]
        let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * inv_freq;
        // [b, s, d/2] -> [b, s, d]: both halves of a head use the same frequencies.
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        Rope { cos: emb.cos().to_kind(kind), sin: emb.sin().to_kind(kind) }
    }
}

/// Inverse frequencies [d/2] in fp32: `1 / theta^(2i/d)`, then the llama3 rescaling when
/// `spec.rope_scaling` is set. Mirrors `_compute_default_rope_parameters` and
/// `_compute_llama3_parameters` of transformers operation by operation (fp32 throughout).
pub fn inv_freq(spec: &ModelSpec, device: Device) -> Tensor {
    let d = spec.head_dim;
    let exponent = Tensor::arange_start_step(0, d, 2, (Kind::Int64, device)).to_kind(Kind::Float) / (d as f64);
    let inv_freq = Tensor::pow_scalar(spec.rope_theta, &exponent).reciprocal();
    let Some(s) = &spec.rope_scaling else {
        return inv_freq;
    };
    let old_context = s.original_max_position_embeddings as f64;
    let low_freq_wavelen = old_context / s.low_freq_factor;
    let high_freq_wavelen = old_context / s.high_freq_factor;
    let wavelen = inv_freq.reciprocal() * (2.0 * PI);
    // Long wavelengths (low frequencies) are stretched by `factor`, short ones kept.
    let stretched = (&inv_freq / s.factor).where_self(&wavelen.gt(low_freq_wavelen), &inv_freq);
    // In between, interpolate smoothly between the stretched and the original frequency.
    let smooth = (wavelen.reciprocal() * old_context - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
    let smoothed = (1f64 - &smooth) * &stretched / s.factor + &smooth * &stretched;
    let medium = wavelen.lt(high_freq_wavelen).logical_not().logical_and(&wavelen.gt(low_freq_wavelen).logical_not());
    smoothed.where_self(&medium, &stretched)
}

/// Rotates `x` [b, s, heads, d] by the angles of `rope` ([b, s, d], broadcast over heads):
/// `x * cos + rotate_half(x) * sin`, with `rotate_half([x1, x2]) = [-x2, x1]`.
pub fn apply_rope(x: &Tensor, rope: &Rope) -> Tensor {
    let half = x.size()[3] / 2;
    let (x1, x2) = (x.narrow(3, 0, half), x.narrow(3, half, half));
    // [b, s, heads, d/2] x 2 -> [b, s, heads, d]
    let rotated = Tensor::cat(&[&-x2, &x1], 3);
    // [b, s, d] -> [b, s, 1, d]
    let (cos, sin) = (rope.cos.unsqueeze(2), rope.sin.unsqueeze(2));
    x * cos + rotated * sin
}
