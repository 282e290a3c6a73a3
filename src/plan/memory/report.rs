//! The memory plan in words: the table `ulysses check` prints, the one-line placement a run logs,
//! and the message that stops a run that cannot fit.
use super::{longest_fit, Budget, Estimate, MemoryPlan, Place, Placement, PlanInputs, Shortfall};
use crate::config::{ActivationPlacement, DeviceKind, StatePlacement};
use crate::model::spec::UnitId;
use crate::units::{bytes, gib_limit, limit, GIB};
use std::fmt::Write;
use std::path::Path;

/// A run stopped before allocating: the plan does not fit its budget. The message says by how
/// much and what would help (`refusal`).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DoesNotFit(pub String);

/// The estimate by component and place, per rank, and the budget.
pub fn table(plan: &MemoryPlan, budget: &Budget) -> String {
    let est = &plan.estimate;
    let n = est.layers;
    let kept = ((plan.attention_gpu + plan.attention_host) / est.attention_per_layer).round() as usize;
    let mut s = format!("{:<58} {:>10} {:>10} {:>10}\n", "", "GPU", "host", "disk");
    let mut row = |name: &str, cells: [Option<f64>; 3], fmt: fn(f64) -> String| {
        let [gpu, host, disk] = cells.map(|c| c.map_or(String::new(), fmt));
        let _ = writeln!(s, "{name:<58} {gpu:>10} {host:>10} {disk:>10}");
    };
    if est.frozen > 0.0 {
        row(
            "frozen base ([lora]: weights only, no state)",
            [Some(plan.frozen_gpu), Some(plan.frozen_host), None],
            bytes,
        );
    }
    row(
        if est.frozen > 0.0 {
            "optimizer state of the adapters (fp32 master, grad, m, v)"
        } else {
            "optimizer state (fp32 master, grad, Adam m, v)"
        },
        [Some(plan.optimizer_gpu), Some(plan.optimizer_host), Some(plan.optimizer_disk)],
        bytes,
    );
    if plan.state_staging > 0.0 {
        row(
            "staging of the state off the GPU (landing grads, disk chunks)",
            [None, Some(plan.state_staging), None],
            bytes,
        );
    }
    row(
        &format!("layer inputs kept for backward ({n} × {})", bytes(est.input_per_layer)),
        [Some(plan.activations_gpu), Some(plan.activations_host), Some(plan.activations_disk)],
        bytes,
    );
    row(
        &format!("attention output + log-sum-exp kept ({kept} of {n} × {})", bytes(est.attention_per_layer)),
        [Some(plan.attention_gpu), Some(plan.attention_host), None],
        bytes,
    );
    if plan.checkpoint_staging > 0.0 {
        row("checkpoint staging (checkpoint.async)", [None, Some(plan.checkpoint_staging), None], bytes);
    }
    if plan.mlp_gpu > 0.0 {
        let k = (plan.mlp_gpu / est.mlp_per_layer).round() as usize;
        let name = format!("MLP gate + up projections kept ({k} of {n} × {})", bytes(est.mlp_per_layer));
        row(&name, [Some(plan.mlp_gpu), None, None], bytes);
    }
    row("working set of one layer's backward", [Some(est.layer_working), None, None], bytes);
    if plan.qkv_graph > 0.0 {
        row("segment 1's graph, kept through attention's backward", [Some(plan.qkv_graph), None, None], bytes);
    }
    if plan.staging > 0.0 {
        row("kept tensors in flight to the GPU during a layer's backward", [Some(plan.staging), None, None], bytes);
    }
    row("working set of the LM head and loss tiles", [Some(est.head_working), None, None], bytes);
    row("peak (one working set at a time)", [Some(plan.gpu_peak()), Some(plan.host()), Some(plan.disk())], bytes);
    row("budget", [Some(budget.gpu), Some(budget.host), Some(budget.disk)], limit);
    s
}

/// One line: where the layer inputs and kept attention wait, and the use of each budget (`plan`
/// placed by `Estimate::with_placement(placement)`).
pub fn summary(plan: &MemoryPlan, placement: &Placement, budget: &Budget) -> String {
    let est = &plan.estimate;
    let n = placement.inputs.len();
    let kept = n - placement.attention_in(None);
    let units = placement.state.len();
    if est.device == DeviceKind::Cpu {
        let attention =
            if est.keep_attention { format!("attention kept in {kept} of {n} layers") } else { recomputed() };
        return format!(
            "optimizer state of {} of {units} units in memory / {} on disk; layer inputs {} in memory / {} on disk; {attention} (a CPU run budgets only its model state)",
            placement.state_in(Place::Device),
            placement.state_in(Place::Disk),
            placement.inputs_in(Place::Device),
            placement.inputs_in(Place::Disk)
        );
    }
    let attention = if est.keep_attention {
        format!(
            "attention kept {kept} of {n} layers ({} GPU, {} host)",
            placement.attention_in(Some(Place::Device)),
            placement.attention_in(Some(Place::Host))
        )
    } else {
        recomputed()
    };
    let used = |what: &str, used: f64, budget: f64| format!("{what} ~{:.1} of {}", used / GIB, gib_limit(budget));
    let mut s = format!(
        "optimizer state of {units} units {} GPU / {} host / {} disk; layer inputs {} GPU / {} host / {} disk; {attention}; {}, {}/rank",
        placement.state_in(Place::Device),
        placement.state_in(Place::Host),
        placement.state_in(Place::Disk),
        placement.inputs_in(Place::Device),
        placement.inputs_in(Place::Host),
        placement.inputs_in(Place::Disk),
        used("GPU", plan.gpu_peak(), budget.gpu),
        used("host", plan.host(), budget.host)
    );
    if plan.disk() > 0.0 {
        let _ = write!(s, ", {}/rank", used("disk", plan.disk(), budget.disk));
    }
    if placement.qkv_once && est.keep_attention {
        let _ = write!(s, "; segment 1 runs once in backward");
    }
    let mlp = placement.mlp.iter().filter(|&&k| k).count();
    if mlp > 0 {
        let _ = write!(s, "; MLP projections kept in {mlp} of {n} layers");
    }
    s
}

fn recomputed() -> String {
    "attention recomputed in every layer (parallel.keep_attention = false)".into()
}

/// Why a run of `inputs` cannot start within `budget` (bytes per rank), each component's size, and
/// what would help. `offload_dir`: where state and layer inputs on disk go
/// (`MemoryConfig::offload_dir`).
pub fn refusal(inputs: &PlanInputs, budget: &Budget, shortfall: &Shortfall, offload_dir: &Path) -> String {
    use ActivationPlacement::{Auto, Device, Disk, Host};
    let PlanInputs { parallel: p, train: t, world, seq_len, .. } = *inputs;
    let est = Estimate::new(inputs);
    let configured = est.as_configured();
    let n = est.layers;
    let state_total = UnitId::all(n).map(|id| est.unit_state(id)).sum::<f64>();
    let quoted = |a: ActivationPlacement| format!("parallel.activations = \"{}\"", format!("{a:?}").to_lowercase());
    let mut s = format!("does not fit in memory: {shortfall}.\n");
    let _ = writeln!(
        s,
        "  per rank at data.seq_len = {} ({} tokens per rank) on {world} ranks (sp = {}, dp = {}), GiB:",
        seq_len,
        seq_len / p.sp * t.micro_batch,
        p.sp,
        p.dp
    );
    let mut row = |name: String, size: f64, place: String| {
        let _ = writeln!(s, "    {name:<52} {:>8.1}  {place}", size / GIB);
    };
    let state_where = match p.offload_optimizer {
        StatePlacement::Auto if est.sharded => "on the GPU, in host memory or on disk, unit by unit",
        StatePlacement::Auto | StatePlacement::Device => "on the GPU",
        StatePlacement::Host => "in host memory",
        StatePlacement::Disk => "on disk",
    };
    row(
        "optimizer state (fp32 master, grad, Adam m, v)".into(),
        state_total,
        format!("{state_where} (parallel.offload_optimizer = \"{}\")", p.offload_optimizer.name()),
    );
    if est.frozen > 0.0 {
        row("frozen base ([lora]: weights only, no state)".into(), est.frozen, "on the GPU".into());
    }
    let staging_if_on_gpu = state_total * est.checkpoint_staging_per_state;
    if staging_if_on_gpu > 0.0 {
        row(
            "checkpoint staging (asynchronous saves), at most".into(),
            staging_if_on_gpu,
            "in host memory, for the state on the GPU (checkpoint.async = true, checkpoint.every > 0)".into(),
        );
    }
    // Where the GPU ran short because of a layer's backward, the copies in flight then are part
    // of what it needs.
    let in_flight = match shortfall {
        Shortfall::Gpu { .. } if est.layer_working + est.staging_reserve() > est.head_working => est.staging_reserve(),
        _ => 0.0,
    };
    let working = if in_flight > 0.0 { est.layer_working } else { configured.working() };
    row("working set (a layer's backward or the LM head)".into(), working, "on the GPU".into());
    if in_flight > 0.0 {
        row("kept tensors in flight from host memory or disk".into(), in_flight, "on the GPU".into());
    }
    let inputs_where = match p.activations {
        Auto => "on the GPU, in host memory or on disk",
        Device => "on the GPU",
        Host => "in host memory",
        Disk => "on disk",
    };
    row(
        format!("layer inputs ({n} layers × {:.2})", est.input_per_layer / GIB),
        n as f64 * est.input_per_layer,
        format!("{inputs_where} ({})", quoted(p.activations)),
    );
    if p.keep_attention {
        row(
            format!("kept attention ({n} layers × {:.2}), optional", est.attention_per_layer / GIB),
            n as f64 * est.attention_per_layer,
            "where room is left on the GPU or in host memory; else recomputed".into(),
        );
    }
    let _ = writeln!(
        s,
        "    budget per rank: GPU {}, host {}, disk {}",
        gib_limit(budget.gpu),
        gib_limit(budget.host),
        gib_limit(budget.disk)
    );
    // Each tier's least need: on the GPU a working set and the copies in flight, and the state
    // unless it may leave; the rest then waits in host memory and on disk.
    let state_leaves = match p.offload_optimizer {
        StatePlacement::Auto => est.sharded,
        StatePlacement::Device => false,
        StatePlacement::Host | StatePlacement::Disk => true,
    };
    let (state_on_gpu, state_off) = if state_leaves { (0.0, state_total) } else { (state_total, 0.0) };
    let gpu_least = est.frozen + est.layer_working.max(est.head_working) + est.staging_reserve() + state_on_gpu;
    let elsewhere = state_off + n as f64 * est.input_per_layer;
    let _ = writeln!(
        s,
        "    least need: GPU {:.1} GiB ({}a working set, two layers' copies in flight{}) of {}; host and disk together {:.1} GiB (the layer inputs{}) of {}",
        gpu_least / GIB,
        if est.frozen > 0.0 { "the frozen base, " } else { "" },
        if state_leaves { "" } else { ", the optimizer state" },
        gib_limit(budget.gpu),
        elsewhere / GIB,
        if state_leaves { " and the optimizer state" } else { "" },
        gib_limit(budget.host + budget.disk)
    );
    if matches!(shortfall, Shortfall::Disk { .. }) {
        let free = super::budget::free_disk_bytes(offload_dir).map_or("unknown".into(), bytes);
        let _ = writeln!(
            s,
            "    memory.offload_dir: {} ({free} free; {} of it stay free, the rest is shared by the node's ranks)",
            offload_dir.display(),
            bytes(super::DISK_RESERVE)
        );
    }
    let cpu = p.device == DeviceKind::Cpu;
    let mut help = Vec::new();
    let inputs_short = matches!(shortfall, Shortfall::Inputs { .. });
    match p.activations {
        Device if inputs_short => help.push(format!(
            "{} or \"host\": layer inputs in host memory, then on disk, when the GPU is full",
            quoted(Auto)
        )),
        Host | Disk if inputs_short => help.push(format!(
            "{}: layer inputs on the GPU, in host memory and on disk, wherever there is room",
            quoted(Auto)
        )),
        _ => {}
    }
    let gpu_short =
        matches!(shortfall, Shortfall::Gpu { .. }) || (inputs_short && matches!(p.activations, Auto | Device));
    if gpu_short && p.offload_optimizer == StatePlacement::Device {
        help.push(format!(
            "parallel.offload_optimizer = \"auto\": moves the optimizer state ({:.1} GiB) unit by unit to host memory, then disk, as far as the GPU needs",
            state_total / GIB
        ));
    }
    if matches!(shortfall, Shortfall::Host { .. }) && p.offload_optimizer == StatePlacement::Host {
        help.push(
            "parallel.offload_optimizer = \"auto\": the optimizer state on the GPU where it has room, the rest in host memory, then on disk".into(),
        );
    }
    if matches!(shortfall, Shortfall::Host { .. }) && configured.checkpoint_staging > 0.0 {
        help.push(format!(
            "checkpoint.async = false: saves block training while they write, but need no host staging ({:.1} GiB)",
            configured.checkpoint_staging / GIB
        ));
    }
    if matches!(shortfall, Shortfall::Host { .. }) {
        help.push(
            "more ranks (a larger parallel.sp or parallel.dp): ZeRO-3 shards the optimizer state over all of them"
                .into(),
        );
        if p.offload_optimizer.forced_off_device() {
            help.push("parallel.offload_optimizer = \"device\", if the GPU has room for the optimizer state".into());
        }
    } else if matches!(shortfall, Shortfall::Disk { .. }) {
        help.push(format!(
            "memory.offload_dir on a file system with more free space than {} (or free some there)",
            offload_dir.display()
        ));
        help.push(
            "more ranks (a larger parallel.sp or parallel.dp): ZeRO-3 shards the optimizer state over all of them"
                .into(),
        );
    } else if !cpu {
        help.push("a larger parallel.sp (more GPUs): each rank's layer inputs and working sets shrink as 1/sp".into());
    }
    help.push(match longest_fit(inputs, budget) {
        Some(fit) => format!("a smaller data.seq_len: up to {fit} tokens fit these budgets"),
        None => format!("not a smaller data.seq_len: even {} tokens do not fit these budgets", p.sp * 1024),
    });
    let state_may_use_disk = matches!(p.offload_optimizer, StatePlacement::Auto | StatePlacement::Disk);
    let disk = if matches!(p.activations, Auto | Disk) || state_may_use_disk {
        "; memory.offload_dir on a file system with more free space"
    } else {
        ""
    };
    if cpu {
        help.push(format!(
            "memory.host_gib (per node), if the budget is wrong for these machines (unset on CPU: unlimited){disk}"
        ));
    } else {
        help.push(format!(
            "memory.gpu_gib (per GPU) or memory.host_gib (per node), if the budget is wrong for these machines \
             (unset, each is measured at start less a reserve, the smallest of any rank){disk}"
        ));
    }
    let _ = writeln!(s, "  what would help:");
    for h in help {
        let _ = writeln!(s, "    - {h}");
    }
    s.trim_end().to_string()
}
