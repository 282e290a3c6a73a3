//! Writing a checkpoint. Every rank takes part in gathering the sharded state; rank 0 alone
//! holds the whole tensors (one state at a time: the model, then each Adam moment) and writes
//! them. For Llama-3.1-8B that is 32 GB of host memory on rank 0 per state; a per-rank sharded
//! writer can replace this without changing the files.
use super::*;
use crate::comm::Collective;
use crate::model::params::ModelWeights;
use crate::model::spec::ModelSpec;
use crate::model::weights::{copy_tokenizer_files, save_hf};
use crate::parallel::zero::{ShardedParams, State};
use tch::Tensor;

/// Largest model shard file; transformers' own default is 5 GB.
const MAX_SHARD_BYTES: u64 = 5 << 30;

/// Saves `params` with `state` as `RUN_DIR/checkpoints/step-<state.step>`, with the `tokenizer`
/// files (path, name) beside config.json so the folder serves as a Hugging Face model, and keeps
/// the newest `keep`. Collective: every rank calls it; returns when the checkpoint is published.
pub fn save(
    params: &ShardedParams,
    state: &RunState,
    spec: &ModelSpec,
    tokenizer: &[(PathBuf, &str)],
    run_dir: &Path,
    keep: usize,
    world: &dyn Collective,
) -> Result<PathBuf, CheckpointError> {
    let root = world.rank() == 0;
    let dir = checkpoints_dir(run_dir);
    let dest = dir.join(step_dir_name(state.step));
    let tmp = dir.join(format!("{}.tmp-{}", step_dir_name(state.step), std::process::id()));
    if root {
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        remove_stale(&dir)?;
        std::fs::create_dir_all(tmp.join(OPTIMIZER)).map_err(io_err(&tmp))?;
    }
    let master = params.gather_named_state(world, State::Master, root)?;
    if root {
        let weights = ModelWeights::from_named(spec, master)?;
        save_hf(&weights, spec, &tmp, MAX_SHARD_BYTES)?;
        copy_tokenizer_files(tokenizer, &tmp)?;
        slow_save_for_tests();
    }
    for (which, file) in [(State::ExpAvg, EXP_AVG), (State::ExpAvgSq, EXP_AVG_SQ)] {
        let named = params.gather_named_state(world, which, root)?;
        if root {
            write_tensors(&named, &tmp.join(OPTIMIZER).join(file))?;
        }
    }
    if root {
        let json = serde_json::to_string_pretty(state).expect("RunState always serializes");
        write_file(&tmp.join(RUN_STATE), &(json + "\n"))?;
        write_file(&tmp.join(EXPERIMENT), &state.config_toml)?;
        publish(&tmp, &dest)?;
        prune(run_dir, keep, state.step)?;
    }
    // No rank goes on (or exits, after a preemption save) before the checkpoint is published.
    world.barrier()?;
    Ok(dest)
}

fn write_tensors(named: &[(String, Tensor)], path: &Path) -> Result<(), CheckpointError> {
    Tensor::write_safetensors(named, path).map_err(|e| CheckpointError::Io {
        path: path.display().to_string(),
        source: std::io::Error::other(e.to_string()),
    })
}

fn write_file(path: &Path, text: &str) -> Result<(), CheckpointError> {
    std::fs::write(path, text).map_err(io_err(path))
}

/// Test hook for the kill-during-save test: `ULYSSES_TEST_SLOW_SAVE_MS` pauses rank 0 after the
/// model files and before the optimizer files, so a test can kill the job mid-save.
fn slow_save_for_tests() {
    if let Some(ms) = std::env::var("ULYSSES_TEST_SLOW_SAVE_MS").ok().and_then(|v| v.parse().ok()) {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}
