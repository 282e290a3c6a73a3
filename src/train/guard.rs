//! The non-finite guard: a step whose loss or gradient norm is NaN or infinite stops the run
//! before its optimizer update, so no weights, checkpoint or `final/` ever hold what it computed.
//! The loss and the norm are reduced over the job, so every rank takes the same decision in the
//! same collective; the message then says where the non-finite numbers came from.
use crate::comm::{all_reduce_f64s, Collective, Mesh};
use crate::optim::unit_grad_squares;
use crate::parallel::zero::ShardedParams;
use anyhow::Result;
use std::path::Path;

/// The run stopped on non-finite numbers. Every rank returns it alike: rank 0 reports it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NonFinite(pub String);

/// Ok when step `step`'s job-wide `loss` and gradient `norm` are finite; otherwise (collective)
/// the error naming the ranks whose own loss (`loss_local`) is not finite and the units whose
/// gradient is not.
pub fn check(
    step: usize,
    (loss, loss_local, norm): (f64, f64, f64),
    params: &mut ShardedParams,
    mesh: &Mesh,
    world: &dyn Collective,
    run_dir: &Path,
) -> Result<()> {
    if loss.is_finite() && norm.is_finite() {
        return Ok(());
    }
    let mut mine = vec![0.0; mesh.world_size()];
    mine[mesh.world_rank] = if loss_local.is_finite() { 0.0 } else { 1.0 };
    let flags = all_reduce_f64s(world, &mine)?;
    let ranks: Vec<String> = flags.iter().enumerate().filter(|(_, &f)| f > 0.0).map(|(r, _)| r.to_string()).collect();
    let units: Vec<String> = unit_grad_squares(params, world)?
        .into_iter()
        .filter(|(_, s)| !s.is_finite())
        .map(|(u, _)| u.to_string())
        .collect();
    let loss_part = if loss.is_finite() {
        format!("the loss is {loss:.4}")
    } else if ranks.is_empty() {
        format!("the loss is {loss} (finite on every rank, not in their sum)")
    } else {
        format!("the loss is {loss} (not finite on rank(s) {})", ranks.join(", "))
    };
    let norm_part = match (norm.is_finite(), units.is_empty()) {
        (true, _) => format!("the gradient norm is {norm:.4}"),
        (false, true) => format!("the gradient norm is {norm}"),
        (false, false) => format!("the gradient norm is {norm} (not finite in {})", units.join(", ")),
    };
    Err(NonFinite(format!(
        "step {step}: {loss_part} and {norm_part}. The run stopped before this step's optimizer update: no \
         weights, checkpoint or final model of it exist, and the newest checkpoint in {} stays the resume point. \
         Usual causes: a learning rate too high (train.lr), no gradient clipping (train.clip_grad_norm), a \
         bad batch of data",
        run_dir.join("checkpoints").display()
    ))
    .into())
}
