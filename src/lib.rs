//! ulysses: long-sequence LLM training with DeepSpeed-Ulysses sequence parallelism and ZeRO-3.
//!
//! Layering (dependencies point one way; tests/layering.rs enforces the rules that matter most,
//! docs/architecture.md draws the picture):
//! - plain data, no libtorch: `config` (the experiment TOML), `model::spec` (architectures),
//!   `data` (HDF5 shards), `layout` (which tokens each rank holds), `units`, `rng`, `h5`;
//! - `ffi`: every call into libtorch that tch does not expose, through shim/*.cpp; `files`: files
//!   made without following a link planted at their name; `oom`: CUDA out of memory said as
//!   one message;
//! - `comm`: the collectives (MPI, NCCL) and the mesh;
//! - `model`: Llama on tch, unaware of any parallelism (attention comes through a seam);
//! - `parallel`: Ulysses all-to-alls and ZeRO parameter shards; `optim`: AdamW on the shards;
//! - `plan`: what `ulysses check` prints, including the memory plan (plain arithmetic);
//! - `checkpoint` (the sharded checkpoint format and the Hugging Face export), `metrics` (metrics.h5,
//!   TensorBoard, progress lines, the time split);
//! - `train` (the step and the loop), `eval`, `report`, `launch`.
pub mod checkpoint;
pub mod comm;
pub mod config;
pub mod data;
pub mod eval;
pub mod ffi;
pub mod files;
pub mod h5;
pub mod launch;
pub mod layout;
pub mod metrics;
pub mod model;
pub mod oom;
pub mod optim;
pub mod parallel;
pub mod plan;
pub mod report;
pub mod rng;
pub mod train;
pub mod units;
pub mod versions;
