//! Llama on tch. Parallelism reaches the model only through seams (attention core, parameter
//! source); nothing here imports `comm`.
pub mod spec;
