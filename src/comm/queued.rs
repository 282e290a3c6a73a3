//! Collectives a GPU has been given but has not finished, for the watchdog.
//!
//! An NCCL call returns once its work is enqueued on a CUDA stream, so a rank whose peer never
//! arrives is not inside a collective on the host: it blocks later, in whatever waits for the
//! stream (a loss read back, a copy to the host). After each enqueued collective the rank
//! records a marker (a CUDA event) behind it in the [`Ledger`]; the oldest marker the GPU has
//! not reached names the collective the rank really waits in. Markers are reused, so a call
//! costs one event record and, usually, one query of the oldest marker.
use super::watchdog::{Group, Op};
use crate::ffi::cuda::{Event, Stream};
use std::collections::VecDeque;

/// A point recorded in a GPU stream's queue.
pub trait Marker: Send {
    /// Records the marker after the work enqueued on `stream` so far (again, when reused).
    fn record(&mut self, stream: Stream) -> Result<(), String>;
    /// Whether the stream has run past it; never waits.
    fn done(&self) -> bool;
}

impl Marker for Event {
    fn record(&mut self, stream: Stream) -> Result<(), String> {
        Event::record(self, stream)
    }
    fn done(&self) -> bool {
        Event::done(self)
    }
}

/// Makes a new marker for a stream's GPU.
pub type MakeMarker = Box<dyn Fn(Stream) -> Result<Box<dyn Marker>, String> + Send>;

/// A collective: its group, its kind and its call number on that group (1 for the first).
pub type Place = (Group, Op, u64);

/// The enqueued collectives not known to be finished, oldest first, and the markers free for reuse.
pub struct Ledger {
    queued: VecDeque<(Place, Box<dyn Marker>)>,
    free: Vec<Box<dyn Marker>>,
    make: MakeMarker,
}

impl Default for Ledger {
    /// CUDA events on the stream's GPU.
    fn default() -> Self {
        Ledger::new(Box::new(|s: Stream| Ok(Box::new(Event::new(s.gpu)?) as Box<dyn Marker>)))
    }
}

impl Ledger {
    pub fn new(make: MakeMarker) -> Ledger {
        Ledger { queued: VecDeque::new(), free: Vec::new(), make }
    }

    /// A marker for the next collective on `stream`: a finished collective's, else a new one.
    /// The caller records it without holding the ledger (a record, like any launch, can block
    /// while the GPU is stuck and its queue full; the watchdog must still read the ledger).
    pub fn marker(&mut self, stream: Stream) -> Result<Box<dyn Marker>, String> {
        self.retire();
        match self.free.pop() {
            Some(m) => Ok(m),
            None => (self.make)(stream),
        }
    }

    /// Collective `place`, with its marker recorded after it.
    pub fn push(&mut self, place: Place, marker: Box<dyn Marker>) {
        self.queued.push_back((place, marker));
    }

    /// Frees the markers of finished collectives from the oldest on; returns how many finished.
    /// A stream runs its queue in order, so the first unfinished one stops the look (a later one
    /// on another stream that finished early waits its turn, and costs nothing but its place).
    pub fn retire(&mut self) -> usize {
        let mut finished = 0;
        while self.queued.front().is_some_and(|(_, m)| m.done()) {
            let (_, marker) = self.queued.pop_front().expect("a front was just seen");
            self.free.push(marker);
            finished += 1;
        }
        finished
    }

    /// The oldest collective the GPU has not finished (call `retire` first).
    pub fn oldest(&self) -> Option<Place> {
        self.queued.front().map(|(place, _)| *place)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    /// A GPU that runs its queue when told: markers are numbered as recorded, and done once the
    /// fake has finished that many.
    #[derive(Default)]
    pub(crate) struct FakeGpu {
        recorded: AtomicU64,
        pub finished: AtomicU64,
        pub made: AtomicU64,
    }

    struct FakeMarker {
        gpu: Arc<FakeGpu>,
        number: u64,
    }

    impl Marker for FakeMarker {
        fn record(&mut self, _: Stream) -> Result<(), String> {
            self.number = self.gpu.recorded.fetch_add(1, Ordering::Relaxed) + 1;
            Ok(())
        }
        fn done(&self) -> bool {
            self.gpu.finished.load(Ordering::Relaxed) >= self.number
        }
    }

    pub(crate) fn fake_ledger(gpu: &Arc<FakeGpu>) -> Ledger {
        let gpu = gpu.clone();
        Ledger::new(Box::new(move |_| {
            gpu.made.fetch_add(1, Ordering::Relaxed);
            Ok(Box::new(FakeMarker { gpu: gpu.clone(), number: u64::MAX }) as Box<dyn Marker>)
        }))
    }

    pub(crate) fn stream() -> Stream {
        Stream { gpu: 0, raw: std::ptr::null_mut() }
    }

    fn enqueue(ledger: &mut Ledger, place: Place) -> Result<(), String> {
        let mut marker = ledger.marker(stream())?;
        marker.record(stream())?;
        ledger.push(place, marker);
        Ok(())
    }

    #[test]
    fn the_oldest_unfinished_collective_is_named_and_markers_are_reused() {
        let gpu = Arc::new(FakeGpu::default());
        let mut ledger = fake_ledger(&gpu);
        assert_eq!(ledger.oldest(), None);
        enqueue(&mut ledger, (Group::Sp, Op::AllToAll, 1)).unwrap();
        enqueue(&mut ledger, (Group::Sp, Op::AllToAll, 2)).unwrap();
        enqueue(&mut ledger, (Group::World, Op::AllGather, 1)).unwrap();
        assert_eq!(ledger.oldest(), Some((Group::Sp, Op::AllToAll, 1)));
        gpu.finished.store(2, Ordering::Relaxed);
        assert_eq!(ledger.retire(), 2);
        assert_eq!(ledger.oldest(), Some((Group::World, Op::AllGather, 1)));
        // The two freed markers serve the next two calls: no new ones.
        enqueue(&mut ledger, (Group::World, Op::ReduceScatter, 1)).unwrap();
        enqueue(&mut ledger, (Group::Dp, Op::AllReduce, 1)).unwrap();
        assert_eq!(gpu.made.load(Ordering::Relaxed), 3);
        gpu.finished.store(5, Ordering::Relaxed);
        assert_eq!(ledger.retire(), 3);
        assert_eq!(ledger.oldest(), None);
    }

    #[test]
    fn a_steady_run_keeps_a_handful_of_markers() {
        let gpu = Arc::new(FakeGpu::default());
        let mut ledger = fake_ledger(&gpu);
        // The GPU two collectives behind the host, for 1000 calls.
        for call in 1..=1000 {
            enqueue(&mut ledger, (Group::Sp, Op::AllToAll, call)).unwrap();
            gpu.finished.store(call.saturating_sub(2), Ordering::Relaxed);
        }
        ledger.retire();
        assert!(gpu.made.load(Ordering::Relaxed) <= 4, "{} markers made", gpu.made.load(Ordering::Relaxed));
        assert_eq!(ledger.oldest(), Some((Group::Sp, Op::AllToAll, 999)));
    }

    #[test]
    fn a_marker_that_cannot_be_made_is_an_error() {
        let mut ledger = Ledger::new(Box::new(|_| Err("cuEventCreate: out of memory".into())));
        let e = enqueue(&mut ledger, (Group::Sp, Op::AllToAll, 1)).unwrap_err();
        assert!(e.contains("cuEventCreate"), "{e}");
        assert_eq!(ledger.oldest(), None);
    }
}
