//! What `ulysses check` prints: the mesh, each rank's share of the sequence and the heads, and the
//! parameter shard sizes. Plain arithmetic on the config, no GPU and no MPI.
use crate::config::Experiment;
use crate::model::spec::ModelSpec;
use std::fmt::Write;

pub struct Plan {
    pub world: usize,
    pub sp: usize,
    pub dp: usize,
    pub seq_len: usize,
    pub seq_local: usize,
    pub q_heads_local: i64,
    /// KV heads a rank attends with after the all-to-all (replicated when kv_heads < sp).
    pub kv_heads_local: i64,
    pub kv_replication: i64,
    pub params: i64,
    /// Parameters each rank stores (all of them at ZeRO 0, a 1/world slice at ZeRO 3).
    pub params_per_rank: i64,
    /// Largest single layer, gathered whole just in time at ZeRO 3.
    pub layer_params: i64,
}

impl Plan {
    pub fn new(exp: &Experiment, spec: &ModelSpec, world: usize) -> Plan {
        let (sp, dp) = (exp.parallel.sp, exp.parallel.dp);
        let kv = spec.num_key_value_heads;
        let kv_replication = if kv >= sp as i64 { 1 } else { sp as i64 / kv };
        let params = spec.total_params();
        let params_per_rank =
            if exp.parallel.zero_stage == 3 { (params + world as i64 - 1) / world as i64 } else { params };
        Plan {
            world,
            sp,
            dp,
            seq_len: exp.data.seq_len,
            seq_local: exp.data.seq_len / sp,
            q_heads_local: spec.num_attention_heads / sp as i64,
            kv_heads_local: (kv * kv_replication) / sp as i64,
            kv_replication,
            params,
            params_per_rank,
            layer_params: spec.layer_params(),
        }
    }

    pub fn render(&self, exp: &Experiment, spec: &ModelSpec) -> String {
        let mut s = String::new();

        let model =
            exp.model.preset.clone().unwrap_or_else(|| format!("{}", exp.model.config.as_ref().unwrap().display()));
        let _ = writeln!(
            s,
            "model      {model}: {} layers, hidden {}, {} query / {} KV heads of {}, vocab {}, {} parameters",
            spec.num_hidden_layers,
            spec.hidden_size,
            spec.num_attention_heads,
            spec.num_key_value_heads,
            spec.head_dim,
            spec.vocab_size,
            count(self.params)
        );
        let _ = writeln!(
            s,
            "mesh       {} ranks = dp {} × sp {}; SP groups are contiguous ranks",
            self.world, self.dp, self.sp
        );
        for d in 0..self.dp {
            let ranks: Vec<String> = (0..self.sp).map(|r| (d * self.sp + r).to_string()).collect();
            let _ = writeln!(s, "           dp group {d}: ranks [{}]", ranks.join(", "));
        }
        let _ = writeln!(
            s,
            "sequence   {} tokens per sample; each rank holds {} tokens (rank r: [r·{}, (r+1)·{}))",
            self.seq_len, self.seq_local, self.seq_local, self.seq_local
        );
        let _ = writeln!(s, "attention  after the all-to-all each rank attends over all {} tokens with {} query heads and {} KV heads{}",
            self.seq_len, self.q_heads_local, self.kv_heads_local,
            if self.kv_replication > 1 { format!(" (each KV head replicated {}×)", self.kv_replication) } else { String::new() });
        let stage = exp.parallel.zero_stage;
        let bytes_per_param = 4.0 + 4.0 + 8.0; // fp32 master + grad + Adam m, v (bf16 weights are gathered per use)
        let _ = writeln!(s, "ZeRO-{stage}     {} parameters per rank ({} of fp32 master, grads and Adam moments at 16 B/param); a gathered layer holds {} parameters",
            count(self.params_per_rank), bytes(self.params_per_rank as f64 * bytes_per_param), count(self.layer_params));
        let _ = writeln!(
            s,
            "train      {} steps, micro batch {}, grad accum {}, {} tokens per optimizer step",
            exp.train.steps,
            exp.train.micro_batch,
            exp.train.grad_accum,
            self.seq_len * self.dp * exp.train.micro_batch * exp.train.grad_accum
        );
        s
    }
}

/// 8.030B, 46.2K: parameter counts at a glance.
pub fn count(n: i64) -> String {
    let n = n as f64;
    match n {
        n if n >= 1e9 => format!("{:.3}B", n / 1e9),
        n if n >= 1e6 => format!("{:.2}M", n / 1e6),
        n if n >= 1e3 => format!("{:.1}K", n / 1e3),
        n => format!("{n}"),
    }
}

/// Bytes in a GiB.
pub const GIB: f64 = (1u64 << 30) as f64;

/// A byte count in GiB.
pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / GIB
}

/// 31.2 GiB, 712.0 KiB: sizes in binary units.
pub fn bytes(b: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", units[u])
}
