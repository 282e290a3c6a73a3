//! LoRA dropout (PEFT's `lora_dropout`): in training a projection's adapter sees `dropout(x)`,
//! each element of its input zeroed with probability p and the kept ones scaled by 1/(1-p); the
//! base weight sees x itself. Evaluation never drops.
//!
//! The step recomputes every layer in backward and spreads a sequence over ranks (Ulysses chunks,
//! the ring's zigzag halves, packed documents, dp ranks and micro batches), so the mask cannot
//! come from a generator with state: it is a function of where an element is, drawn with integer
//! tensor ops on any device:
//!
//! ```text
//!   lt      = key(seed, step, layer, projection)       64 bits, on the host
//!   row     = lo32(splitmix64(lt ^ sample))             the row's sample: its index in the data set
//!   token   = hash32(row ^ position)                    the token's position in its sequence
//!   feature = hash32(hi32(lt) ^ f)                      the input feature f
//!   dropped = hash32(token ^ feature) < round(p · 2^32)
//! ```
//!
//! with `key(seed, v..) = fold(h = splitmix64(seed ^ DOMAIN), h = splitmix64(h ^ v))` and
//! `projection` the index in q, k, v, o, gate, up, down. A sample is in one row of an optimizer
//! step, whichever dp rank and micro batch it lands in, so (step, sample) names the row in every
//! layout; positions are global, so an SP chunk or a ring half draws exactly its tokens' part of
//! the whole sequence's mask, and the recompute in backward draws it again identically.
use super::llama::seq_tiles;
use crate::config::lora::LoraTarget;
use crate::rng::splitmix64;
use std::rc::Rc;
use tch::{Kind, Tensor};

/// Separates the dropout's keys from the other users of the run's seed.
const DOMAIN: u64 = 0x4c6f_5241_2044_726f;
/// hash32's multipliers: odd and below 2^31, so that the int64 product of a 32-bit value never
/// overflows (every tensor op below is exact, the same on CPU and CUDA).
const M1: i64 = 0x7feb_352d;
const M2: i64 = 0x735a_2d97;
const LOW32: i64 = 0xffff_ffff;
/// Elements of one mask tile: its int64 temporaries (two at most, 128 MiB each) and the bool mask
/// are the only memory the draw adds, whatever the sequence length (`plan::memory` counts it).
pub const TILE_ELEMENTS: i64 = 1 << 24;

/// A 32-bit integer hash (xorshift-multiply, as Wellons' lowbias32 with multipliers below 2^31);
/// `hash32_tensor` is the same on int64 tensors.
pub fn hash32(x: u32) -> u32 {
    let mut x = x as u64;
    x ^= x >> 16;
    x = (x * M1 as u64) & LOW32 as u64;
    x ^= x >> 15;
    x = (x * M2 as u64) & LOW32 as u64;
    x ^= x >> 16;
    x as u32
}

/// `hash32` of every element of an int64 tensor whose values are in [0, 2^32), in place.
fn hash32_tensor(mut x: Tensor) -> Tensor {
    let xorshift = |x: &mut Tensor, s: i64| {
        let shifted = x.bitwise_right_shift_tensor_scalar(s);
        let _ = x.bitwise_xor_tensor_(&shifted);
    };
    xorshift(&mut x, 16);
    let _ = x.g_mul_scalar_(M1).bitwise_and_(LOW32);
    xorshift(&mut x, 15);
    let _ = x.g_mul_scalar_(M2).bitwise_and_(LOW32);
    xorshift(&mut x, 16);
    x
}

/// The key of (seed, values..): splitmix64 folded over them.
fn key(seed: u64, values: &[u64]) -> u64 {
    values.iter().fold(splitmix64(seed ^ DOMAIN), |h, v| splitmix64(h ^ v))
}

/// One micro batch's dropout: the probability, the step's key, each row's sample and each
/// token's global position, shared by the micro batch's layers.
pub struct Draw {
    p: f64,
    step_key: u64,
    samples: Vec<u64>,
    /// [t] int64: the global positions of the rank's tokens, in the order it holds them.
    positions: Tensor,
}

impl Draw {
    /// Optimizer step `step` of a run seeded `seed`, for rows of `samples` holding the tokens at
    /// `positions` ([t] int64, on the compute device). `p` in (0, 1).
    pub fn new(p: f64, seed: u64, step: u64, samples: &[u64], positions: Tensor) -> Rc<Draw> {
        Rc::new(Draw { p, step_key: key(seed, &[step]), samples: samples.to_vec(), positions })
    }

    /// The dropout of decoder layer `layer`.
    pub fn layer(self: &Rc<Self>, layer: usize) -> LayerDropout {
        let len = self.positions.size()[0];
        LayerDropout { draw: self.clone(), key: splitmix64(self.step_key ^ layer as u64), start: 0, len }
    }
}

/// A layer's dropout over a run of its tokens (all of the rank's, or one MLP tile of them).
pub struct LayerDropout {
    draw: Rc<Draw>,
    /// The step's key with the layer folded in.
    key: u64,
    start: i64,
    len: i64,
}

impl LayerDropout {
    /// The same dropout for the tokens `start..start + len` of these.
    pub fn tokens(&self, start: i64, len: i64) -> LayerDropout {
        LayerDropout { draw: self.draw.clone(), key: self.key, start: self.start + start, len }
    }

    /// The mask of projection `target`: which elements of its input [b, t, in] (these tokens)
    /// are dropped, one tile of `tile_tokens` tokens at a time.
    pub fn mask(&self, target: LoraTarget, b: i64, features: i64) -> Mask<'_> {
        let index = LoraTarget::ALL.iter().position(|t| *t == target).expect("a target") as u64;
        let lt = splitmix64(self.key ^ index);
        let device = self.draw.positions.device();
        assert_eq!(b as usize, self.draw.samples.len(), "one sample per row");
        let rows: Vec<i64> = self.draw.samples.iter().map(|s| (splitmix64(lt ^ s) & LOW32 as u64) as i64).collect();
        // [b, 1] ^ [1, t] -> [b, t]
        let rows = Tensor::from_slice(&rows).to_device(device).unsqueeze(1);
        let positions = self.draw.positions.narrow(0, self.start, self.len).unsqueeze(0);
        let tokens = hash32_tensor(rows.bitwise_xor_tensor(&positions));
        let f = Tensor::arange(features, (Kind::Int64, device)).bitwise_xor((lt >> 32) as i64);
        Mask {
            dropout: self,
            tokens,
            features: hash32_tensor(f),
            threshold: (self.draw.p * 4_294_967_296.0).round() as i64,
            tile_tokens: (TILE_ELEMENTS / (b * features).max(1)).max(1),
        }
    }

    /// 1/(1-p): the kept elements' factor.
    pub fn keep_scale(&self) -> f64 {
        1.0 / (1.0 - self.draw.p)
    }

    /// `dropout(x)·Aᵀ` for x [b, t, in] and A [r, in], one tile of tokens at a time (the dropped
    /// input exists for one tile; with autograd each tile keeps its mask and dropped input).
    pub fn project(&self, target: LoraTarget, x: &Tensor, a: &Tensor) -> Tensor {
        let (b, t, features) = x.size3().expect("[b, t, in]");
        let mask = self.mask(target, b, features);
        let tiles: Vec<Tensor> = mask
            .tiles(t)
            .map(|(start, len, dropped)| self.dropped(&x.narrow(1, start, len), &dropped).linear(a, None::<Tensor>))
            .collect();
        // [b, tile, r] x n -> [b, t, r]
        Tensor::cat(&tiles, 1)
    }

    /// By hand, without autograd: from x [b, t, in], A [r, in] and the gradient `gu` [b·t, r]
    /// of `u = dropout(x)·Aᵀ`, adds x's gradient `dropout'(gu·A)` into `grad_x` [b, t, in] one
    /// tile at a time (no input-sized temporary), and returns A's gradient `guᵀ·dropout(x)`
    /// [r, in] and u itself [b·t, r] (for B's gradient).
    pub fn backward(
        &self,
        target: LoraTarget,
        x: &Tensor,
        a: &Tensor,
        gu: &Tensor,
        grad_x: &mut Tensor,
    ) -> (Tensor, Tensor) {
        let (b, t, features) = x.size3().expect("[b, t, in]");
        let r = a.size()[0];
        let gu = gu.view([b, t, r]);
        let mask = self.mask(target, b, features);
        let mut grad_a = a.zeros_like();
        let mut u = Vec::new();
        for (start, len, dropped) in mask.tiles(t) {
            let xd = self.dropped(&x.narrow(1, start, len), &dropped).reshape([-1, features]);
            let g = gu.narrow(1, start, len).reshape([-1, r]);
            // [r, b·tile] @ [b·tile, in] -> [r, in]
            let _ = grad_a.addmm_(&g.tr(), &xd);
            // [b·tile, in] @ [in, r] -> [b, tile, r]
            u.push(xd.mm(&a.tr()).view([b, len, r]));
            // [b·tile, r] @ [r, in] -> [b, tile, in], dropped like the input
            let _ = grad_x.narrow(1, start, len).g_add_(&self.dropped(&g.mm(a).view([b, len, features]), &dropped));
        }
        (grad_a, Tensor::cat(&u, 1).view([-1, r]))
    }

    /// `x` with the `dropped` elements zero and the rest scaled by 1/(1-p).
    fn dropped(&self, x: &Tensor, dropped: &Tensor) -> Tensor {
        x.masked_fill(dropped, 0.0) * self.keep_scale()
    }
}

/// One projection's mask over a layer's tokens: each token's and each feature's key, drawn once;
/// the elements' tile by tile.
pub struct Mask<'a> {
    dropout: &'a LayerDropout,
    /// [b, t] int64
    tokens: Tensor,
    /// [in] int64
    features: Tensor,
    threshold: i64,
    tile_tokens: i64,
}

impl Mask<'_> {
    /// (start, len, dropped [b, len, in] bool) for consecutive tiles of tokens covering `t`.
    pub fn tiles(&self, t: i64) -> impl Iterator<Item = (i64, i64, Tensor)> + '_ {
        assert_eq!(t, self.dropout.len, "the input holds the dropout's tokens");
        seq_tiles(t, self.tile_tokens as usize).map(|(start, len)| (start, len, self.dropped(start, len)))
    }

    /// Whether each element of tokens `start..start + len` is dropped, [b, len, in] bool.
    fn dropped(&self, start: i64, len: i64) -> Tensor {
        // [b, len, 1] ^ [in] -> [b, len, in]
        let u = self.tokens.narrow(1, start, len).unsqueeze(-1).bitwise_xor_tensor(&self.features);
        hash32_tensor(u).lt(self.threshold)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draw(p: f64, step: u64, samples: &[u64], positions: &[i64]) -> Rc<Draw> {
        Draw::new(p, 7, step, samples, Tensor::from_slice(positions))
    }

    /// The dropped elements of `target`'s mask over [b, t, features].
    fn mask(d: &LayerDropout, target: LoraTarget, features: i64) -> Tensor {
        let b = d.draw.samples.len() as i64;
        let m = d.mask(target, b, features);
        Tensor::cat(&m.tiles(d.len).map(|(_, _, t)| t).collect::<Vec<_>>(), 1)
    }

    #[test]
    fn hash32_on_tensors_equals_the_host_function() {
        let xs: Vec<u32> = (0..1000u32).map(|i| i.wrapping_mul(2_654_435_761)).chain([1, u32::MAX]).collect();
        let t = hash32_tensor(Tensor::from_slice(&xs.iter().map(|&x| x as i64).collect::<Vec<_>>()));
        let want: Vec<i64> = xs.iter().map(|&x| hash32(x) as i64).collect();
        assert_eq!(Vec::<i64>::try_from(&t).unwrap(), want);
        // Not the identity, and a bijection on these inputs.
        assert_ne!(hash32(1), 1);
        let mut seen = want.clone();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), want.len());
    }

    /// The dropped fraction of 2 rows × 1000 tokens × 512 features (n = 1024000 draws) is p within
    /// 5 standard deviations of a binomial, sqrt(p(1-p)/n) (< 0.0025 at p = 0.5).
    #[test]
    fn the_dropped_fraction_is_p() {
        let positions: Vec<i64> = (0..1000).collect();
        for p in [0.05, 0.1, 0.5, 0.9] {
            let d = draw(p, 3, &[4, 9], &positions).layer(2);
            let m = mask(&d, LoraTarget::Q, 512);
            let n = m.numel() as f64;
            let frac = m.to_kind(Kind::Double).sum(Kind::Double).double_value(&[]) / n;
            let bound = 5.0 * (p * (1.0 - p) / n).sqrt();
            assert!((frac - p).abs() < bound, "p = {p}: dropped {frac}, bound {bound}");
        }
    }

    /// Kept elements are x/(1-p), dropped ones 0, and `project` is `dropout(x)·Aᵀ`.
    #[test]
    fn kept_values_are_scaled_and_dropped_ones_zero() {
        let positions: Vec<i64> = (0..64).collect();
        let d = draw(0.25, 1, &[0], &positions).layer(0);
        let x = Tensor::randn([1, 64, 32], (Kind::Double, tch::Device::Cpu));
        let dropped = mask(&d, LoraTarget::V, 32);
        let a = Tensor::eye(32, (Kind::Double, tch::Device::Cpu));
        let y = d.project(LoraTarget::V, &x, &a);
        let kept = dropped.logical_not();
        assert!(y.masked_select(&dropped).abs().max().double_value(&[]) == 0.0);
        let want = x.masked_select(&kept) / 0.75;
        assert!(y.masked_select(&kept).allclose(&want, 1e-12, 1e-12, false));
    }

    /// Same inputs, same mask; another step, layer, projection, sample, position or feature: another
    /// draw. Two masks of p = 0.5 that were the same draw agree everywhere; independent ones agree
    /// on about half the elements.
    #[test]
    fn the_mask_is_a_function_of_where_an_element_is() {
        let positions: Vec<i64> = (0..256).collect();
        let base = || draw(0.5, 5, &[3, 8], &positions);
        let m = |d: &LayerDropout, target| mask(d, target, 128);
        let reference = m(&base().layer(1), LoraTarget::Gate);
        let agreement =
            |other: &Tensor| other.eq_tensor(&reference).to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
        assert_eq!(agreement(&m(&base().layer(1), LoraTarget::Gate)), 1.0, "same inputs, same mask");
        let others = [
            ("step", m(&draw(0.5, 6, &[3, 8], &positions).layer(1), LoraTarget::Gate)),
            ("layer", m(&base().layer(2), LoraTarget::Gate)),
            ("projection (gate vs up: one input)", m(&base().layer(1), LoraTarget::Up)),
            ("sample", m(&draw(0.5, 5, &[4, 9], &positions).layer(1), LoraTarget::Gate)),
        ];
        for (what, other) in &others {
            let a = agreement(other);
            // 65536 elements: independent masks agree on 0.5 ± 0.002 (1 sd).
            assert!((a - 0.5).abs() < 0.02, "another {what}: agreement {a}");
        }
        // A sample draws its mask in any row (dp ranks and micro batches split a step's rows).
        let alone = m(&draw(0.5, 5, &[8], &positions).layer(1), LoraTarget::Gate);
        assert!(alone.get(0).equal(&reference.get(1)), "sample 8 alone and in row 1");
        // The rows differ from each other, neighbouring tokens and features too.
        let rows = reference.get(0).eq_tensor(&reference.get(1)).to_kind(Kind::Double).mean(Kind::Double);
        assert!((rows.double_value(&[]) - 0.5).abs() < 0.02);
        let next_token = reference.narrow(1, 1, 255).eq_tensor(&reference.narrow(1, 0, 255));
        assert!((next_token.to_kind(Kind::Double).mean(Kind::Double).double_value(&[]) - 0.5).abs() < 0.02);
        let next_feature = reference.narrow(2, 1, 127).eq_tensor(&reference.narrow(2, 0, 127));
        assert!((next_feature.to_kind(Kind::Double).mean(Kind::Double).double_value(&[]) - 0.5).abs() < 0.02);
    }

    /// A token's mask depends on its global position only: a chunk of the sequence (an SP rank),
    /// the ring's two zigzag halves, or a tile of an MLP draws exactly its part of the whole
    /// sequence's mask, whatever the tile size.
    #[test]
    fn any_split_of_the_tokens_draws_its_part_of_the_whole_mask() {
        let whole: Vec<i64> = (0..96).collect();
        let full = mask(&draw(0.3, 2, &[1], &whole).layer(4), LoraTarget::Down, 40);
        let zigzag: Vec<i64> = (12..24).chain(72..84).collect();
        let part = mask(&draw(0.3, 2, &[1], &zigzag).layer(4), LoraTarget::Down, 40);
        let want = Tensor::cat(&[full.narrow(1, 12, 12), full.narrow(1, 72, 12)], 1);
        assert!(part.equal(&want), "the ring's halves");
        let tile = mask(&draw(0.3, 2, &[1], &whole).layer(4).tokens(30, 20), LoraTarget::Down, 40);
        assert!(tile.equal(&full.narrow(1, 30, 20)), "an MLP tile");
        // Tiles of the mask smaller than the tokens (a long sequence): the same elements.
        let d = draw(0.3, 2, &[1], &whole).layer(4);
        let mut small = d.mask(LoraTarget::Down, 1, 40);
        small.tile_tokens = 7;
        let tiled = Tensor::cat(&small.tiles(96).map(|(_, _, t)| t).collect::<Vec<_>>(), 1);
        assert!(tiled.equal(&full), "tiles of 7 tokens");
    }

    /// `backward` is autograd's gradient of `project`, tile by tile.
    #[test]
    fn backward_equals_autograd() {
        let positions: Vec<i64> = (0..50).collect();
        let d = draw(0.2, 9, &[0, 5], &positions).layer(3);
        let opts = (Kind::Double, tch::Device::Cpu);
        let x = Tensor::randn([2, 50, 16], opts).set_requires_grad(true);
        let a = Tensor::randn([4, 16], opts).set_requires_grad(true);
        let u = d.project(LoraTarget::K, &x, &a);
        let gu = Tensor::randn([2, 50, 4], opts);
        let grads = Tensor::run_backward(&[(&u * &gu).sum(Kind::Double)], &[&x, &a], false, false);
        let mut gx = Tensor::ones([2, 50, 16], opts);
        let (ga, u2) = tch::no_grad(|| d.backward(LoraTarget::K, &x, &a, &gu.view([-1, 4]), &mut gx));
        assert!((gx - 1.0).allclose(&grads[0], 1e-12, 1e-12, false), "added into the given gradient");
        assert!(ga.allclose(&grads[1], 1e-12, 1e-12, false));
        assert!(u2.allclose(&u.detach().view([-1, 4]), 1e-12, 1e-12, false));
    }
}
