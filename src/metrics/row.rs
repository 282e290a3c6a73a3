//! One optimizer step's numbers, as the metrics file, TensorBoard and the progress line take them.

/// Wall time of one optimizer step's parts, in seconds. On GPU each part ends with a device
/// synchronize, or kernels still running are billed to the next part.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepTimes {
    /// Waiting for the loader (its prefetch thread should make this ~0).
    pub data: f64,
    /// Embedding, layers and the tiled loss with its own backward (interleaved tile by tile).
    pub forward: f64,
    /// Layer-wise backward with recompute, all-to-alls and gradient reduce-scatters.
    pub backward: f64,
    /// Gradient norm, clipping and AdamW on the local shards.
    pub optimizer: f64,
    /// The held-out loss after the update (`train.eval_every`; 0 on other steps): not part of
    /// `step_time`.
    pub eval: f64,
}

pub struct StepRow {
    pub step: u64,
    pub tokens: u64,
    /// Documents attention ran over in the step, whole job (one per sample when the boundaries
    /// are ignored).
    pub documents: u64,
    pub loss: f64,
    /// Labels the loss was taken over (not ignored: -100), whole job.
    pub trained_tokens: u64,
    /// The held-out loss after this step's update (`train.eval_every`), NaN on other steps.
    pub eval_loss: f64,
    /// Trained labels of the held-out set (0 on steps without one).
    pub eval_tokens: u64,
    pub lr: f64,
    pub grad_norm: f64,
    pub step_time: f64,
    pub tokens_per_s: f64,
    pub tflops: f64,
    pub mfu: f64,
    pub tflops_alst: f64,
    pub mfu_alst: f64,
    pub times: StepTimes,
    pub checkpoint_time: f64,
    /// One entry per world rank, bytes.
    pub peak_host_mem: Vec<u64>,
    pub peak_gpu_mem: Vec<u64>,
    /// Activation-store files on local disk, at peak (printed, not in metrics.h5).
    pub peak_disk: Vec<u64>,
}
