//! The versions a run was made with, recorded in every checkpoint (run_state.json) and in
//! metrics.h5.
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
/// This ulysses, the tch crate it was built with, and the libtorch it links.
pub struct Versions {
    pub ulysses: String,
    pub tch: String,
    pub libtorch: String,
}

impl Versions {
    pub fn current() -> Versions {
        Versions {
            ulysses: env!("CARGO_PKG_VERSION").into(),
            tch: "0.24.0".into(),
            libtorch: option_env!("ULYSSES_LIBTORCH_VERSION").unwrap_or("unknown").into(),
        }
    }
}
