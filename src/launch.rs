//! Process start-up under MPI: world and node-local rank, the mesh's sub-communicators, rank-tagged
//! logging, and the rule that a failure on one rank aborts the whole job (MPI_Abort) instead of
//! leaving the other ranks blocked in a collective.
pub mod nodes;

use crate::comm::bench;
use crate::comm::mpi::MpiCollective;
use crate::comm::nccl::NcclCollective;
use crate::comm::selfcheck::{conformance, values};
use crate::comm::{Collective, Groups, Mesh};
use crate::ffi::cuda;
use anyhow::{anyhow, ensure, Context, Result};
use mpi::topology::{Color, SimpleCommunicator};
use mpi::traits::*;
use nodes::{GpuSlot, Nodes, RANKS_PER_GPU_VAR};
use std::io::Write;
use tch::{Device, Tensor};

pub struct Launch {
    _universe: mpi::environment::Universe,
    pub world: SimpleCommunicator,
    pub rank: usize,
    pub size: usize,
    /// Rank among the processes of this node (MPI_Comm_split_type SHARED): the GPU index.
    pub local_rank: usize,
    pub local_size: usize,
    /// Where every rank of the job runs.
    pub nodes: Nodes,
    /// `ULYSSES_RANKS_PER_GPU` as set; read when a GPU is chosen, so a bad value is reported
    /// once, by rank 0, like any other error of the job.
    ranks_per_gpu: Option<String>,
}

/// Which library moves the tensors: MPI (CPU tensors) or NCCL (CUDA tensors, one GPU per rank).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    Mpi,
    Nccl,
}

impl Launch {
    pub fn init() -> Result<Launch> {
        let universe = mpi::initialize().ok_or_else(|| anyhow!("MPI was already initialised in this process"))?;
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        let node = world.split_shared(world.rank());
        let (local_rank, local_size) = (node.rank() as usize, node.size() as usize);
        install_abort_on_panic(rank);
        let nodes = gather_nodes(&world, &node);
        let ranks_per_gpu = std::env::var(RANKS_PER_GPU_VAR).ok();
        Ok(Launch { _universe: universe, world, rank, size, local_rank, local_size, nodes, ranks_per_gpu })
    }

    /// Ranks of this node on one GPU: 1 unless `ULYSSES_RANKS_PER_GPU` says more (the value
    /// itself is checked by `gpu_slot`).
    pub fn ranks_per_gpu(&self) -> usize {
        nodes::ranks_per_gpu(self.ranks_per_gpu.as_deref()).unwrap_or(1)
    }

    /// This rank's GPU among the `gpus` visible ones, by the switch's rules (`nodes::gpu_slot`).
    fn gpu_slot(&self, gpus: usize) -> Result<GpuSlot> {
        let per_gpu = nodes::ranks_per_gpu(self.ranks_per_gpu.as_deref())?;
        let host = &self.nodes.host[self.rank];
        Ok(nodes::gpu_slot(host, self.local_rank, self.local_size, gpus, per_gpu)?)
    }

    /// The job's placement rules, before any training: one MPI node per machine, every SP group
    /// (`sp` consecutive ranks) on one node.
    pub fn check_nodes(&self, sp: usize) -> Result<()> {
        self.nodes.check_distinct_machines()?;
        self.nodes.check_sp_within_nodes(sp)?;
        Ok(())
    }

    /// Which node holds which rank (and, on GPUs, which GPU), one line per node; a collective
    /// call (every rank gathers every rank's GPU).
    pub fn describe_nodes(&self, device: Device) -> String {
        let mine = match device {
            Device::Cuda(i) => i as i64,
            _ => -1,
        };
        let mut all = vec![0i64; self.size];
        self.world.all_gather_into(&mine, &mut all[..]);
        let gpu_of: Vec<Option<usize>> = all.iter().map(|&g| (g >= 0).then_some(g as usize)).collect();
        self.nodes.describe(&gpu_of)
    }

    /// The mesh's Ulysses, DP and ring groups as MPI communicators (ranks with the same dp_rank
    /// and ring_rank share a Ulysses group, ranks with the same sp_rank a DP group, ranks with the
    /// same dp_rank and ulysses_rank a ring group; ranks keep their world order in each).
    fn split(&self, mesh: &Mesh) -> Result<[SimpleCommunicator; 3]> {
        let split = |color: usize, what: &str| {
            self.world
                .split_by_color(Color::with_value(color as i32))
                .with_context(|| format!("MPI_Comm_split for the {what} group returned no communicator"))
        };
        Ok([
            split(mesh.dp_rank * mesh.ring + mesh.ring_rank(), "sp")?,
            split(mesh.sp_rank, "dp")?,
            split(mesh.dp_rank * mesh.ulysses() + mesh.ulysses_rank(), "ring")?,
        ])
    }

    /// Splits the world into the mesh's groups (MPI backend).
    pub fn mpi_groups(&self, mesh: &Mesh) -> Result<Groups> {
        let [sp, dp, ring] = self.split(mesh)?;
        let world = self.world.duplicate();
        let mpi = |c| Box::new(MpiCollective::new(c)) as Box<dyn Collective>;
        Ok(Groups::new(mpi(world), mpi(sp), mpi(dp), mpi(ring)))
    }

    /// One NCCL communicator per group of the mesh, on GPU `local_rank` (made torch's current
    /// device here, before any CUDA tensor or communicator exists).
    pub fn nccl_groups(&self, mesh: &Mesh) -> Result<Groups> {
        let gpu = self.cuda_device()?;
        let [sp, dp, ring] = self.split(mesh)?;
        let nccl = |group: &SimpleCommunicator, what: &str| -> Result<Box<dyn Collective>> {
            let c =
                NcclCollective::new(group, gpu).with_context(|| format!("NCCL communicator for the {what} group"))?;
            Ok(Box::new(c))
        };
        Ok(Groups::new(nccl(&self.world, "world")?, nccl(&sp, "sp")?, nccl(&dp, "dp")?, nccl(&ring, "ring")?))
    }

    /// Selects this rank's GPU as torch's current device: its node-local rank, or with
    /// `ULYSSES_RANKS_PER_GPU=N` the node's ranks round-robin on its GPUs, N to a GPU, each rank
    /// then with its own NCCL host identity (set here, before any NCCL call reads it).
    pub fn cuda_device(&self) -> Result<usize> {
        let rank = self.rank;
        self.nodes.check_distinct_machines()?;
        let slot = self.gpu_slot(cuda::device_count()).with_context(|| format!("rank {rank}"))?;
        if slot.ranks_per_gpu > 1 {
            let id = nodes::nccl_host_id(&self.nodes.machine[rank], slot.slot);
            // The process's environment is changed before any NCCL call and before the watchdog
            // thread starts; NCCL reads NCCL_HOSTID when it first makes a communicator. A user's
            // own NCCL_HOSTID would be the same on every rank of the node: NCCL would refuse
            // the shared GPU, so it is replaced.
            std::env::set_var("NCCL_HOSTID", &id);
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                if rank == 0 {
                    log::info!(
                        "{RANKS_PER_GPU_VAR}={}: this node's {} ranks share {} GPU(s) round-robin, {} to a GPU, each rank with its own NCCL host identity (NCCL_HOSTID) and 1/{} of the GPU's memory budget; for correctness checks, never for speed",
                        slot.ranks_per_gpu, self.local_size, slot.gpus_used, slot.ranks_per_gpu, slot.ranks_per_gpu
                    );
                }
            });
        }
        let gpu = slot.gpu;
        ensure!(cuda::set_device(gpu), "rank {rank}: torch could not select GPU {gpu}");
        Ok(gpu)
    }

    pub fn groups(&self, backend: Backend, mesh: &Mesh) -> Result<Groups> {
        match backend {
            Backend::Mpi => self.mpi_groups(mesh),
            Backend::Nccl => self.nccl_groups(mesh),
        }
    }

    /// Where this rank's tensors live for `backend` (for NCCL: selects the GPU).
    pub fn device(&self, backend: Backend) -> Result<Device> {
        Ok(match backend {
            Backend::Mpi => Device::Cpu,
            Backend::Nccl => Device::Cuda(self.cuda_device()?),
        })
    }

    /// Bandwidth of every collective over the whole world, `mib` MiB per rank; rank 0 prints it.
    pub fn comm_bench(&self, backend: Backend, mib: usize) -> Result<()> {
        let device = self.device(backend)?;
        let mesh = Mesh::new(self.size, 1, self.size, self.rank)?;
        let groups = self.groups(backend, &mesh)?;
        for b in bench::measure(groups.world.as_ref(), device, mib, 20)? {
            if self.rank == 0 {
                let (mb, ms) = (b.bytes as f64 / 1048576.0, b.seconds * 1e3);
                let (alg, bus) = (b.algbw / 1e9, b.busbw / 1e9);
                println!("bandwidth {backend:?} {} ranks {:<14} {mb:.0} MiB/rank {ms:8.3} ms  algbw {alg:7.1} GB/s  busbw {bus:7.1} GB/s", self.size, b.op);
            }
        }
        Ok(())
    }

    /// The conformance suite over the job: the world, then the Ulysses, DP and ring groups of
    /// every mesh (sp, ring) the world size allows, checking that each group holds exactly the
    /// ranks the mesh says; Ulysses attention over each Ulysses group and ring attention over each
    /// ring group against local attention.
    pub fn comm_check(&self, backend: Backend) -> Result<()> {
        inject_failure(self.rank)?;
        let device = self.device(backend)?;
        let world = self.size;
        // Rank 1's figures from the overlap check over the whole world's ring (CUDA only).
        let mut overlap = None;
        for sp in (1..=world).filter(|sp| world % sp == 0) {
            let dp = world / sp;
            for ring in (1..=sp).filter(|ring| sp % ring == 0) {
                let mesh = Mesh::new(sp, dp, world, self.rank)?.with_ring(ring)?;
                let groups = self.groups(backend, &mesh)?;
                if sp == 1 {
                    conformance(groups.world.as_ref(), device, "world")?;
                }
                let layout = format!("mesh sp={sp} (ulysses {} x ring {ring}) dp={dp}", mesh.ulysses());
                for (name, group, members) in [
                    ("sp", &groups.sp, mesh.ulysses_group()),
                    ("dp", &groups.dp, mesh.dp_group()),
                    ("ring", &groups.ring, mesh.ring_group()),
                ] {
                    let tag = format!("{layout} {name} group");
                    let me = Tensor::from_slice(&[self.rank as i64]).to_device(device);
                    let got: Vec<usize> = values(&group.all_gather(&me)?).iter().map(|&v| v as usize).collect();
                    ensure!(got == members, "{tag}: holds world ranks {got:?}, the mesh says {members:?}");
                    conformance(group.as_ref(), device, &tag)?;
                }
                // Ulysses attention over the Ulysses group and ring attention over the ring group
                // against local attention on the whole sequence (fp32): outputs and q/k/v gradients.
                let err = crate::parallel::ulysses::check_against_local(groups.sp.as_ref(), device)?;
                ensure!(
                    err <= 1e-5,
                    "{layout}: Ulysses attention differs from local attention by {err:.2e} (relative)"
                );
                let (ring_err, tolerance) = crate::parallel::ring::check_against_local(groups.ring.as_ref(), device)?;
                ensure!(
                    ring_err <= tolerance,
                    "{layout}: ring attention differs from local attention by {ring_err:.2e} (relative; tolerance {tolerance:.0e})"
                );
                log::info!("collectives exact, Ulysses attention within {err:.1e} and ring attention within {ring_err:.1e} of local for {layout} on {world} rank(s)");
                if ring == world {
                    overlap = crate::comm::selfcheck::shift_overlaps(groups.ring.as_ref(), device)?;
                }
            }
        }
        self.world.barrier();
        if self.rank == 0 {
            let what = match backend {
                Backend::Mpi => "MPI backend, CPU tensors",
                Backend::Nccl => "NCCL backend, CUDA tensors",
            };
            println!("comm-check: all collectives exact on {world} rank(s) ({what}); Ulysses attention matches local attention (outputs and q/k/v gradients) for every SP degree; ring attention matches it for every ring degree");
            if let Some((compute_ms, later_ms)) = overlap {
                println!("comm-check: ring shifts overlap compute: a matmul queued behind a shift still waiting for its peer finished in {compute_ms:.1} ms, the shift arrived {later_ms:.1} ms later");
            }
        }
        Ok(())
    }

    /// Ends the whole job from one rank: prints why, then MPI_Abort (mpirun kills every rank).
    /// An error every rank hits alike (the same experiment file, the same data, the same budget)
    /// is printed once: rank 0 says it at once and ends the job, another rank gives it a moment
    /// first; a rank that fails alone still reports, a moment later.
    pub fn abort(&self, err: &anyhow::Error) -> ! {
        if self.rank != 0 && self.size > 1 {
            std::thread::sleep(std::time::Duration::from_secs(2));
        }
        let text = format!("error: {}", explain(err));
        if self.size == 1 {
            print_tagged(self.rank, &text);
            std::process::exit(1);
        }
        end_job(self.rank, Some(&format!("{text}\naborting all {} ranks", self.size)))
    }
}

/// Every rank's node (the world rank of its node's first rank), host name and machine (host name
/// and kernel boot id: network namespaces with their own host names are nodes of one kernel;
/// one machine named twice in a host list is two MPI nodes of one host name and boot id).
fn gather_nodes(world: &SimpleCommunicator, node: &SimpleCommunicator) -> Nodes {
    const LEN: usize = 256;
    let mut leader = world.rank();
    node.process_at_rank(0).broadcast_into(&mut leader);
    let mut node_of = vec![0i32; world.size() as usize];
    world.all_gather_into(&leader, &mut node_of[..]);
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default().trim().to_string();
    let host = read("/proc/sys/kernel/hostname");
    let machine = format!("{host} {}", read("/proc/sys/kernel/random/boot_id"));
    let gather = |text: &str| -> Vec<String> {
        let mut mine = [0u8; LEN];
        let bytes = text.as_bytes();
        let n = bytes.len().min(LEN);
        mine[..n].copy_from_slice(&bytes[..n]);
        let mut all = vec![0u8; LEN * world.size() as usize];
        world.all_gather_into(&mine[..], &mut all[..]);
        all.chunks(LEN).map(|c| String::from_utf8_lossy(c).trim_end_matches('\0').to_string()).collect()
    };
    Nodes { node_of: node_of.iter().map(|&r| r as usize).collect(), host: gather(&host), machine: gather(&machine) }
}

/// Each line of `message` tagged with the rank, written in one piece: ranks failing at once
/// never interleave within a line.
fn print_tagged(rank: usize, message: &str) {
    let text: String = message.lines().map(|l| format!("[rank {rank}] {l}\n")).collect();
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

/// Ends the job from rank `rank` (MPI_Abort: mpirun kills every rank), printing `message` first
/// when there is one. Also what the collective watchdog calls, from its own thread.
pub fn end_job(rank: usize, message: Option<&str>) -> ! {
    if let Some(m) = message {
        print_tagged(rank, m);
    }
    // mpirun forwards our stderr through its proxy; MPI_Abort tears the job down at once, and
    // without a moment's grace the message above can be lost on a loaded machine.
    std::thread::sleep(std::time::Duration::from_millis(500));
    mpi_abort(1);
    std::process::exit(1);
}

/// MPI_Abort on the world, when MPI is running: mpirun ends every rank with exit status `code`.
fn mpi_abort(code: i32) {
    if mpi::environment::is_initialized() && !mpi::environment::is_finalized() {
        // SAFETY: MPI is initialised and not finalised; MPI_Abort on COMM_WORLD never returns. It
        // may come from the watchdog's thread or a panic hook while the main thread is blocked in
        // a collective: it only asks the process manager to end the job.
        unsafe { mpi::ffi::MPI_Abort(mpi::ffi::RSMPI_COMM_WORLD, code) };
    }
}

/// `render_error`, or for CUDA out of memory the one message `oom::explain` makes of it.
pub fn explain(err: &anyhow::Error) -> String {
    let text = render_error(err);
    crate::oom::explain(&text).unwrap_or(text)
}

/// An error and its causes on one line, each said once: a context that already quotes its
/// cause (`reading x.h5: No such file or directory (os error 2)`) is not followed by it again,
/// and HDF5's error stacks are said as what happened (`crate::h5::explain`).
pub fn render_error(err: &anyhow::Error) -> String {
    let mut text = String::new();
    let said = |c: &(dyn std::error::Error + 'static)| match c.downcast_ref::<hdf5::Error>() {
        Some(h5) => crate::h5::explain(h5),
        None => c.to_string(),
    };
    for cause in err.chain().map(said) {
        let cause = cause.trim();
        if cause.is_empty() || text.contains(cause) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(cause);
    }
    text
}

/// Fault injection for the abort tests: `ULYSSES_INJECT_FAILURE=R` makes rank R fail before its
/// first collective, while the other ranks are already waiting in one.
pub fn inject_failure(rank: usize) -> Result<()> {
    match std::env::var("ULYSSES_INJECT_FAILURE").ok().and_then(|v| v.parse::<usize>().ok()) {
        Some(r) if r == rank => Err(anyhow!("injected failure (ULYSSES_INJECT_FAILURE={r})")),
        _ => Ok(()),
    }
}

/// A file-size limit (`ulimit -f`, RLIMIT_FSIZE) makes a write past it fail with EFBIG, reported
/// with the file's name, instead of killing the process with SIGXFSZ before it can say which.
pub fn report_file_size_limits() {
    // SAFETY: setting a signal's disposition to "ignore" runs no handler code; nothing else in
    // ulysses handles SIGXFSZ.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
}

/// A panic on one rank (a tch op that unwraps an error, say) must not leave the others hanging.
/// CUDA running out of memory is said as one message (`oom::explain`), not as a panic with
/// libtorch's C++ backtrace.
fn install_abort_on_panic(rank: usize) {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let text = payload.downcast_ref::<String>().map(String::as_str).or(payload.downcast_ref::<&str>().copied());
        if let Some(message) = text.and_then(crate::oom::explain) {
            // As in `Launch::abort`: when every rank runs out alike, rank 0 says it once.
            if rank != 0 {
                std::thread::sleep(std::time::Duration::from_secs(2));
            }
            end_job(rank, Some(&format!("error: {message}")));
        }
        default_hook(info);
        if mpi::environment::is_initialized() && !mpi::environment::is_finalized() {
            eprintln!("panic on an MPI rank: aborting the job");
        }
        mpi_abort(2);
    }));
}

/// Logging with the rank on every line; rank 0 logs at info, the others at warn, unless RUST_LOG
/// says otherwise.
pub fn init_logging(rank: usize) {
    let default = if rank == 0 { "info" } else { "warn" };
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default))
        .format(move |buf, record| writeln!(buf, "[rank {rank}] {}: {}", record.level(), record.args()))
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::render_error;
    use anyhow::Context;

    #[test]
    fn a_cause_already_quoted_is_not_said_twice() {
        let io = std::fs::read("/nonexistent/ulysses-test").unwrap_err();
        let quoted = format!("reading /nonexistent/ulysses-test: {io}");
        let e = Err::<(), _>(io).context(quoted).context("loading the experiment").unwrap_err();
        assert_eq!(
            render_error(&e),
            "loading the experiment: reading /nonexistent/ulysses-test: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn hdf5_errors_are_said_as_what_happened() {
        let dir = tempfile::tempdir().unwrap();
        let h5 = hdf5::File::open(dir.path()).unwrap_err();
        let e = Err::<(), _>(h5).with_context(|| format!("opening {}", dir.path().display())).unwrap_err();
        let text = render_error(&e);
        assert!(text.starts_with(&format!("opening {}: ", dir.path().display())), "{text}");
        assert_eq!(
            text,
            format!("opening {}: {}", dir.path().display(), crate::h5::explain(e.downcast_ref().unwrap()))
        );
    }
}
