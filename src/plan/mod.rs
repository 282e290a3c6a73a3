//! What `ulysses check` prints, and a run prints as it starts: the mesh, each rank's share of the
//! sequence and the heads, the parameter shard sizes (`Plan`) and, for GPU runs, the memory plan
//! (`memory`) with where each layer's kept tensors wait and the longest sequence that fits. Plain
//! arithmetic on the config, no GPU and no MPI; `data` checks the shards against the experiment
//! when they are on this machine.
pub mod check;
pub mod data;
pub mod flops;
pub mod memory;
pub mod ring;

use crate::config::{Dtype, LoraConfig, ParallelConfig, TrainConfig, ZeroStage};
use crate::model::spec::adapter::param_counts;
use crate::model::spec::ModelSpec;
use crate::units::{bytes, count};
use std::fmt::Write;

pub struct Plan {
    pub world: usize,
    pub sp: usize,
    /// Ring attention's degree; the Ulysses groups hold sp / ring ranks.
    pub ring: usize,
    pub dp: usize,
    pub zero_stage: ZeroStage,
    pub seq_len: usize,
    pub seq_local: usize,
    pub q_heads_local: i64,
    /// KV heads a rank attends with after the all-to-all (replicated when kv_heads < sp / ring).
    pub kv_heads_local: i64,
    pub kv_replication: i64,
    pub params: i64,
    /// Parameters each rank stores (all of them at ZeRO 0, a 1/world slice at ZeRO 3).
    pub params_per_rank: i64,
    /// The slices the parameters are cut into (1 at ZeRO 0).
    pub shards: i64,
    /// Largest single layer, gathered whole just in time at ZeRO 3.
    pub layer_params: i64,
}

impl Plan {
    /// The layout of `seq_len`-token samples of `spec` on `world` ranks as `p` arranges them.
    pub fn new(p: &ParallelConfig, seq_len: usize, spec: &ModelSpec, world: usize) -> Plan {
        let (sp, dp, ring) = (p.sp, p.dp, p.ring.max(1));
        let ulysses = p.ulysses() as i64;
        let kv = spec.num_key_value_heads;
        let kv_replication = if kv >= ulysses { 1 } else { ulysses / kv };
        let params = spec.total_params();
        let shards = p.shards(world) as i64;
        let params_per_rank = (params + shards - 1) / shards;
        Plan {
            world,
            sp,
            ring,
            dp,
            zero_stage: p.zero_stage,
            seq_len,
            seq_local: seq_len / sp,
            q_heads_local: spec.num_attention_heads / ulysses,
            kv_heads_local: (kv * kv_replication) / ulysses,
            kv_replication,
            params,
            params_per_rank,
            shards,
            layer_params: spec.layer_params(),
        }
    }

    /// The plan in lines of text, for the model called `model` trained as `t` and `lora` say.
    pub fn render(&self, model: &str, spec: &ModelSpec, t: &TrainConfig, lora: Option<&LoraConfig>) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "model      {model}: {}, {} layers, hidden {}, {} query / {} KV heads of {}, vocab {}, {} parameters",
            spec.describe_family(),
            spec.num_hidden_layers,
            spec.hidden_size,
            spec.num_attention_heads,
            spec.num_key_value_heads,
            spec.head_dim,
            spec.vocab_size,
            count(self.params)
        );
        if !spec.source.ignored.is_empty() {
            let _ = writeln!(
                s,
                "           config.json fields not read (transformers' {} does not read them either): {}",
                spec.family.architecture(),
                spec.source.ignored.join(", ")
            );
        }
        if self.ring == 1 {
            let _ = writeln!(
                s,
                "mesh       {} ranks = dp {} × sp {}; SP groups are contiguous ranks",
                self.world, self.dp, self.sp
            );
        } else {
            let _ = writeln!(
                s,
                "mesh       {} ranks = dp {} × sp {} (ulysses {} × ring {}); Ulysses groups are contiguous ranks (one node each when ulysses ≤ GPUs per node), ring groups strided across them",
                self.world, self.dp, self.sp, self.sp / self.ring, self.ring
            );
        }
        let ulysses = self.sp / self.ring;
        for d in 0..self.dp {
            let ranks: Vec<String> = (0..self.sp).map(|r| (d * self.sp + r).to_string()).collect();
            let _ = writeln!(s, "           dp group {d}: ranks [{}]", ranks.join(", "));
            if self.ring > 1 {
                let list = |ranks: Vec<usize>| {
                    format!("[{}]", ranks.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", "))
                };
                let base = d * self.sp;
                let ulysses_groups: Vec<String> =
                    (0..self.ring).map(|r| list((0..ulysses).map(|u| base + r * ulysses + u).collect())).collect();
                let ring_groups: Vec<String> =
                    (0..ulysses).map(|u| list((0..self.ring).map(|r| base + r * ulysses + u).collect())).collect();
                let _ = writeln!(
                    s,
                    "             ulysses groups {}; ring groups {}",
                    ulysses_groups.join(" "),
                    ring_groups.join(" ")
                );
            }
        }
        if self.ring == 1 {
            let _ = writeln!(
                s,
                "sequence   {} tokens per sample; each rank holds {} tokens (rank r: [r·{}, (r+1)·{}))",
                self.seq_len, self.seq_local, self.seq_local, self.seq_local
            );
            let _ = writeln!(s, "attention  after the all-to-all each rank attends over all {} tokens with {} query heads and {} KV heads{}",
                self.seq_len, self.q_heads_local, self.kv_heads_local,
                if self.kv_replication > 1 { format!(" (each KV head replicated {}×)", self.kv_replication) } else { String::new() });
        } else {
            let chunk = self.seq_len / (2 * self.ring);
            let _ = writeln!(
                s,
                "sequence   {} tokens per sample in {} zigzag chunks of {chunk}: ring rank r holds chunks r and {}−r; each rank of its Ulysses group {} tokens of the two",
                self.seq_len, 2 * self.ring, 2 * self.ring - 1, self.seq_local
            );
            let _ = writeln!(s, "attention  after the all-to-all each rank holds its ring rank's {} tokens with {} query heads and {} KV heads{}; ring attention over {} hops (the K/V blocks pass around the ring)",
                self.seq_len / self.ring, self.q_heads_local, self.kv_heads_local,
                if self.kv_replication > 1 { format!(" (each KV head replicated {}×)", self.kv_replication) } else { String::new() },
                self.ring);
        }
        let stage = self.zero_stage;
        let bytes_per_param = 4.0 + 4.0 + 8.0; // fp32 master + grad + Adam m, v (bf16 weights are gathered per use)
        match lora {
            None => {
                let _ = writeln!(s, "ZeRO-{stage}     {} parameters per rank ({} of fp32 master, grads and Adam moments at 16 B/param); a gathered layer holds {} parameters",
                    count(self.params_per_rank), bytes(self.params_per_rank as f64 * bytes_per_param), count(self.layer_params));
            }
            Some(lora) => {
                // The adapters train; the base is held in the compute dtype, weights only.
                let trained = (param_counts(spec, lora).0 + self.shards - 1) / self.shards;
                let elt = if t.dtype == Dtype::Bf16 { 2.0 } else { 4.0 };
                let _ = writeln!(s, "ZeRO-{stage}     {} trained parameters per rank ({} of fp32 master, grads and Adam moments at 16 B/param) and {} frozen ({} in {}, weights only); a gathered layer holds {} parameters",
                    count(trained), bytes(trained as f64 * bytes_per_param), count(self.params_per_rank),
                    bytes(self.params_per_rank as f64 * elt), format!("{:?}", t.dtype).to_lowercase(), count(self.layer_params));
            }
        }
        let _ = writeln!(
            s,
            "train      {} steps, micro batch {}, grad accum {}, {} tokens per optimizer step",
            t.steps,
            t.micro_batch,
            t.grad_accum,
            self.seq_len * self.dp * t.micro_batch * t.grad_accum
        );
        s
    }
}
