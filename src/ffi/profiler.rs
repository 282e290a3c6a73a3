//! libtorch's profiler (Kineto, over CUPTI on a GPU) for one measured step: the GPU's kernels,
//! copies and memsets with their times, and the step's named ranges; shim/profiler.cpp.
use super::{check, ShimError};
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::{Mutex, MutexGuard};

extern "C" {
    fn ulysses_profiler_start(cuda: c_int) -> *mut c_char;
    fn ulysses_range_push(name: *const c_char, range: *mut *mut c_void) -> *mut c_char;
    fn ulysses_range_pop(range: *mut c_void);
    fn ulysses_profiler_stop(text: *mut *mut c_char) -> *mut c_char;
}

/// What an event is (Kineto's activity types that matter here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activity {
    /// A named range of the step (or another CPU-side event).
    Cpu,
    Kernel,
    Memcpy,
    Memset,
    Other,
}

/// One profiled event; times in ns on the profiler's clock (GPU times are mapped onto it).
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub activity: Activity,
    pub start_ns: u64,
    pub end_ns: u64,
    pub name: String,
}

/// libtorch's profiler is one per process: a session holds this lock from start to stop, so a
/// second one (another thread, a test beside another) waits instead of corrupting the first.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A profiling session of the calling thread; one at a time in a process.
pub struct Session {
    _only: MutexGuard<'static, ()>,
    /// Stopped by `stop`; otherwise `Drop` stops it (a step that failed midway).
    stopped: bool,
}

impl Session {
    /// Starts collecting the calling thread's ranges, and GPU activity with `cuda`.
    pub fn start(cuda: bool) -> Result<Session, ShimError> {
        let only = ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // SAFETY: a plain call; the shim catches every exception.
        check("starting the profiler", unsafe { ulysses_profiler_start(cuda as c_int) })?;
        Ok(Session { _only: only, stopped: false })
    }

    /// Stops collecting and returns every event.
    pub fn stop(mut self) -> Result<Vec<Event>, ShimError> {
        self.stopped = true;
        let mut text: *mut c_char = std::ptr::null_mut();
        // SAFETY: the shim writes `text` (a malloc'ed C string) on success.
        check("stopping the profiler", unsafe { ulysses_profiler_stop(&mut text) })?;
        // SAFETY: non-null, NUL-terminated, from strdup; freed once here.
        let s = unsafe { CStr::from_ptr(text) }.to_string_lossy().into_owned();
        unsafe { libc::free(text as *mut c_void) };
        Ok(s.lines().filter_map(parse).collect())
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if !self.stopped {
            let mut text: *mut c_char = std::ptr::null_mut();
            // SAFETY: as in `stop`; the events are dropped (an error's message is freed by check).
            if check("stopping the profiler", unsafe { ulysses_profiler_stop(&mut text) }).is_ok() {
                // SAFETY: the shim's malloc'ed text, freed once.
                unsafe { libc::free(text as *mut c_void) };
            }
        }
    }
}

/// One line of the shim's text: activity type, device type, start, end, name (tab-separated).
fn parse(line: &str) -> Option<Event> {
    let mut f = line.splitn(5, '\t');
    let activity = match f.next()?.parse::<u8>().ok()? {
        // libkineto::ActivityType: CPU_OP, USER_ANNOTATION
        0 | 1 => Activity::Cpu,
        3 => Activity::Memcpy,
        4 => Activity::Memset,
        5 => Activity::Kernel,
        _ => Activity::Other,
    };
    let _device = f.next()?;
    let start_ns = f.next()?.parse().ok()?;
    let end_ns = f.next()?.parse().ok()?;
    Some(Event { activity, start_ns, end_ns, name: f.next().unwrap_or("").to_string() })
}

/// A named range of the step, open until dropped; the profiler records it when a session runs.
pub struct Range(*mut c_void);

impl Range {
    pub fn push(name: &str) -> Result<Range, ShimError> {
        let name = CString::new(name.replace('\0', " ")).expect("NULs replaced");
        let mut raw = std::ptr::null_mut();
        // SAFETY: `name` outlives the call (the shim copies it); the shim writes `raw` on success.
        check("opening a profiler range", unsafe { ulysses_range_push(name.as_ptr(), &mut raw) })?;
        Ok(Range(raw))
    }
}

impl Drop for Range {
    fn drop(&mut self) {
        // SAFETY: `self.0` came from ulysses_range_push and is closed once, here.
        unsafe { ulysses_range_pop(self.0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_shims_lines() {
        let e = parse("5\t1\t100\t250\tsm90_xmma_gemm_bf16\tx").unwrap();
        assert_eq!((e.activity, e.start_ns, e.end_ns), (Activity::Kernel, 100, 250));
        assert_eq!(e.name, "sm90_xmma_gemm_bf16\tx");
        assert_eq!(parse("1\t0\t5\t9\tulysses: head").unwrap().activity, Activity::Cpu);
        assert!(parse("garbage").is_none());
    }

    #[test]
    fn a_cpu_session_records_nested_ranges() {
        let s = Session::start(false).unwrap();
        {
            let _outer = Range::push("ulysses: outer").unwrap();
            let _inner = Range::push("ulysses: inner").unwrap();
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let events = s.stop().unwrap();
        let find = |n: &str| events.iter().find(|e| e.name == n).unwrap_or_else(|| panic!("{n}: {events:?}"));
        let (outer, inner) = (find("ulysses: outer"), find("ulysses: inner"));
        assert!(outer.start_ns <= inner.start_ns && inner.end_ns <= outer.end_ns, "{outer:?} {inner:?}");
        assert!(inner.end_ns - inner.start_ns >= 2_000_000, "{inner:?}");
    }
}
