//! NCCL backend of `Collective` for CUDA tensors (training on GPUs).
//!
//! Every operation but the ring shift is enqueued on torch's *current* CUDA stream, so it runs
//! after the kernels that produced its input and before the ones that read its output, with no
//! host synchronisation; the output is allocated by torch on that same stream, so the caching
//! allocator never hands its memory to another stream while NCCL still writes it. Ring shifts run
//! on the communication stream (`ffi::comm_stream`), ordered with the compute stream by events,
//! so that ring attention's transfers overlap its kernels (`Collective::ring_shift_start`). Data
//! movement (all_to_all, all_gather, broadcast, ring_shift) moves bytes, like the MPI backend;
//! reductions sum in the tensor's own dtype.
//! NCCL is dlopened at run time (cudarc's `dynamic-loading`); MPI only carries the unique id.
use super::shift::{stream_error, Shift};
use super::watchdog::Op;
use super::{check_blocks, Collective, CommError};
use crate::ffi::comm_stream;
use crate::ffi::cuda::{self, Stream};
use cudarc::nccl::result::{self as nccl, NcclError, NcclStatus};
use cudarc::nccl::sys::{self, ncclDataType_t as Dt, ncclRedOp_t};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use std::ffi::{c_char, c_void, CStr};
use tch::{Device, Kind, Tensor};

pub struct NcclCollective {
    comm: sys::ncclComm_t,
    rank: usize,
    size: usize,
    /// The GPU the communicator is bound to; every tensor must live there.
    gpu: usize,
}

const REDUCE_KINDS: &str = "f32, f64, f16, bf16, i32, i64";

/// cudarc panics when it cannot dlopen NCCL, and the launcher's panic hook turns any panic into an
/// MPI_Abort before `catch_unwind` could see it; so ask first, with cudarc's own list of names.
fn nccl_loadable() -> Result<(), CommError> {
    // SAFETY: only tries to dlopen candidate library names and closes what it opened.
    if unsafe { sys::is_culib_present() } {
        return Ok(());
    }
    Err(CommError::Backend {
        op: "init",
        message: "cannot load the NCCL library libnccl.so (tried the names cudarc knows: libnccl.so, \
                  libnccl.so.<cuda major>, ...). Add the folder holding it to LD_LIBRARY_PATH; pip's \
                  nvidia-nccl-cu13 ships only libnccl.so.2, so also create a libnccl.so symlink to it \
                  (scripts/run-gpu.sh does both)"
            .into(),
    })
}

/// An NCCL failure with NCCL's own explanation (`comm` may be null before one exists).
fn failed(op: &'static str, comm: sys::ncclComm_t, e: NcclError) -> CommError {
    // SAFETY: NCCL returns static or communicator-owned NUL-terminated strings; they are copied
    // out before the communicator can go away.
    let (what, last) =
        unsafe { (CStr::from_ptr(sys::ncclGetErrorString(e.0)), CStr::from_ptr(sys::ncclGetLastError(comm))) };
    let message = format!("NCCL {:?}: {} {}", e.0, what.to_string_lossy(), last.to_string_lossy());
    CommError::Backend { op, message: message.trim_end().into() }
}

fn sum_dtype(op: &'static str, kind: Kind) -> Result<Dt, CommError> {
    Ok(match kind {
        Kind::Float => Dt::ncclFloat32,
        Kind::Double => Dt::ncclFloat64,
        Kind::Half => Dt::ncclFloat16,
        Kind::BFloat16 => Dt::ncclBfloat16,
        Kind::Int => Dt::ncclInt32,
        Kind::Int64 => Dt::ncclInt64,
        _ => return Err(CommError::UnsupportedDtype { op, kind, supported: REDUCE_KINDS }),
    })
}

fn nbytes(t: &Tensor) -> usize {
    t.numel() * t.kind().elt_size_in_bytes()
}

impl NcclCollective {
    /// One communicator over the ranks of `group`, bound to GPU `gpu`, which must be torch's
    /// current device. Every rank of the group calls this at the same point (NCCL init is
    /// collective); rank 0 of the group makes the unique id and MPI broadcasts it.
    pub fn new(group: &SimpleCommunicator, gpu: usize) -> Result<Self, CommError> {
        const OP: &str = "init";
        nccl_loadable()?;
        let (rank, size) = (group.rank() as usize, group.size() as usize);
        let mut id = [0u8; 128];
        if rank == 0 {
            let made = nccl::get_uniqueid().map_err(|e| failed(OP, std::ptr::null_mut(), e))?;
            id = made.internal.map(|c| c as u8);
        }
        group.process_at_rank(0).broadcast_into(&mut id[..]);
        let id = sys::ncclUniqueId { internal: id.map(|b| b as c_char) };
        let mut comm = std::ptr::null_mut();
        // SAFETY: `comm` is a valid out-pointer; every rank of the group passes the same id and
        // size and its own rank, as ncclCommInitRank requires.
        unsafe { nccl::comm_init_rank(&mut comm, size as i32, id, rank as i32) }
            .map_err(|e| failed(OP, std::ptr::null_mut(), e))?;
        // From here on, an early return destroys `comm` (Drop).
        let me = NcclCollective { comm, rank, size, gpu };
        // SAFETY: `comm` was just created and is alive.
        let bound = unsafe { nccl::comm_cu_device(comm) }.map_err(|e| failed(OP, comm, e))?;
        if bound as usize != gpu {
            let message = format!("communicator bound to GPU {bound}, expected GPU {gpu} (set the device first)");
            return Err(CommError::Backend { op: OP, message });
        }
        Ok(me)
    }

    /// The preconditions shared by every operation; returns torch's current stream on our GPU.
    fn prepare(&self, op: &'static str, t: &Tensor, split: bool) -> Result<sys::cudaStream_t, CommError> {
        match t.device() {
            Device::Cuda(i) if i == self.gpu => {}
            found => return Err(CommError::WrongDevice { op, found, expected: "CUDA tensors on this rank's GPU" }),
        }
        check_blocks(op, t, self.size, split)?;
        let stream = cuda::current_stream(self.gpu).ok_or_else(|| CommError::Backend {
            op,
            message: format!("torch has no current stream on GPU {}", self.gpu),
        })?;
        Ok(stream as sys::cudaStream_t)
    }

    fn check(&self, op: &'static str, r: Result<NcclStatus, NcclError>) -> Result<(), CommError> {
        r.map(|_| ()).map_err(|e| failed(op, self.comm, e))
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn device(&self) -> Device {
        Device::Cuda(self.gpu)
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_to_all(&self, input: &Tensor) -> Result<Tensor, CommError> {
        const OP: &str = "all_to_all";
        let stream = self.prepare(OP, input, true)?;
        let out = input.empty_like();
        let chunk = nbytes(input) / self.size;
        let (src, dst) = (input.data_ptr() as *const u8, out.data_ptr() as *mut u8);
        // Grouped so NCCL runs the 2·size point-to-point calls as one collective (no deadlock).
        self.check(OP, nccl::group_start())?;
        let mut sent = Ok(NcclStatus::Success);
        for peer in 0..self.size {
            // SAFETY: both tensors are contiguous on our GPU with `size * chunk` bytes; block
            // `peer` starts `peer * chunk` bytes in. `input` and `out` outlive the enqueue, and
            // stream order keeps their memory from reuse until NCCL is done.
            sent = sent.and_then(|_| unsafe {
                let off = peer * chunk;
                nccl::send(src.add(off) as *const c_void, chunk, Dt::ncclUint8, peer as i32, self.comm, stream)?;
                nccl::recv(dst.add(off) as *mut c_void, chunk, Dt::ncclUint8, peer as i32, self.comm, stream)
            });
        }
        // The group must be closed even when a call inside it failed.
        let ended = nccl::group_end();
        self.check(OP, sent)?;
        self.check(OP, ended)?;
        Ok(out)
    }

    fn all_gather(&self, input: &Tensor) -> Result<Tensor, CommError> {
        const OP: &str = "all_gather";
        let stream = self.prepare(OP, input, false)?;
        let mut shape = input.size();
        shape[0] *= self.size as i64;
        let out = Tensor::empty(shape.as_slice(), (input.kind(), input.device()));
        // SAFETY: `input` holds nbytes(input) bytes, `out` size times that, both on our GPU;
        // ordering and lifetimes as in all_to_all.
        self.check(OP, unsafe {
            nccl::all_gather(input.data_ptr(), out.data_ptr(), nbytes(input), Dt::ncclUint8, self.comm, stream)
        })?;
        Ok(out)
    }

    fn reduce_scatter(&self, input: &Tensor) -> Result<Tensor, CommError> {
        const OP: &str = "reduce_scatter";
        let dtype = sum_dtype(OP, input.kind())?;
        let stream = self.prepare(OP, input, true)?;
        let mut shape = input.size();
        shape[0] /= self.size as i64;
        let out = Tensor::empty(shape.as_slice(), (input.kind(), input.device()));
        // SAFETY: `out` holds numel/size elements of `dtype`, `input` size times that.
        self.check(OP, unsafe {
            let count = out.numel();
            nccl::reduce_scatter(
                input.data_ptr(),
                out.data_ptr(),
                count,
                dtype,
                ncclRedOp_t::ncclSum,
                self.comm,
                stream,
            )
        })?;
        Ok(out)
    }

    fn all_reduce(&self, input: &Tensor) -> Result<Tensor, CommError> {
        const OP: &str = "all_reduce";
        let dtype = sum_dtype(OP, input.kind())?;
        let stream = self.prepare(OP, input, false)?;
        let out = input.empty_like();
        // SAFETY: both tensors hold numel elements of `dtype` on our GPU.
        self.check(OP, unsafe {
            nccl::all_reduce(
                input.data_ptr(),
                out.data_ptr(),
                input.numel(),
                dtype,
                ncclRedOp_t::ncclSum,
                self.comm,
                stream,
            )
        })?;
        Ok(out)
    }

    fn broadcast(&self, input: &Tensor, root: usize) -> Result<Tensor, CommError> {
        const OP: &str = "broadcast";
        let stream = self.prepare(OP, input, false)?;
        if root >= self.size {
            return Err(CommError::BadRoot { root, size: self.size });
        }
        let out = input.empty_like();
        // SAFETY: both tensors hold nbytes(input) bytes on our GPU (same shape on every rank).
        self.check(OP, unsafe {
            nccl::broadcast(
                input.data_ptr(),
                out.data_ptr(),
                nbytes(input),
                Dt::ncclUint8,
                root as i32,
                self.comm,
                stream,
            )
        })?;
        Ok(out)
    }

    fn ring_shift(&self, input: &Tensor) -> Result<Tensor, CommError> {
        self.ring_shift_start(input)?.wait()
    }

    /// On the communication stream (`ffi::comm_stream`), so that ring attention's next block
    /// travels while the compute stream runs this hop's kernels.
    fn ring_shift_start(&self, input: &Tensor) -> Result<Shift, CommError> {
        const OP: &str = "ring_shift";
        self.prepare(OP, input, false)?;
        // Allocated on the compute stream, which the communication stream waits for below.
        let out = input.empty_like();
        let stream = comm_stream::after_current(self.gpu).map_err(stream_error)? as sys::cudaStream_t;
        let (next, prev) = ((self.rank + 1) % self.size, (self.rank + self.size - 1) % self.size);
        let n = nbytes(input);
        // Grouped: the send to the next rank and the receive from the previous one run as one
        // operation on every rank, so the ring cannot deadlock.
        self.check(OP, nccl::group_start())?;
        // SAFETY: both tensors are contiguous on our GPU with `n` bytes; the communication stream
        // waits for the compute stream's work so far, and `comm_stream::done` keeps both blocks
        // from reuse until it is past the transfer.
        let sent = unsafe {
            nccl::send(input.data_ptr(), n, Dt::ncclUint8, next as i32, self.comm, stream)
                .and_then(|_| nccl::recv(out.data_ptr(), n, Dt::ncclUint8, prev as i32, self.comm, stream))
        };
        let ended = nccl::group_end();
        self.check(OP, sent)?;
        self.check(OP, ended)?;
        let arrived = comm_stream::done(self.gpu, &[input, &out]).map_err(stream_error)?;
        Ok(Shift::in_flight(out, arrived))
    }

    /// NCCL has no barrier: a one-element all_reduce, then reading its value, which waits for the
    /// stream: every rank's earlier GPU work in this group is done when it returns.
    fn barrier(&self) -> Result<(), CommError> {
        let one = Tensor::ones([1], (Kind::Int, Device::Cuda(self.gpu)));
        let sum = self.all_reduce(&one)?.int64_value(&[0]);
        if sum != self.size as i64 {
            let message = format!("barrier counted {sum} ranks, expected {}", self.size);
            return Err(CommError::Backend { op: "barrier", message });
        }
        Ok(())
    }

    /// Ring shifts go on the communication stream, every other operation on torch's current
    /// stream (see `prepare`).
    fn stream(&self, op: Op) -> Option<Stream> {
        let raw = match op {
            Op::RingShift => comm_stream::current(self.gpu).ok()?,
            _ => cuda::current_stream(self.gpu)?,
        };
        Some(Stream { gpu: self.gpu, raw })
    }
}

impl Drop for NcclCollective {
    fn drop(&mut self) {
        // SAFETY: `comm` came from ncclCommInitRank and is destroyed exactly once, here; NCCL
        // finishes the operations still queued on it first.
        if let Err(e) = unsafe { nccl::comm_destroy(self.comm) } {
            log::warn!("{}", failed("destroy", std::ptr::null_mut(), e));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether or not this machine has a libnccl.so on the library path, asking must not panic
    /// (cudarc's loader would), and a missing library must say how to fix the path.
    #[test]
    fn a_missing_nccl_is_an_error_not_a_panic() {
        match nccl_loadable() {
            Ok(()) => {}
            Err(CommError::Backend { op: "init", message }) => {
                assert!(message.contains("LD_LIBRARY_PATH"), "{message}")
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
}
