//! What ring attention (`parallel.ring` > 1) adds to a layer and to each hop, for the memory plan
//! and `ulysses check`: the ring's buffers, the bytes one shift moves, and whether the shift
//! hides behind the hop's attention at the link speed `parallel.ring_link_gb_s` states.
use crate::config::{Dtype, ParallelConfig};
use crate::model::spec::ModelSpec;
use crate::units::bytes;

/// Attention throughput a hop's compute is timed at when the plan has no measured figure: about
/// half an H100's dense bf16 peak, what fused attention kernels reach at long sequences. A
/// rough figure: the verdict is only as good as it.
pub const ATTENTION_TFLOPS: f64 = 400.0;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RingCost {
    pub ring: usize,
    /// Tokens each rank attends with after the all-to-all: its ring rank's two zigzag chunks.
    pub tokens: f64,
    /// The ring's buffers during one layer's attention, bytes: the K/V block in hand and the one
    /// arriving, the fp32 output and log-sum-exp being merged (forward); in backward the fp32
    /// dq, and the fp32 dk/dv of the block in hand and of the one arriving.
    pub buffers: f64,
    /// Bytes one rank sends per hop: the KV heads of its block (forward), plus their fp32
    /// gradients (backward).
    pub hop_forward: f64,
    pub hop_backward: f64,
    /// Seconds of one off-diagonal hop's attention (half a block) at `ATTENTION_TFLOPS`.
    pub compute_forward: f64,
    pub compute_backward: f64,
    /// Seconds one shift takes at the stated link speed.
    pub transfer_forward: f64,
    pub transfer_backward: f64,
    pub link_gb_s: f64,
}

impl RingCost {
    /// The ring's costs for samples of `seq_len` tokens, `micro_batch` of them per micro batch;
    /// None without a ring.
    pub fn new(p: &ParallelConfig, spec: &ModelSpec, seq_len: usize, micro_batch: usize, dtype: Dtype) -> Option<Self> {
        if p.ring <= 1 || p.sp % p.ring != 0 {
            return None;
        }
        let elt = match dtype {
            Dtype::Bf16 => 2.0,
            Dtype::Fp32 => 4.0,
        };
        let ulysses = p.ulysses() as i64;
        let q_heads = (spec.num_attention_heads / ulysses) as f64;
        // KV heads travel once each; replicated only as far as the Ulysses group needs.
        let kv_heads = (spec.num_key_value_heads.max(ulysses) / ulysses) as f64;
        let d = spec.head_dim as f64;
        let tokens = (seq_len / p.ring * micro_batch) as f64;
        let kv = 2.0 * tokens * kv_heads * d;
        let q = tokens * q_heads * d;
        let forward = 2.0 * kv * elt + q * 4.0 + tokens * q_heads * 4.0;
        let backward = q * 4.0 + 2.0 * kv * 4.0 + 2.0 * kv * elt;
        // Half a block: tokens²/2 query-key pairs, 4·d FLOP each per head forward, 2.5× that back.
        let flop = 4.0 * d * q_heads * tokens * tokens / 2.0 / micro_batch as f64;
        let rate = ATTENTION_TFLOPS * 1e12;
        let link = p.ring_link_gb_s * 1e9;
        let (hop_forward, hop_backward) = (kv * elt, kv * (elt + 4.0));
        Some(RingCost {
            ring: p.ring,
            tokens,
            buffers: forward.max(backward),
            hop_forward,
            hop_backward,
            compute_forward: flop / rate,
            compute_backward: 2.5 * flop / rate,
            transfer_forward: hop_forward / link,
            transfer_backward: hop_backward / link,
            link_gb_s: p.ring_link_gb_s,
        })
    }

    /// Whether each shift takes no longer than the hop's attention (forward, backward): the shift
    /// runs beside it on CUDA (`parallel::ring`), so then it costs no time.
    pub fn hides(&self) -> (bool, bool) {
        (self.transfer_forward <= self.compute_forward, self.transfer_backward <= self.compute_backward)
    }

    /// `ulysses check`'s lines about the ring.
    pub fn render(&self) -> String {
        let verdict = |hides: bool, transfer: f64, compute: f64| {
            let ms = |s: f64| format!("{:.2} ms", s * 1e3);
            match hides {
                true => format!("hides ({} shift under {} of attention)", ms(transfer), ms(compute)),
                false => format!("does NOT hide ({} shift over {} of attention)", ms(transfer), ms(compute)),
            }
        };
        let (f, b) = self.hides();
        format!(
            "ring       {} hops a layer each way; per hop a rank sends {} forward (its K/V block) and {} backward (K/V and their fp32 gradients); ring buffers {} during a layer's attention\n           on CUDA each shift runs beside the hop's attention (a communication stream); at {} GB/s per link (parallel.ring_link_gb_s) and {ATTENTION_TFLOPS} TFLOP/s of attention (assumed): forward {}, backward {}\n",
            self.ring,
            bytes(self.hop_forward),
            bytes(self.hop_backward),
            bytes(self.buffers),
            self.link_gb_s,
            verdict(f, self.transfer_forward, self.compute_forward),
            verdict(b, self.transfer_backward, self.compute_backward),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::spec::{ModelSpec, Preset};

    #[test]
    fn longer_sequences_hide_the_shift_and_no_ring_costs_nothing() {
        let spec = ModelSpec::preset(Preset::Llama31_8b);
        let p = ParallelConfig { sp: 8, ring: 2, ..Default::default() };
        let short = RingCost::new(&p, &spec, 4096, 1, Dtype::Bf16).unwrap();
        let long = RingCost::new(&p, &spec, 262144, 1, Dtype::Bf16).unwrap();
        // Transfer grows with the tokens, compute with their square.
        assert_eq!(short.hides(), (false, false));
        assert_eq!(long.hides(), (true, true));
        assert!((long.hop_forward / short.hop_forward - 64.0).abs() < 1e-9);
        assert!(long.render().contains("forward hides"), "{}", long.render());
        assert!(RingCost::new(&ParallelConfig { sp: 8, ..Default::default() }, &spec, 4096, 1, Dtype::Bf16).is_none());
    }
}
