//! Collectives on tensors behind one small trait, and the dp × sp mesh.
//!
//! Backends: `mpi` (CPU tensors; tests and CI) and `nccl` (CUDA tensors). Every backend passes the
//! same conformance suite (tests/collectives.rs). A world of one rank goes through the same code.
pub mod bench;
pub mod mesh;
pub mod mpi;
pub mod nccl;
pub mod queued;
pub mod selfcheck;
pub mod shift;
pub mod solo;
pub mod watchdog;

pub use mesh::Mesh;
pub use shift::Shift;

use crate::ffi::cuda::Stream;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};
use watchdog::{Group, Op, Progress, Watched};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CommError {
    #[error("{op}: tensor must be contiguous (call .contiguous() first)")]
    NotContiguous { op: &'static str },
    #[error("{op}: tensor is on {found:?}, this backend needs {expected}")]
    WrongDevice { op: &'static str, found: Device, expected: &'static str },
    #[error("{op}: dtype {kind:?} is not supported here; supported: {supported}")]
    UnsupportedDtype { op: &'static str, kind: Kind, supported: &'static str },
    #[error("{op}: first dimension {dim0} is not divisible by the group size {size}")]
    NotDivisible { op: &'static str, dim0: i64, size: usize },
    #[error("{op}: tensor has no dimensions; collectives split and stack along dimension 0")]
    Scalar { op: &'static str },
    #[error("{op}: {bytes} bytes per peer exceed what one call can move ({limit})")]
    TooLarge { op: &'static str, bytes: usize, limit: usize },
    #[error("broadcast: root {root} is not a rank of this group of {size}")]
    BadRoot { root: usize, size: usize },
    #[error("{op}: backend failure: {message}")]
    Backend { op: &'static str, message: String },
}

/// Collective operations over the ranks of one group. Block semantics along dimension 0:
/// a tensor `[size * n, ...]` is `size` blocks of `n` rows, block `j` belonging to rank `j`.
pub trait Collective {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Where this group's tensors must live (small host values are moved there and back).
    fn device(&self) -> Device;
    /// Block `j` of the input goes to rank `j`; block `i` of the output came from rank `i`.
    fn all_to_all(&self, input: &Tensor) -> Result<Tensor, CommError>;
    /// Every rank's input stacked along dimension 0, in rank order.
    fn all_gather(&self, input: &Tensor) -> Result<Tensor, CommError>;
    /// Sum over ranks, then rank `r` keeps block `r`.
    fn reduce_scatter(&self, input: &Tensor) -> Result<Tensor, CommError>;
    /// Sum over ranks, everywhere.
    fn all_reduce(&self, input: &Tensor) -> Result<Tensor, CommError>;
    /// `root`'s tensor, everywhere (every rank passes a tensor of the same shape and dtype).
    fn broadcast(&self, input: &Tensor, root: usize) -> Result<Tensor, CommError>;
    /// A ring shift: this rank's tensor goes to rank `(rank + 1) % size`, and the result came from
    /// rank `(rank - 1) % size`; one grouped send and receive (every rank passes the same shape
    /// and dtype). Ring attention passes K/V blocks and their gradients around with it.
    fn ring_shift(&self, input: &Tensor) -> Result<Tensor, CommError>;
    /// `ring_shift` started and finished later by `Shift::wait`, so that the transfer can run
    /// while this rank computes (NCCL: on the communication stream beside the compute stream).
    /// Every rank starts its shifts in the same order. `input` must not be written in place
    /// before the shift is waited for. Backends whose calls complete before they return shift
    /// at once.
    fn ring_shift_start(&self, input: &Tensor) -> Result<Shift, CommError> {
        Ok(Shift::done(self.ring_shift(input)?))
    }
    fn barrier(&self) -> Result<(), CommError>;
    /// The CUDA stream `op` is enqueued on, for a backend whose operations return before they are
    /// done (NCCL); None where a returned operation has finished (MPI, solo). The watchdog
    /// follows the work there (comm::queued).
    fn stream(&self, _op: Op) -> Option<Stream> {
        None
    }
}

/// The communicators a training rank uses: the whole world (ZeRO shards), its Ulysses group
/// (`sp`: the all-to-alls; the whole SP group unless there is a ring), its DP group and its ring
/// group (ring attention's shifts; one rank without a ring); each call through them marks
/// `progress` for the watchdog.
pub struct Groups {
    pub world: Box<dyn Collective>,
    pub sp: Box<dyn Collective>,
    pub dp: Box<dyn Collective>,
    pub ring: Box<dyn Collective>,
    pub progress: Arc<Progress>,
}

impl Groups {
    /// The mesh's four communicators, watched.
    pub fn new(
        world: Box<dyn Collective>,
        sp: Box<dyn Collective>,
        dp: Box<dyn Collective>,
        ring: Box<dyn Collective>,
    ) -> Groups {
        let progress = Arc::new(Progress::default());
        let watched = |c, g| Box::new(Watched::new(c, g, progress.clone())) as Box<dyn Collective>;
        Groups {
            world: watched(world, Group::World),
            sp: watched(sp, Group::Sp),
            dp: watched(dp, Group::Dp),
            ring: watched(ring, Group::Ring),
            progress,
        }
    }

    /// A single process with no launcher: every group is the process itself.
    pub fn solo() -> Groups {
        Groups::new(Box::new(solo::Solo), Box::new(solo::Solo), Box::new(solo::Solo), Box::new(solo::Solo))
    }
}

/// The checks every backend makes before moving data.
pub(crate) fn check_blocks(op: &'static str, t: &Tensor, size: usize, split: bool) -> Result<(), CommError> {
    if t.dim() == 0 {
        return Err(CommError::Scalar { op });
    }
    if !t.is_contiguous() {
        return Err(CommError::NotContiguous { op });
    }
    let dim0 = t.size()[0];
    if split && dim0 % size as i64 != 0 {
        return Err(CommError::NotDivisible { op, dim0, size });
    }
    Ok(())
}

/// Sums a scalar over the group (loss numerators, token counts, gradient norms).
pub fn all_reduce_f64(c: &dyn Collective, x: f64) -> Result<f64, CommError> {
    let t = Tensor::from_slice(&[x]).to_device(c.device());
    Ok(c.all_reduce(&t)?.double_value(&[0]))
}

/// Sums each of `xs` over the group (per-rank flags, per-unit norms), through the backend's device.
pub fn all_reduce_f64s(c: &dyn Collective, xs: &[f64]) -> Result<Vec<f64>, CommError> {
    let summed = c.all_reduce(&Tensor::from_slice(xs).to_device(c.device()))?;
    Ok(Vec::<f64>::try_from(&summed.to_device(Device::Cpu).to_kind(Kind::Double))
        .expect("a 1-D float64 tensor converts"))
}

/// Rank `root`'s `x` on every rank. Through the backend's device: NCCL takes only GPU tensors.
pub fn broadcast_i64(c: &dyn Collective, x: i64, root: usize) -> Result<i64, CommError> {
    let t = Tensor::from_slice(&[x]).to_device(c.device());
    Ok(c.broadcast(&t, root)?.int64_value(&[0]))
}
