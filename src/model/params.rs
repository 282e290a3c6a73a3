//! The Llama parameters in Hugging Face layout (`nn.Linear` weights are [out, in]) and naming, so
//! a checkpoint maps onto these structs name for name with no transposes. Re-exported by `llama`.
use super::adapter::LayerAdapters;
use super::error::WeightsError;
use super::spec::ModelSpec;
use crate::rng::splitmix64;
use std::collections::{HashMap, HashSet};
use tch::{Device, Kind, Tensor};

/// One decoder layer: the nine tensors of Llama's layer, and the family's biases and q/k norms
/// (`ModelSpec::layer_shapes` says which a spec has).
pub struct LayerWeights {
    pub attn_norm: Tensor,
    /// [n_q*d, h]
    pub wq: Tensor,
    /// [n_kv*d, h]
    pub wk: Tensor,
    /// [n_kv*d, h]
    pub wv: Tensor,
    /// [h, n_q*d]
    pub wo: Tensor,
    pub mlp_norm: Tensor,
    /// [intermediate, h]
    pub w_gate: Tensor,
    /// [intermediate, h]
    pub w_up: Tensor,
    /// [h, intermediate]
    pub w_down: Tensor,
    /// [n_q*d], [n_kv*d], [n_kv*d] (`spec.qkv_bias`)
    pub bq: Option<Tensor>,
    pub bk: Option<Tensor>,
    pub bv: Option<Tensor>,
    /// [h] (`spec.o_bias`)
    pub bo: Option<Tensor>,
    /// [d] each, applied per head to q and k before RoPE (`spec.qk_norm`)
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
    /// LoRA adapters on some of the projections (`LayerWeights::project` applies them).
    pub adapters: LayerAdapters,
}

pub struct ModelWeights {
    /// [V, h]
    pub embed: Tensor,
    pub layers: Vec<LayerWeights>,
    pub norm: Tensor,
    /// [V, h]; None when the LM head is tied to the embedding.
    pub lm_head: Option<Tensor>,
}

impl LayerWeights {
    /// (name, shape) of every tensor of a layer of `spec`, in the order of `tensors()`.
    pub fn shapes(spec: &ModelSpec) -> Vec<(&'static str, Vec<i64>)> {
        spec.layer_shapes()
    }

    /// Every tensor the layer has, by HF name relative to `model.layers.{i}.`, in the order of
    /// `ModelSpec::layer_shapes` (which lists the optional ones after the matrices they belong to).
    pub fn tensors(&self) -> Vec<(&'static str, &Tensor)> {
        let all: [(&'static str, Option<&Tensor>); 15] = [
            ("input_layernorm.weight", Some(&self.attn_norm)),
            ("self_attn.q_proj.weight", Some(&self.wq)),
            ("self_attn.q_proj.bias", self.bq.as_ref()),
            ("self_attn.k_proj.weight", Some(&self.wk)),
            ("self_attn.k_proj.bias", self.bk.as_ref()),
            ("self_attn.v_proj.weight", Some(&self.wv)),
            ("self_attn.v_proj.bias", self.bv.as_ref()),
            ("self_attn.o_proj.weight", Some(&self.wo)),
            ("self_attn.o_proj.bias", self.bo.as_ref()),
            ("self_attn.q_norm.weight", self.q_norm.as_ref()),
            ("self_attn.k_norm.weight", self.k_norm.as_ref()),
            ("post_attention_layernorm.weight", Some(&self.mlp_norm)),
            ("mlp.gate_proj.weight", Some(&self.w_gate)),
            ("mlp.up_proj.weight", Some(&self.w_up)),
            ("mlp.down_proj.weight", Some(&self.w_down)),
        ];
        all.into_iter().filter_map(|(n, t)| t.map(|t| (n, t))).collect()
    }

    /// Inverse of `tensors()`: takes the layer's tensors by their HF suffix names (any order),
    /// checks names and shapes against `spec`.
    pub fn from_tensors(spec: &ModelSpec, named: Vec<(String, Tensor)>) -> Result<LayerWeights, WeightsError> {
        let expected: Vec<(String, Vec<i64>)> =
            Self::shapes(spec).into_iter().map(|(n, s)| (n.to_string(), s)).collect();
        let ordered = check_and_order(&expected, named, &|_| "layer tensors".to_string(), "layer tensors")?;
        Ok(Self::from_ordered(spec, ordered))
    }

    /// Layer `layer` of `ModelWeights::init` (same values), for callers that build one layer at a time.
    pub fn init(spec: &ModelSpec, layer: usize, seed: i64, kind: Kind, device: Device) -> LayerWeights {
        let t = Self::shapes(spec)
            .into_iter()
            .map(|(n, s)| init_tensor(&format!("model.layers.{layer}.{n}"), &s, seed, kind, device))
            .collect();
        Self::from_ordered(spec, t)
    }

    /// Tensors in the order of `shapes(spec)`; the caller guarantees that they are all there.
    fn from_ordered(spec: &ModelSpec, t: Vec<Tensor>) -> LayerWeights {
        let mut m: HashMap<&str, Tensor> = Self::shapes(spec).into_iter().map(|(n, _)| n).zip(t).collect();
        let must = |m: &mut HashMap<&str, Tensor>, name: &str| {
            m.remove(name).unwrap_or_else(|| unreachable!("every layer has {name}"))
        };
        LayerWeights {
            attn_norm: must(&mut m, "input_layernorm.weight"),
            wq: must(&mut m, "self_attn.q_proj.weight"),
            wk: must(&mut m, "self_attn.k_proj.weight"),
            wv: must(&mut m, "self_attn.v_proj.weight"),
            wo: must(&mut m, "self_attn.o_proj.weight"),
            mlp_norm: must(&mut m, "post_attention_layernorm.weight"),
            w_gate: must(&mut m, "mlp.gate_proj.weight"),
            w_up: must(&mut m, "mlp.up_proj.weight"),
            w_down: must(&mut m, "mlp.down_proj.weight"),
            bq: m.remove("self_attn.q_proj.bias"),
            bk: m.remove("self_attn.k_proj.bias"),
            bv: m.remove("self_attn.v_proj.bias"),
            bo: m.remove("self_attn.o_proj.bias"),
            q_norm: m.remove("self_attn.q_norm.weight"),
            k_norm: m.remove("self_attn.k_norm.weight"),
            adapters: LayerAdapters::default(),
        }
    }
}

impl ModelWeights {
    /// Full HF names and shapes of every tensor, in the order of `named_tensors()`.
    pub fn shapes(spec: &ModelSpec) -> Vec<(String, Vec<i64>)> {
        // The spec lists the outer tensors as embedding, final norm, (LM head); layers go between.
        let mut outer = spec.outer_shapes().into_iter().map(|(n, s)| (n.to_string(), s));
        let mut out: Vec<(String, Vec<i64>)> = outer.next().into_iter().collect();
        for l in 0..spec.num_hidden_layers {
            out.extend(LayerWeights::shapes(spec).into_iter().map(|(n, s)| (format!("model.layers.{l}.{n}"), s)));
        }
        out.extend(outer);
        out
    }

    /// Random weights like HF's `_init_weights`: normal(0, 0.02) matrices, norms 1. Each tensor is
    /// drawn on the host from a counter-based generator keyed by (seed, its name), so the values
    /// do not depend on the device, the thread count, or which other tensors are built.
    pub fn init(spec: &ModelSpec, seed: i64, kind: Kind, device: Device) -> ModelWeights {
        let t = Self::shapes(spec).into_iter().map(|(n, s)| init_tensor(&n, &s, seed, kind, device)).collect();
        Self::from_ordered(spec, t)
    }

    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), self.embed.shallow_clone())];
        for (l, layer) in self.layers.iter().enumerate() {
            out.extend(layer.tensors().into_iter().map(|(n, t)| (format!("model.layers.{l}.{n}"), t.shallow_clone())));
        }
        out.push(("model.norm.weight".to_string(), self.norm.shallow_clone()));
        if let Some(head) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), head.shallow_clone()));
        }
        out
    }

    /// Builds the weights from HF-named tensors, checking every name and shape against `spec`.
    pub fn from_named(spec: &ModelSpec, named: Vec<(String, Tensor)>) -> Result<ModelWeights, WeightsError> {
        Self::from_named_in(spec, named, &|_| "the given tensors".to_string(), "the given tensors")
    }

    /// `from_named` whose errors name where each tensor came from (`origin`) and the checkpoint as
    /// a whole (`whole`, for missing tensors).
    pub(crate) fn from_named_in(
        spec: &ModelSpec,
        mut named: Vec<(String, Tensor)>,
        origin: &dyn Fn(&str) -> String,
        whole: &str,
    ) -> Result<ModelWeights, WeightsError> {
        // What transformers itself ignores when loading: a stored LM head of a tied model, and the
        // rotary `inv_freq` buffers that older conversions saved.
        let ignored =
            |n: &str| (spec.tie_word_embeddings && n == "lm_head.weight") || n.ends_with("rotary_emb.inv_freq");
        named.retain(|(n, _)| !ignored(n));
        let ordered = check_and_order(&Self::shapes(spec), named, origin, whole)?;
        Ok(Self::from_ordered(spec, ordered))
    }

    /// The LM head: its own matrix, or the embedding when tied.
    pub fn lm_head(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Tensors in the order of `shapes(spec)`.
    fn from_ordered(spec: &ModelSpec, t: Vec<Tensor>) -> ModelWeights {
        let mut it = t.into_iter();
        let mut next = || it.next().unwrap_or_else(|| unreachable!("checked against shapes(spec)"));
        let embed = next();
        let per_layer = spec.layer_shapes().len();
        let layers = (0..spec.num_hidden_layers)
            .map(|_| LayerWeights::from_ordered(spec, (0..per_layer).map(|_| next()).collect()))
            .collect();
        let norm = next();
        let lm_head = (!spec.tie_word_embeddings).then(next);
        ModelWeights { embed, layers, norm, lm_head }
    }
}

/// One tensor of `init`: norms are ones, biases zeros (as transformers initialises them),
/// everything else normal(0, 0.02) keyed by (seed, name).
pub fn init_tensor(name: &str, shape: &[i64], seed: i64, kind: Kind, device: Device) -> Tensor {
    if name.ends_with("norm.weight") {
        return Tensor::ones(shape, (kind, device));
    }
    if name.ends_with(".bias") {
        return Tensor::zeros(shape, (kind, device));
    }
    // FNV-1a of the name, mixed with the seed.
    let key = name.bytes().fold(splitmix64(seed as u64), |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    let n = shape.iter().product::<i64>() as usize;
    Tensor::from_slice(&normal_values(key, n, 0.02))
        .view(shape) // [n] -> shape
        .to_kind(kind)
        .to_device(device)
}

/// `n` draws of normal(0, std). Counter-based (element i depends only on `key` and i), so the
/// values are the same for any thread count and no global generator is touched: libtorch's
/// `manual_seed` + `randn` is not deterministic while other threads draw random numbers.
fn normal_values(key: u64, n: usize, std: f64) -> Vec<f32> {
    let mut out = vec![0f32; n];
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let chunk = n.div_ceil(threads).max(1 << 16);
    std::thread::scope(|scope| {
        for (c, part) in out.chunks_mut(chunk).enumerate() {
            scope.spawn(move || {
                for (j, v) in part.iter_mut().enumerate() {
                    let i = (c * chunk + j) as u64;
                    // Box-Muller from two independent uniforms in (0, 1].
                    let u1 = unit(splitmix64(key ^ splitmix64(2 * i)));
                    let u2 = unit(splitmix64(key ^ splitmix64(2 * i + 1)));
                    *v = (std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32;
                }
            });
        }
    });
    out
}

/// The top 53 bits as a uniform in (0, 1] (never 0, so its log is finite).
fn unit(x: u64) -> f64 {
    ((x >> 11) + 1) as f64 / (1u64 << 53) as f64
}

/// Checks `named` against `expected` (every name once, right shape, one dtype and device) and
/// returns the tensors in the order of `expected`.
fn check_and_order(
    expected: &[(String, Vec<i64>)],
    named: Vec<(String, Tensor)>,
    origin: &dyn Fn(&str) -> String,
    whole: &str,
) -> Result<Vec<Tensor>, WeightsError> {
    let mut map: HashMap<String, Tensor> = HashMap::with_capacity(named.len());
    for (name, t) in named {
        if map.contains_key(&name) {
            return Err(WeightsError::Duplicate { origin: whole.to_string(), tensor: name });
        }
        map.insert(name, t);
    }
    let wanted: HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    let missing: Vec<String> = expected.iter().filter(|(n, _)| !map.contains_key(n)).map(|(n, _)| n.clone()).collect();
    let mut unexpected: Vec<String> = map.keys().filter(|n| !wanted.contains(n.as_str())).cloned().collect();
    if !missing.is_empty() || !unexpected.is_empty() {
        unexpected.sort();
        return Err(WeightsError::Names { origin: whole.to_string(), missing, unexpected });
    }
    let mut ordered = Vec::with_capacity(expected.len());
    for (name, shape) in expected {
        let t = map.remove(name).unwrap_or_else(|| unreachable!("missing names were rejected above"));
        if t.size() != *shape {
            return Err(WeightsError::Shape {
                origin: origin(name),
                tensor: name.clone(),
                expected: shape.clone(),
                found: t.size(),
            });
        }
        if let Some((first, reference)) = ordered.first().zip(expected.first()) {
            let first: &Tensor = first;
            if (t.kind(), t.device()) != (first.kind(), first.device()) {
                return Err(WeightsError::Placement {
                    tensor: name.clone(),
                    found: format!("{:?} on {:?}", t.kind(), t.device()),
                    expected: format!("{:?} on {:?}", first.kind(), first.device()),
                    reference: reference.0.clone(),
                });
            }
        }
        ordered.push(t);
    }
    Ok(ordered)
}
