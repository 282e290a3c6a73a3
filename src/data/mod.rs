//! Long-sequence data: the HDF5 shard format (docs/data.md), the per-rank reader used by
//! training, and the `ulysses data prepare | synth | inspect` tools that write and check shards.
//!
//! A rank never reads a whole sample: SP rank r of a dp group reads tokens
//! `[r*c, (r+1)*c + 1)` (c = seq_len / sp) of the sample its dp rank is dealt, one hyperslab.
pub mod chat;
pub mod cli;
mod dataset;
pub mod documents;
mod error;
pub mod format;
mod loader;
pub mod model_files;
pub mod needle;
mod order;
pub mod prepare;
mod records;
mod shard;
pub mod split;
pub mod synth;
pub mod template;
pub mod tokenizer;

pub use dataset::{Dataset, PasskeyInfo};
pub use documents::Documents;
pub use error::DataError;
pub use loader::{
    build_batch, check_packing, mask_targets, sample_documents, sample_targets, Batch, Loader, LoaderSpec, LoaderState,
    LossOn, PackedDocuments, Packing, Positions, IGNORE_INDEX,
};
pub use shard::shard_files;
