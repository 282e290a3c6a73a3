//! Reading a checkpoint back: which one (`checkpoint.resume`), its run state, and the shards of
//! the job that loads it. Each rank reads only the byte ranges of its own shards, in any layout,
//! from a checkpoint of either format: loading needs no collective.
use super::*;
use crate::comm::{all_reduce_f64, broadcast_i64, Collective};
use crate::config::{LoraConfig, Resume, ZeroStage};
use crate::data::LoaderState;
use crate::model::params::ModelWeights;
use crate::model::spec::ModelSpec;
use crate::model::weights::load_hf;
use crate::parallel::units::lora_units;
use crate::parallel::zero::{ShardedParams, State, StateTiers};
use crate::plan::memory::DISK_CHUNK;
use tch::{Device, Kind, Tensor};

/// A checkpoint the run starts from, loaded.
pub struct Resumed<T> {
    pub dir: PathBuf,
    pub loaded: T,
}

/// The checkpoint `checkpoint.resume` names, loaded by `load` on every rank (collective):
/// - "none": None;
/// - a folder: that one; any failure is an error;
/// - "auto": the newest complete checkpoint of the run directory that every rank can read. One
///   whose files are damaged (`CheckpointError::is_damage`) is skipped with a warning naming it,
///   for the next older one; when none is left, or there is none, rank 0 says so and the run
///   starts from the beginning (None). A checkpoint that is readable but does not fit the
///   experiment (another model, seed, ...) stops the run instead: an older one would not fit
///   either, and starting over would replace the run's checkpoints.
///
/// Rank 0 lists the candidates and tells the others, so every rank tries the same one even
/// while a shared file system is still settling.
pub fn resolve_and_load<T>(
    resume: &Resume,
    run_dir: &Path,
    world: &dyn Collective,
    mut load: impl FnMut(&Path) -> Result<T, CheckpointError>,
) -> Result<Option<Resumed<T>>, CheckpointError> {
    let root = world.rank() == 0;
    let candidates: Vec<u64> = match resume {
        Resume::None => return Ok(None),
        Resume::From(dir) => {
            if !dir.join(COMPLETE).is_file() {
                return Err(CheckpointError::Incomplete { path: dir.display().to_string() });
            }
            return Ok(Some(Resumed { dir: dir.clone(), loaded: load(dir)? }));
        }
        Resume::Auto if root => list_complete(run_dir)?.into_iter().rev().map(|(s, _)| s).collect(),
        Resume::Auto => Vec::new(),
    };
    let dir = checkpoints_dir(run_dir);
    let mut skipped = Vec::new();
    for i in 0.. {
        let next = candidates.get(i).map_or(-1, |&s| s as i64);
        let step = broadcast_i64(world, next, 0)?;
        if step < 0 {
            break;
        }
        let path = dir.join(step_dir_name(step as u64));
        let result = match load(&path) {
            Err(e) if e.is_damage() => {
                log::warn!("cannot load checkpoint {}: {e}", path.display());
                None
            }
            other => Some(other?),
        };
        if all_reduce_f64(world, if result.is_none() { 1.0 } else { 0.0 })? == 0.0 {
            let loaded = result.unwrap_or_else(|| unreachable!("no rank failed"));
            return Ok(Some(Resumed { dir: path, loaded }));
        }
        if root {
            log::warn!(
                "resume = \"auto\": skipping {}: it cannot be read (see the warnings above); trying an older checkpoint",
                path.display()
            );
        }
        skipped.push(path.display().to_string());
    }
    if root {
        if skipped.is_empty() {
            println!("resume = \"auto\": no checkpoint in {}; starting from the beginning", dir.display());
        } else {
            log::warn!(
                "resume = \"auto\": no checkpoint in {} can be read (skipped {}); starting from the beginning",
                dir.display(),
                skipped.join(", ")
            );
        }
    }
    Ok(None)
}

pub fn read_state(dir: &Path) -> Result<RunState, CheckpointError> {
    let path = dir.join(RUN_STATE);
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    let bad = |message: String| CheckpointError::RunState { path: path.display().to_string(), message };
    let format = serde_json::from_str::<serde_json::Value>(&text)
        .map_err(|e| bad(format!("not valid JSON: {e}")))?
        .get("format")
        .cloned()
        .unwrap_or(serde_json::Value::Null);
    if format != 1 && format != FORMAT {
        return Err(CheckpointError::Format { path: path.display().to_string(), found: format.to_string() });
    }
    serde_json::from_str(&text).map_err(|e| bad(format!("unexpected content: {e}")))
}

/// The loader position of the resumed job, whose dp and micro batch may differ from the saved
/// job's: the data position is kept in samples, which must fill whole micro batches.
pub fn restore_loader_state(
    state: &RunState,
    dir: &Path,
    seed: u64,
    dp: usize,
    micro_batch: usize,
) -> Result<LoaderState, CheckpointError> {
    let mismatch = |message: String| CheckpointError::Mismatch { path: dir.display().to_string(), message };
    if state.seed != seed {
        return Err(mismatch(format!(
            "written with run.seed = {}, but the experiment has run.seed = {seed}; the data order depends on the seed: set run.seed = {} to resume",
            state.seed, state.seed
        )));
    }
    let per_step = (dp * micro_batch) as u64;
    if state.data.samples % per_step != 0 {
        return Err(mismatch(format!(
            "{} samples of epoch {} were consumed, not a multiple of parallel.dp × train.micro_batch = {dp} × {micro_batch}; resume with a dp × micro_batch that divides it (it was {} × {})",
            state.data.samples, state.data.epoch, state.layout.dp, state.layout.micro_batch
        )));
    }
    Ok(LoaderState { epoch: state.data.epoch, position: state.data.samples / per_step })
}

/// The parameters and Adam moments of checkpoint `dir` (of run-state format `format`), sharded
/// for this job: any ZeRO stage and world size. Each rank reads its own shards' byte ranges,
/// holding nothing else (state on a GPU passes through a 64 MiB host buffer).
pub fn load_params(
    dir: &Path,
    format: u32,
    spec: &ModelSpec,
    stage: ZeroStage,
    world: &dyn Collective,
    state: impl Into<StateTiers>,
) -> Result<ShardedParams, CheckpointError> {
    load_trained(dir, format, spec, None, stage, world, state)
}

/// `load_params` for the parameters a run trains: the whole model, or under `lora` the adapters
/// and the modules trained in full (`lora_units`), with their Adam moments.
pub fn load_trained(
    dir: &Path,
    format: u32,
    spec: &ModelSpec,
    lora: Option<&LoraConfig>,
    stage: ZeroStage,
    world: &dyn Collective,
    state: impl Into<StateTiers>,
) -> Result<ShardedParams, CheckpointError> {
    let source = Source::open_trained(dir, spec, lora, format)?;
    let params = match lora {
        None => ShardedParams::zeroed(spec, stage, world, state)?,
        Some(l) => ShardedParams::zeroed_units(|shards| lora_units(spec, l, shards), stage, world, state)?,
    };
    for (i, u) in params.units().iter().enumerate() {
        let (start, len) = params.shard_range(u.id);
        for state in State::ALL {
            match params.memory_state(u.id, state) {
                Some(dest) => source.read(i, state, start, dest)?,
                // A shard on disk: in chunks through host memory.
                None => {
                    let mut at = 0;
                    while at < len {
                        let part = Tensor::empty([DISK_CHUNK.min(len - at)], (Kind::Float, Device::Cpu));
                        source.read(i, state, start + at, &part)?;
                        params.write_state(u.id, state, at, &part)?;
                        at += part.numel() as i64;
                    }
                }
            }
        }
    }
    Ok(params)
}

/// A model's weights, whole, as `kind` on `device`: from a ulysses checkpoint folder (either
/// format: its fp32 master weights), else from Hugging Face files (`load_hf`: a folder or one
/// `.safetensors` file). Adapters (a LoRA run's checkpoint or a PEFT folder) come merged into
/// their base (`adapters::Adapters::merged`). For evaluation and `model.weights`.
pub fn load_weights(
    path: &Path,
    spec: &ModelSpec,
    kind: Kind,
    device: Device,
) -> Result<ModelWeights, CheckpointError> {
    if let Some(adapters) = super::adapters::Adapters::open(path)? {
        if adapters.spec() != spec {
            return Err(CheckpointError::Mismatch {
                path: path.display().to_string(),
                message: format!(
                    "holds LoRA adapters of {}, but the experiment's model is {}",
                    super::adapters::describe(adapters.spec()),
                    super::adapters::describe(spec)
                ),
            });
        }
        return adapters.merged(kind, device);
    }
    if !path.join(RUN_STATE).is_file() {
        return Ok(load_hf(path, spec, kind, device)?);
    }
    if !path.join(COMPLETE).is_file() {
        return Err(CheckpointError::Incomplete { path: path.display().to_string() });
    }
    let state = read_state(path)?;
    let source = Source::open(path, spec, state.format)?;
    let mut named = Vec::new();
    for unit in 0..crate::parallel::zero::model_units(spec, 1).len() {
        let mut offset = 0;
        for (name, shape) in source.unit_tensors(unit) {
            let numel: i64 = shape.iter().product();
            let t = Tensor::empty([numel], (Kind::Float, Device::Cpu));
            source.read(unit, State::Master, offset, &t)?;
            named.push((name.clone(), t.view(shape.as_slice()).to_kind(kind).to_device(device)));
            offset += numel;
        }
    }
    Ok(ModelWeights::from_named(spec, named)?)
}
