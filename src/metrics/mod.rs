//! What a run reports about itself: the step row (`row`), metrics.h5 (`file`), TensorBoard event
//! files, the progress lines, the time split of profiled steps (`profile`), peak memory, and the
//! loss by position in the sequence. Training fills these in; `report` and `eval` read and write
//! the same files without depending on the training loop.
pub mod file;
pub mod memory;
pub mod position;
pub mod profile;
pub(crate) mod progress;
pub mod row;
pub mod tensorboard;

pub use file::{MetricsWriter, RunInfo, SCHEMA_VERSION};
pub use row::{StepRow, StepTimes};

/// The folder of a run's TensorBoard event files (`metrics.tensorboard`).
pub const TENSORBOARD: &str = "tensorboard";
