//! The collective watchdog: a rank that stops arriving (SIGSTOP, a stuck GPU, a stalled file
//! system) must end the job instead of leaving the others blocked in a collective forever.
//!
//! Every collective a rank calls goes through [`Watched`], which marks progress in the rank's
//! [`Progress`] (two clock reads and a few atomic stores: nothing measurable beside a collective).
//! A collective that returns before it is done (NCCL: enqueued on a CUDA stream) also leaves a
//! marker behind it in the rank's [`Ledger`]: the rank then waits in the oldest one its GPU has not
//! finished, wherever its host thread blocks, and a GPU finishing collectives is progress too.
//! A thread per rank ([`Watchdog`]) looks at it a few times per timeout. When a rank has made no
//! progress for half the timeout it starts writing a small report into the run folder
//! (`RUN_DIR/watchdog/rank-N.json`: where it waits, and a heartbeat; a healthy run writes
//! none); once it has made none for the
//! whole timeout it reads the others' reports, waits a few heartbeats to tell live ones from
//! stale ones, and aborts the job. The lowest live rank prints one message naming the operation
//! the live ranks wait in and the ranks that did not arrive. A stopped rank writes nothing, so
//! the run folder is the side channel that needs no MPI call from a second thread.
use super::queued::{Ledger, Place};
use super::{Collective, CommError};
use crate::ffi::cuda::Stream;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tch::{Device, Tensor};

/// The communicators of a training rank, as the watchdog names them (in `GROUPS` order: the
/// discriminant is the index).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Group {
    World,
    /// The Ulysses group: the all-to-alls (the whole SP group without a ring).
    Sp,
    Dp,
    /// Ring attention's group (`parallel.ring` > 1).
    Ring,
}

/// A collective (in `OPS` order: the discriminant is the index).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    AllToAll,
    AllGather,
    ReduceScatter,
    AllReduce,
    Broadcast,
    RingShift,
    Barrier,
}

const GROUPS: [Group; 4] = [Group::World, Group::Sp, Group::Dp, Group::Ring];
const OPS: [Op; 7] =
    [Op::AllToAll, Op::AllGather, Op::ReduceScatter, Op::AllReduce, Op::Broadcast, Op::RingShift, Op::Barrier];
/// `Progress::current` when the rank is not inside a collective.
const OUTSIDE: u64 = u64::MAX;

/// What one rank is doing, as cheaply as it can be recorded.
pub struct Progress {
    start: Instant,
    /// Nanoseconds after `start` of the last progress: a collective entered or left, a step begun.
    last_ns: AtomicU64,
    /// The collective this rank is in (`group * OPS.len() + op`), or OUTSIDE.
    current: AtomicU64,
    /// Collectives called on each group so far: ranks that did arrive have called one more.
    calls: [AtomicU64; 4],
    step: AtomicU64,
    /// Collectives enqueued on the GPU and not known to be finished.
    queued: Mutex<Ledger>,
}

impl Default for Progress {
    /// Markers are CUDA events (made only when a backend enqueues on a GPU).
    fn default() -> Self {
        Progress::with_ledger(Ledger::default())
    }
}

impl Progress {
    pub fn with_ledger(queued: Ledger) -> Progress {
        Progress {
            start: Instant::now(),
            last_ns: AtomicU64::new(0),
            current: AtomicU64::new(OUTSIDE),
            calls: Default::default(),
            step: AtomicU64::new(0),
            queued: Mutex::new(queued),
        }
    }

    fn touch(&self) {
        self.last_ns.store(self.start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    /// Returns the call's number on its group (1 for the first).
    fn enter(&self, group: Group, op: Op) -> u64 {
        let (g, o) = (group as usize, op as usize);
        let call = self.calls[g].fetch_add(1, Ordering::Relaxed) + 1;
        self.current.store((g * OPS.len() + o) as u64, Ordering::Relaxed);
        self.touch();
        call
    }

    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        // A panic while holding it has already ended the job (the launcher's panic hook).
        self.queued.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Collective `place` was enqueued on `stream` and returned before it is done.
    fn enqueued(&self, place: Place, stream: Stream) -> Result<(), String> {
        let mut marker = self.ledger().marker(stream)?;
        marker.record(stream)?; // without the lock: see Ledger::marker
        self.ledger().push(place, marker);
        Ok(())
    }

    /// The oldest collective the GPU has not finished; finished ones count as progress.
    fn oldest_queued(&self) -> Option<Place> {
        let mut ledger = self.ledger();
        if ledger.retire() > 0 {
            self.touch();
        }
        ledger.oldest()
    }

    fn leave(&self) {
        self.current.store(OUTSIDE, Ordering::Relaxed);
        self.touch();
    }

    /// The training loop begins step `step` (also progress: a rank between collectives is busy).
    pub fn begin_step(&self, step: usize) {
        self.step.store(step as u64, Ordering::Relaxed);
        self.touch();
    }

    fn stalled(&self) -> Duration {
        let last = Duration::from_nanos(self.last_ns.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }

    fn snapshot(&self, rank: usize, beat: u64) -> Report {
        let current = self.current.load(Ordering::Relaxed);
        let inside = (current != OUTSIDE).then(|| {
            let (g, o) = (current as usize / OPS.len(), current as usize % OPS.len());
            (GROUPS[g], OPS[o], self.calls[g].load(Ordering::Relaxed))
        });
        Report {
            rank,
            beat,
            step: self.step.load(Ordering::Relaxed),
            stalled_s: self.stalled().as_secs_f64(),
            inside,
            queued: self.oldest_queued(),
            calls: [0, 1, 2, 3].map(|g| self.calls[g].load(Ordering::Relaxed)),
        }
    }
}

/// A collective whose calls mark progress for the watchdog.
pub struct Watched {
    inner: Box<dyn Collective>,
    group: Group,
    progress: Arc<Progress>,
}

impl Watched {
    pub fn new(inner: Box<dyn Collective>, group: Group, progress: Arc<Progress>) -> Watched {
        Watched { inner, group, progress }
    }

    fn call<T>(&self, op: Op, f: impl FnOnce(&dyn Collective) -> Result<T, CommError>) -> Result<T, CommError> {
        let call = self.progress.enter(self.group, op);
        let out = f(self.inner.as_ref());
        self.progress.leave();
        if let (Ok(_), Some(stream)) = (&out, self.inner.stream(op)) {
            self.progress
                .enqueued((self.group, op, call), stream)
                .map_err(|message| CommError::Backend { op: op_name(op), message })?;
        }
        out
    }
}

impl Collective for Watched {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn size(&self) -> usize {
        self.inner.size()
    }
    fn device(&self) -> Device {
        self.inner.device()
    }
    fn all_to_all(&self, input: &Tensor) -> Result<Tensor, CommError> {
        self.call(Op::AllToAll, |c| c.all_to_all(input))
    }
    fn all_gather(&self, input: &Tensor) -> Result<Tensor, CommError> {
        self.call(Op::AllGather, |c| c.all_gather(input))
    }
    fn reduce_scatter(&self, input: &Tensor) -> Result<Tensor, CommError> {
        self.call(Op::ReduceScatter, |c| c.reduce_scatter(input))
    }
    fn all_reduce(&self, input: &Tensor) -> Result<Tensor, CommError> {
        self.call(Op::AllReduce, |c| c.all_reduce(input))
    }
    fn broadcast(&self, input: &Tensor, root: usize) -> Result<Tensor, CommError> {
        self.call(Op::Broadcast, |c| c.broadcast(input, root))
    }
    fn ring_shift(&self, input: &Tensor) -> Result<Tensor, CommError> {
        self.call(Op::RingShift, |c| c.ring_shift(input))
    }
    fn ring_shift_start(&self, input: &Tensor) -> Result<super::Shift, CommError> {
        self.call(Op::RingShift, |c| c.ring_shift_start(input))
    }
    fn barrier(&self) -> Result<(), CommError> {
        self.call(Op::Barrier, |c| c.barrier())
    }
    fn stream(&self, op: Op) -> Option<Stream> {
        self.inner.stream(op)
    }
}

/// One rank's report, written once it has stalled for half the timeout.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Report {
    rank: usize,
    /// Rewritten every tick while stalled: a report whose beat does not move is a stopped rank's.
    beat: u64,
    step: u64,
    stalled_s: f64,
    /// The collective its host thread is in, and that group's call count.
    inside: Option<Place>,
    /// The oldest collective enqueued on its GPU and not finished (NCCL), and its call number.
    queued: Option<Place>,
    calls: [u64; 4],
}

/// The watchdog's settings for one rank of a job.
pub struct Settings {
    pub timeout: Duration,
    /// `RUN_DIR/watchdog`: shared by the job's ranks, as the run folder is.
    pub folder: PathBuf,
    pub rank: usize,
    pub size: usize,
}

/// The thread watching one rank; dropping it stops the thread and removes the rank's report.
pub struct Watchdog {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    /// Starts watching `progress`; on a hang, `abort(rank, message)` ends the job (printing the
    /// message when it is given one).
    pub fn start(
        progress: Arc<Progress>,
        settings: Settings,
        abort: fn(usize, Option<&str>) -> !,
    ) -> std::io::Result<Watchdog> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        progress.touch();
        let thread = std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || watch(&progress, &settings, &flag, abort))?;
        Ok(Watchdog { stop, thread: Some(thread) })
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            // Woken at once: a run does not end a tick (up to 10 s) late.
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// How often the thread looks: often enough that a report starts well before the timeout and a
/// heartbeat is seen within a second or two in tests, rarely enough to cost nothing.
fn tick(timeout: Duration) -> Duration {
    (timeout / 20).clamp(Duration::from_millis(100), Duration::from_secs(10))
}

fn report_path(folder: &Path, rank: usize) -> PathBuf {
    folder.join(format!("rank-{rank:05}.json"))
}

fn watch(progress: &Progress, s: &Settings, stop: &AtomicBool, abort: fn(usize, Option<&str>) -> !) {
    let (tick, own) = (tick(s.timeout), report_path(&s.folder, s.rank));
    let mut beat = 0;
    let write_own = |beat: u64| {
        let text = serde_json::to_string(&progress.snapshot(s.rank, beat)).expect("a report serializes");
        // Whole or not at all: a reader never sees half a report.
        let tmp = own.with_extension("tmp");
        let _ = std::fs::create_dir_all(&s.folder)
            .and_then(|_| crate::files::write(&tmp, text.as_bytes()))
            .and_then(|_| std::fs::rename(&tmp, &own));
    };
    while !stop.load(Ordering::Relaxed) {
        std::thread::park_timeout(tick);
        if stop.load(Ordering::Relaxed) {
            break;
        }
        progress.oldest_queued(); // a host waiting on a GPU that finishes collectives is not stalled
        let stalled = progress.stalled();
        if stalled < s.timeout / 2 {
            if beat > 0 {
                let _ = std::fs::remove_file(&own);
                let _ = std::fs::remove_dir(&s.folder);
                beat = 0;
            }
            continue;
        }
        beat += 1;
        write_own(beat);
        if stalled < s.timeout {
            continue;
        }
        // Three heartbeats apart, a live rank's report has moved on and a stopped one's has not.
        let before = read_reports(&s.folder, s.size);
        for _ in 0..3 {
            std::thread::sleep(tick);
            beat += 1;
            write_own(beat);
        }
        let after = read_reports(&s.folder, s.size);
        let mut live: Vec<Report> =
            after.into_iter().filter(|r| before.iter().all(|b| b.rank != r.rank || b.beat != r.beat)).collect();
        // This rank is alive whether or not its report could be written (an unwritable run folder).
        if live.iter().all(|r| r.rank != s.rank) {
            live.push(progress.snapshot(s.rank, beat));
            live.sort_by_key(|r| r.rank);
        }
        progress.oldest_queued();
        if progress.stalled() < s.timeout {
            continue; // it moved after all (a very slow collective, not a hang)
        }
        // The reports stay: other ranks may still be reading them, and after the job they say
        // where each rank was.
        let printer = live.iter().map(|r| r.rank).min().unwrap_or(s.rank);
        if printer == s.rank {
            abort(s.rank, Some(&message(&live, s.size, s.timeout)));
        }
        // The printer's abort ends this rank too; should it be gone, end the job from here.
        std::thread::sleep(Duration::from_secs(3));
        abort(s.rank, None);
    }
    // A healthy run leaves nothing: the folder goes with the last report in it.
    if beat > 0 {
        let _ = std::fs::remove_file(&own);
        let _ = std::fs::remove_dir(&s.folder);
    }
}

fn read_reports(folder: &Path, size: usize) -> Vec<Report> {
    (0..size)
        .filter_map(|r| std::fs::read_to_string(report_path(folder, r)).ok())
        .filter_map(|text| serde_json::from_str(&text).ok())
        .collect()
}

/// The one message of a hang: what the live ranks wait in, and who did not arrive.
fn message(live: &[Report], size: usize, timeout: Duration) -> String {
    let mut lines = vec![format!(
        "collective watchdog: no progress for {:.0} s (parallel.collective_timeout_s = {}); aborting the job",
        live.iter().map(|r| r.stalled_s).fold(timeout.as_secs_f64(), f64::max),
        timeout.as_secs_f64()
    )];
    // Live ranks grouped by where they are.
    let mut places: Vec<(String, Vec<usize>)> = Vec::new();
    for r in live {
        // The GPU's oldest unfinished collective first: the host may wait behind it anywhere.
        let place = match (r.queued, r.inside) {
            (Some((g, op, call)), _) => format!(
                "waiting in {} on the {} group (its call {call}, enqueued on the GPU and not finished), step {}",
                op_name(op),
                group_name(g),
                r.step
            ),
            (None, Some((g, op, call))) => {
                format!("waiting in {} on the {} group (its call {call}), step {}", op_name(op), group_name(g), r.step)
            }
            (None, None) => format!("not in a collective (busy or blocked elsewhere), step {}", r.step),
        };
        match places.iter_mut().find(|(p, _)| *p == place) {
            Some((_, ranks)) => ranks.push(r.rank),
            None => places.push((place, vec![r.rank])),
        }
    }
    for (place, ranks) in &places {
        lines.push(format!("  {}: {place}", ranks_text(ranks)));
    }
    let silent: Vec<usize> = (0..size).filter(|r| live.iter().all(|l| l.rank != *r)).collect();
    if !silent.is_empty() {
        lines.push(format!(
            "  {}: did not arrive, and sent no report (the process is stopped, or hung where it cannot report: a stuck driver call, a frozen node, or a node that does not see the run folder)",
            ranks_text(&silent)
        ));
    }
    // A live rank that has called fewer collectives on a group than others waiting there did
    // not arrive either: it is stuck before that call.
    for (gi, g) in GROUPS.iter().enumerate() {
        let waiting =
            live.iter().filter_map(|r| r.queued.or(r.inside).filter(|(x, _, _)| x == g).map(|(_, _, c)| c)).max();
        if let Some(call) = waiting {
            let behind: Vec<usize> = live.iter().filter(|r| r.calls[gi] < call).map(|r| r.rank).collect();
            if !behind.is_empty() {
                lines.push(format!(
                    "  {}: did not arrive at call {call} on the {} group",
                    ranks_text(&behind),
                    group_name(*g)
                ));
            }
        }
    }
    lines.join("\n")
}

fn ranks_text(ranks: &[usize]) -> String {
    let list = ranks.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", ");
    if ranks.len() == 1 {
        format!("rank {list}")
    } else {
        format!("ranks {list}")
    }
}

fn group_name(g: Group) -> &'static str {
    match g {
        Group::World => "world",
        Group::Sp => "sp",
        Group::Dp => "dp",
        Group::Ring => "ring",
    }
}

fn op_name(op: Op) -> &'static str {
    match op {
        Op::AllToAll => "all_to_all",
        Op::AllGather => "all_gather",
        Op::ReduceScatter => "reduce_scatter",
        Op::AllReduce => "all_reduce",
        Op::Broadcast => "broadcast",
        Op::RingShift => "ring_shift",
        Op::Barrier => "barrier",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::queued::tests as fake;
    use crate::comm::solo::Solo;

    #[test]
    fn discriminants_are_the_table_indices() {
        assert!(GROUPS.iter().enumerate().all(|(i, &g)| g as usize == i));
        assert!(OPS.iter().enumerate().all(|(i, &o)| o as usize == i));
    }

    #[test]
    fn a_call_counts_and_ends_outside() {
        let p = Arc::new(Progress::default());
        let w = Watched::new(Box::new(Solo), Group::Sp, p.clone());
        w.barrier().unwrap();
        let _sum = w.all_reduce(&Tensor::from_slice(&[1.0f32])).unwrap();
        let r = p.snapshot(0, 1);
        assert_eq!(r.calls, [0, 2, 0, 0]);
        assert_eq!(r.inside, None);
        p.enter(Group::World, Op::AllToAll);
        assert_eq!(p.snapshot(0, 2).inside, Some((Group::World, Op::AllToAll, 1)));
    }

    /// Solo's results, but "enqueued on a GPU stream" as NCCL's are.
    struct Enqueuing;

    impl Collective for Enqueuing {
        fn rank(&self) -> usize {
            0
        }
        fn size(&self) -> usize {
            1
        }
        fn device(&self) -> Device {
            Device::Cpu
        }
        fn all_to_all(&self, input: &Tensor) -> Result<Tensor, CommError> {
            Solo.all_to_all(input)
        }
        fn all_gather(&self, input: &Tensor) -> Result<Tensor, CommError> {
            Solo.all_gather(input)
        }
        fn reduce_scatter(&self, input: &Tensor) -> Result<Tensor, CommError> {
            Solo.reduce_scatter(input)
        }
        fn all_reduce(&self, input: &Tensor) -> Result<Tensor, CommError> {
            Solo.all_reduce(input)
        }
        fn broadcast(&self, input: &Tensor, root: usize) -> Result<Tensor, CommError> {
            Solo.broadcast(input, root)
        }
        fn ring_shift(&self, input: &Tensor) -> Result<Tensor, CommError> {
            Solo.ring_shift(input)
        }
        fn barrier(&self) -> Result<(), CommError> {
            Solo.barrier()
        }
        fn stream(&self, _op: Op) -> Option<Stream> {
            Some(fake::stream())
        }
    }

    #[test]
    fn an_enqueued_collective_is_waited_in_until_the_gpu_finishes_it() {
        let gpu = Arc::new(fake::FakeGpu::default());
        let p = Arc::new(Progress::with_ledger(fake::fake_ledger(&gpu)));
        let sp = Watched::new(Box::new(Enqueuing), Group::Sp, p.clone());
        let world = Watched::new(Box::new(Enqueuing), Group::World, p.clone());
        let x = Tensor::from_slice(&[1.0f32, 2.0]);
        let _ = sp.all_to_all(&x).unwrap();
        let _ = world.all_gather(&x).unwrap();
        let _ = sp.all_to_all(&x).unwrap();
        // The host has returned from all three; the GPU has finished the first.
        gpu.finished.store(1, Ordering::Relaxed);
        let r = p.snapshot(0, 1);
        assert_eq!(r.inside, None);
        assert_eq!(r.queued, Some((Group::World, Op::AllGather, 1)));
        assert_eq!(r.calls, [1, 2, 0, 0]);
        // A GPU that finishes collectives is progress, though the host has not moved.
        std::thread::sleep(Duration::from_millis(50));
        assert!(p.stalled() >= Duration::from_millis(50));
        gpu.finished.store(2, Ordering::Relaxed);
        assert_eq!(p.snapshot(0, 2).queued, Some((Group::Sp, Op::AllToAll, 2)));
        assert!(p.stalled() < Duration::from_millis(50), "{:?}", p.stalled());
        gpu.finished.store(3, Ordering::Relaxed);
        assert_eq!(p.snapshot(0, 3).queued, None);
        // MPI's calls are done when they return: nothing is queued behind them.
        let mpi_like = Watched::new(Box::new(Solo), Group::Dp, p.clone());
        let _ = mpi_like.all_reduce(&x).unwrap();
        assert_eq!(p.snapshot(0, 4).queued, None);
    }

    #[test]
    fn the_message_names_the_collective_the_gpu_waits_in() {
        // NCCL: the live ranks' hosts wait elsewhere (a loss read back), their GPUs in all_to_all
        // call 12 of the sp group, which rank 2 never enqueued.
        let live = |rank| Report {
            rank,
            beat: 4,
            step: 3,
            stalled_s: 21.0,
            inside: None,
            queued: Some((Group::Sp, Op::AllToAll, 12)),
            calls: [0, 14, 0, 0],
        };
        let m = message(&[live(0), live(1), live(3)], 4, Duration::from_secs(20));
        assert!(
            m.contains("ranks 0, 1, 3: waiting in all_to_all on the sp group (its call 12, enqueued on the GPU and not finished), step 3"),
            "{m}"
        );
        assert!(m.contains("rank 2: did not arrive, and sent no report"), "{m}");
        // A live rank whose host never got to call 12 did not arrive either.
        let late = Report { queued: None, calls: [0, 11, 0, 0], ..live(3) };
        let m = message(&[live(0), live(1), late], 4, Duration::from_secs(20));
        assert!(m.contains("rank 3: did not arrive at call 12 on the sp group"), "{m}");
    }

    #[test]
    fn the_message_names_who_waits_and_who_did_not_arrive() {
        let waiting = |rank| Report {
            rank,
            beat: 4,
            step: 3,
            stalled_s: 5.2,
            inside: Some((Group::World, Op::AllReduce, 57)),
            queued: None,
            calls: [57, 10, 2, 0],
        };
        let behind = Report { inside: None, calls: [56, 10, 2, 0], ..waiting(2) };
        let m = message(&[waiting(0), waiting(1), behind], 4, Duration::from_secs(5));
        assert!(m.starts_with("collective watchdog: no progress for 5 s (parallel.collective_timeout_s = 5)"), "{m}");
        assert!(m.contains("ranks 0, 1: waiting in all_reduce on the world group (its call 57), step 3"), "{m}");
        assert!(m.contains("rank 2: not in a collective"), "{m}");
        assert!(m.contains("rank 2: did not arrive at call 57 on the world group"), "{m}");
        assert!(m.contains("rank 3: did not arrive, and sent no report"), "{m}");
    }

    #[test]
    fn reports_round_trip_and_ticks_stay_in_bounds() {
        let r = Progress::default().snapshot(3, 7);
        let back: Report = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        assert_eq!(tick(Duration::from_secs(1800)), Duration::from_secs(10));
        assert_eq!(tick(Duration::from_secs(1)), Duration::from_millis(100));
        assert_eq!(tick(Duration::from_secs(4)), Duration::from_millis(200));
    }
}
