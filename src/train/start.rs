//! Where a run starts: fresh shards, or the shards, data position and step of a checkpoint; and
//! the run state a checkpoint records.
use crate::checkpoint::{self, CheckpointError, DataPosition, RunState};
use crate::comm::{Collective, Mesh};
use crate::config::{Experiment, LoraConfig, Resume, ZeroStage};
use crate::data::tokenizer::{self, recorded_tokenizer};
use crate::data::{Dataset, Loader, LoaderState};
use crate::model::lora::{init_adapters, load_peft};
use crate::model::params::init_tensor;
use crate::model::spec::adapter::full_module_shapes;
use crate::model::spec::ModelSpec;
use crate::model::weights;
use crate::parallel::frozen::FrozenParams;
use crate::parallel::units::{lora_units, model_units, Unit, UnitId};
use crate::parallel::zero::{ShardedParams, StateTiers};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// What the start of a run depends on.
pub struct StartSpec<'a> {
    /// `checkpoint.resume`.
    pub resume: &'a Resume,
    pub run_dir: PathBuf,
    /// `model.path` or `model.weights`: initial weights (Hugging Face files or a checkpoint), else a seeded
    /// initialisation.
    pub weights: Option<&'a Path>,
    pub seed: u64,
    pub zero_stage: ZeroStage,
    /// `train.steps`: a checkpoint beyond it cannot be continued.
    pub steps: usize,
    pub micro_batch: usize,
    /// `[lora]`: the parameters that train are the adapters and the modules trained in full.
    pub lora: Option<&'a LoraConfig>,
}

impl StartSpec<'_> {
    pub fn of(exp: &Experiment) -> StartSpec<'_> {
        StartSpec {
            resume: &exp.checkpoint.resume,
            run_dir: exp.run_dir(),
            weights: exp.model.weights_path(),
            seed: exp.run.seed,
            zero_stage: exp.parallel.zero_stage,
            steps: exp.train.steps,
            micro_batch: exp.train.micro_batch,
            lora: exp.lora.as_ref(),
        }
    }
}

/// The weights of `model.weights` by name as `kind` on the CPU; None: the seeded initialisation.
fn loaded_weights(s: &StartSpec, spec: &ModelSpec, kind: Kind) -> Result<Option<Vec<(String, Tensor)>>> {
    let Some(path) = s.weights else {
        return Ok(None);
    };
    let w = checkpoint::load_weights(path, spec, kind, Device::Cpu)
        .with_context(|| format!("loading model.weights {}", path.display()))?;
    Ok(Some(w.named_tensors()))
}

/// The initial tensors of unit `u` as `kind`: among `loaded`, else seeded (one unit at a time,
/// so no whole model is ever built).
fn initial_unit(u: &Unit, loaded: Option<&[(String, Tensor)]>, seed: u64, kind: Kind) -> Vec<Tensor> {
    u.tensors
        .iter()
        .map(|(n, shape)| match loaded {
            Some(named) => named.iter().find(|(k, _)| k == n).expect("validated names").1.shallow_clone(),
            None => init_tensor(n, shape, seed as i64, Kind::Float, Device::Cpu).to_kind(kind),
        })
        .collect()
}

/// The frozen base of a LoRA run (collective at ZeRO-3: nothing, but every rank builds its own
/// shard): the initial weights held as `kind` on `device`, never updated.
pub fn frozen_base(
    s: &StartSpec,
    spec: &ModelSpec,
    world: &dyn Collective,
    kind: Kind,
    device: Device,
) -> Result<FrozenParams> {
    let loaded = loaded_weights(s, spec, kind)?;
    Ok(FrozenParams::new(spec, s.zero_stage, world, kind, device, |u| initial_unit(u, loaded.as_deref(), s.seed, kind)))
}

/// Fresh shards: `weights` when given, else the seeded initialisation. Under LoRA: the adapters
/// of `lora.adapter` (a PEFT folder) or PEFT's initialisation, and the modules trained in full
/// from the frozen base `base` (collective: gathered from it).
fn fresh_params(
    s: &StartSpec,
    spec: &ModelSpec,
    world: &dyn Collective,
    state: &StateTiers,
    base: Option<&FrozenParams>,
) -> Result<ShardedParams> {
    let (Some(lora), Some(base)) = (s.lora, base) else {
        let loaded = loaded_weights(s, spec, Kind::Float)?;
        return Ok(ShardedParams::new(spec, s.zero_stage, world, state.clone(), |u| {
            initial_unit(u, loaded.as_deref(), s.seed, Kind::Float)
        })?);
    };
    let mut trained = match &lora.adapter {
        Some(dir) => load_peft(dir, spec, lora).with_context(|| format!("lora.adapter = \"{}\"", dir.display()))?,
        None => init_adapters(spec, lora, s.seed),
    };
    for (name, _) in full_module_shapes(spec, lora) {
        // A PEFT folder carries the modules it trained in full; a fresh start takes the base's.
        if !trained.iter().any(|(n, _)| *n == name) {
            let id = if name.starts_with("lm_head") { UnitId::Head } else { UnitId::Embedding };
            let unit = base.gather(world, id)?;
            let i = model_units(spec, 1)[id.index(spec.num_hidden_layers as usize)]
                .tensors
                .iter()
                .position(|(n, _)| *n == name)
                .expect("the module is in its unit");
            trained.push((name, unit[i].to_device(Device::Cpu).to_kind(Kind::Float)));
        }
    }
    Ok(ShardedParams::new_units(
        |n| lora_units(spec, lora, n),
        s.zero_stage,
        world,
        state.clone(),
        |u| initial_unit(u, Some(&trained), s.seed, Kind::Float),
    )?)
}

/// The shards and the data position to start from, the step already done, and the checkpoint
/// they come from (None: a fresh start).
pub fn start_point(
    s: &StartSpec,
    spec: &ModelSpec,
    mesh: &Mesh,
    world: &dyn Collective,
    state: &StateTiers,
    base: Option<&FrozenParams>,
) -> Result<(ShardedParams, LoaderState, u64, Option<PathBuf>)> {
    let resumed = checkpoint::resolve_and_load(s.resume, &s.run_dir, world, |dir| {
        let run_state = checkpoint::read_state(dir)?;
        if run_state.step > s.steps as u64 {
            return Err(CheckpointError::Mismatch {
                path: dir.display().to_string(),
                message: format!(
                    "the checkpoint is at step {}, beyond train.steps = {}; raise train.steps to continue",
                    run_state.step, s.steps
                ),
            });
        }
        let loader = checkpoint::restore_loader_state(&run_state, dir, s.seed, mesh.dp, s.micro_batch)?;
        let params = checkpoint::load_trained(dir, run_state.format, spec, s.lora, s.zero_stage, world, state.clone())?;
        Ok((run_state, loader, params))
    })
    .with_context(|| format!("checkpoint.resume = \"{}\"", String::from(s.resume.clone())))?;
    let Some(checkpoint::Resumed { dir, loaded: (state, loader, params) }) = resumed else {
        return Ok((fresh_params(s, spec, world, state, base)?, LoaderState::default(), 0, None));
    };
    if mesh.world_rank == 0 {
        println!(
            "resuming from {} (step {}, written by a {}-rank sp={} dp={} job, format {})",
            dir.display(),
            state.step,
            state.layout.world,
            state.layout.sp,
            state.layout.dp,
            state.format
        );
    }
    Ok((params, loader, state.step, Some(dir)))
}

/// The tokenizer files every checkpoint of the run carries: those of the model folder
/// (`model.path`, or the folder of `model.weights`), else the tokenizer.json the data was
/// prepared with and the tokenizer files beside it; none for the byte tokenizer.
/// Each is read now: a broken one stops the run before it trains.
pub fn tokenizer_files(
    exp: &Experiment,
    data: &Dataset,
) -> Result<Vec<(PathBuf, &'static str)>, weights::WeightsError> {
    let model_dir = exp.model.weights_path().map(|p| if p.is_dir() { p } else { p.parent().unwrap_or(p) });
    if let Some(files) = model_dir.map(weights::tokenizer_files).filter(|f| !f.is_empty()) {
        weights::check_tokenizer_files(&files)?;
        warn_if_other_tokenizer(&files, data);
        return Ok(files);
    }
    let Some(recorded) = recorded_tokenizer(data) else {
        return Ok(Vec::new());
    };
    let beside = weights::tokenizer_files(recorded.parent().unwrap_or(Path::new(".")));
    let mut files: Vec<_> = beside.into_iter().filter(|(_, name)| *name != "tokenizer.json").collect();
    files.insert(0, (recorded, "tokenizer.json"));
    weights::check_tokenizer_files(&files)?;
    Ok(files)
}

/// A model folder's tokenizer.json that is not the one the data was prepared with (shards made
/// with a tokenizer.json record its hash; the byte tokenizer is not compared): the run goes on,
/// as the ids may still fit the vocabulary, but the user is told.
fn warn_if_other_tokenizer(files: &[(PathBuf, &str)], data: &Dataset) {
    let Some((model_tokenizer, _)) = files.iter().find(|(_, name)| *name == "tokenizer.json") else {
        return;
    };
    let Ok(bytes) = std::fs::read(model_tokenizer) else {
        return;
    };
    if data.tokenizer().starts_with("huggingface") && tokenizer::identity(&bytes) != data.tokenizer() {
        log::warn!(
            "the data was prepared with another tokenizer.json ({}) than the model's {}: its token ids may mean \
             other text to this model",
            data.tokenizer(),
            model_tokenizer.display()
        );
    }
}

/// What a checkpoint of step `step` records besides the tensors: the resolved experiment, the
/// data position and the layout it was written with.
pub fn run_state(exp: &Experiment, mesh: &Mesh, step: u64, loader: &Loader) -> RunState {
    let l = loader.state();
    let samples = l.position * (mesh.dp * exp.train.micro_batch) as u64;
    RunState::new(exp, mesh, step, DataPosition { epoch: l.epoch, samples })
}
