//! The conformance suite every `Collective` backend must pass: exact expected values for each
//! operation, uneven and invalid inputs, and the mesh's sub-communicators. `ulysses comm-check`
//! runs it over the real job (MPI on CPU, NCCL on GPU); the multi-rank tests run it under mpirun.
use super::{Collective, CommError};
use anyhow::{bail, ensure, Result};
use tch::{Device, Kind, Tensor};

pub(crate) fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_device(Device::Cpu).to_kind(Kind::Double).flatten(0, -1)).expect("f64 copy")
}

fn expect_eq(what: &str, got: &Tensor, want: &[f64], shape: &[i64]) -> Result<()> {
    ensure!(got.size() == shape, "{what}: shape {:?}, expected {shape:?}", got.size());
    let g = values(got);
    ensure!(g == want, "{what}: got {g:?}, expected {want:?}");
    Ok(())
}

fn expect_err(what: &str, r: Result<Tensor, CommError>, want: CommError) -> Result<()> {
    match r {
        Err(e) if e == want => Ok(()),
        Err(e) => bail!("{what}: got error `{e}`, expected `{want}`"),
        Ok(_) => bail!("{what}: succeeded, expected `{want}`"),
    }
}

/// Runs every check on `c` with tensors on `device`; `tag` names the group in messages.
pub fn conformance(c: &dyn Collective, device: Device, tag: &str) -> Result<()> {
    let (r, n) = (c.rank() as f64, c.size());
    let nf = n as f64;
    let f32_on = |v: Vec<f64>, shape: &[i64]| Tensor::from_slice(&v).view(shape).to_kind(Kind::Float).to_device(device);

    // all_to_all: rank r sends value 100·r + j (3 elements each, uneven width) to rank j.
    let send: Vec<f64> = (0..n).flat_map(|j| (0..3).map(move |k| 100.0 * r + j as f64 + 0.25 * k as f64)).collect();
    let want: Vec<f64> = (0..n).flat_map(|i| (0..3).map(move |k| 100.0 * i as f64 + r + 0.25 * k as f64)).collect();
    for kind in [Kind::Float, Kind::BFloat16, Kind::Int64] {
        let t = f32_on(send.clone(), &[n as i64, 3]).to_kind(kind);
        let w: Vec<f64> = want.iter().map(|v| values(&Tensor::from_slice(&[*v]).to_kind(kind))[0]).collect();
        expect_eq(&format!("{tag} all_to_all {kind:?}"), &c.all_to_all(&t)?, &w, &[n as i64, 3])?;
    }
    // all_gather of an uneven-width 2-D block: rank r contributes [[r, r+0.5, r+1]].
    let t = f32_on(vec![r, r + 0.5, r + 1.0], &[1, 3]);
    let want: Vec<f64> = (0..n).flat_map(|i| [i as f64, i as f64 + 0.5, i as f64 + 1.0]).collect();
    expect_eq(&format!("{tag} all_gather"), &c.all_gather(&t)?, &want, &[n as i64, 3])?;
    // reduce_scatter: element (j, k) of rank r is r + 10 j + k; rank r keeps row r summed.
    let t = f32_on((0..n).flat_map(|j| (0..2).map(move |k| r + 10.0 * j as f64 + k as f64)).collect(), &[n as i64, 2]);
    let base = nf * (nf - 1.0) / 2.0;
    let want: Vec<f64> = (0..2).map(|k| base + nf * (10.0 * r + k as f64)).collect();
    expect_eq(&format!("{tag} reduce_scatter"), &c.reduce_scatter(&t)?, &want, &[1, 2])?;
    // all_reduce in f32, f64, i64 and bf16 (exact small integers).
    for kind in [Kind::Float, Kind::Double, Kind::Int64, Kind::BFloat16] {
        let t = f32_on(vec![r + 1.0, 2.0 * r, 7.0], &[3]).to_kind(kind);
        let want = vec![base + nf, 2.0 * base, 7.0 * nf];
        expect_eq(&format!("{tag} all_reduce {kind:?}"), &c.all_reduce(&t)?, &want, &[3])?;
    }
    // broadcast from the last rank.
    let root = n - 1;
    let t = f32_on(vec![r * 3.0, -r], &[2]);
    expect_eq(&format!("{tag} broadcast"), &c.broadcast(&t, root)?, &[root as f64 * 3.0, -(root as f64)], &[2])?;
    // ring_shift: rank r sends [[r, r + 0.5, -r], [10 r, 1, 2]] and receives its predecessor's.
    let prev = ((c.rank() + n - 1) % n) as f64;
    for kind in [Kind::Float, Kind::BFloat16, Kind::Int64] {
        let t = f32_on(vec![r, r + 0.5, -r, 10.0 * r, 1.0, 2.0], &[2, 3]).to_kind(kind);
        let w: Vec<f64> = [prev, prev + 0.5, -prev, 10.0 * prev, 1.0, 2.0]
            .iter()
            .map(|v| values(&Tensor::from_slice(&[*v]).to_kind(kind))[0])
            .collect();
        expect_eq(&format!("{tag} ring_shift {kind:?}"), &c.ring_shift(&t)?, &w, &[2, 3])?;
    }
    // n shifts bring a tensor home.
    let mut t = f32_on(vec![r; 4], &[4]);
    for _ in 0..n {
        t = c.ring_shift(&t)?;
    }
    expect_eq(&format!("{tag} ring_shift {n} times"), &t, &[r; 4], &[4])?;
    // Two shifts in flight at once (ring attention's backward: K/V and their gradients), waited
    // for in the order they started and in the other.
    let (a, b) = (f32_on(vec![r, -r], &[2]), f32_on(vec![2.0 * r; 3], &[3]));
    let (sa, sb) = (c.ring_shift_start(&a)?, c.ring_shift_start(&b)?);
    let (sb2, sa2) = (c.ring_shift_start(&b)?, c.ring_shift_start(&a)?);
    expect_eq(&format!("{tag} ring_shift_start"), &sa.wait()?, &[prev, -prev], &[2])?;
    expect_eq(&format!("{tag} ring_shift_start, second in flight"), &sb.wait()?, &[2.0 * prev; 3], &[3])?;
    expect_eq(&format!("{tag} ring_shift_start, waited out of order"), &sa2.wait()?, &[prev, -prev], &[2])?;
    expect_eq(&format!("{tag} ring_shift_start, first started"), &sb2.wait()?, &[2.0 * prev; 3], &[3])?;
    c.barrier()?;

    // Invalid inputs are typed errors, identical on every rank (so no rank enters the collective).
    if n > 1 {
        let odd = Tensor::zeros([n as i64 + 1, 2], (Kind::Float, device));
        expect_err(
            &format!("{tag} uneven all_to_all"),
            c.all_to_all(&odd),
            CommError::NotDivisible { op: "all_to_all", dim0: n as i64 + 1, size: n },
        )?;
        expect_err(
            &format!("{tag} uneven reduce_scatter"),
            c.reduce_scatter(&odd),
            CommError::NotDivisible { op: "reduce_scatter", dim0: n as i64 + 1, size: n },
        )?;
    }
    let strided = Tensor::zeros([2, 2 * n as i64], (Kind::Float, device)).transpose(0, 1);
    expect_err(
        &format!("{tag} non-contiguous"),
        c.all_gather(&strided),
        CommError::NotContiguous { op: "all_gather" },
    )?;
    expect_err(
        &format!("{tag} non-contiguous ring_shift"),
        c.ring_shift(&strided),
        CommError::NotContiguous { op: "ring_shift" },
    )?;
    let flags = Tensor::zeros([n as i64], (Kind::Bool, device));
    match c.all_reduce(&flags) {
        Err(CommError::UnsupportedDtype { op: "all_reduce", kind: Kind::Bool, .. }) => {}
        other => bail!("{tag} all_reduce on bool: expected UnsupportedDtype, got {:?}", other.map(|t| t.size())),
    }
    match c.broadcast(&t, n) {
        Err(CommError::BadRoot { .. }) => {}
        other => bail!("{tag} broadcast from rank {n}: expected BadRoot, got {:?}", other.map(|t| t.size())),
    }
    Ok(())
}

/// That a started ring shift leaves the compute stream free (`Collective::ring_shift_start` on
/// NCCL runs on the communication stream): rank 0 starts its shift `DELAY` late, so rank 1's
/// shift cannot arrive before then; rank 1 queues a matmul on the compute stream after starting
/// its shift, and the matmul must finish while the shift is still waiting. On a backend whose
/// shifts complete at once (MPI, one rank) there is nothing to overlap: None. Otherwise every
/// rank returns rank 1's times (ms): the matmul's, and how much later the shift arrived.
pub fn shift_overlaps(c: &dyn Collective, device: Device) -> Result<Option<(f64, f64)>> {
    use crate::ffi::transfer::CopyEvent;
    use std::time::{Duration, Instant};
    const DELAY: Duration = Duration::from_millis(500);
    if !device.is_cuda() || c.size() < 2 {
        return Ok(None);
    }
    let (rank, n) = (c.rank(), c.size());
    let sent = Tensor::full([1 << 16], rank as f64, (Kind::Float, device));
    let a = Tensor::randn([2048, 2048], (Kind::BFloat16, device)) / 64.0;
    // Both once untimed: a kernel's first launch loads its module, which under CUDA's lazy
    // loading waits for the kernels running on the device (here: the shift waiting for its
    // peer), and a first transfer between two ranks may set up their connection on the host.
    // Either would hold the matmul back for reasons that say nothing about the streams.
    let _ = a.matmul(&a);
    let _ = c.ring_shift_start(&sent)?.wait()?;
    c.barrier()?;
    if rank == 0 {
        std::thread::sleep(DELAY);
    }
    let t0 = Instant::now();
    let shift = c.ring_shift_start(&sent)?;
    let started_ms = t0.elapsed().as_secs_f64() * 1e3;
    let _ = a.matmul(&a).matmul(&a);
    let computed = CopyEvent::record_current(device)?;
    computed.synchronize()?;
    let compute_ms = t0.elapsed().as_secs_f64() * 1e3;
    let pending = !shift.arrived()?;
    // `wait` only orders the compute stream after the transfer; reading the values waits for it.
    let received = values(&shift.wait()?);
    let arrived_ms = t0.elapsed().as_secs_f64() * 1e3;
    let prev = ((rank + n - 1) % n) as f64;
    ensure!(received.iter().all(|&v| v == prev), "ring_shift_start: rank {rank} received wrong values");
    // Rank 1's figures, on every rank, so that every rank reaches the same verdict.
    let mine =
        if rank == 1 { [pending as u8 as f64, compute_ms, arrived_ms - compute_ms, started_ms] } else { [0.0; 4] };
    let sums = super::all_reduce_f64s(c, &mine)?;
    let (pending, compute_ms, later_ms, started_ms) = (sums[0], sums[1], sums[2], sums[3]);
    ensure!(
        pending == 1.0,
        "ring_shift_start does not overlap compute: a matmul queued after a shift still waiting for its peer took {compute_ms:.1} ms and finished after the shift ({started_ms:.1} ms of it in starting the shift on the host; the shift must run on its own stream and return at once)"
    );
    Ok(Some((compute_ms, later_ms)))
}
