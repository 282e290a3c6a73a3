//! Jobs on a unit's state that one worker thread runs while the caller goes on: the optimizer
//! update of state in host memory, beside the next step's forward on the GPU. Each job belongs
//! to a slot (a unit); a slot's next use waits for its job and gets its error.
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Mutex, PoisonError};

/// A job: Ok, or why it failed.
pub type HostJob = Box<dyn FnOnce() -> Result<(), String> + Send>;

type Outcome = Result<(), String>;

/// The slots' pending jobs and the worker that runs them in the order pushed.
pub struct Deferred {
    /// Per slot: the outcome of the job the worker may still be running; taken by `wait`.
    pending: Vec<Mutex<Option<Receiver<Outcome>>>>,
    /// The worker's queue, from the first `push` on; the thread ends with the queue.
    worker: Option<Sender<(HostJob, Sender<Outcome>)>>,
}

impl Deferred {
    pub fn new(slots: usize) -> Deferred {
        Deferred { pending: (0..slots).map(|_| Mutex::new(None)).collect(), worker: None }
    }

    /// Queues `job` on `slot` and returns at once; a job still pending on the slot is waited
    /// for first (a slot's jobs never overlap).
    pub fn push(&mut self, slot: usize, job: HostJob) -> Result<(), String> {
        self.wait(slot)?;
        if self.worker.is_none() {
            self.worker = Some(start_worker()?);
        }
        let (done, outcome) = channel();
        let queue = self.worker.as_ref().expect("started above");
        queue.send((job, done)).map_err(|_| "the worker thread has stopped".to_string())?;
        *self.pending[slot].get_mut().unwrap_or_else(PoisonError::into_inner) = Some(outcome);
        Ok(())
    }

    /// Waits for the slot's job, if one is pending; its error, once.
    pub fn wait(&self, slot: usize) -> Result<(), String> {
        let pending = self.pending[slot].lock().unwrap_or_else(PoisonError::into_inner).take();
        match pending.map(|outcome| outcome.recv()) {
            None | Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(reason))) => Err(reason),
            Some(Err(_)) => Err("the worker thread stopped before the job was done".into()),
        }
    }

    /// Whether the slot has a job that `wait` has not collected.
    pub fn is_pending(&self, slot: usize) -> bool {
        self.pending[slot].lock().unwrap_or_else(PoisonError::into_inner).is_some()
    }
}

impl Drop for Deferred {
    /// No job outlives its owner's state.
    fn drop(&mut self) {
        for slot in 0..self.pending.len() {
            let _ = self.wait(slot);
        }
    }
}

/// The worker thread: runs jobs in the order queued, each reporting its outcome; ends when its
/// queue is dropped.
fn start_worker() -> Result<Sender<(HostJob, Sender<Outcome>)>, String> {
    let (queue, jobs) = channel::<(HostJob, Sender<Outcome>)>();
    std::thread::Builder::new()
        .name("host-update".into())
        .spawn(move || {
            for (job, done) in jobs {
                // The waiter may be gone (an error elsewhere ended the step): nothing to tell.
                let _ = done.send(job());
            }
        })
        .map_err(|e| format!("cannot start the worker thread: {e}"))?;
    Ok(queue)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn a_wait_sees_the_slots_job_done_and_its_error_once() {
        let done = Arc::new(AtomicUsize::new(0));
        let mut d = Deferred::new(2);
        let slow = done.clone();
        d.push(
            0,
            Box::new(move || {
                std::thread::sleep(Duration::from_millis(50));
                slow.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }),
        )
        .unwrap();
        d.push(1, Box::new(|| Err("kernel refused".into()))).unwrap();
        assert!(d.is_pending(0));
        d.wait(0).unwrap();
        assert_eq!(done.load(Ordering::SeqCst), 1, "wait returned before the job ran");
        assert!(!d.is_pending(0));
        assert_eq!(d.wait(1), Err("kernel refused".to_string()));
        assert_eq!(d.wait(1), Ok(()), "an error is reported once");
    }

    #[test]
    fn a_slots_second_job_runs_after_its_first() {
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut d = Deferred::new(1);
        for i in 0..3 {
            let o = order.clone();
            d.push(
                0,
                Box::new(move || {
                    std::thread::sleep(Duration::from_millis(10));
                    o.lock().unwrap().push(i);
                    Ok(())
                }),
            )
            .unwrap();
        }
        d.wait(0).unwrap();
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2]);
    }

    #[test]
    fn a_job_that_panics_is_an_error_not_a_hang() {
        let mut d = Deferred::new(2);
        d.push(0, Box::new(|| panic!("job bug"))).unwrap();
        assert!(d.wait(0).unwrap_err().contains("stopped"));
        assert!(d.push(1, Box::new(|| Ok(()))).is_err() || d.wait(1).is_err());
    }

    #[test]
    fn dropping_waits_for_the_jobs() {
        let done = Arc::new(AtomicUsize::new(0));
        let mut d = Deferred::new(1);
        let late = done.clone();
        d.push(
            0,
            Box::new(move || {
                std::thread::sleep(Duration::from_millis(50));
                late.store(1, Ordering::SeqCst);
                Ok(())
            }),
        )
        .unwrap();
        drop(d);
        assert_eq!(done.load(Ordering::SeqCst), 1);
    }
}
