//! Process start-up under MPI: world and node-local rank, the mesh's sub-communicators, rank-tagged
//! logging, and the rule that a failure on one rank aborts the whole job (MPI_Abort) instead of
//! leaving the other ranks blocked in a collective.
use crate::comm::mpi::MpiCollective;
use crate::comm::selfcheck::{conformance, values};
use crate::comm::{Groups, Mesh};
use anyhow::{anyhow, ensure, Context, Result};
use mpi::topology::{Color, SimpleCommunicator};
use mpi::traits::*;
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
}

impl Launch {
    pub fn init() -> Result<Launch> {
        let universe = mpi::initialize().ok_or_else(|| anyhow!("MPI was already initialised in this process"))?;
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        let node = world.split_shared(world.rank());
        let (local_rank, local_size) = (node.rank() as usize, node.size() as usize);
        install_abort_on_panic();
        Ok(Launch { _universe: universe, world, rank, size, local_rank, local_size })
    }

    /// Splits the world into the mesh's SP and DP groups (MPI backend).
    pub fn mpi_groups(&self, mesh: &Mesh) -> Result<Groups> {
        let split = |color: usize, what: &str| {
            self.world
                .split_by_color(Color::with_value(color as i32))
                .with_context(|| format!("MPI_Comm_split for the {what} group returned no communicator"))
        };
        let sp = split(mesh.dp_rank, "sp")?;
        let dp = split(mesh.sp_rank, "dp")?;
        let world = self.world.duplicate();
        Ok(Groups {
            world: Box::new(MpiCollective::new(world)),
            sp: Box::new(MpiCollective::new(sp)),
            dp: Box::new(MpiCollective::new(dp)),
        })
    }

    /// The conformance suite over the job: the world, then the SP and DP groups of every mesh the
    /// world size allows, checking that each group holds exactly the ranks the mesh says.
    pub fn comm_check(&self) -> Result<()> {
        inject_failure(self.rank)?;
        let device = Device::Cpu;
        let world = self.size;
        for sp in (1..=world).filter(|sp| world % sp == 0) {
            let dp = world / sp;
            let mesh = Mesh::new(sp, dp, world, self.rank)?;
            let groups = self.mpi_groups(&mesh)?;
            if sp == 1 {
                conformance(groups.world.as_ref(), device, "world")?;
            }
            for (name, group, members) in [("sp", &groups.sp, mesh.sp_group()), ("dp", &groups.dp, mesh.dp_group())] {
                let tag = format!("mesh sp={sp} dp={dp} {name} group");
                let me = Tensor::from_slice(&[self.rank as i64]).to_device(device);
                let got: Vec<usize> = values(&group.all_gather(&me)?).iter().map(|&v| v as usize).collect();
                ensure!(got == members, "{tag}: holds world ranks {got:?}, the mesh says {members:?}");
                conformance(group.as_ref(), device, &tag)?;
            }
            log::info!("collectives exact for mesh sp={sp} x dp={dp} on {world} rank(s)");
        }
        self.world.barrier();
        if self.rank == 0 {
            println!("comm-check: all collectives exact on {world} rank(s) (MPI backend, CPU tensors)");
        }
        Ok(())
    }

    /// Ends the whole job from one rank: prints why, then MPI_Abort (mpirun kills every rank).
    pub fn abort(&self, err: &anyhow::Error) -> ! {
        eprintln!("[rank {}] error: {err:#}", self.rank);
        if self.size > 1 {
            eprintln!("[rank {}] aborting all {} ranks", self.rank, self.size);
            let _ = std::io::stderr().flush();
            self.world.abort(1);
        }
        std::process::exit(1);
    }
}

/// Fault injection for the abort tests: `ULYSSES_INJECT_FAILURE=R` makes rank R fail before its
/// first collective, while the other ranks are already waiting in one.
pub fn inject_failure(rank: usize) -> Result<()> {
    match std::env::var("ULYSSES_INJECT_FAILURE").ok().and_then(|v| v.parse::<usize>().ok()) {
        Some(r) if r == rank => Err(anyhow!("injected failure (ULYSSES_INJECT_FAILURE={r})")),
        _ => Ok(()),
    }
}

/// A panic on one rank (a tch op that unwraps an error, say) must not leave the others hanging.
fn install_abort_on_panic() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        if mpi::environment::is_initialized() && !mpi::environment::is_finalized() {
            eprintln!("panic on an MPI rank: aborting the job");
            // SAFETY: MPI is initialised and not finalised; MPI_Abort on COMM_WORLD never returns.
            unsafe { mpi::ffi::MPI_Abort(mpi::ffi::RSMPI_COMM_WORLD, 2) };
        }
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
