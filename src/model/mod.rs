//! Llama on tch. Parallelism reaches the model only through seams (attention core, parameter
//! source); nothing here imports `comm`.
pub mod llama;
pub mod mask;
pub mod params;
pub mod rope;
pub mod spec;
pub mod weights;

