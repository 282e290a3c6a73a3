//! Where a run starts: fresh shards, or the shards, data position and step of a checkpoint; and
//! the run state a checkpoint records.
use super::checkpoint::{self, CheckpointError, DataPosition, Layout, RunState, Versions};
use crate::comm::{Collective, Mesh};
use crate::config::{Experiment, Resume, ZeroStage};
use crate::data::{Loader, LoaderState};
use crate::model::params::init_tensor;
use crate::model::spec::ModelSpec;
use crate::parallel::zero::ShardedParams;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use tch::{Device, Kind};

/// What the start of a run depends on.
pub struct StartSpec<'a> {
    /// `checkpoint.resume`.
    pub resume: &'a Resume,
    pub run_dir: PathBuf,
    /// `model.weights`: initial weights (Hugging Face files or a checkpoint), else a seeded
    /// initialisation.
    pub weights: Option<&'a Path>,
    pub seed: u64,
    pub zero_stage: ZeroStage,
    /// `train.steps`: a checkpoint beyond it cannot be continued.
    pub steps: usize,
    pub micro_batch: usize,
}

impl StartSpec<'_> {
    pub fn of(exp: &Experiment) -> StartSpec<'_> {
        StartSpec {
            resume: &exp.checkpoint.resume,
            run_dir: exp.run_dir(),
            weights: exp.model.weights.as_deref(),
            seed: exp.run.seed,
            zero_stage: exp.parallel.zero_stage,
            steps: exp.train.steps,
            micro_batch: exp.train.micro_batch,
        }
    }
}

/// Fresh shards: `weights` when given, else the seeded initialisation.
fn fresh_params(s: &StartSpec, spec: &ModelSpec, world: &dyn Collective, device: Device) -> Result<ShardedParams> {
    let initial = match s.weights {
        Some(path) => Some(
            checkpoint::load_weights(path, spec, Kind::Float, Device::Cpu)
                .with_context(|| format!("loading model.weights {}", path.display()))?
                .named_tensors(),
        ),
        None => None,
    };
    Ok(ShardedParams::new(spec, s.zero_stage, world, device, |u| match &initial {
        Some(named) => u
            .tensors
            .iter()
            .map(|(n, _)| named.iter().find(|(k, _)| k == n).expect("validated names").1.shallow_clone())
            .collect(),
        None => {
            u.tensors.iter().map(|(n, shape)| init_tensor(n, shape, s.seed as i64, Kind::Float, Device::Cpu)).collect()
        }
    }))
}

/// The shards and the data position to start from, the step already done, and the checkpoint
/// they come from (None: a fresh start).
pub fn start_point(
    s: &StartSpec,
    spec: &ModelSpec,
    mesh: &Mesh,
    world: &dyn Collective,
    device: Device,
) -> Result<(ShardedParams, LoaderState, u64, Option<PathBuf>)> {
    let resumed = checkpoint::resolve_and_load(s.resume, &s.run_dir, world, |dir| {
        let state = checkpoint::read_state(dir)?;
        if state.step > s.steps as u64 {
            return Err(CheckpointError::Mismatch {
                path: dir.display().to_string(),
                message: format!(
                    "the checkpoint is at step {}, beyond train.steps = {}; raise train.steps to continue",
                    state.step, s.steps
                ),
            });
        }
        let loader = checkpoint::restore_loader_state(&state, dir, s.seed, mesh.dp, s.micro_batch)?;
        let params = checkpoint::load_params(dir, state.format, spec, s.zero_stage, world, device)?;
        Ok((state, loader, params))
    })
    .with_context(|| format!("checkpoint.resume = \"{}\"", String::from(s.resume.clone())))?;
    let Some(checkpoint::Resumed { dir, loaded: (state, loader, params) }) = resumed else {
        return Ok((fresh_params(s, spec, world, device)?, LoaderState::default(), 0, None));
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

/// What a checkpoint of step `step` records besides the tensors: the resolved experiment, the
/// data position and the layout it was written with.
pub fn run_state(exp: &Experiment, mesh: &Mesh, step: u64, loader: &Loader) -> RunState {
    let l = loader.state();
    RunState {
        format: checkpoint::FORMAT,
        step,
        total_steps: exp.train.steps as u64,
        data: DataPosition { epoch: l.epoch, samples: l.position * (mesh.dp * exp.train.micro_batch) as u64 },
        seed: exp.run.seed,
        layout: Layout {
            world: mesh.world_size(),
            sp: mesh.sp,
            dp: mesh.dp,
            zero_stage: exp.parallel.zero_stage,
            micro_batch: exp.train.micro_batch,
            grad_accum: exp.train.grad_accum,
        },
        versions: Versions::current(),
        model_dtype: "float32".into(),
        config_toml: exp.to_toml(),
    }
}
