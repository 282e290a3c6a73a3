//! Long-context evaluation of a checkpoint (`ulysses eval`, docs/eval.md).
//!
//! - `forward`: each rank runs the model on its chunk of a sequence with Ulysses attention over
//!   its SP group (no autograd) and computes logits only where it scores; an SP group of one rank
//!   is the plain single-device forward.
//! - `grid`: passkey / needle-in-a-haystack accuracy over a length × depth grid, built with the
//!   data synth code (`data::needle`).
//! - `loss`: the per-position loss curve over a held-out set of shards.
//! - `results`: the HDF5 results file; `plot`: its PNGs (heat map, loss curve).
//! - `cli`: the `ulysses eval` command (MPI start-up, mesh, checkpoint, dispatch).
pub mod cli;
pub mod forward;
pub mod grid;
pub mod loss;
pub mod plot;
pub mod results;

pub use plot::plot_eval;

use crate::comm::CommError;
use crate::data::DataError;
use crate::model::weights::WeightsError;
use std::path::PathBuf;

/// What `ulysses eval` measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EvalTask {
    /// Pass-key retrieval over a length × depth grid.
    Passkey,
    /// Needle in a haystack (varied filler, "The special magic number is N") over the grid.
    Niah,
    /// Per-position loss over a held-out set (`--data`).
    Loss,
}

impl EvalTask {
    pub fn name(self) -> &'static str {
        match self {
            EvalTask::Passkey => "passkey",
            EvalTask::Niah => "niah",
            EvalTask::Loss => "loss",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A bad argument: the message says what was found and what would be valid.
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error("loading the checkpoint: {0}")]
    Weights(#[from] WeightsError),
    #[error("collective failed: {0}")]
    Comm(#[from] CommError),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("{}: {action} failed ({detail})", .path.display())]
    Results { path: PathBuf, action: &'static str, detail: String },
    #[error("{}: drawing the plot failed ({detail})", .path.display())]
    Plot { path: PathBuf, detail: String },
}

impl EvalError {
    pub(crate) fn results(path: &std::path::Path, action: &'static str, e: impl ToString) -> Self {
        EvalError::Results { path: path.to_path_buf(), action, detail: e.to_string() }
    }
}
