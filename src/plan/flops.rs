//! FLOPs of one optimizer step, in the two conventions we report (formulas as in the DeepSpeed-ALST
//! peer's README, so the numbers compare):
//! - model FLOPs (Megatron convention, used for TFLOP/s and MFU): dense `6·N·T` plus causal
//!   attention `3·A_fwd`, no recompute counted;
//! - the ALST paper's counter: `8·N·T + 16·s²·n_q·d·L` per sample (non-causal, recompute counted).
//!
//! A LoRA run (`[lora]`) counts the work it does: a frozen matmul weight costs its forward and the
//! input's gradient (`4·N_frozen·T`), no weight gradient; the adapters and any module trained in
//! full cost `6·N·T` like a full run's (ALST: 6 and 8 with the recompute).
//!
//! Attention within documents (`data.documents = "mask"`) computes only each document's causal
//! square, so both count `Σ len²` over the documents where full causal attention counts `s²`:
//! packed and full-causal figures are different workloads, each counted by the work it does.
use crate::config::LoraConfig;
use crate::model::spec::adapter::{full_module_shapes, layer_adapter_shapes};
use crate::model::spec::ModelSpec;

/// Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, TFLOP/s, by a piece of
/// the device name CUDA reports ("NVIDIA H100 80GB HBM3"); the first match wins, so the specific
/// names come before the general ones.
const PEAKS: &[(&str, f64)] = &[
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("B200", 2250.0),
    ("L40S", 362.0),
];

/// The MFU denominator and where it came from: `metrics.peak_tflops` when set (> 0), else the
/// data-sheet peak of the GPU named `gpu_name`; None for a CPU run or a GPU not in the table, which
/// then report TFLOP/s but no MFU.
pub fn peak_tflops(configured: f64, gpu_name: Option<&str>) -> Option<(f64, String)> {
    if configured > 0.0 {
        return Some((configured, "metrics.peak_tflops".into()));
    }
    let name = gpu_name?;
    PEAKS.iter().find(|(piece, _)| name.contains(piece)).map(|&(_, peak)| (peak, name.to_string()))
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepFlops {
    pub model: f64,
    pub alst: f64,
}

/// `samples` sequences of `seq_len` tokens per optimizer step, full causal attention.
pub fn step_flops(spec: &ModelSpec, lora: Option<&LoraConfig>, seq_len: usize, samples: usize) -> StepFlops {
    let s = seq_len as f64;
    flops(spec, lora, s * samples as f64, s * s * samples as f64)
}

/// `tokens` per optimizer step whose attention covers `squares` = Σ len² over every sample's
/// documents (`data::Documents::square_sum`; full causal: samples × seq_len²), training every
/// parameter or (`lora`) adapters on a frozen base.
pub fn flops(spec: &ModelSpec, lora: Option<&LoraConfig>, tokens: f64, squares: f64) -> StepFlops {
    let (h, d, l) = (spec.hidden_size as f64, spec.head_dim as f64, spec.num_hidden_layers as f64);
    let (nq, nkv, f, v) = (
        spec.num_attention_heads as f64,
        spec.num_key_value_heads as f64,
        spec.intermediate_size as f64,
        spec.vocab_size as f64,
    );
    let n_layers = l * (h * nq * d + 2.0 * h * nkv * d + nq * d * h + 3.0 * h * f);
    let head = h * v; // the embedding is a lookup, not a matmul
                      // Matmul parameters whose weight gradient backward computes, and those it skips (frozen).
    let (trained, frozen) = match lora {
        None => (n_layers + head, 0.0),
        Some(lora) => {
            let adapters: i64 = layer_adapter_shapes(spec, lora).iter().map(|(_, s)| s.iter().product::<i64>()).sum();
            // The LM head's weight trains in full, or (tied) with the embedding.
            let head_trains = full_module_shapes(spec, lora)
                .iter()
                .any(|(n, _)| n == "lm_head.weight" || (spec.tie_word_embeddings && n == "model.embed_tokens.weight"));
            let head = if head_trains { (head, 0.0) } else { (0.0, head) };
            (l * adapters as f64 + head.0, n_layers + head.1)
        }
    };
    let attn_fwd = 2.0 * squares * nq * d * l; // QKᵀ and PV, causal half
    StepFlops {
        model: (6.0 * trained + 4.0 * frozen) * tokens + 3.0 * attn_fwd,
        alst: (8.0 * trained + 6.0 * frozen) * tokens + 16.0 * squares * nq * d * l,
    }
}

/// The forward attention FLOPs of one sample with documents `docs` (causal within each).
pub fn attention_forward(spec: &ModelSpec, squares: f64) -> f64 {
    2.0 * squares * (spec.num_attention_heads * spec.head_dim * spec.num_hidden_layers) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::spec::Preset;

    #[test]
    fn peaks_come_from_the_config_or_a_known_gpu() {
        assert_eq!(peak_tflops(0.0, Some("NVIDIA H100 80GB HBM3")).unwrap().0, 989.0);
        assert_eq!(peak_tflops(0.0, Some("NVIDIA H100 PCIe")).unwrap().0, 756.0);
        assert_eq!(peak_tflops(0.0, Some("NVIDIA H200")).unwrap().0, 989.0);
        assert_eq!(peak_tflops(0.0, Some("NVIDIA A100-SXM4-80GB")).unwrap().0, 312.0);
        assert_eq!(peak_tflops(0.0, Some("Some Future GPU")), None);
        assert_eq!(peak_tflops(0.0, None), None, "a CPU run has no peak");
        assert_eq!(peak_tflops(500.0, None), Some((500.0, "metrics.peak_tflops".into())));
    }

    #[test]
    fn llama8b_at_128k_matches_the_peer_formula() {
        let spec = ModelSpec::preset(Preset::Llama31_8b);
        let f = step_flops(&spec, None, 131072, 1);
        // The peer's README: F = 5.90e15 (dense) + 1.35e16 (attention) = 1.94e16 per step.
        assert!((f.model / 1.94e16 - 1.0).abs() < 0.005, "{}", f.model);
        assert!(f.alst > f.model);
    }

    #[test]
    fn documents_count_their_own_causal_squares() {
        let spec = ModelSpec::preset(Preset::Llama31_8b);
        let (s, doc) = (262144.0, 32768.0);
        let full = flops(&spec, None, s, s * s);
        let packed = flops(&spec, None, s, 8.0 * doc * doc);
        // The dense part is the same; attention is an eighth of full causal's.
        let dense = flops(&spec, None, s, 0.0);
        assert!(((packed.model - dense.model) * 8.0 / (full.model - dense.model) - 1.0).abs() < 1e-12);
        assert_eq!(step_flops(&spec, None, 262144, 1), full);
        let attention = full.model - dense.model;
        assert!((attention_forward(&spec, s * s) * 3.0 / attention - 1.0).abs() < 1e-12);
    }

    #[test]
    fn lora_skips_the_frozen_weight_gradients_and_counts_the_adapters() {
        use crate::config::{FullModule, LoraConfig};
        use crate::model::spec::adapter::param_counts;
        let spec = ModelSpec::preset(Preset::Llama31_8b);
        let lora = LoraConfig { rank: 16, alpha: 32.0, ..LoraConfig::default() };
        let t = 262144.0;
        // Every matmul weight (dense part of the full count) and the adapters (peft counts 41.94M).
        let n = flops(&spec, None, t, 0.0).model / 6.0 / t;
        let (adapters, _) = param_counts(&spec, &lora);
        assert_eq!(adapters, 41_943_040);
        let dense = flops(&spec, Some(&lora), t, 0.0);
        assert!((dense.model / ((4.0 * n + 6.0 * adapters as f64) * t) - 1.0).abs() < 1e-12, "{}", dense.model);
        assert!((dense.alst / ((6.0 * n + 8.0 * adapters as f64) * t) - 1.0).abs() < 1e-12, "{}", dense.alst);
        // Attention is the same work either way.
        let attention = |l: Option<&LoraConfig>| flops(&spec, l, t, t * t).model - flops(&spec, l, t, 0.0).model;
        assert_eq!(attention(Some(&lora)), attention(None));
        // The LM head trained in full costs its weight gradient again: 2·h·V per token more.
        let head = LoraConfig { train_fully: vec![FullModule::LmHead], ..lora.clone() };
        let more = flops(&spec, Some(&head), t, 0.0).model - dense.model;
        assert!((more / (2.0 * (spec.hidden_size * spec.vocab_size) as f64 * t) - 1.0).abs() < 1e-9, "{more}");
    }

    #[test]
    fn qwen3_8b_counts_its_own_shapes() {
        // The peer's formula on Qwen3-8B's dimensions (36 layers, intermediate 12,288, vocab
        // 151,936; q/k norms and biases are no matmuls): 2.1151e16 per step at 128K.
        let spec = ModelSpec::preset(Preset::Qwen3_8b);
        let f = step_flops(&spec, None, 131072, 1);
        assert!((f.model / 2.1151e16 - 1.0).abs() < 1e-4, "{}", f.model);
    }
}
