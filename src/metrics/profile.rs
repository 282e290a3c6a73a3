//! Where a step's time goes, on the steps `[metrics] time_split_every` names:
//! - by region, with wall clocks: attention kernels, other compute, communication, and waiting
//!   for the slowest rank. GPU work is asynchronous, so this synchronises the device at every
//!   region boundary (and a barrier before each collective, to separate waiting from moving
//!   data); that costs a few percent, which is why such steps are not used for speed figures;
//! - by phase (each layer's forward and backward segments, the head, the optimizer) and kind of
//!   GPU work: libtorch's profiler (`ffi::profiler`) records every kernel, and each kernel's time
//!   goes to the innermost phase it ran in and to its kind by name (matmul, attention,
//!   elementwise, copies, communication).
use crate::comm::Collective;
use crate::ffi::profiler::{Activity, Event, Range, Session};
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

/// GPU kernel seconds of a measured step (or phase) by kind of work.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct KernelSplit {
    /// cuBLAS / CUTLASS matrix products.
    pub matmul: f64,
    /// Fused attention kernels (cuDNN, flash), forward and backward.
    pub attention: f64,
    /// Everything else that computes: element-wise ops, norms, reductions, softmax, loss.
    pub elementwise: f64,
    /// Memory copies and memsets, and copy kernels (contiguous, cat, to_kind).
    pub copy: f64,
    /// NCCL kernels.
    pub comm: f64,
}

impl KernelSplit {
    pub fn total(&self) -> f64 {
        self.matmul + self.attention + self.elementwise + self.copy + self.comm
    }

    fn add(&mut self, kind: KernelKind, secs: f64) {
        match kind {
            KernelKind::Matmul => self.matmul += secs,
            KernelKind::Attention => self.attention += secs,
            KernelKind::Elementwise => self.elementwise += secs,
            KernelKind::Copy => self.copy += secs,
            KernelKind::Comm => self.comm += secs,
        }
    }
}

/// One phase of a measured step: its wall time and its kernels by kind.
#[derive(Debug, Clone, PartialEq)]
pub struct PhaseSplit {
    /// "forward layer 3 / attention", "head and loss", ...
    pub phase: String,
    pub wall: f64,
    pub kernels: KernelSplit,
}

/// One GPU kernel (or copy) of a measured step by name: how often it ran and for how long.
#[derive(Debug, Clone, PartialEq)]
pub struct KernelTotal {
    pub name: String,
    /// "matmul", "attention", "elementwise", "copies" or "NCCL".
    pub kind: &'static str,
    pub calls: usize,
    pub secs: f64,
}

/// Everything a measured step found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepProfile {
    pub split: TimeSplit,
    /// Kernel seconds by kind over the whole step (GPU runs).
    pub kernels: Option<KernelSplit>,
    /// By phase, in the order the phases began.
    pub phases: Vec<PhaseSplit>,
    /// Each kernel by name, longest total first (GPU runs): which elementwise and copy kernels
    /// the non-matmul time goes to.
    pub by_name: Vec<KernelTotal>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KernelKind {
    Matmul,
    Attention,
    Elementwise,
    Copy,
    Comm,
}

impl KernelKind {
    fn label(self) -> &'static str {
        match self {
            KernelKind::Matmul => "matmul",
            KernelKind::Attention => "attention",
            KernelKind::Elementwise => "elementwise",
            KernelKind::Copy => "copies",
            KernelKind::Comm => "NCCL",
        }
    }
}

/// Every GPU event's time summed by name, longest first.
fn by_name(events: &[Event]) -> Vec<KernelTotal> {
    let mut totals: std::collections::HashMap<&str, KernelTotal> = std::collections::HashMap::new();
    for e in events {
        let Some(kind) = kernel_kind(e) else { continue };
        let t = totals.entry(&e.name).or_insert_with(|| KernelTotal {
            name: e.name.clone(),
            kind: kind.label(),
            calls: 0,
            secs: 0.0,
        });
        t.calls += 1;
        t.secs += e.end_ns.saturating_sub(e.start_ns) as f64 * 1e-9;
    }
    let mut out: Vec<KernelTotal> = totals.into_values().collect();
    out.sort_by(|a, b| b.secs.total_cmp(&a.secs).then_with(|| a.name.cmp(&b.name)));
    out
}

/// The kind of a GPU event, by its activity and name (CUDA 13's cuBLAS names Hopper kernels
/// `nvjet_*`; cuDNN's attention kernels carry `sdpa`/`flash`, and often `wgmma` too, so attention
/// is tested first).
fn kernel_kind(e: &Event) -> Option<KernelKind> {
    let name = e.name.to_ascii_lowercase();
    let any = |words: &[&str]| words.iter().any(|w| name.contains(w));
    match e.activity {
        Activity::Cpu | Activity::Other => None,
        Activity::Memcpy | Activity::Memset => Some(KernelKind::Copy),
        Activity::Kernel if any(&["nccl"]) => Some(KernelKind::Comm),
        Activity::Kernel if any(&["fmha", "flash", "sdpa", "attention", "attn"]) => Some(KernelKind::Attention),
        Activity::Kernel if any(&["gemm", "xmma", "cutlass", "nvjet", "cublas", "matmul"]) => Some(KernelKind::Matmul),
        Activity::Kernel if any(&["copy", "catarray"]) => Some(KernelKind::Copy),
        Activity::Kernel => Some(KernelKind::Elementwise),
    }
}

/// The step's ranges are named with this prefix, so other CPU events are told apart.
const RANGE: &str = "ulysses: ";

/// Each GPU event's time to its kind, overall and in the innermost range it started in.
fn attribute(events: &[Event]) -> (KernelSplit, Vec<PhaseSplit>) {
    let mut ranges: Vec<&Event> =
        events.iter().filter(|e| e.activity == Activity::Cpu && e.name.starts_with(RANGE)).collect();
    ranges.sort_by_key(|r| (r.start_ns, std::cmp::Reverse(r.end_ns)));
    // A range's full name: the names of the ranges that contain it, outermost first.
    let path = |i: usize| {
        let r = ranges[i];
        let mut names: Vec<&str> = ranges[..i]
            .iter()
            .filter(|o| o.start_ns <= r.start_ns && r.end_ns <= o.end_ns)
            .map(|o| &o.name[RANGE.len()..])
            .collect();
        names.push(&r.name[RANGE.len()..]);
        names.join(" / ")
    };
    let mut phases: Vec<PhaseSplit> = (0..ranges.len())
        .map(|i| PhaseSplit {
            phase: path(i),
            wall: (ranges[i].end_ns - ranges[i].start_ns) as f64 * 1e-9,
            kernels: KernelSplit::default(),
        })
        .collect();
    let mut total = KernelSplit::default();
    for e in events {
        let Some(kind) = kernel_kind(e) else { continue };
        let secs = e.end_ns.saturating_sub(e.start_ns) as f64 * 1e-9;
        total.add(kind, secs);
        // The innermost range: the last one (by start) that contains the event's start.
        if let Some(i) = ranges.iter().rposition(|r| r.start_ns <= e.start_ns && e.start_ns < r.end_ns) {
            phases[i].kernels.add(kind, secs);
        }
    }
    (total, phases)
}

pub struct Profiler {
    device: Device,
    on: Cell<bool>,
    last: Cell<Instant>,
    split: RefCell<TimeSplit>,
    /// libtorch's profiler, running during a measured step.
    session: RefCell<Option<Session>>,
}

impl Profiler {
    pub fn new(device: Device, on: bool) -> Profiler {
        let p = Profiler {
            device,
            on: Cell::new(false),
            last: Cell::new(Instant::now()),
            split: RefCell::new(TimeSplit::default()),
            session: RefCell::new(None),
        };
        p.start_step(on);
        p
    }

    /// Starts a step: measured (`on`) or not, with the split back at zero. A measured step runs
    /// libtorch's profiler too; if it cannot start, the step is measured by regions only.
    pub fn start_step(&self, on: bool) {
        self.on.set(on);
        self.last.set(Instant::now());
        *self.split.borrow_mut() = TimeSplit::default();
        if on && self.session.borrow().is_none() {
            match Session::start(self.device.is_cuda()) {
                Ok(s) => *self.session.borrow_mut() = Some(s),
                Err(e) => log::warn!("no kernel breakdown for this step: {e}"),
            }
        }
    }

    /// Runs one phase of the step (on a measured step: synchronised at both ends and named, so
    /// its kernels are attributed to it; phases nest).
    pub fn phase<T>(&self, name: std::fmt::Arguments, f: impl FnOnce() -> T) -> T {
        if !self.on.get() {
            return f();
        }
        self.mark(Region::Compute);
        let range = Range::push(&format!("{RANGE}{name}")).map_err(|e| log::warn!("profiler range {name}: {e}")).ok();
        let r = f();
        self.mark(Region::Compute);
        drop(range);
        r
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

    /// Closes the last region and returns what the step found (zeros and nothing when off).
    pub fn finish(&self) -> StepProfile {
        if !self.on.get() {
            return StepProfile::default();
        }
        self.mark(Region::Compute);
        let split = *self.split.borrow();
        let Some(session) = self.session.borrow_mut().take() else {
            return StepProfile { split, ..StepProfile::default() };
        };
        match session.stop() {
            Ok(events) => {
                let (kernels, phases) = attribute(&events);
                let cuda = self.device.is_cuda();
                let by_name = if cuda { by_name(&events) } else { Vec::new() };
                StepProfile { split, kernels: cuda.then_some(kernels), phases, by_name }
            }
            Err(e) => {
                log::warn!("no kernel breakdown for this step: {e}");
                StepProfile { split, ..StepProfile::default() }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(activity: Activity, start_ns: u64, end_ns: u64, name: &str) -> Event {
        Event { activity, start_ns, end_ns, name: name.into() }
    }

    #[test]
    fn kernels_go_to_their_kind_and_innermost_phase() {
        let events = [
            ev(Activity::Cpu, 0, 1000, "ulysses: backward layer 0"),
            ev(Activity::Cpu, 100, 400, "ulysses: attention"),
            ev(Activity::Cpu, 400, 900, "ulysses: pre-attention"),
            ev(Activity::Cpu, 50, 60, "aten::mm"),
            ev(Activity::Kernel, 120, 320, "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16"),
            ev(Activity::Kernel, 450, 550, "nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_TNT"),
            ev(Activity::Kernel, 560, 600, "void at::native::vectorized_elementwise_kernel<4, silu>"),
            ev(Activity::Kernel, 600, 610, "void at::native::unrolled_elementwise_kernel<direct_copy_kernel_cuda>"),
            ev(Activity::Memcpy, 610, 630, "Memcpy DtoH (Device -> Pinned)"),
            ev(Activity::Kernel, 40, 90, "ncclDevKernel_AllGather_RING_LL"),
            ev(Activity::Kernel, 2000, 2100, "sm90_xmma_gemm_bf16bf16_bf16f32"),
        ];
        let (total, phases) = attribute(&events);
        let ns = 1e-9;
        assert_eq!(total.attention, 200.0 * ns);
        assert_eq!(total.matmul, 200.0 * ns);
        assert_eq!(total.elementwise, 40.0 * ns);
        assert_eq!(total.copy, 30.0 * ns);
        assert_eq!(total.comm, 50.0 * ns);
        let names: Vec<&str> = phases.iter().map(|p| p.phase.as_str()).collect();
        assert_eq!(names, ["backward layer 0", "backward layer 0 / attention", "backward layer 0 / pre-attention"]);
        assert_eq!(phases[0].kernels, KernelSplit { comm: 50.0 * ns, ..KernelSplit::default() });
        assert_eq!(phases[1].kernels, KernelSplit { attention: 200.0 * ns, ..KernelSplit::default() });
        let pre = &phases[2].kernels;
        assert_eq!((pre.matmul, pre.elementwise, pre.copy), (100.0 * ns, 40.0 * ns, 30.0 * ns));
        assert_eq!(phases[2].wall, 500.0 * ns);
        let named = by_name(&events);
        let gemm = named.iter().find(|k| k.name.starts_with("nvjet")).unwrap();
        assert_eq!((gemm.kind, gemm.calls, gemm.secs), ("matmul", 1, 100.0 * ns));
        assert_eq!((named[0].kind, named[0].secs), ("attention", 200.0 * ns), "longest first: {named:?}");
        assert!(
            named.iter().all(|k| !k.name.starts_with("ulysses") && k.name != "aten::mm"),
            "CPU events are no kernels"
        );
        assert!((named.iter().map(|k| k.secs).sum::<f64>() - total.total()).abs() < 1e-15, "every kernel counted once");
    }

    #[test]
    fn kernels_by_name_sum_their_calls() {
        let events = [
            ev(Activity::Kernel, 0, 10, "silu"),
            ev(Activity::Kernel, 20, 60, "mul"),
            ev(Activity::Kernel, 70, 90, "silu"),
            ev(Activity::Memset, 100, 105, "Memset (Device)"),
        ];
        let named = by_name(&events);
        let row =
            |n: &str| named.iter().find(|k| k.name == n).map(|k| (k.kind, k.calls, (k.secs * 1e9).round())).unwrap();
        assert_eq!(named.iter().map(|k| k.name.as_str()).collect::<Vec<_>>(), ["mul", "silu", "Memset (Device)"]);
        assert_eq!(row("silu"), ("elementwise", 2, 30.0));
        assert_eq!(row("Memset (Device)"), ("copies", 1, 5.0));
    }

    #[test]
    fn a_measured_cpu_step_names_its_phases() {
        let p = Profiler::new(Device::Cpu, true);
        p.phase(format_args!("forward layer 0"), || p.phase(format_args!("attention"), || p.attention(|| ())));
        let profile = p.finish();
        assert!(profile.kernels.is_none(), "a CPU step has no GPU kernels");
        let names: Vec<&str> = profile.phases.iter().map(|x| x.phase.as_str()).collect();
        assert_eq!(names, ["forward layer 0", "forward layer 0 / attention"]);
        // Off: nothing is measured.
        p.start_step(false);
        p.phase(format_args!("head"), || ());
        assert_eq!(p.finish(), StepProfile::default());
    }
}
