//! Bandwidth of each collective on one group, in nccl-tests' terms: algbw = bytes / time, and
//! busbw = algbw × the share of the data that crosses links, comparable to link bandwidth.
//! Bytes are per rank: the full tensor of all_to_all, reduce_scatter and all_reduce, and the
//! gathered output of all_gather, the tensor passed on by ring_shift.
use super::{Collective, CommError};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

pub struct Bandwidth {
    pub op: &'static str,
    pub bytes: usize,
    pub seconds: f64,
    pub algbw: f64,
    pub busbw: f64,
}

/// Times `iters` back-to-back calls of each collective on bf16 tensors of about `mib` MiB per
/// rank. Calls are not synchronised one by one; barriers (which wait for the device) bracket the
/// loop, so the time is what a training step would see.
pub fn measure(c: &dyn Collective, device: Device, mib: usize, iters: usize) -> Result<Vec<Bandwidth>, CommError> {
    let n = c.size();
    let elems = ((mib << 20) / 2 / n * n) as i64;
    let full = Tensor::ones([elems], (Kind::BFloat16, device));
    let shard = full.narrow(0, 0, elems / n as i64); // contiguous: a prefix of a 1-D tensor
    let ring = (n as f64 - 1.0) / n as f64;
    type Op<'a> = &'a dyn Fn() -> Result<Tensor, CommError>;
    let ops: [(&str, f64, Op); 5] = [
        ("all_to_all", ring, &|| c.all_to_all(&full)),
        ("all_gather", ring, &|| c.all_gather(&shard)),
        ("reduce_scatter", ring, &|| c.reduce_scatter(&full)),
        ("all_reduce", 2.0 * ring, &|| c.all_reduce(&full)),
        // Each byte crosses one link (to the next rank), whatever the ring's size.
        ("ring_shift", 1.0, &|| c.ring_shift(&full)),
    ];
    let bytes = elems as usize * 2;
    let mut rows = Vec::new();
    for (op, bus, run) in ops {
        for _ in 0..2 {
            drop(run()?); // warm-up: NCCL sets up channels and buffers on first use
        }
        c.barrier()?;
        let start = Instant::now();
        for _ in 0..iters {
            drop(run()?);
        }
        c.barrier()?;
        let seconds = start.elapsed().as_secs_f64() / iters as f64;
        let algbw = bytes as f64 / seconds;
        rows.push(Bandwidth { op, bytes, seconds, algbw, busbw: algbw * bus });
    }
    Ok(rows)
}
