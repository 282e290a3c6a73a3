//! Preemption: SIGTERM or SIGUSR1 (what Slurm sends before a time limit or a preemption) sets a
//! flag; at the next step boundary the ranks agree, so they all save the same step together and
//! exit with `EXIT_PREEMPTED`, and the next launch resumes from that checkpoint.
use crate::comm::{all_reduce_f64, Collective, CommError};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The exit status of a job stopped by preemption at a checkpoint: EX_TEMPFAIL (sysexits.h,
/// "try again later"), not 0, so a script tells it from a finished run (slurm/launch.sh requeues
/// the job on it) and not 1, an error.
pub const EXIT_PREEMPTED: i32 = 75;

pub struct Preemption {
    flag: Arc<AtomicBool>,
}

impl Preemption {
    /// Installs the handlers. The handler only sets an atomic flag (async-signal-safe); the
    /// default "terminate" action is replaced, so the process lives to save.
    pub fn install() -> std::io::Result<Preemption> {
        let flag = Arc::new(AtomicBool::new(false));
        for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGUSR1] {
            signal_hook::flag::register(signal, Arc::clone(&flag))?;
        }
        Ok(Preemption { flag })
    }

    /// Whether any rank got a signal. Collective: a signal may reach only some ranks (or reach
    /// them between two steps), and all must stop at the same step.
    pub fn requested(&self, world: &dyn Collective) -> Result<bool, CommError> {
        let mine = if self.flag.load(Ordering::Relaxed) { 1.0 } else { 0.0 };
        Ok(all_reduce_f64(world, mine)? > 0.0)
    }
}
