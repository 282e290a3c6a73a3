//! ZeRO parameter sharding. Parameters are grouped in units (the embedding, each decoder layer,
//! the head); a unit's tensors are flattened into one vector, padded to a multiple of the world
//! size, and at stage 3 each rank keeps one slice of it: fp32 master weights, gradient and Adam
//! moments. A unit is all-gathered just before use and dropped after; its gradients are
//! reduce-scattered, which also sums the partial weight gradients of the SP ranks. At stage 0
//! every rank keeps the whole vector and gradients are all-reduced.
use crate::autograd::shim_result;
use crate::comm::{Collective, CommError};
use crate::model::spec::ModelSpec;
use crate::transfer::{self, CopyEvent, TransferError};
use std::ffi::c_char;
use tch::{Device, Kind, Tensor};
use torch_sys::C_tensor;

/// One gathered-together group of parameters.
#[derive(Debug, Clone)]
pub struct Unit {
    pub name: String,
    /// Full Hugging Face names and shapes, in flattening order.
    pub tensors: Vec<(String, Vec<i64>)>,
    pub numel: i64,
    /// `numel` rounded up to a multiple of the shard count.
    pub padded: i64,
}

impl Unit {
    fn new(name: String, tensors: Vec<(String, Vec<i64>)>, shards: i64) -> Unit {
        let numel = tensors.iter().map(|(_, s)| s.iter().product::<i64>()).sum::<i64>();
        let padded = (numel + shards - 1) / shards * shards;
        Unit { name, tensors, numel, padded }
    }

    /// Flat ranges `[start, end)` of the matrices (weight decay applies to them, not to norms).
    fn matrix_ranges(&self) -> Vec<(i64, i64)> {
        let mut at = 0;
        let mut out = Vec::new();
        for (_, shape) in &self.tensors {
            let n: i64 = shape.iter().product();
            if shape.len() >= 2 {
                out.push((at, at + n));
            }
            at += n;
        }
        out
    }
}

/// The units of a Llama model: embedding, one per decoder layer, then the head (final norm and,
/// unless tied, the LM head).
pub fn model_units(spec: &ModelSpec, shards: i64) -> Vec<Unit> {
    let outer = spec.outer_shapes();
    let named = |n: &str| outer.iter().filter(|(k, _)| *k == n).map(|(k, s)| (k.to_string(), s.clone())).collect();
    let mut units = vec![Unit::new("embed".into(), named("model.embed_tokens.weight"), shards)];
    for i in 0..spec.num_hidden_layers {
        let t = spec.layer_shapes().into_iter().map(|(k, s)| (format!("model.layers.{i}.{k}"), s)).collect();
        units.push(Unit::new(format!("layer {i}"), t, shards));
    }
    let mut head: Vec<(String, Vec<i64>)> = named("model.norm.weight");
    head.extend(named("lm_head.weight"));
    units.push(Unit::new("head".into(), head, shards));
    units
}

/// Per-unit optimizer state of this rank: the slice `[rank·len, (rank+1)·len)` of the flat unit.
pub struct Shard {
    pub master: Tensor,
    pub grad: Tensor,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
}

/// The fp32 states a checkpoint saves and restores (the gradient is always zero between steps).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Master,
    ExpAvg,
    ExpAvgSq,
}

impl Shard {
    fn state(&self, which: State) -> &Tensor {
        match which {
            State::Master => &self.master,
            State::ExpAvg => &self.exp_avg,
            State::ExpAvgSq => &self.exp_avg_sq,
        }
    }

    fn state_mut(&mut self, which: State) -> &mut Tensor {
        match which {
            State::Master => &mut self.master,
            State::ExpAvg => &mut self.exp_avg,
            State::ExpAvgSq => &mut self.exp_avg_sq,
        }
    }
}

pub struct ShardedParams {
    pub units: Vec<Unit>,
    pub shards: Vec<Shard>,
    /// 0 or 3.
    pub stage: u8,
    rank: i64,
    /// Where the fp32 state lives (CPU when the optimizer is offloaded).
    pub state_device: Device,
    /// With the optimizer offloaded: each unit's reduced gradient on its way to pinned host
    /// memory (a side-stream copy started as soon as the reduce-scatter is queued), added to
    /// the shard's gradient by `land_grads`. The backward pass never waits for these copies.
    in_flight: Vec<Option<(Tensor, CopyEvent)>>,
}

impl ShardedParams {
    /// Builds the shards from full fp32 tensors that `full(unit)` returns for each unit (in the
    /// unit's tensor order); only this rank's slice is kept.
    pub fn new(
        spec: &ModelSpec,
        stage: u8,
        world: &dyn Collective,
        state_device: Device,
        mut full: impl FnMut(&Unit) -> Vec<Tensor>,
    ) -> ShardedParams {
        let (rank, size) = (world.rank() as i64, world.size() as i64);
        let shards_count = if stage == 3 { size } else { 1 };
        let units = model_units(spec, shards_count);
        let shards = units
            .iter()
            .map(|u| {
                let flat = flatten_padded(&full(u), u.padded);
                let len = u.padded / shards_count;
                let start = if stage == 3 { rank * len } else { 0 };
                let master = flat.narrow(0, start, len).to_device(state_device).copy();
                let zeros = || Tensor::zeros([len], (Kind::Float, state_device));
                Shard { master, grad: zeros(), exp_avg: zeros(), exp_avg_sq: zeros() }
            })
            .collect();
        let in_flight = units.iter().map(|_| None).collect();
        ShardedParams { units, shards, stage, rank, state_device, in_flight }
    }

    fn shard_len(&self, unit: usize) -> i64 {
        self.shards[unit].master.size()[0]
    }

    /// The whole unit as tensors of `kind` on `device` (views into one gathered buffer).
    pub fn gather(
        &self,
        world: &dyn Collective,
        unit: usize,
        kind: Kind,
        device: Device,
    ) -> Result<Vec<Tensor>, CommError> {
        self.gather_state(world, unit, State::Master, kind, device)
    }

    /// One state of the whole unit, like `gather`.
    pub fn gather_state(
        &self,
        world: &dyn Collective,
        unit: usize,
        which: State,
        kind: Kind,
        device: Device,
    ) -> Result<Vec<Tensor>, CommError> {
        let local = self.shards[unit].state(which).to_device(device).to_kind(kind);
        let flat = if self.stage == 3 { world.all_gather(&local)? } else { local };
        Ok(split_flat(&flat, &self.units[unit]))
    }

    /// Replaces one state of a unit with this rank's slice of the whole unit, which `root` gives
    /// as full tensors in the unit's order (the other ranks pass `None`) and broadcasts: only the
    /// root reads a checkpoint, and any world size or stage can load what any other wrote.
    pub fn load_state(
        &mut self,
        world: &dyn Collective,
        unit: usize,
        which: State,
        root: usize,
        full: Option<&[Tensor]>,
    ) -> Result<(), CommError> {
        let u = &self.units[unit];
        let flat = match full {
            Some(tensors) => flatten_padded(tensors, u.padded),
            None => Tensor::zeros([u.padded], (Kind::Float, Device::Cpu)),
        };
        let flat = world.broadcast(&flat.to_device(self.state_device), root)?;
        let len = self.shard_len(unit);
        let start = if self.stage == 3 { self.rank * len } else { 0 };
        *self.shards[unit].state_mut(which) = flat.narrow(0, start, len).copy();
        Ok(())
    }

    /// Adds this rank's gradients of a unit (full tensors, any float dtype) into the shards:
    /// summed over every rank in fp32, then each rank keeps its slice.
    pub fn accumulate(&mut self, world: &dyn Collective, unit: usize, grads: &[Tensor]) -> Result<(), CommError> {
        let flat = flatten_padded(grads, self.units[unit].padded);
        let mine = if self.stage == 3 { world.reduce_scatter(&flat)? } else { world.all_reduce(&flat)? };
        if mine.device() == self.state_device {
            let _ = self.shards[unit].grad.g_add_(&mine);
            return Ok(());
        }
        // Offloaded optimizer: stream the shard to host memory instead of a synchronous copy
        // that would stall the host until the GPU drained its queue, once per unit.
        self.land_unit(unit)?;
        self.land_arrived()?;
        self.in_flight[unit] = Some(transfer::to_host(&mine).map_err(offload_error)?);
        Ok(())
    }

    /// Adds the in-flight gradients whose copies have finished, so that only the last unit or two
    /// hold pinned staging memory (a layer's backward outlasts its copy by far).
    fn land_arrived(&mut self) -> Result<(), CommError> {
        for u in 0..self.units.len() {
            let arrived = match &self.in_flight[u] {
                Some((_, copied)) => copied.is_complete().map_err(offload_error)?,
                None => false,
            };
            if arrived {
                self.land_unit(u)?;
            }
        }
        Ok(())
    }

    /// Waits for a unit's gradient copy to host memory, if one is in flight, and adds it.
    fn land_unit(&mut self, unit: usize) -> Result<(), CommError> {
        if let Some((host, copied)) = self.in_flight[unit].take() {
            copied.synchronize().map_err(offload_error)?;
            let _ = self.shards[unit].grad.g_add_(&host);
        }
        Ok(())
    }

    /// Adds every gradient still on its way to host memory (optimizer offload) to its shard;
    /// `grad_norm` and `adamw_step` need all of them.
    pub fn land_grads(&mut self) -> Result<(), CommError> {
        (0..self.units.len()).try_for_each(|u| self.land_unit(u))
    }

    /// This rank's accumulated gradient of a unit as named tensors; the whole gradient when the
    /// shard is the whole unit (stage 0, or a world of one rank).
    pub fn unit_grads(&self, unit: usize) -> Vec<(String, Tensor)> {
        assert!(self.in_flight[unit].is_none(), "unit_grads before land_grads");
        let u = &self.units[unit];
        assert_eq!(self.shard_len(unit), u.padded, "unit_grads needs whole (unsharded) units");
        u.tensors.iter().map(|(n, _)| n.clone()).zip(split_flat(&self.shards[unit].grad, u)).collect()
    }

    /// Sum of squared gradient entries over the whole model (over all ranks at stage 3).
    pub fn grad_norm(&mut self, world: &dyn Collective) -> Result<f64, CommError> {
        self.land_grads()?;
        let local: f64 = self.shards.iter().map(|s| s.grad.square().sum(Kind::Double).double_value(&[])).sum();
        let total = if self.stage == 3 { crate::comm::all_reduce_f64(world, local)? } else { local };
        Ok(total.sqrt())
    }

    /// Decoupled-weight-decay Adam (torch.optim.AdamW's update) on this rank's shards, with the
    /// gradients scaled by `grad_scale` (clipping); then clears the gradients. Gradients still in
    /// flight must have landed (`land_grads`, which `grad_norm` does).
    pub fn adamw_step(&mut self, h: &AdamW, lr: f64, step: i64, grad_scale: f64) -> Result<(), String> {
        assert!(self.in_flight.iter().all(Option::is_none), "adamw_step before land_grads");
        for u in 0..self.units.len() {
            let start = if self.stage == 3 { self.rank * self.shard_len(u) } else { 0 };
            let len = self.shard_len(u);
            let ranges = self.units[u].matrix_ranges();
            let s = &mut self.shards[u];
            if grad_scale != 1.0 {
                let _ = s.grad.g_mul_scalar_(grad_scale);
            }
            if h.weight_decay > 0.0 {
                // Decay only the matrices: intersect their flat ranges with this shard's slice.
                for (a, b) in ranges {
                    let (lo, hi) = (a.max(start), b.min(start + len));
                    if lo < hi {
                        let _ = s.master.narrow(0, lo - start, hi - lo).g_mul_scalar_(1.0 - lr * h.weight_decay);
                    }
                }
            }
            fused_adamw(s, step as f64, lr, h)?;
            let _ = s.grad.zero_();
        }
        Ok(())
    }

    /// Every parameter, gathered whole in fp32 on the CPU, by Hugging Face name.
    pub fn gather_named(&self, world: &dyn Collective) -> Result<Vec<(String, Tensor)>, CommError> {
        self.gather_named_state(world, State::Master, true)
    }

    /// One state of every parameter, gathered whole in fp32 on the CPU, by Hugging Face name;
    /// kept only where `keep` (a checkpoint keeps it on the writing rank alone, so the other
    /// ranks hold one unit at a time).
    pub fn gather_named_state(
        &self,
        world: &dyn Collective,
        which: State,
        keep: bool,
    ) -> Result<Vec<(String, Tensor)>, CommError> {
        let mut out = Vec::new();
        for u in 0..self.units.len() {
            let tensors = self.gather_state(world, u, which, Kind::Float, self.state_device)?;
            if keep {
                for ((name, _), t) in self.units[u].tensors.iter().zip(tensors) {
                    out.push((name.clone(), t.to_device(Device::Cpu).copy()));
                }
            }
        }
        Ok(out)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

extern "C" {
    fn ulysses_fused_adamw(
        param: *const C_tensor,
        grad: *const C_tensor,
        exp_avg: *const C_tensor,
        exp_avg_sq: *const C_tensor,
        step: f64,
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
    ) -> *mut c_char;
}

/// torch's fused AdamW kernel (`torch._fused_adamw_`, through the shim) on one shard, without
/// weight decay: one vectorized, multi-threaded pass over the four fp32 vectors. On CPU it was 15×
/// faster than the same update as a chain of element-wise ops with temporaries (50M parameters,
/// 2 cores: 0.032 s against 0.48 s), with bit-identical results.
fn fused_adamw(s: &Shard, step: f64, lr: f64, h: &AdamW) -> Result<(), String> {
    // SAFETY: live tch handles (torch::Tensor*) borrowed for the call; the kernel updates the
    // tensors in place; the shim returns null or a malloc'ed message.
    shim_result(unsafe {
        ulysses_fused_adamw(
            s.master.as_ptr(),
            s.grad.as_ptr(),
            s.exp_avg.as_ptr(),
            s.exp_avg_sq.as_ptr(),
            step,
            lr,
            h.beta1,
            h.beta2,
            h.eps,
        )
    })
    .map_err(|e| format!("AdamW: {e}"))
}

fn offload_error(e: TransferError) -> CommError {
    CommError::Backend { op: "gradient offload to host memory", message: e.to_string() }
}

/// Copies tensors, flattened and as fp32, into one zero-padded vector of `padded` elements
/// (one allocation: a unit's gradients can be a gigabyte).
fn flatten_padded(tensors: &[Tensor], padded: i64) -> Tensor {
    let flat = Tensor::zeros([padded], (Kind::Float, tensors[0].device()));
    let mut at = 0;
    for t in tensors {
        let n = t.numel() as i64;
        flat.narrow(0, at, n).copy_(&t.reshape([-1]));
        at += n;
    }
    flat
}

/// Splits a flat unit buffer back into its tensors (views sharing the buffer).
fn split_flat(flat: &Tensor, unit: &Unit) -> Vec<Tensor> {
    let mut at = 0;
    unit.tensors
        .iter()
        .map(|(_, shape)| {
            let n: i64 = shape.iter().product();
            let t = flat.narrow(0, at, n).view(shape.as_slice());
            at += n;
            t
        })
        .collect()
}
