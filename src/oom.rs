//! CUDA out of memory, said once and plainly. libtorch reports it as an exception whose text
//! begins "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19
//! GiB of which 1.23 GiB is free." and goes on with a C++ backtrace; tch makes it an error, or a
//! panic in the methods that unwrap. `explain` recognises that text wherever it surfaces (the
//! panic hook, an error at the end of a job) and says in one message which phase asked, what
//! was asked and free, what the memory plan expected, and what to change. The run says its phase
//! (`set_phase`) and its plan (`set_plan`) as it goes: a few stores a step.
use std::sync::Mutex;

static PHASE: Mutex<String> = Mutex::new(String::new());
static PLAN: Mutex<String> = Mutex::new(String::new());

/// What the job is doing now, for the message: "step 12, forward and backward".
pub fn set_phase(phase: impl Into<String>) {
    if let Ok(mut p) = PHASE.lock() {
        *p = phase.into();
    }
}

/// The memory plan's estimate for this rank, for the message: "a GPU peak of 61.3 GiB within a
/// budget of 76.0 GiB".
pub fn set_plan(plan: impl Into<String>) {
    if let Ok(mut p) = PLAN.lock() {
        *p = plan.into();
    }
}

/// The numbers of libtorch's out-of-memory text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Oom {
    /// "2.00 GiB"
    pub asked: String,
    /// "GPU 0"
    pub gpu: Option<String>,
    /// "79.19 GiB"
    pub total: Option<String>,
    /// "1.23 GiB"
    pub free: Option<String>,
}

/// The out-of-memory report in `text` (an error's or a panic's message), if it is one.
pub fn parse(text: &str) -> Option<Oom> {
    let at = text.find("CUDA out of memory")?;
    let text = &text[at..];
    let after = |key: &str, end: &str| -> Option<String> {
        let from = text.find(key)? + key.len();
        let rest = &text[from..];
        Some(rest[..rest.find(end)?].trim().to_string())
    };
    Some(Oom {
        // "2.00 GiB. GPU 0 has ...": the sentence ends at ". ", the number has its own point.
        asked: after("Tried to allocate ", ". ").unwrap_or_else(|| "an unknown amount".into()),
        gpu: after(". GPU ", " has").map(|g| format!("GPU {g}")),
        total: after("total capacity of ", " of which"),
        free: after(" of which ", " is free"),
    })
}

/// One message for libtorch's out-of-memory `text`, or None when it is something else.
pub fn explain(text: &str) -> Option<String> {
    let oom = parse(text)?;
    let phase = PHASE.lock().map(|p| p.clone()).unwrap_or_default();
    let plan = PLAN.lock().map(|p| p.clone()).unwrap_or_default();
    let gpu = oom.gpu.as_deref().unwrap_or("the GPU");
    let free = match (&oom.free, &oom.total) {
        (Some(free), Some(total)) => format!("{free} free of its {total}"),
        _ => "its free memory unknown".into(),
    };
    let phase = if phase.is_empty() { "setting up".into() } else { phase };
    let plan = if plan.is_empty() {
        "there was no GPU memory plan yet".into()
    } else {
        format!("the memory plan expected {plan}")
    };
    Some(format!(
        "CUDA out of memory in {phase}: asked for {} on {gpu}, {free}; {plan}. What to change: memory.gpu_gib below \
         what this GPU leaves free (the plan then keeps less on it), parallel.activations = \"host\" (layer inputs \
         off the GPU), parallel.offload_optimizer = \"host\" (the optimizer state off it), or a shorter data.seq_len",
        oom.asked
    ))
}

/// Test hook: `ULYSSES_TEST_CUDA_OOM=PHASE` makes the phase whose name starts with PHASE fail as
/// libtorch does when CUDA runs out of memory (a panic with its text), so the message can be
/// tested on a machine without a GPU.
pub fn inject_for_tests(phase: &str) {
    if std::env::var("ULYSSES_TEST_CUDA_OOM").is_ok_and(|p| !p.is_empty() && phase.starts_with(&p)) {
        panic!("called `Result::unwrap()` on an `Err` value: Torch(\"{SAMPLE}\")");
    }
}

/// libtorch 2.11's text for an allocation the GPU could not serve, as tch passes it on.
pub const SAMPLE: &str = "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of \
    79.19 GiB of which 3.38 GiB is free. Including non-PyTorch memory, this process has 75.80 GiB memory in use. Of \
    the allocated memory 73.91 GiB is allocated by PyTorch, and 1.12 GiB is reserved by PyTorch but unallocated. If \
    reserved but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid \
    fragmentation.  See documentation for Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)\n\
    Exception raised from malloc at /pytorch/c10/cuda/CUDACachingAllocator.cpp:1441 (most recent call first):\n\
    frame #0: c10::Error::Error(c10::SourceLocation, std::string) + 0x9d (0x7f0c in libc10.so)";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtorchs_text_becomes_one_message_with_the_numbers_and_what_to_change() {
        let oom = parse(&format!("called `Result::unwrap()` on an `Err` value: Torch(\"{SAMPLE}\")")).unwrap();
        assert_eq!(oom.asked, "20.00 GiB");
        assert_eq!(oom.gpu.as_deref(), Some("GPU 0"));
        assert_eq!((oom.total.as_deref(), oom.free.as_deref()), (Some("79.19 GiB"), Some("3.38 GiB")));
        set_phase("step 3, forward and backward");
        set_plan("a GPU peak of 61.3 GiB within a budget of 76.0 GiB");
        let m = explain(SAMPLE).unwrap();
        for want in [
            "CUDA out of memory in step 3, forward and backward",
            "asked for 20.00 GiB on GPU 0, 3.38 GiB free of its 79.19 GiB",
            "the memory plan expected a GPU peak of 61.3 GiB within a budget of 76.0 GiB",
            "memory.gpu_gib",
            "parallel.activations",
            "parallel.offload_optimizer",
            "data.seq_len",
        ] {
            assert!(m.contains(want), "{want:?} not in {m}");
        }
        assert!(!m.contains("frame #0") && !m.contains("Exception raised"), "{m}");
        assert_eq!(explain("No such file or directory"), None);
    }
}
