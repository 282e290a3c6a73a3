//! Llama on tch. Parallelism reaches the model only through seams (attention core, parameter
//! source); nothing here imports `comm`.
pub mod adapter;
pub mod dropout;
mod error;
pub mod head;
pub mod llama;
pub mod lora;
pub mod mask;
pub mod params;
pub mod rope;
pub mod spec;
pub mod weights;

use crate::config::Dtype;

/// The tensor kind of `train.dtype`: the one mapping from the plain-data config to libtorch.
pub fn kind_of(dtype: Dtype) -> tch::Kind {
    match dtype {
        Dtype::Fp32 => tch::Kind::Float,
        Dtype::Bf16 => tch::Kind::BFloat16,
    }
}
