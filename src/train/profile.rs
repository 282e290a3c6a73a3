//! Where a step's time goes: attention kernels, other compute, communication, and waiting for
//! the slowest rank. GPU work is asynchronous, so measuring means synchronising the device at
//! every region boundary (and a barrier before each collective, to separate waiting from
//! moving data); that costs a few percent, which is why it runs only on the steps the config
//! names and those steps are not used for speed figures.
use crate::comm::Collective;
use std::cell::{Cell, RefCell};
use std::time::Instant;
use tch::Device;

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TimeSplit {
    pub attention: f64,
    pub compute: f64,
    pub comm: f64,
    pub wait: f64,
}

#[derive(Clone, Copy)]
enum Region {
    Attention,
    Compute,
    Comm,
    Wait,
}

pub struct Profiler {
    device: Device,
    on: Cell<bool>,
    last: Cell<Instant>,
    split: RefCell<TimeSplit>,
}

impl Profiler {
    pub fn new(device: Device, on: bool) -> Profiler {
        Profiler {
            device,
            on: Cell::new(on),
            last: Cell::new(Instant::now()),
            split: RefCell::new(TimeSplit::default()),
        }
    }

    /// Starts a step: measured (`on`) or not, with the split back at zero.
    pub fn start_step(&self, on: bool) {
        self.on.set(on);
        self.last.set(Instant::now());
        *self.split.borrow_mut() = TimeSplit::default();
    }

    pub fn is_on(&self) -> bool {
        self.on.get()
    }

    /// Attributes the time since the previous mark to `region`.
    fn mark(&self, region: Region) {
        if let Device::Cuda(i) = self.device {
            tch::Cuda::synchronize(i as i64);
        }
        let now = Instant::now();
        let dt = (now - self.last.replace(now)).as_secs_f64();
        let mut s = self.split.borrow_mut();
        match region {
            Region::Attention => s.attention += dt,
            Region::Compute => s.compute += dt,
            Region::Comm => s.comm += dt,
            Region::Wait => s.wait += dt,
        }
    }

    /// Runs a collective on `group`: waiting for the group's slowest rank is counted apart.
    pub fn comm<T>(&self, group: &dyn Collective, f: impl FnOnce() -> T) -> T {
        if !self.on.get() {
            return f();
        }
        self.mark(Region::Compute);
        let _ = group.barrier();
        self.mark(Region::Wait);
        let r = f();
        self.mark(Region::Comm);
        r
    }

    /// Runs attention kernels (forward or backward).
    pub fn attention<T>(&self, f: impl FnOnce() -> T) -> T {
        if !self.on.get() {
            return f();
        }
        self.mark(Region::Compute);
        let r = f();
        self.mark(Region::Attention);
        r
    }

    /// Closes the last region and returns the split (zeros when off).
    pub fn finish(&self) -> TimeSplit {
        if self.on.get() {
            self.mark(Region::Compute);
        }
        *self.split.borrow()
    }
}
