//! A LoRA run's weights outside training. Its checkpoints hold only the adapters (and the modules
//! trained in full), its `final/` and `ulysses export` write them as a PEFT adapter folder, and
//! neither means anything without the base the adapters were trained on. `Adapters::open` reads
//! a LoRA checkpoint or a PEFT folder together with where its base is: the run's `model.path` /
//! `model.weights` (else its seeded initialisation), or the folder's `base_model_name_or_path`.
//! From it: the PEFT folder (`export_peft`), and the whole model with the adapters merged
//! (`merged`: `export --merge`, `eval`, `model.weights`).
use super::export::{check_replaceable, new_temporary, publish, write_config};
use super::index::Source;
use super::*;
use crate::comm::{all_reduce_f64, Collective};
use crate::config::LoraConfig;
use crate::model::lora::{attach, load_peft, merge, save_peft};
use crate::model::params::ModelWeights;
use crate::model::spec::adapter::{adapter_section, check_adapter, ADAPTER_CONFIG};
use crate::model::spec::ModelSpec;
use crate::model::weights::{save_hf, tokenizer_files};
use crate::parallel::units::lora_units;
use crate::parallel::zero::State;
use tch::{Device, Kind, Tensor};

/// Where the frozen base of a set of adapters comes from.
enum Base {
    /// Hugging Face files or a checkpoint; `field` names where the path was found, for messages.
    Path { path: PathBuf, field: &'static str },
    /// The seeded initialisation of a run without `model.path` (`run.seed`).
    Seeded(u64),
}

/// Trained adapters, read from a LoRA checkpoint or a PEFT folder, with their model and base.
pub struct Adapters {
    /// The checkpoint or PEFT folder they were read from.
    origin: PathBuf,
    spec: ModelSpec,
    lora: LoraConfig,
    base: Base,
    /// The training step (a PEFT folder that ulysses did not write: 0).
    step: u64,
    /// `train.dtype` of the run (a PEFT folder: fp32), the merged export's default.
    pub trained_dtype: Kind,
    /// fp32 CPU tensors by their names in the model.
    trained: Vec<(String, Tensor)>,
}

impl Adapters {
    /// The adapters at `path`: a checkpoint of a `[lora]` run, or a PEFT adapter folder
    /// (adapter_config.json). None: `path` holds a whole model (or nothing ulysses reads).
    pub fn open(path: &Path) -> Result<Option<Adapters>, CheckpointError> {
        if path.join(RUN_STATE).is_file() {
            return Self::open_checkpoint(path);
        }
        if path.join(ADAPTER_CONFIG).is_file() {
            return Self::open_peft(path).map(Some);
        }
        Ok(None)
    }

    /// Whether they were read from a PEFT folder (not a checkpoint).
    pub fn is_peft_folder(&self) -> bool {
        !self.origin.join(RUN_STATE).is_file()
    }

    fn open_checkpoint(dir: &Path) -> Result<Option<Adapters>, CheckpointError> {
        let state = read_state(dir)?;
        let shown = dir.join(RUN_STATE).display().to_string();
        let bad = |message: String| CheckpointError::RunState { path: shown.clone(), message };
        let config: toml::Table =
            toml::from_str(&state.config_toml).map_err(|e| bad(format!("its config_toml does not parse: {e}")))?;
        let Some(section) = config.get("lora") else {
            return Ok(None);
        };
        let lora: LoraConfig = section.clone().try_into().map_err(|e| bad(format!("its [lora] section: {e}")))?;
        if !dir.join(COMPLETE).is_file() {
            return Err(CheckpointError::Incomplete { path: dir.display().to_string() });
        }
        let model = config.get("model");
        let field = |key: &str| model.and_then(|m| m.get(key)).and_then(|v| v.as_str()).map(PathBuf::from);
        let base = match (field("path"), field("weights")) {
            (Some(path), _) => Base::Path { path, field: "model.path" },
            (None, Some(path)) => Base::Path { path, field: "model.weights" },
            (None, None) => Base::Seeded(state.seed),
        };
        let spec = ModelSpec::from_hf_config(&dir.join(CONFIG))
            .map_err(|e| CheckpointError::Mismatch { path: dir.display().to_string(), message: e.to_string() })?;
        let source = Source::open_trained(dir, &spec, Some(&lora), state.format)?;
        let mut trained = Vec::new();
        for unit in 0..lora_units(&spec, &lora, 1).len() {
            let mut offset = 0;
            for (name, shape) in source.unit_tensors(unit) {
                let numel: i64 = shape.iter().product();
                let t = Tensor::empty([numel], (Kind::Float, Device::Cpu));
                source.read(unit, State::Master, offset, &t)?;
                trained.push((name.clone(), t.view(shape.as_slice())));
                offset += numel;
            }
        }
        let trained_dtype = super::export::training_dtype(dir)?;
        Ok(Some(Adapters { origin: dir.to_path_buf(), spec, lora, base, step: state.step, trained_dtype, trained }))
    }

    fn open_peft(dir: &Path) -> Result<Adapters, CheckpointError> {
        let mismatch = |message: String| CheckpointError::Mismatch { path: dir.display().to_string(), message };
        let (lora, base) = adapter_section(dir).map_err(&mismatch)?;
        let Some(base) = base.as_ref().map(PathBuf::from).filter(|b| b.exists()) else {
            let named = base.map_or("has no base_model_name_or_path".into(), |b| {
                format!("names base_model_name_or_path = \"{b}\", which is no folder or file here")
            });
            return Err(mismatch(format!(
                "is a PEFT adapter folder whose {ADAPTER_CONFIG} {named}: ulysses needs the base model's files (a \
                 Hugging Face folder or a ulysses checkpoint) to put the adapters on; set base_model_name_or_path to \
                 that folder, or use the run's checkpoint instead"
            )));
        };
        let spec = base_spec(&base)?.ok_or_else(|| {
            mismatch(format!("its base_model_name_or_path \"{}\" has no {CONFIG} beside it", base.display()))
        })?;
        if let Err(problems) = check_adapter(dir, &spec, &lora) {
            let more = match problems.len() {
                1 => String::new(),
                n => format!(" (and {} more like it)", n - 1),
            };
            return Err(mismatch(format!("does not fit its base: {}{more}", problems[0])));
        }
        let trained = load_peft(dir, &spec, &lora)?;
        let step = super::export::exported_step(dir).unwrap_or(0);
        let base = Base::Path { path: base, field: "base_model_name_or_path" };
        Ok(Adapters { origin: dir.to_path_buf(), spec, lora, base, step, trained_dtype: Kind::Float, trained })
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The base model, whole, as fp32 on the CPU; refused with one message when it is missing or
    /// is another model than the adapters were trained on.
    fn base_weights(&self) -> Result<ModelWeights, CheckpointError> {
        let (path, field) = match &self.base {
            Base::Seeded(seed) => return Ok(ModelWeights::init(&self.spec, *seed as i64, Kind::Float, Device::Cpu)),
            Base::Path { path, field } => (path, field),
        };
        let mismatch = |message: String| CheckpointError::Mismatch { path: self.origin.display().to_string(), message };
        if !path.exists() {
            return Err(mismatch(format!(
                "holds LoRA adapters trained on the base {field} = \"{}\", which does not exist (any more?): the \
                 adapters mean nothing without it; put that model back at that path",
                path.display()
            )));
        }
        let found = base_spec(path)?;
        if let Some(found) = found.filter(|f| *f != self.spec) {
            return Err(mismatch(format!(
                "holds LoRA adapters of {}, but its base {field} = \"{}\" is now {}: put back the model the adapters \
                 were trained on",
                describe(&self.spec),
                path.display(),
                describe(&found)
            )));
        }
        load_weights(path, &self.spec, Kind::Float, Device::Cpu)
    }

    /// The whole model with the adapters merged into the base (`W + alpha/r · B·A`, in fp32) and
    /// the modules trained in full in place of the base's, as `kind` on `device`.
    pub fn merged(&self, kind: Kind, device: Device) -> Result<ModelWeights, CheckpointError> {
        let mut w = self.base_weights()?;
        attach(&mut w, &self.spec, &self.lora, &self.trained);
        merge(&mut w);
        let named = w.named_tensors().into_iter().map(|(n, t)| (n, t.to_kind(kind).to_device(device))).collect();
        Ok(ModelWeights::from_named(&self.spec, named)?)
    }

    /// The base as `peft.PeftModel.from_pretrained` is told it (`base_model_name_or_path`): its
    /// path, made absolute (a relative `model.path` means the training job's working directory,
    /// where `final/` is written), or nothing for a seeded base.
    fn base_name(&self) -> String {
        match &self.base {
            Base::Path { path, .. } => std::path::absolute(path).unwrap_or_else(|_| path.clone()).display().to_string(),
            Base::Seeded(_) => String::new(),
        }
    }

    /// Writes the adapters as a PEFT adapter folder at `out` (adapter_model.safetensors in
    /// `dtype`, adapter_config.json, the tokenizer files the checkpoint carries, the export
    /// marker); `out` is replaced only when it is ulysses' own.
    pub fn export_peft(&self, out: &Path, dtype: Kind) -> Result<(), CheckpointError> {
        check_replaceable(out)?;
        let tmp = new_temporary(out)?;
        save_peft(&tmp, &self.spec, &self.lora, &self.trained, dtype, &self.base_name())?;
        publish(&self.origin, &tokenizer_files(&self.origin), self.step, dtype, &tmp, out)?;
        log::info!("export: {} holds the adapters of step {} of {}", out.display(), self.step, self.origin.display());
        Ok(())
    }

    /// Writes the merged model (`merged`) as a Hugging Face folder at `out`: weight files of at
    /// most `max_shard_bytes` in `dtype`, the config.json of the checkpoint (else of the base),
    /// the tokenizer files of the checkpoint or folder (else of the base). Holds the whole model
    /// in memory, in fp32.
    pub fn export_merged(&self, out: &Path, dtype: Kind, max_shard_bytes: u64) -> Result<(), CheckpointError> {
        check_replaceable(out)?;
        let w = self.merged(dtype, Device::Cpu)?;
        let tmp = new_temporary(out)?;
        save_hf(&w, &self.spec, &tmp, max_shard_bytes)?;
        let base_dir = match &self.base {
            Base::Path { path, .. } if path.is_dir() => Some(path.as_path()),
            Base::Path { path, .. } => path.parent(),
            Base::Seeded(_) => None,
        };
        let config =
            [Some(self.origin.as_path()), base_dir].into_iter().flatten().map(|d| d.join(CONFIG)).find(|c| c.is_file());
        if let Some(config) = config {
            write_config(&config, &tmp, dtype)?;
        }
        let mut tokenizer = tokenizer_files(&self.origin);
        if tokenizer.is_empty() {
            tokenizer = base_dir.map(tokenizer_files).unwrap_or_default();
        }
        publish(&self.origin, &tokenizer, self.step, dtype, &tmp, out)?;
        log::info!("export: {} holds the base with the adapters of {} merged", out.display(), self.origin.display());
        Ok(())
    }
}

/// A model in a message: its family and the dimensions that tell two tiny ones apart.
pub(super) fn describe(spec: &ModelSpec) -> String {
    format!(
        "{} with {} layers, hidden size {} and {} tokens",
        spec.describe_family(),
        spec.num_hidden_layers,
        spec.hidden_size,
        spec.vocab_size
    )
}

/// The model of a base at `path`: the config.json of its folder (a Hugging Face folder or a
/// checkpoint), or of the folder of a single weights file; None when there is none (a bare
/// weights file: loading it checks every name and shape instead).
fn base_spec(path: &Path) -> Result<Option<ModelSpec>, CheckpointError> {
    let dir = if path.is_dir() { path } else { path.parent().unwrap_or(Path::new(".")) };
    let config = dir.join(CONFIG);
    if !config.is_file() {
        return Ok(None);
    }
    ModelSpec::from_hf_config(&config)
        .map(Some)
        .map_err(|e| CheckpointError::Mismatch { path: path.display().to_string(), message: e.to_string() })
}

/// A LoRA run's `final/` (collective): rank 0 writes the adapters of `checkpoint` as a PEFT
/// folder at `out`, in fp32 (what peft computes adapters in, whatever the base's dtype); a
/// failure there stops every rank.
pub fn export_final(checkpoint: &Path, out: &Path, world: &dyn Collective) -> Result<(), CheckpointError> {
    let mut result = Ok(());
    if world.rank() == 0 {
        result = Adapters::open(checkpoint).and_then(|a| match a {
            Some(a) => a.export_peft(out, Kind::Float),
            None => Err(CheckpointError::Final(format!("{} holds no LoRA adapters", checkpoint.display()))),
        });
    }
    let failed = all_reduce_f64(world, if result.is_err() { 1.0 } else { 0.0 })?;
    if failed > 0.0 && result.is_ok() {
        return Err(CheckpointError::Final(format!("rank 0 could not write {}", out.display())));
    }
    result
}
