//! A group of one rank with no MPI underneath: every collective is a copy. It lets the library
//! (tests, single-GPU evaluation) run the very code a sharded job runs, without a launcher.
use super::{check_blocks, Collective, CommError};
use tch::{Kind, Tensor};

pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }

    fn device(&self) -> tch::Device {
        tch::Device::Cpu
    }

    fn size(&self) -> usize {
        1
    }

    fn all_to_all(&self, input: &Tensor) -> Result<Tensor, CommError> {
        check_blocks("all_to_all", input, 1, true)?;
        Ok(input.copy())
    }

    fn all_gather(&self, input: &Tensor) -> Result<Tensor, CommError> {
        check_blocks("all_gather", input, 1, false)?;
        Ok(input.copy())
    }

    fn reduce_scatter(&self, input: &Tensor) -> Result<Tensor, CommError> {
        summable("reduce_scatter", input)?;
        check_blocks("reduce_scatter", input, 1, true)?;
        Ok(input.copy())
    }

    fn all_reduce(&self, input: &Tensor) -> Result<Tensor, CommError> {
        summable("all_reduce", input)?;
        check_blocks("all_reduce", input, 1, false)?;
        Ok(input.copy())
    }

    fn broadcast(&self, input: &Tensor, root: usize) -> Result<Tensor, CommError> {
        check_blocks("broadcast", input, 1, false)?;
        if root != 0 {
            return Err(CommError::BadRoot { root, size: 1 });
        }
        Ok(input.copy())
    }

    fn ring_shift(&self, input: &Tensor) -> Result<Tensor, CommError> {
        check_blocks("ring_shift", input, 1, false)?;
        Ok(input.copy())
    }

    fn barrier(&self) -> Result<(), CommError> {
        Ok(())
    }
}

/// The reductions accept the dtypes the other backends can sum.
fn summable(op: &'static str, t: &Tensor) -> Result<(), CommError> {
    match t.kind() {
        Kind::Float | Kind::Double | Kind::Int | Kind::Int64 | Kind::BFloat16 | Kind::Half => Ok(()),
        kind => Err(CommError::UnsupportedDtype { op, kind, supported: "f32, f64, i32, i64, bf16, f16" }),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passes_the_conformance_suite() {
        super::super::selfcheck::conformance(&super::Solo, tch::Device::Cpu, "solo").unwrap();
    }
}
