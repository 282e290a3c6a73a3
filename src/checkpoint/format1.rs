//! Format 1, what ulysses wrote before format 2: rank 0 gathers every unit whole and writes the
//! model as Hugging Face files plus the Adam moments by Hugging Face name (`optimizer/`). Such
//! checkpoints still load (`index::Source` reads them by byte range too). This writer is kept as
//! the baseline that `ulysses bench-checkpoint` measures format 2 against, and to make format-1
//! checkpoints for the compatibility tests; training no longer writes it.
use super::commit::{prepare_dir, publish, write_synced};
use super::*;
use crate::comm::Collective;
use crate::model::params::ModelWeights;
use crate::model::spec::ModelSpec;
use crate::model::weights::save_hf;
use crate::parallel::zero::{ShardedParams, State};
use tch::Tensor;

/// Largest model file, as format 1 wrote them.
const MAX_SHARD_BYTES: u64 = 5 << 30;

/// Saves `params` with `state` (its `format` becomes 1) as `RUN_DIR/checkpoints/step-<step>`,
/// rank 0 holding one whole state at a time. Collective.
pub fn save(
    params: &ShardedParams,
    state: &RunState,
    spec: &ModelSpec,
    run_dir: &Path,
    world: &dyn Collective,
) -> Result<PathBuf, CheckpointError> {
    let root = world.rank() == 0;
    let dir = checkpoints_dir(run_dir);
    let dest = dir.join(step_dir_name(state.step));
    let tmp = dir.join(format!("{}.tmp-{}", step_dir_name(state.step), std::process::id()));
    if root {
        prepare_dir(run_dir)?;
        std::fs::create_dir_all(tmp.join(OPTIMIZER)).map_err(io_err(&tmp))?;
    }
    let master = params.gather_named_state(world, State::Master, root)?;
    if root {
        save_hf(&ModelWeights::from_named(spec, master)?, spec, &tmp, MAX_SHARD_BYTES)?;
    }
    for (which, file) in [(State::ExpAvg, EXP_AVG), (State::ExpAvgSq, EXP_AVG_SQ)] {
        let named = params.gather_named_state(world, which, root)?;
        if root {
            let path = tmp.join(OPTIMIZER).join(file);
            Tensor::write_safetensors(&named, &path).map_err(|e| CheckpointError::Io {
                path: path.display().to_string(),
                source: std::io::Error::other(e.to_string()),
            })?;
        }
    }
    if root {
        let state = RunState { format: 1, ..state.clone() };
        let json = serde_json::to_string_pretty(&state).expect("RunState always serializes") + "\n";
        write_synced(&tmp.join(RUN_STATE), json.as_bytes())?;
        write_synced(&tmp.join(EXPERIMENT), state.config_toml.as_bytes())?;
        for entry in walk(&tmp)? {
            super::commit::fsync(&entry)?;
        }
        publish(&tmp, &dest)?;
    }
    world.barrier()?;
    Ok(dest)
}

/// Every file under `dir`, then `dir`'s folders (so a folder is flushed after its files).
fn walk(dir: &Path) -> Result<Vec<PathBuf>, CheckpointError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        if path.is_dir() {
            out.extend(walk(&path)?);
        }
        out.push(path);
    }
    Ok(out)
}
