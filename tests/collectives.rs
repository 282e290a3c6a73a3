//! Every collective, sub-communicator and invalid input, on real MPI ranks (CPU tensors), with
//! exact expected values (the suite is `comm::selfcheck::conformance`, run by `ulysses comm-check`).
mod common;
use common::*;
use std::time::{Duration, Instant};

fn comm_check(n: usize) {
    let dir = tempfile::tempdir().unwrap();
    let out = mpirun(n, &["comm-check"], dir.path(), &[]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains(&format!("comm-check: all collectives exact on {n} rank(s)")), "{t}");
    assert!(t.contains("Ulysses attention matches local attention"), "{t}");
    assert!(t.contains("ring attention matches it for every ring degree"), "{t}");
}

#[test]
fn collectives_exact_on_1_rank() {
    comm_check(1);
}

#[test]
fn collectives_exact_on_2_ranks() {
    comm_check(2);
}

#[test]
fn collectives_exact_on_4_ranks_with_every_mesh() {
    comm_check(4);
}

#[test]
fn one_failing_rank_aborts_the_job_without_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let start = Instant::now();
    // Rank 2 fails before its first collective while the others are already inside one.
    let out = mpirun(4, &["comm-check"], dir.path(), &[("ULYSSES_INJECT_FAILURE", "2")]);
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(t.contains("[rank 2] error") && t.contains("injected failure"), "{t}");
    assert!(start.elapsed() < Duration::from_secs(60), "abort took {:?}", start.elapsed());
}

#[test]
fn bandwidth_of_every_collective_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let out = mpirun(2, &["comm-check", "--bench-mib", "1"], dir.path(), &[]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    for op in ["all_to_all", "all_gather", "reduce_scatter", "all_reduce", "ring_shift"] {
        assert!(t.contains(&format!("bandwidth Mpi 2 ranks {op:<14} 1 MiB/rank")), "{op} missing:\n{t}");
    }
}

/// On a machine without a GPU (CI) the NCCL backend must end the job with a clear error on
/// every rank, quickly; on a GPU machine with two GPUs it must pass the same suite.
#[test]
fn nccl_backend_needs_a_gpu_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let out = mpirun(2, &["comm-check", "--backend", "nccl"], dir.path(), &[]);
    if ulysses::ffi::cuda::device_count() >= 2 {
        assert!(out.status.success(), "{}", text(&out));
        return;
    }
    let t = assert_clean_failure(&out);
    assert!(t.contains("no CUDA device is available") || t.contains("2 ranks on node"), "{t}");
    assert!(start.elapsed() < Duration::from_secs(60), "failing took {:?}", start.elapsed());
}
