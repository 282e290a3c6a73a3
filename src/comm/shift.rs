//! A ring shift in flight (`Collective::ring_shift_start`): the tensor being received and the
//! point at which it has arrived. On CUDA (NCCL) the transfer runs on the communication stream
//! (`ffi::comm_stream`) while the compute stream goes on; [`Shift::wait`] makes the compute stream
//! wait for the arrival, not the host. A backend whose shift completes before it returns (MPI,
//! one rank) gives a shift that has already arrived.
use super::CommError;
use crate::ffi::transfer::{CopyEvent, TransferError};
use tch::Tensor;

pub struct Shift {
    received: Tensor,
    arrived: CopyEvent,
}

/// A failure of the stream machinery around a shift, as the backend's error.
pub(crate) fn stream_error(e: TransferError) -> CommError {
    CommError::Backend { op: "ring_shift", message: e.to_string() }
}

impl Shift {
    /// A shift that has completed: `received` is ready.
    pub fn done(received: Tensor) -> Shift {
        Shift { received, arrived: CopyEvent::complete() }
    }

    /// A shift whose transfer into `received` completes with `arrived`. Its memory, and the sent
    /// tensor's, must be marked as used on the transfer's stream (`ffi::comm_stream::done`).
    pub(crate) fn in_flight(received: Tensor, arrived: CopyEvent) -> Shift {
        Shift { received, arrived }
    }

    /// The received tensor, for the compute stream: work queued there from now on runs after the
    /// transfer (the host does not wait).
    pub fn wait(self) -> Result<Tensor, CommError> {
        self.arrived.wait().map_err(stream_error)?;
        Ok(self.received)
    }

    /// Whether the transfer has completed, without waiting (`comm-check`'s overlap check).
    pub fn arrived(&self) -> Result<bool, CommError> {
        self.arrived.is_complete().map_err(stream_error)
    }
}
