//! The readable reference trainer set up as the binary's single-rank run starts: the experiment's
//! seeded initial weights, and a loader (sp = dp = 1) that deals the same samples in the same order.
use tch::{Device, Kind};
use ulysses::config::Experiment;
use ulysses::data::{Dataset, Loader, LoaderSpec, LoaderState};
use ulysses::model::params::{init_tensor, ModelWeights};
use ulysses::train::reference::Reference;

pub fn reference_and_loader(exp: &Experiment) -> (Reference, Loader) {
    let spec = ulysses::config::validate(exp, Some(exp.parallel.sp * exp.parallel.dp)).unwrap();
    (Reference::new(&spec, initial_weights(exp)), loader(exp))
}

/// The experiment's seeded initial weights by name, as every rank initialises its shards.
pub fn initial_weights(exp: &Experiment) -> Vec<(String, tch::Tensor)> {
    let spec = ulysses::config::validate(exp, Some(exp.parallel.sp * exp.parallel.dp)).unwrap();
    ModelWeights::shapes(&spec)
        .into_iter()
        .map(|(n, s)| {
            let t = init_tensor(&n, &s, exp.run.seed as i64, Kind::Float, Device::Cpu);
            (n, t)
        })
        .collect()
}

/// A loader at sp = dp = 1 dealing the samples the binary's single-rank run sees, in its order.
pub fn loader(exp: &Experiment) -> Loader {
    let loader_spec = LoaderSpec {
        seed: exp.run.seed,
        shuffle: exp.data.shuffle,
        dp: 1,
        dp_rank: 0,
        sp: 1,
        sp_rank: 0,
        ring: 1,
        micro_batch: exp.train.micro_batch,
        loss_on: exp.data.loss_on,
        packing: exp.data.packing(),
    };
    let dataset = Dataset::open(&exp.data.paths, exp.data.seq_len).unwrap();
    Loader::new(dataset, loader_spec, LoaderState::default()).unwrap()
}
