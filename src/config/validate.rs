//! Every rule of an experiment, checked at once. Each problem names its TOML path, the value found
//! and what would be valid, so a user fixes the whole file in one go.
use super::{
    CheckpointConfig, DataConfig, DeviceKind, Dtype, Experiment, MemoryConfig, MetricsConfig, ModelConfig,
    ParallelConfig, PositionBy, Resume, RunConfig, TrainConfig, ZeroStage,
};
use crate::data::PackedDocuments;
use crate::model::spec::{ModelSpec, Preset};
use std::fmt;

#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// TOML path, e.g. `parallel.sp`.
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// A config enum as the TOML spells it.
fn serde_plain<T: serde::Serialize>(v: &T) -> String {
    toml::Value::try_from(v).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
}

fn divisors(n: i64) -> String {
    let d: Vec<String> = (1..=n.max(1)).filter(|k| n % k == 0).map(|k| k.to_string()).collect();
    d.join(", ")
}

/// The architecture `[model]` names, reporting what is wrong with it.
fn model_spec(m: &ModelConfig, bad: &mut impl FnMut(&str, String)) -> Option<ModelSpec> {
    if let Some(n) = m.layers {
        if m.preset.is_none() {
            bad("model.layers", "needs model.preset (it sets the preset's number of decoder layers)".into());
        } else if n < 1 {
            bad("model.layers", format!("= {n} must be at least 1"));
        }
    }
    if let Some(w) = &m.weights {
        if !w.exists() {
            bad(
                "model.weights",
                format!("\"{}\" does not exist; give a folder with Hugging Face safetensors", w.display()),
            );
        }
    }
    let from_file = |bad: &mut dyn FnMut(&str, String), key: &str, file: &std::path::Path| {
        ModelSpec::from_hf_config(file).map_err(|e| e.messages().into_iter().for_each(|msg| bad(key, msg))).ok()
    };
    match (&m.path, &m.preset, &m.config) {
        (Some(dir), ..) => {
            if m.preset.is_some() || m.config.is_some() || m.weights.is_some() {
                bad(
                    "model",
                    "`path` names the whole model folder (config.json, weights, tokenizer); leave out `preset`, \
                     `config` and `weights`"
                        .into(),
                );
                return None;
            }
            if !dir.is_dir() {
                bad(
                    "model.path",
                    format!(
                        "\"{}\" is not a folder; give a Hugging Face model folder (config.json, model.safetensors \
                         or its index, tokenizer files)",
                        dir.display()
                    ),
                );
                return None;
            }
            let has = |f: &str| dir.join(f).is_file();
            if !has("model.safetensors") && !has("model.safetensors.index.json") {
                bad(
                    "model.path",
                    format!(
                        "\"{}\" has neither model.safetensors nor model.safetensors.index.json; to start from \
                         random weights, name its config.json with `model.config` instead",
                        dir.display()
                    ),
                );
            }
            from_file(bad, "model.path", &dir.join("config.json"))
        }
        (None, Some(_), Some(_)) => {
            bad("model", "set either `preset` or `config`, not both".into());
            None
        }
        (None, None, None) => {
            bad(
                "model",
                format!(
                    "set `preset` (one of {}), `path` (a Hugging Face model folder) or `config` (a Hugging Face \
                     config.json)",
                    Preset::names()
                ),
            );
            None
        }
        (None, Some(preset), None) => {
            let mut spec = ModelSpec::preset(*preset);
            if let Some(n) = m.layers.filter(|n| *n >= 1) {
                spec.num_hidden_layers = n;
            }
            Some(spec)
        }
        (None, None, Some(file)) => from_file(bad, "model.config", file),
    }
}

/// The longest `parallel.collective_timeout_s`: a year is "never" for a job.
const YEAR_S: f64 = 365.0 * 24.0 * 3600.0;

/// Resolves the model architecture and checks every rule; `world_size` is the number of ranks the
/// job runs on (`None`: skip the rule sp × dp = world size).
///
/// One function per TOML section. A rule between two sections lives in the section whose path it
/// reports, except the few noted where they are, which keep the order problems were always listed in.
pub fn validate(exp: &Experiment, world_size: Option<usize>) -> Result<ModelSpec, Vec<Problem>> {
    let mut problems = Vec::new();
    let mut bad = |path: &str, message: String| problems.push(Problem { path: path.into(), message });

    let spec = model_spec(&exp.model, &mut bad);
    parallel(&exp.parallel, spec.as_ref(), world_size, &mut bad);
    data(&exp.data, &exp.parallel, &exp.train, spec.as_ref(), &mut bad);
    // Reported right after data's rules: its fix is data.documents.
    if exp.metrics.position_by == PositionBy::Document && !exp.data.packing().reads_documents() {
        bad(
            "metrics.position_by",
            "= \"document\" needs the document boundaries: set data.documents = \"mask\"".into(),
        );
    }
    train(&exp.train, &exp.parallel, &exp.data, &mut bad);
    checkpoint(&exp.checkpoint, &exp.train, &mut bad);
    metrics(&exp.metrics, &exp.data, &mut bad);
    memory(&exp.memory, &mut bad);
    run(&exp.run, &mut bad);
    if let Some(lora) = &exp.lora {
        for (path, message) in super::lora::problems(lora, spec.as_ref()) {
            bad(&path, message);
        }
    }

    match spec {
        Some(s) if problems.is_empty() => Ok(s),
        _ => Err(problems),
    }
}

/// `[parallel]`: the mesh against the job and the model's heads, the watchdog, the offload.
fn parallel(
    p: &ParallelConfig,
    spec: Option<&ModelSpec>,
    world_size: Option<usize>,
    bad: &mut impl FnMut(&str, String),
) {
    if p.sp == 0 {
        bad("parallel.sp", "is 0; must be at least 1".into());
    }
    if p.dp == 0 {
        bad("parallel.dp", "is 0; must be at least 1".into());
    }
    if let Some(world) = world_size {
        let want = p.sp * p.dp;
        if want != world {
            let ranks = if world == 1 { "1 rank".to_string() } else { format!("{world} ranks") };
            // One rank is what a command started without a launcher gets.
            let launch = if world == 1 {
                format!(": launch it under MPI, `mpirun -n {want} ulysses train EXPERIMENT.toml`, or set sp and dp for one rank")
            } else {
                "; sp × dp must equal the number of ranks (parallel.dp = \"auto\" takes ranks / sp)".into()
            };
            bad("parallel", format!("sp × dp = {} × {} = {want} but the job has {ranks}{launch}", p.sp, p.dp));
        }
    }
    // Beyond a year the value would not even be a valid Duration.
    if !(1.0..=YEAR_S).contains(&p.collective_timeout_s) {
        bad(
            "parallel.collective_timeout_s",
            format!(
                "= {} must be a number of seconds from 1 to {YEAR_S} (a year; default 1800)",
                p.collective_timeout_s
            ),
        );
    }
    if p.offload_optimizer.forced_off_device() && p.zero_stage != ZeroStage::Sharded {
        bad(
            "parallel.offload_optimizer",
            format!(
                "= \"{}\" needs parallel.zero_stage = 3 (the offloaded optimizer works on shards)",
                p.offload_optimizer.name()
            ),
        );
    }
    let ring_ok = p.ring > 0 && p.sp > 0 && p.sp % p.ring == 0;
    if p.ring == 0 {
        bad("parallel.ring", "is 0; must be at least 1 (1: Ulysses alone)".into());
    } else if p.sp > 0 && !ring_ok {
        bad(
            "parallel.ring",
            format!("= {} does not divide parallel.sp = {}; use one of {}", p.ring, p.sp, divisors(p.sp as i64)),
        );
    }
    if !(p.ring_link_gb_s > 0.0 && p.ring_link_gb_s.is_finite()) {
        bad(
            "parallel.ring_link_gb_s",
            format!("= {} must be a positive bandwidth in GB/s (default 25)", p.ring_link_gb_s),
        );
    }
    // The all-to-alls split heads over the Ulysses group (sp / ring ranks): whole query heads
    // each, and KV heads either split over it or replicated so each rank holds whole heads.
    if let Some(s) = spec.filter(|_| ring_ok) {
        let (heads, kv) = (s.num_attention_heads, s.num_key_value_heads);
        let fits = |u: i64| heads % u == 0 && (kv % u == 0 || u % kv == 0);
        let ulysses = p.ulysses() as i64;
        // A rule of the model's alone, reported here among the head rules as it always was.
        if s.num_key_value_heads > 0 && heads % kv != 0 {
            bad("model", format!("{heads} query heads are not a multiple of {kv} KV heads"));
        } else if p.ring == 1 && heads % ulysses != 0 {
            bad(
                "parallel.sp",
                format!("= {} does not divide the model's {heads} query heads; use one of {}", p.sp, divisors(heads)),
            );
        } else if p.ring == 1 && !fits(ulysses) {
            bad("parallel.sp", format!("= {} neither divides nor is a multiple of the {kv} KV heads", p.sp));
        } else if !fits(ulysses) {
            let rings: Vec<String> =
                (1..=p.sp).filter(|r| p.sp % r == 0 && fits((p.sp / r) as i64)).map(|r| r.to_string()).collect();
            bad(
                "parallel.ring",
                format!(
                    "= {} leaves Ulysses groups of sp / ring = {ulysses} ranks, which must divide the model's {heads} query heads and divide or be a multiple of its {kv} KV heads; with parallel.sp = {} use parallel.ring = {}",
                    p.ring,
                    p.sp,
                    if rings.is_empty() { "none (change parallel.sp)".to_string() } else { rings.join(", ") }
                ),
            );
        }
    }
}

/// `[data]`: the shards, the sequence length against the mesh and the model, packed documents.
fn data(
    d: &DataConfig,
    p: &ParallelConfig,
    t: &TrainConfig,
    spec: Option<&ModelSpec>,
    bad: &mut impl FnMut(&str, String),
) {
    if d.paths.is_empty() {
        bad(
            "data.paths",
            "is empty; list HDF5 shard files or folders of them (make some with `ulysses data synth`)".into(),
        );
    }
    let ring_ok = p.ring > 0 && p.sp > 0 && p.sp % p.ring == 0;
    if d.seq_len == 0 {
        bad("data.seq_len", "is 0; must be a positive number of tokens".into());
    } else if ring_ok && p.ring > 1 && d.seq_len % (2 * p.sp) != 0 {
        // The zigzag layout: 2·ring chunks, each split over the Ulysses group.
        let unit = 2 * p.sp;
        let lo = d.seq_len / unit * unit;
        bad(
            "data.seq_len",
            format!(
                "= {} is not divisible by 2 × parallel.ring × ulysses = 2 × {} × {} = {unit} (the zigzag layout); use e.g. {} or {}",
                d.seq_len,
                p.ring,
                p.sp / p.ring,
                lo.max(unit),
                lo + unit
            ),
        );
    } else if p.sp > 0 && d.seq_len % p.sp != 0 {
        let lo = d.seq_len / p.sp * p.sp;
        bad(
            "data.seq_len",
            format!(
                "= {} is not divisible by parallel.sp = {}; use e.g. {} or {}",
                d.seq_len,
                p.sp,
                lo.max(p.sp),
                lo + p.sp
            ),
        );
    }
    if let Some(s) = spec {
        if let Err(e) = s.check_seq_len(d.seq_len) {
            bad("data.seq_len", format!("= {}: {e}", d.seq_len));
        }
        if d.seq_len as i64 > s.max_position_embeddings * 64 {
            bad(
                "data.seq_len",
                format!(
                    "= {} is far beyond the model's max_position_embeddings = {}",
                    d.seq_len, s.max_position_embeddings
                ),
            );
        }
    }

    if d.documents == PackedDocuments::Mask && p.ring > 1 {
        bad(
            "data.documents",
            format!(
                "= \"mask\" is not supported with parallel.ring = {} (ring attention's blocks are plain causal or unmasked; documents that cross blocks would need per-block masks); use parallel.ring = 1 or data.documents = \"ignore\"",
                p.ring
            ),
        );
    }
    if p.ring > 1 && p.fused_attention().is_none() {
        bad(
            "parallel.attention",
            format!(
                "= \"{}\" has no kernel that returns the log-sum-exp, which ring attention merges blocks with (parallel.ring = {}); use \"auto\", \"cudnn\" or \"flash\"",
                serde_plain(&p.attention),
                p.ring
            ),
        );
    }
    if d.documents == PackedDocuments::Mask && p.fused_attention().is_none() {
        bad(
            "data.documents",
            format!(
                "= \"mask\" needs an attention kernel that takes document boundaries; parallel.attention = \"{}\" has none, use \"auto\", \"cudnn\" or \"flash\"",
                serde_plain(&p.attention)
            ),
        );
    }
    if let Some(problem) = d.packing().problem() {
        bad("data.positions", problem.trim_start_matches("data.positions ").into());
    }
    if !d.eval_paths.is_empty() && t.eval_every == 0 {
        bad(
            "data.eval_paths",
            "is set but train.eval_every = 0 never evaluates it; set train.eval_every = N to evaluate the held-out loss every N steps".into(),
        );
    }
}

/// A number as a user writes it: 1e39 and 1e-50 in exponent form, not forty digits.
fn num(v: f64) -> String {
    if v != 0.0 && v.is_finite() && !(1e-4..1e6).contains(&v.abs()) {
        format!("{v:e}")
    } else {
        v.to_string()
    }
}

/// `[train]`: the step counts, the optimizer's numbers, the dtype against the device.
fn train(t: &TrainConfig, p: &ParallelConfig, d: &DataConfig, bad: &mut impl FnMut(&str, String)) {
    if t.steps == 0 {
        bad("train.steps", "is 0; must be at least 1".into());
    }
    if t.micro_batch == 0 {
        bad("train.micro_batch", "is 0; must be at least 1".into());
    }
    if t.grad_accum == 0 {
        bad("train.grad_accum", "is 0; must be at least 1".into());
    }
    // The optimizer computes in fp32: a larger lr is infinite there, and every weight with it.
    if !(t.lr > 0.0 && t.lr <= f64::from(f32::MAX)) {
        bad(
            "train.lr",
            format!(
                "= {} must be a positive number within fp32's range (at most 3.4e38; typical 1e-5 to 1e-3)",
                num(t.lr)
            ),
        );
    }
    if !(t.min_lr >= 0.0 && t.min_lr <= t.lr) {
        bad("train.min_lr", format!("= {} must be between 0 and train.lr = {}", t.min_lr, t.lr));
    }
    if t.warmup_steps > t.steps {
        bad("train.warmup_steps", format!("= {} exceeds train.steps = {}", t.warmup_steps, t.steps));
    }
    for (name, v) in [("beta1", t.beta1), ("beta2", t.beta2)] {
        if !(0.0..1.0).contains(&v) {
            bad(&format!("train.{name}"), format!("= {v} must be in [0, 1)"));
        }
    }
    if !(1e-30..=1.0).contains(&t.eps) {
        bad(
            "train.eps",
            format!(
                "= {} must be in [1e-30, 1] (the fp32 state rounds a smaller one to 0, and 0 / 0 is NaN where a gradient is 0; typical 1e-8)",
                num(t.eps)
            ),
        );
    }
    // Decay multiplies the weights by 1 - lr × weight_decay each step: at 1 or more it zeroes or
    // flips them.
    if !(t.weight_decay >= 0.0 && t.weight_decay.is_finite() && t.lr * t.weight_decay < 1.0) {
        bad(
            "train.weight_decay",
            format!(
                "= {} must be a finite number >= 0 with train.lr × train.weight_decay < 1 (each step multiplies the weights by 1 - lr × weight_decay; typical 0 to 0.1)",
                num(t.weight_decay)
            ),
        );
    }
    if !(t.clip_grad_norm >= 0.0) {
        bad("train.clip_grad_norm", format!("= {} must be >= 0 (0 disables clipping)", t.clip_grad_norm));
    }
    if t.dtype == Dtype::Bf16 && p.device == DeviceKind::Cpu {
        bad("train.dtype", "= \"bf16\" needs parallel.device = \"cuda\"; CPU runs are fp32".into());
    }
    if t.eval_every > 0 && d.eval_paths.is_empty() {
        bad(
            "train.eval_every",
            format!(
                "= {} needs held-out shards in data.eval_paths (`ulysses data prepare` of documents kept out of data.paths)",
                t.eval_every
            ),
        );
    }
    if t.eval_every > 0 && t.memory_fit {
        bad(
            "train.eval_every",
            format!(
                "= {} with train.memory_fit = true: a memory-fit run's losses mean nothing; set it to 0",
                t.eval_every
            ),
        );
    }
}

/// `[checkpoint]`: how many to keep, where to resume from; a memory-fit run saves none (reported
/// between the two, under `train.memory_fit`, where it always was).
fn checkpoint(c: &CheckpointConfig, t: &TrainConfig, bad: &mut impl FnMut(&str, String)) {
    if c.keep == 0 {
        bad("checkpoint.keep", "is 0; keep at least 1 checkpoint".into());
    }
    if t.memory_fit && (c.save_final || c.every > 0) {
        bad(
            "train.memory_fit",
            "= true needs checkpoint.save_final = false and checkpoint.every = 0: a memory-fit run's weights mean nothing"
                .into(),
        );
    }
    if let Resume::From(dir) = &c.resume {
        if !dir.exists() {
            bad(
                "checkpoint.resume",
                format!("\"{}\" is neither \"none\", \"auto\" nor an existing checkpoint folder", dir.display()),
            );
        }
    }
}

/// `[metrics]`: the loss-by-position bins against the sequence, the peak FLOP/s.
fn metrics(m: &MetricsConfig, d: &DataConfig, bad: &mut impl FnMut(&str, String)) {
    if m.position_bins == 0 {
        bad("metrics.position_bins", "is 0; must be at least 1".into());
    } else if m.position_bins > d.seq_len && d.seq_len > 0 {
        bad(
            "metrics.position_bins",
            format!("= {} exceeds data.seq_len = {}; use at most one bin per position", m.position_bins, d.seq_len),
        );
    }
    let peak = m.peak_tflops;
    if !(peak >= 0.0 && peak.is_finite()) {
        bad("metrics.peak_tflops", format!("= {peak} must be a number of TFLOP/s >= 0 (0: from the GPU's name)"));
    }
}

/// `[memory]`: the budgets.
fn memory(m: &MemoryConfig, bad: &mut impl FnMut(&str, String)) {
    for (name, gib) in [("gpu_gib", m.gpu_gib), ("host_gib", m.host_gib)] {
        if !(gib >= 0.0 && gib.is_finite()) {
            bad(&format!("memory.{name}"), format!("= {gib} must be a number of GiB >= 0 (0: measure at start)"));
        }
    }
}

/// `[run]`: the run folder's name.
fn run(r: &RunConfig, bad: &mut impl FnMut(&str, String)) {
    // The run folder is output_dir/name and everything the run writes or deletes is inside it:
    // "." or ".." would make it output_dir itself or its parent.
    let name = &r.name;
    if name.is_empty()
        || name == "."
        || name == ".."
        || name.contains(['/', '\\'])
        || name.chars().any(char::is_control)
    {
        bad(
            "run.name",
            format!("{name:?} must be one plain folder name: not empty, not \".\" or \"..\", no '/', '\\' or control characters"),
        );
    }
}
