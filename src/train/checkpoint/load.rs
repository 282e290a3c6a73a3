//! Reading a checkpoint back: which one (`checkpoint.resume`), its run state, and the sharded
//! parameters and Adam moments for the layout of the job that loads it.
use super::*;
use crate::comm::Collective;
use crate::config::{Resume, ZeroStage};
use crate::data::LoaderState;
use crate::model::spec::ModelSpec;
use crate::model::weights::load_hf;
use crate::parallel::zero::{ShardedParams, State};
use std::collections::HashMap;
use tch::{Device, Kind, Tensor};

/// The checkpoint to resume from: `resume` is "none", "auto" (the newest complete checkpoint of
/// the run directory, if any) or a checkpoint folder. Rank 0 decides and tells the others, so
/// every rank loads the same one even while a file system is still settling.
pub fn resolve(resume: &Resume, run_dir: &Path, world: &dyn Collective) -> Result<Option<PathBuf>, CheckpointError> {
    match resume {
        Resume::None => Ok(None),
        Resume::Auto => {
            let newest =
                if world.rank() == 0 { list_complete(run_dir)?.last().map_or(-1, |(s, _)| *s as i64) } else { 0 };
            let step = world.broadcast(&Tensor::from_slice(&[newest]), 0)?.int64_value(&[0]);
            Ok((step >= 0).then(|| checkpoints_dir(run_dir).join(step_dir_name(step as u64))))
        }
        Resume::From(dir) => {
            let dir = dir.clone();
            if !dir.join(COMPLETE).is_file() {
                return Err(CheckpointError::Incomplete { path: dir.display().to_string() });
            }
            Ok(Some(dir))
        }
    }
}

pub fn read_state(dir: &Path) -> Result<RunState, CheckpointError> {
    let path = dir.join(RUN_STATE);
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    let bad = |message: String| CheckpointError::RunState { path: path.display().to_string(), message };
    let format = serde_json::from_str::<serde_json::Value>(&text)
        .map_err(|e| bad(format!("not valid JSON: {e}")))?
        .get("format")
        .and_then(|f| f.as_u64());
    if format != Some(FORMAT as u64) {
        return Err(bad(format!("has format {format:?}; this ulysses reads format {FORMAT}")));
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

/// The parameters and Adam moments of checkpoint `dir`, sharded for this job (any stage and world
/// size). Rank 0 reads each file, checking every tensor's name and shape against `spec`, and
/// broadcasts it unit by unit; the other ranks keep only their slices.
pub fn load_params(
    dir: &Path,
    spec: &ModelSpec,
    stage: ZeroStage,
    world: &dyn Collective,
    state_device: Device,
) -> Result<ShardedParams, CheckpointError> {
    let root = world.rank() == 0;
    let mut params = ShardedParams::new(spec, stage, world, state_device, |u| {
        u.tensors.iter().map(|(_, shape)| Tensor::zeros(shape.as_slice(), (Kind::Float, Device::Cpu))).collect()
    });
    let optimizer = dir.join(OPTIMIZER);
    for (which, path) in [
        (State::Master, dir.to_path_buf()),
        (State::ExpAvg, optimizer.join(EXP_AVG)),
        (State::ExpAvgSq, optimizer.join(EXP_AVG_SQ)),
    ] {
        let named: Option<HashMap<String, Tensor>> = if root {
            Some(load_hf(&path, spec, Kind::Float, Device::Cpu)?.named_tensors().into_iter().collect())
        } else {
            None
        };
        let units = params.units().to_vec();
        for u in &units {
            let full = match &named {
                Some(named) => Some(unit_tensors(named, &u.tensors, &path)?),
                None => None,
            };
            params.load_state(world, u.id, which, 0, full.as_deref())?;
        }
    }
    Ok(params)
}

/// A unit's tensors, in its order, from a file `load_hf` has already checked against the spec.
fn unit_tensors(
    named: &HashMap<String, Tensor>,
    unit: &[(String, Vec<i64>)],
    path: &Path,
) -> Result<Vec<Tensor>, CheckpointError> {
    unit.iter()
        .map(|(name, _)| {
            named.get(name).map(Tensor::shallow_clone).ok_or_else(|| CheckpointError::Mismatch {
                path: path.display().to_string(),
                message: format!("has no tensor `{name}`"),
            })
        })
        .collect()
}
