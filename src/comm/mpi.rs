//! MPI backend of `Collective` for CPU tensors (tests, CI, CPU training).
//!
//! Data movement (all_to_all, all_gather, broadcast) is dtype-agnostic and moves bytes; reductions
//! are typed (f32, f64, i32, i64; bf16/f16 are summed in f32, as MPI has no 16-bit float type).
use super::{check_blocks, Collective, CommError};
use crate::ffi::transfer::{host_bytes, host_bytes_mut, host_values, host_values_mut};
use mpi::collective::SystemOperation;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use tch::{Device, Kind, Tensor};

pub struct MpiCollective {
    comm: SimpleCommunicator,
}

impl MpiCollective {
    pub fn new(comm: SimpleCommunicator) -> Self {
        MpiCollective { comm }
    }
}

fn cpu(op: &'static str, t: &Tensor) -> Result<(), CommError> {
    match t.device() {
        Device::Cpu => Ok(()),
        found => Err(CommError::WrongDevice { op, found, expected: "CPU tensors" }),
    }
}

/// MPI counts are C ints.
fn count_ok(op: &'static str, bytes: usize) -> Result<(), CommError> {
    let limit = i32::MAX as usize;
    if bytes > limit {
        return Err(CommError::TooLarge { op, bytes, limit });
    }
    Ok(())
}

fn nbytes(t: &Tensor) -> usize {
    t.numel() * t.kind().elt_size_in_bytes()
}

const REDUCE_KINDS: &str = "f32, f64, i32, i64, bf16, f16";

impl MpiCollective {
    /// Runs a sum-reduction `f(send, recv)` in the tensor's dtype (16-bit floats via f32).
    fn reduce(
        &self,
        op: &'static str,
        input: &Tensor,
        out_rows: i64,
        f: &dyn Fn(&SimpleCommunicator, &Tensor, &mut Tensor),
    ) -> Result<Tensor, CommError> {
        let kind = input.kind();
        let wide = match kind {
            Kind::Float | Kind::Double | Kind::Int | Kind::Int64 => input.shallow_clone(),
            Kind::BFloat16 | Kind::Half => input.to_kind(Kind::Float),
            _ => return Err(CommError::UnsupportedDtype { op, kind, supported: REDUCE_KINDS }),
        };
        count_ok(op, nbytes(&wide))?;
        let mut shape = wide.size();
        shape[0] = out_rows;
        let mut out = Tensor::empty(shape.as_slice(), (wide.kind(), Device::Cpu));
        f(&self.comm, &wide, &mut out);
        Ok(if wide.kind() == kind { out } else { out.to_kind(kind) })
    }
}

macro_rules! dispatch_sum {
    ($comm:expr, $send:expr, $recv:expr, $method:ident) => {
        match $send.kind() {
            Kind::Float => {
                $comm.$method(host_values::<f32>($send), host_values_mut::<f32>($recv), SystemOperation::sum())
            }
            Kind::Double => {
                $comm.$method(host_values::<f64>($send), host_values_mut::<f64>($recv), SystemOperation::sum())
            }
            Kind::Int => {
                $comm.$method(host_values::<i32>($send), host_values_mut::<i32>($recv), SystemOperation::sum())
            }
            Kind::Int64 => {
                $comm.$method(host_values::<i64>($send), host_values_mut::<i64>($recv), SystemOperation::sum())
            }
            k => unreachable!("reduce widened every dtype to a summable one, got {k:?}"),
        }
    };
}

impl Collective for MpiCollective {
    fn rank(&self) -> usize {
        self.comm.rank() as usize
    }

    fn device(&self) -> Device {
        Device::Cpu
    }

    fn size(&self) -> usize {
        self.comm.size() as usize
    }

    fn all_to_all(&self, input: &Tensor) -> Result<Tensor, CommError> {
        const OP: &str = "all_to_all";
        cpu(OP, input)?;
        check_blocks(OP, input, self.size(), true)?;
        count_ok(OP, nbytes(input) / self.size())?;
        let mut out = Tensor::empty(input.size().as_slice(), (input.kind(), Device::Cpu));
        self.comm.all_to_all_into(host_bytes(input), host_bytes_mut(&mut out));
        Ok(out)
    }

    fn all_gather(&self, input: &Tensor) -> Result<Tensor, CommError> {
        const OP: &str = "all_gather";
        cpu(OP, input)?;
        check_blocks(OP, input, self.size(), false)?;
        count_ok(OP, nbytes(input))?;
        let mut shape = input.size();
        shape[0] *= self.size() as i64;
        let mut out = Tensor::empty(shape.as_slice(), (input.kind(), Device::Cpu));
        self.comm.all_gather_into(host_bytes(input), host_bytes_mut(&mut out));
        Ok(out)
    }

    fn reduce_scatter(&self, input: &Tensor) -> Result<Tensor, CommError> {
        const OP: &str = "reduce_scatter";
        cpu(OP, input)?;
        check_blocks(OP, input, self.size(), true)?;
        let rows = input.size()[0] / self.size() as i64;
        self.reduce(OP, input, rows, &|c, s, r| dispatch_sum!(c, s, r, reduce_scatter_block_into))
    }

    fn all_reduce(&self, input: &Tensor) -> Result<Tensor, CommError> {
        const OP: &str = "all_reduce";
        cpu(OP, input)?;
        check_blocks(OP, input, self.size(), false)?;
        let rows = input.size()[0];
        self.reduce(OP, input, rows, &|c, s, r| dispatch_sum!(c, s, r, all_reduce_into))
    }

    fn broadcast(&self, input: &Tensor, root: usize) -> Result<Tensor, CommError> {
        const OP: &str = "broadcast";
        cpu(OP, input)?;
        check_blocks(OP, input, self.size(), false)?;
        if root >= self.size() {
            return Err(CommError::BadRoot { root, size: self.size() });
        }
        count_ok(OP, nbytes(input))?;
        let mut out = input.copy();
        self.comm.process_at_rank(root as i32).broadcast_into(host_bytes_mut(&mut out));
        Ok(out)
    }

    fn ring_shift(&self, input: &Tensor) -> Result<Tensor, CommError> {
        const OP: &str = "ring_shift";
        cpu(OP, input)?;
        check_blocks(OP, input, self.size(), false)?;
        count_ok(OP, nbytes(input))?;
        let (rank, size) = (self.comm.rank(), self.comm.size());
        let (next, prev) =
            (self.comm.process_at_rank((rank + 1) % size), self.comm.process_at_rank((rank + size - 1) % size));
        let mut out = input.empty_like();
        // MPI_Sendrecv: every rank sends and receives in one call, so the ring cannot deadlock.
        mpi::point_to_point::send_receive_into(host_bytes(input), &next, host_bytes_mut(&mut out), &prev);
        Ok(out)
    }

    fn barrier(&self) -> Result<(), CommError> {
        self.comm.barrier();
        Ok(())
    }
}
