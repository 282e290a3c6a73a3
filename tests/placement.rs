//! Where ranks run, checked on the real binary under mpirun (CPU): a machine named twice in the
//! host list or a hostfile and a bad `ULYSSES_RANKS_PER_GPU` each end the job before any collective, with one
//! message naming the value and what would be valid. The GPU-count rules themselves (ranks per
//! GPU dividing the node's ranks, a node with fewer GPUs than ranks) are plain functions, tested
//! in src/launch/nodes.rs; SP groups that would span nodes need two nodes: tests/multinode/run.sh.
mod common;
use common::*;
use std::process::Command;
use std::time::{Duration, Instant};

fn mpirun_hosts(hosts: &str, n: usize, args: &[&str], envs: &[(&str, &str)]) -> std::process::Output {
    mpirun_with(&["-hosts", hosts], n, args, envs)
}

/// mpirun (fork launcher) with `placement` (`-hosts LIST` or `-f HOSTFILE`).
fn mpirun_with(placement: &[&str], n: usize, args: &[&str], envs: &[(&str, &str)]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Command::new(MPIRUN);
    c.args(["-launcher", "fork"]).args(placement).args(["-n", &n.to_string(), BIN]).args(args).current_dir(dir.path());
    for (k, v) in envs {
        c.env(k, v);
    }
    run_with_timeout(c, Duration::from_secs(120))
}

#[test]
fn a_machine_named_twice_in_the_host_list_is_refused() {
    // `localhost` and `127.0.0.1` are one machine; hydra makes two nodes of them, whose ranks
    // would each take GPU 0 as their own.
    let start = Instant::now();
    let o = mpirun_hosts("localhost,127.0.0.1", 2, &["comm-check", "--backend", "nccl"], &[]);
    let t = assert_clean_failure(&o);
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let expected = format!("host {} is named more than once in the host list or hostfile", host.trim());
    assert!(t.contains(&expected), "{t}");
    assert!(t.contains("MPI made 2 nodes of it (world ranks 0-1)"), "{t}");
    assert_eq!(t.matches("is named more than once").count(), 1, "said once:\n{t}");
    assert!(start.elapsed() < Duration::from_secs(60), "failing took {:?}", start.elapsed());
}

#[test]
fn a_machine_named_twice_in_a_hostfile_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let hostfile = dir.path().join("hosts.txt");
    std::fs::write(&hostfile, "localhost:1\n127.0.0.1:1\n").unwrap();
    let o = mpirun_with(&["-f", hostfile.to_str().unwrap()], 2, &["comm-check", "--backend", "nccl"], &[]);
    let t = assert_clean_failure(&o);
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let expected = format!("host {} is named more than once in the host list or hostfile", host.trim());
    assert!(t.contains(&expected), "{t}");
    assert!(t.contains(&format!("`{}:N` in the hostfile", host.trim())), "{t}");
}

#[test]
fn a_bad_ranks_per_gpu_value_is_named() {
    for bad in ["0", "two"] {
        let o = mpirun_hosts("localhost", 2, &["comm-check", "--backend", "nccl"], &[("ULYSSES_RANKS_PER_GPU", bad)]);
        let t = assert_clean_failure(&o);
        let expected =
            format!("ULYSSES_RANKS_PER_GPU=\"{bad}\" is not a number of ranks per GPU; use a whole number >= 1");
        assert!(t.contains(&expected), "{t}");
    }
}
