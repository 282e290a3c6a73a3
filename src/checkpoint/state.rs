//! `run_state.json`: everything besides the tensors that an exact resume needs, in terms that do
//! not depend on the layout (sp, dp, ZeRO stage) the checkpoint was written with.
pub use crate::versions::Versions;
use serde::{Deserialize, Serialize};

/// The format this ulysses writes: 2, each rank's shards in its own file (`index.json`); 1 was
/// whole tensors in Hugging Face files, which still load. Bumped when a file or field changes
/// meaning; a checkpoint of an unknown format is refused, not guessed at.
pub const FORMAT: u32 = 2;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    pub format: u32,
    /// Optimizer steps done; the resumed run starts with step `step + 1`. The learning rate and
    /// Adam's bias correction are functions of it, so it is the whole schedule state.
    pub step: u64,
    pub total_steps: u64,
    pub data: DataPosition,
    /// Training draws no random numbers after initialisation: the data order is a function of
    /// (seed, epoch), the initial weights of the seed and LoRA's dropout masks of (seed, step, ..)
    /// (`model::dropout`), so the seed together with `data` is the complete RNG state.
    pub seed: u64,
    /// The layout at save time, for the record: loading works with any other.
    pub layout: Layout,
    pub versions: Versions,
    /// dtype of the saved weights: "float32", the master weights, whatever `train.dtype` is.
    pub model_dtype: String,
    /// The resolved experiment the checkpoint was written by.
    pub config_toml: String,
}

impl RunState {
    /// What a checkpoint of step `step` at data position `data` records besides the tensors: the
    /// resolved experiment and the layout it is written with.
    pub fn new(exp: &crate::config::Experiment, mesh: &crate::comm::Mesh, step: u64, data: DataPosition) -> RunState {
        RunState {
            format: FORMAT,
            step,
            total_steps: exp.train.steps as u64,
            data,
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
}

/// Where the data stream stands: `samples` sequences of `epoch` have been consumed by the job as
/// a whole. Counted in samples, not per-dp-rank micro batches, so another dp or micro batch size
/// continues at the same sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataPosition {
    pub epoch: u64,
    pub samples: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Layout {
    pub world: usize,
    pub sp: usize,
    pub dp: usize,
    pub zero_stage: crate::config::ZeroStage,
    pub micro_batch: usize,
    pub grad_accum: usize,
}
