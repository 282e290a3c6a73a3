//! ulysses: long-sequence LLM training with DeepSpeed-Ulysses sequence parallelism and ZeRO-3.
//!
//! Layering (dependencies point one way): `config` and `model::spec` are plain data; `comm` holds
//! the collectives and the mesh; `model` is Llama on tch and knows nothing of comm; `parallel`
//! wraps model seams with collectives; `data` reads and writes HDF5 shards; `train` runs steps,
//! checkpoints and metrics; `eval` scores checkpoints; `report` reads metrics back; `plan` and
//! `memory_plan` are what `ulysses check` prints; `launch` starts ranks; `cuda`, `transfer` (side-
//! stream copies) and `autograd` reach libtorch functions tch does not expose (through shim/).
pub mod autograd;
pub mod comm;
pub mod config;
pub mod cuda;
pub mod data;
pub mod eval;
pub mod launch;
pub mod memory_plan;
pub mod model;
pub mod parallel;
pub mod plan;
pub mod report;
pub mod train;
pub mod transfer;
