//! The experiment TOML: one typed section per component, unknown keys rejected, defaults in code.
//! `load` parses (with the command line's `--set` overrides and `parallel.dp = "auto"` applied to
//! the TOML value first); `validate` checks every rule at once and lists every problem with its
//! TOML path.
pub mod lora;
mod overrides;
mod validate;

pub use lora::{FullModule, LoraConfig, LoraTarget};
pub use overrides::{Overrides, SetArgs};
pub use validate::{validate, Problem};

pub use crate::model::spec::Preset;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};

/// The sections of an experiment file: `Experiment`'s fields.
pub const SECTIONS: [&str; 9] =
    ["run", "model", "parallel", "data", "train", "checkpoint", "metrics", "memory", "lora"];

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    #[serde(default)]
    pub run: RunConfig,
    pub model: ModelConfig,
    #[serde(default)]
    pub parallel: ParallelConfig,
    pub data: DataConfig,
    #[serde(default)]
    pub train: TrainConfig,
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub memory: MemoryConfig,
    /// Low-rank adapters on a frozen base; absent: every parameter trains.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Names the run directory `<output_dir>/<name>`.
    pub name: String,
    pub output_dir: PathBuf,
    pub seed: u64,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig { name: "run".into(), output_dir: "runs".into(), seed: 1234 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// A Hugging Face model folder: config.json, the safetensors weights and the tokenizer files
    /// (which checkpoints then carry). Exclusive with `preset`, `config` and `weights`.
    pub path: Option<PathBuf>,
    /// A named architecture (`Preset`), with seeded random weights unless `weights` gives them.
    pub preset: Option<Preset>,
    /// The preset's dimensions with this many decoder layers (benchmarks, memory calibration).
    pub layers: Option<i64>,
    /// A Hugging Face `config.json` (Llama, Qwen3, Qwen2 / Qwen2.5 or Mistral).
    pub config: Option<PathBuf>,
    /// Initial weights: a folder (or a single .safetensors file) in Hugging Face layout, or a
    /// ulysses checkpoint folder (its master weights; the optimizer starts fresh).
    pub weights: Option<PathBuf>,
}

impl ModelConfig {
    /// The model as the experiment names it: the folder, the preset, or the config.json path.
    pub fn name(&self) -> String {
        match (&self.path, &self.preset, &self.config) {
            (Some(path), _, _) => path.display().to_string(),
            (None, Some(preset), _) => match self.layers {
                Some(n) => format!("{preset} with {n} layers"),
                None => preset.to_string(),
            },
            (None, None, Some(config)) => config.display().to_string(),
            (None, None, None) => "(no model)".into(),
        }
    }

    /// Where the initial weights are: the model folder, or `weights`.
    pub fn weights_path(&self) -> Option<&Path> {
        self.path.as_deref().or(self.weights.as_deref())
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AttentionBackend {
    /// libtorch picks (cuDNN on H100 when enabled, else flash).
    Auto,
    Cudnn,
    Flash,
    Efficient,
    Math,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ParallelConfig {
    /// Sequence-parallel degree: ranks that share one sample (ulysses × ring).
    pub sp: usize,
    /// Ring attention's degree: the SP group is `ring` ring ranks of sp / ring Ulysses ranks each
    /// (Ulysses groups contiguous, ring groups strided); 1: Ulysses alone (docs/ring.md).
    pub ring: usize,
    /// Bandwidth of the link a ring shift crosses, GB/s per rank, for the plan's estimate of
    /// whether the shifts hide behind attention (default 25: one 200 Gb/s InfiniBand port per GPU).
    pub ring_link_gb_s: f64,
    /// Data-parallel degree: samples processed side by side. `"auto"` in the file: the job's
    /// ranks / sp (resolved when the experiment is loaded, `Overrides::world`).
    pub dp: usize,
    /// 0: everything replicated; 3: parameters, gradients and optimizer state sharded.
    pub zero_stage: ZeroStage,
    pub device: DeviceKind,
    pub attention: AttentionBackend,
    /// Where each ZeRO unit's fp32 state (master weights, gradient buffer, Adam moments) lives:
    /// "auto" (the memory plan chooses per unit: the GPU while it fits, then pinned host memory,
    /// then files in `memory.offload_dir`), or every unit on "device", "host" or "disk". The
    /// switch it used to be still reads: `true` is "host", `false` is "device".
    pub offload_optimizer: StatePlacement,
    /// Where layer inputs wait between forward and backward: "auto" (the memory plan chooses per
    /// layer: GPU while it fits, then pinned host memory, then local disk), or every layer on
    /// "device", "host" or "disk". Host and disk copies run on a side stream.
    pub activations: ActivationPlacement,
    /// Keep each layer's attention output and log-sum-exp (GPU or host memory, where the memory
    /// plan finds room) so backward calls the fused attention backward without recomputing the
    /// attention forward; false: always recompute.
    pub keep_attention: bool,
    /// Tokens per MLP tile (0 = untiled).
    pub mlp_tile: usize,
    /// Tokens per LM-head + cross-entropy tile (0 = untiled).
    pub loss_tile: usize,
    /// Seconds a rank may make no progress (no collective entered or left, no step begun) before
    /// the collective watchdog aborts the job, naming the ranks that did not arrive. The default
    /// (DeepSpeed's) leaves room for a layer of a 1M-token step, an optimizer update in host
    /// memory and a synchronous checkpoint of an 8B model.
    pub collective_timeout_s: f64,
    /// With `data.documents = "mask"`: documents of at least this many tokens attend by the
    /// causal kernel, one call per run of consecutive equal-length ones (the causal kernel is
    /// faster than the varlen ones on long documents); shorter ones by the varlen kernel, one
    /// call per run of them. 0: every document by the varlen kernel.
    pub per_document_min_len: usize,
}

/// How ZeRO splits parameters, gradients and optimizer state; written as its stage number.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(try_from = "u8", into = "u8")]
pub enum ZeroStage {
    /// Stage 0: every rank keeps everything; gradients are all-reduced.
    Replicated,
    /// Stage 3: every rank keeps a 1/world slice of each parameter unit, gathered just in time;
    /// gradients are reduce-scattered.
    Sharded,
}

impl TryFrom<u8> for ZeroStage {
    type Error = String;
    fn try_from(stage: u8) -> Result<Self, String> {
        match stage {
            0 => Ok(ZeroStage::Replicated),
            3 => Ok(ZeroStage::Sharded),
            n => Err(format!("parallel.zero_stage: is {n}; supported stages are 0 (replicated) and 3 (fully sharded)")),
        }
    }
}

impl From<ZeroStage> for u8 {
    fn from(stage: ZeroStage) -> u8 {
        match stage {
            ZeroStage::Replicated => 0,
            ZeroStage::Sharded => 3,
        }
    }
}

impl fmt::Display for ZeroStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", u8::from(*self))
    }
}

/// The fused attention kernel that returns the softmax log-sum-exp, so that a layer's attention
/// output can be kept and backward can call the fused backward (`parallel.keep_attention`).
/// Plain data: the memory plan and the step agree on it without touching libtorch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FusedAttention {
    Cudnn,
    Flash,
    /// libtorch's CPU flash attention (CPU runs and tests).
    CpuFlash,
}

/// Where the optimizer state of each ZeRO unit lives (`parallel.offload_optimizer`): written
/// `"auto"`, `"device"`, `"host"`, `"disk"`, or as the switch it was (`true`: "host", `false`:
/// "device").
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(into = "&'static str")]
pub enum StatePlacement {
    Auto,
    Device,
    Host,
    Disk,
}

impl<'de> Deserialize<'de> for StatePlacement {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<StatePlacement, D::Error> {
        struct Setting;
        impl serde::de::Visitor<'_> for Setting {
            type Value = StatePlacement;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("\"auto\", \"device\", \"host\" or \"disk\" (or true = \"host\", false = \"device\")")
            }
            fn visit_bool<E: serde::de::Error>(self, on: bool) -> Result<StatePlacement, E> {
                Ok(if on { StatePlacement::Host } else { StatePlacement::Device })
            }
            fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<StatePlacement, E> {
                match name {
                    "auto" => Ok(StatePlacement::Auto),
                    "device" => Ok(StatePlacement::Device),
                    "host" => Ok(StatePlacement::Host),
                    "disk" => Ok(StatePlacement::Disk),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(name), &self)),
                }
            }
        }
        d.deserialize_any(Setting)
    }
}

impl From<StatePlacement> for &'static str {
    fn from(p: StatePlacement) -> &'static str {
        p.name()
    }
}

impl StatePlacement {
    pub fn name(self) -> &'static str {
        match self {
            StatePlacement::Auto => "auto",
            StatePlacement::Device => "device",
            StatePlacement::Host => "host",
            StatePlacement::Disk => "disk",
        }
    }

    /// Whether the configuration sends the state off the compute device whatever the budgets.
    pub fn forced_off_device(self) -> bool {
        matches!(self, StatePlacement::Host | StatePlacement::Disk)
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ActivationPlacement {
    Auto,
    Device,
    Host,
    Disk,
}

/// The kernels that attend within packed documents (`data.documents = "mask"`), decided once at
/// start (`parallel::attention::document_kernels`); which one runs on which documents of a micro
/// batch is `parallel::attention::pieces`. Plain data, as `FusedAttention`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DocumentKernels {
    /// The varlen kernel (cumulative sequence lengths; on CPU the flash kernel with a dense mask).
    pub varlen: FusedAttention,
    /// The causal kernel that attends one document (or a batch of equal-length ones) at a time.
    pub causal: FusedAttention,
    /// Documents of at least this many tokens go to `causal` (0: none do).
    pub min_len: usize,
}

impl DocumentKernels {
    /// The rule in words, for `ulysses check` and the run's log.
    pub fn describe(&self) -> String {
        let varlen = self.varlen.describe(true);
        match self.min_len {
            0 => format!("{varlen} on samples of several documents"),
            n => format!(
                "{} on each document of ≥ {n} tokens (one call per run of equal-length ones), {varlen} on the shorter ones",
                self.causal.describe(false)
            ),
        }
    }
}

impl FusedAttention {
    /// The query block length a kept causal attention's forward over `s` tokens runs in
    /// (`parallel::blocks`, which says why): only cuDNN's, past 64K tokens, where it was measured
    /// to win.
    pub fn forward_blocks(self, s: usize) -> Option<usize> {
        const BLOCK: usize = 65536;
        (self == FusedAttention::Cudnn && s > BLOCK).then_some(BLOCK)
    }

    /// How `ulysses check` and the run's log name the kernel, on a full causal sample or on one
    /// with several documents (`masked`).
    pub fn describe(self, masked: bool) -> &'static str {
        match (self, masked) {
            (FusedAttention::Cudnn, false) => "cuDNN (causal)",
            (FusedAttention::Flash, false) => "flash (causal)",
            (FusedAttention::CpuFlash, false) => "CPU flash (causal)",
            (FusedAttention::Cudnn, true) => "cuDNN varlen (cumulative sequence lengths)",
            (FusedAttention::Flash, true) => "flash varlen (cumulative sequence lengths)",
            (FusedAttention::CpuFlash, true) => "CPU flash with a block-diagonal causal mask",
        }
    }
}

impl ParallelConfig {
    /// The kernel that keeps attention's log-sum-exp here: libtorch's CPU flash attention on CPU;
    /// on CUDA cuDNN or flash as `attention` says, and None for the memory-efficient and math
    /// backends, which have no such kernel (those runs recompute attention in backward).
    pub fn fused_attention(&self) -> Option<FusedAttention> {
        match (self.device, self.attention) {
            (DeviceKind::Cpu, _) => Some(FusedAttention::CpuFlash),
            (DeviceKind::Cuda, AttentionBackend::Auto | AttentionBackend::Cudnn) => Some(FusedAttention::Cudnn),
            (DeviceKind::Cuda, AttentionBackend::Flash) => Some(FusedAttention::Flash),
            (DeviceKind::Cuda, AttentionBackend::Efficient | AttentionBackend::Math) => None,
        }
    }

    /// Ranks of a Ulysses group (the all-to-alls): sp / ring.
    pub fn ulysses(&self) -> usize {
        self.sp / self.ring.max(1)
    }

    /// Shards of each parameter unit on a job of `world` ranks.
    pub fn shards(&self, world: usize) -> usize {
        match self.zero_stage {
            ZeroStage::Replicated => 1,
            ZeroStage::Sharded => world,
        }
    }
}

impl Default for ParallelConfig {
    fn default() -> Self {
        ParallelConfig {
            sp: 1,
            ring: 1,
            ring_link_gb_s: 25.0,
            dp: 1,
            zero_stage: ZeroStage::Sharded,
            device: DeviceKind::Cpu,
            attention: AttentionBackend::Auto,
            offload_optimizer: StatePlacement::Auto,
            activations: ActivationPlacement::Auto,
            keep_attention: true,
            mlp_tile: 0,
            loss_tile: 0,
            collective_timeout_s: 1800.0,
            per_document_min_len: 4096,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// HDF5 shard files, or folders holding `*.h5` shards; together they form one dataset.
    pub paths: Vec<PathBuf>,
    /// Held-out shards (files or folders) whose loss is evaluated every `train.eval_every` steps,
    /// read and masked as `paths` are (prepared like them, from documents kept out of them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub eval_paths: Vec<PathBuf>,
    /// Tokens per sample; must equal the shards' sequence length.
    pub seq_len: usize,
    #[serde(default = "default_true")]
    pub shuffle: bool,
    /// "all" (every next-token label) or "answer" (only passkey answers).
    #[serde(default)]
    pub loss_on: crate::data::LossOn,
    /// Packed documents (the boundaries shards record in `docs/*`): "ignore" (default: attention
    /// runs across documents, as on unpacked text) or "mask" (block-diagonal causal attention, no
    /// label across a boundary).
    #[serde(default)]
    pub documents: crate::data::PackedDocuments,
    /// RoPE positions: "global" (default: position in the sequence) or "document" (restart at
    /// each document, as ALST does; needs documents = "mask").
    #[serde(default)]
    pub positions: crate::data::Positions,
}

impl DataConfig {
    /// What the loader does with the shards' document boundaries.
    pub fn packing(&self) -> crate::data::Packing {
        crate::data::Packing { documents: self.documents, positions: self.positions }
    }
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    Constant,
    Cosine,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    Fp32,
    Bf16,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub steps: usize,
    /// Samples per data-parallel rank per micro step.
    pub micro_batch: usize,
    pub grad_accum: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: usize,
    pub schedule: LrSchedule,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Global gradient-norm clip; 0 disables.
    pub clip_grad_norm: f64,
    pub dtype: Dtype,
    /// A memory-fit run: every allocation of a real step, but attention computed in the last layer
    /// only (the others get zeros), so a length whose real step outlasts the time at hand can be
    /// shown to fit. Its losses and timings mean nothing; the log says so on every step and no
    /// metrics are written.
    pub memory_fit: bool,
    /// Evaluate the held-out loss on `data.eval_paths` every N steps and after the last (0: never).
    pub eval_every: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            steps: 10,
            micro_batch: 1,
            grad_accum: 1,
            lr: 3e-4,
            min_lr: 3e-5,
            warmup_steps: 0,
            schedule: LrSchedule::Cosine,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            clip_grad_norm: 1.0,
            dtype: Dtype::Fp32,
            memory_fit: false,
            eval_every: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Save every N steps (0: only at the end).
    pub every: usize,
    /// Keep the last K checkpoints.
    pub keep: usize,
    /// "none", "auto" (latest in the run directory) or a checkpoint folder.
    pub resume: Resume,
    /// Save the model at the end (benchmarks turn it off).
    pub save_final: bool,
    /// `async`: the step waits only while each rank copies its shard into host staging, a
    /// background thread writes it. Unset: on for GPU runs, off on CPU, where the state already
    /// lives in host memory (staging would be a second copy of it) and the writer would compete
    /// with training for the same cores.
    #[serde(rename = "async", skip_serializing_if = "Option::is_none")]
    pub asynchronous: Option<bool>,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig { every: 0, keep: 2, resume: Resume::Auto, save_final: true, asynchronous: None }
    }
}

impl CheckpointConfig {
    /// Whether saves are asynchronous on `device` (`async`, or its default).
    pub fn is_async(&self, device: DeviceKind) -> bool {
        self.asynchronous.unwrap_or(device == DeviceKind::Cuda)
    }
}

/// Where a run starts (`checkpoint.resume`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(from = "String", into = "String")]
pub enum Resume {
    /// "none": from the initial weights, replacing any checkpoints of the run.
    None,
    /// "auto": from the newest complete checkpoint of the run directory, if there is one.
    Auto,
    /// From this checkpoint folder.
    From(PathBuf),
}

impl From<String> for Resume {
    fn from(s: String) -> Resume {
        match s.as_str() {
            "none" => Resume::None,
            "auto" => Resume::Auto,
            _ => Resume::From(PathBuf::from(s)),
        }
    }
}

impl From<Resume> for String {
    fn from(r: Resume) -> String {
        match r {
            Resume::None => "none".into(),
            Resume::Auto => "auto".into(),
            Resume::From(p) => p.display().to_string(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Per-position loss every M steps (0: never).
    pub position_loss_every: usize,
    /// Number of position bins across the whole sequence.
    pub position_bins: usize,
    /// Which position the per-position loss bins by: "sequence" (default: the position in the
    /// sample) or "document" (the position within its document, for packed data).
    pub position_by: PositionBy,
    /// Every N-th step, measure where the time goes (attention, other compute, communication,
    /// waiting) by synchronising the GPU around each region; 0: never. Such steps run slower.
    pub time_split_every: usize,
    /// Also write TensorBoard event files to RUN_DIR/tensorboard (every step's scalars, the
    /// per-position loss, eval results).
    pub tensorboard: bool,
    /// The MFU denominator, dense TFLOP/s per device; 0: the data-sheet peak of a known GPU (H100,
    /// H200, A100, B200, ...), and no MFU on CPU or an unknown GPU.
    pub peak_tflops: f64,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            position_loss_every: 10,
            position_bins: 64,
            position_by: PositionBy::Sequence,
            time_split_every: 0,
            tensorboard: false,
            peak_tflops: 0.0,
        }
    }
}

/// The position a per-position loss curve bins each token by (`metrics.position_by`, `ulysses
/// eval --task loss --by`).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PositionBy {
    /// The position in the sample.
    #[default]
    Sequence,
    /// The position within the token's document (0 where a document begins).
    Document,
}

impl PositionBy {
    pub fn name(self) -> &'static str {
        match self {
            PositionBy::Sequence => "sequence",
            PositionBy::Document => "document",
        }
    }
}

/// What the memory plan may use. 0 means "measure at start".
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryConfig {
    /// GPU memory per GPU for torch's allocator, GiB; 0: the device's total memory less a reserve
    /// for the CUDA context and NCCL.
    pub gpu_gib: f64,
    /// Host memory per node for offloaded state, GiB; 0: MemAvailable at start less a reserve.
    pub host_gib: f64,
    /// Local folder for activations the plan sends to disk; empty: the system temp folder.
    pub offload_dir: PathBuf,
}

impl MemoryConfig {
    /// The folder offloaded activations and model state go to: `offload_dir`, or the system's
    /// temp folder when it is empty.
    pub fn offload_dir(&self) -> PathBuf {
        if self.offload_dir.as_os_str().is_empty() {
            std::env::temp_dir()
        } else {
            self.offload_dir.clone()
        }
    }
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig { gpu_gib: 0.0, host_gib: 0.0, offload_dir: PathBuf::new() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read experiment file {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
}

impl Experiment {
    pub fn load(path: &Path) -> Result<Experiment, ConfigError> {
        Self::load_with(path, &Overrides::default())
    }

    /// Reads the file and applies the command line's `overrides` before typing it.
    pub fn load_with(path: &Path, overrides: &Overrides) -> Result<Experiment, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Io { path: path.display().to_string(), source })?;
        let mut exp = Self::parse_with(&text, &path.display().to_string(), overrides)?;
        exp.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        Ok(exp)
    }

    /// Parses TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Experiment, ConfigError> {
        Self::parse_with(text, origin, &Overrides::default())
    }

    /// Parses TOML text with `overrides` applied to its value; `origin` names it in errors.
    pub fn parse_with(text: &str, origin: &str, overrides: &Overrides) -> Result<Experiment, ConfigError> {
        let parse_error = |message: String| ConfigError::Parse { path: origin.to_string(), message };
        let mut table: toml::Table = toml::from_str(text).map_err(|e| parse_error(describe_toml_error(&e)))?;
        unknown_sections(&table).map_err(parse_error)?;
        if overrides.set.is_empty() && !overrides::wants_auto_dp(&table) {
            // Typed straight from the text, so a wrong value is shown in its line of the file.
            return toml::from_str(text).map_err(|e| parse_error(describe_toml_error(&e)));
        }
        overrides::apply(&mut table, overrides.set).map_err(parse_error)?;
        unknown_sections(&table).map_err(parse_error)?;
        overrides::resolve_auto_dp(&mut table, overrides).map_err(parse_error)?;
        let with = if overrides.set.is_empty() {
            String::new()
        } else {
            format!(" with --set {}", overrides.set.join(" --set "))
        };
        Experiment::deserialize(toml::Value::Table(table)).map_err(|e| ConfigError::Parse {
            path: format!("{origin}{with}"),
            message: e.to_string().trim_end().replace('\n', " "),
        })
    }

    /// Relative paths in an experiment file are relative to the working directory, as a user
    /// typing a command expects; except that a path that does not exist there but does exist next
    /// to the experiment file is taken from there (so `ulysses path/to/exp.toml` works from anywhere).
    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() && !p.exists() && base.join(&*p).exists() {
                *p = base.join(&*p);
            }
        };
        self.data.paths.iter_mut().for_each(fix);
        self.model.path.iter_mut().for_each(fix);
        self.model.config.iter_mut().for_each(fix);
        self.model.weights.iter_mut().for_each(fix);
        if let Some(lora) = &mut self.lora {
            lora.adapter.iter_mut().for_each(fix);
        }
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("an Experiment always serializes")
    }

    pub fn run_dir(&self) -> PathBuf {
        self.run.output_dir.join(&self.run.name)
    }
}

/// Every unknown section at once (serde stops at the first), with the ones there are.
fn unknown_sections(table: &toml::Table) -> Result<(), String> {
    let unknown: Vec<String> =
        table.keys().filter(|k| !SECTIONS.contains(&k.as_str())).map(|k| format!("[{k}]")).collect();
    if unknown.is_empty() {
        return Ok(());
    }
    let known: Vec<String> = SECTIONS.iter().map(|s| format!("[{s}]")).collect();
    Err(format!("unknown section(s) {}; the sections are {}", unknown.join(", "), known.join(", ")))
}

/// toml's message already names the line and column and quotes the line; only its trailing
/// newline goes.
fn describe_toml_error(e: &toml::de::Error) -> String {
    e.to_string().trim_end().to_string()
}
