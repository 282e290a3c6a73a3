//! Hugging Face `config.json`, typed: `RawConfig` lists every field that changes the computation
//! of a Llama, Qwen3, Qwen2 or Mistral model; `read` honours each or refuses it with what is
//! supported. A field that is absent takes the value transformers 5 gives it for that family (so
//! the model is the one `from_pretrained` builds); a field that is present is never replaced by
//! a default. Fields the family does not read are reported (`SourceConfig::ignored`), not used.
use super::{Family, FieldProblem, Llama3RopeScaling, ModelSpec, RopeScaling, SourceConfig as Source, YarnRopeScaling};
use serde::{Deserialize, Deserializer};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::sync::Arc;

/// The config.json a spec was read from, written back into checkpoints with only what training
/// changes (the weights' dtype), and the fields the family does not read. Not part of the
/// architecture: two specs that compute the same model are equal wherever they came from.
#[derive(Debug, Clone, Default)]
pub struct SourceConfig {
    pub json: Option<Arc<Map<String, Value>>>,
    /// Present fields that transformers' class for this family does not read either.
    pub ignored: Vec<String>,
}

impl PartialEq for SourceConfig {
    fn eq(&self, _: &SourceConfig) -> bool {
        true
    }
}

/// A config.json value: absent, `null`, or a value of type T. (Many fields mean something else
/// when absent than when null: Mistral's `sliding_window` is 4096 when absent, none when null.)
#[derive(Debug, Clone, Default, PartialEq)]
enum Field<T> {
    #[default]
    Absent,
    Null,
    Value(T),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Field<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Option::<T>::deserialize(d)?.map_or(Field::Null, Field::Value))
    }
}

impl<T> Field<T> {
    fn is_present(&self) -> bool {
        !matches!(self, Field::Absent)
    }
}

/// `bos_token_id` / `eos_token_id`: one id or a list (the first is kept).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
enum TokenIds {
    One(i64),
    Many(Vec<i64>),
}

/// The fields of config.json that ulysses reads; everything else lands in `other`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawConfig {
    model_type: Field<String>,
    architectures: Field<Vec<String>>,
    vocab_size: Field<i64>,
    hidden_size: Field<i64>,
    intermediate_size: Field<i64>,
    num_hidden_layers: Field<i64>,
    num_attention_heads: Field<i64>,
    num_key_value_heads: Field<i64>,
    head_dim: Field<i64>,
    hidden_act: Field<String>,
    rms_norm_eps: Field<f64>,
    rope_theta: Field<f64>,
    /// transformers 4.x writes `rope_scaling`, 5.x `rope_parameters`; 5.x reads the first that
    /// is a non-empty object.
    rope_scaling: Field<RawRope>,
    rope_parameters: Field<RawRope>,
    partial_rotary_factor: Field<f64>,
    max_position_embeddings: Field<i64>,
    tie_word_embeddings: Field<bool>,
    attention_bias: Field<bool>,
    mlp_bias: Field<bool>,
    attention_dropout: Field<f64>,
    sliding_window: Field<i64>,
    use_sliding_window: Field<bool>,
    max_window_layers: Field<i64>,
    layer_types: Field<Vec<String>>,
    bos_token_id: Field<TokenIds>,
    eos_token_id: Field<TokenIds>,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

/// `rope_scaling` / `rope_parameters`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawRope {
    rope_type: Field<String>,
    /// The 4.x name of `rope_type`.
    #[serde(rename = "type")]
    legacy_type: Field<String>,
    rope_theta: Field<f64>,
    partial_rotary_factor: Field<f64>,
    factor: Field<f64>,
    low_freq_factor: Field<f64>,
    high_freq_factor: Field<f64>,
    original_max_position_embeddings: Field<i64>,
    attention_factor: Field<f64>,
    beta_fast: Field<f64>,
    beta_slow: Field<f64>,
    mscale: Field<f64>,
    mscale_all_dim: Field<f64>,
    truncate: Field<bool>,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

impl RawRope {
    /// `{}`, which transformers treats as absent.
    fn is_empty(&self) -> bool {
        self.present().is_empty()
            && !self.rope_type.is_present()
            && !self.legacy_type.is_present()
            && self.other.is_empty()
    }

    /// The keys present, for messages about the ones a rope type does not take.
    fn present(&self) -> Vec<&'static str> {
        let fields: [(&'static str, bool); 12] = [
            ("factor", self.factor.is_present()),
            ("low_freq_factor", self.low_freq_factor.is_present()),
            ("high_freq_factor", self.high_freq_factor.is_present()),
            ("original_max_position_embeddings", self.original_max_position_embeddings.is_present()),
            ("attention_factor", self.attention_factor.is_present()),
            ("beta_fast", self.beta_fast.is_present()),
            ("beta_slow", self.beta_slow.is_present()),
            ("mscale", self.mscale.is_present()),
            ("mscale_all_dim", self.mscale_all_dim.is_present()),
            ("truncate", self.truncate.is_present()),
            ("rope_theta", self.rope_theta.is_present()),
            ("partial_rotary_factor", self.partial_rotary_factor.is_present()),
        ];
        fields.into_iter().filter(|(_, p)| *p).map(|(n, _)| n).collect()
    }
}

/// Fields of a dense model that define experts: a mixture-of-experts config under a dense
/// model_type is refused rather than trained as the dense model it is not.
const MOE_FIELDS: &[&str] = &[
    "num_experts",
    "num_local_experts",
    "n_routed_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "n_shared_experts",
];

/// Fields every config.json may carry that change nothing in training (transformers'
/// bookkeeping, generation and inference settings, task heads we do not build).
const HARMLESS: &[&str] = &[
    "transformers_version",
    "torch_dtype",
    "dtype",
    "use_cache",
    "initializer_range",
    "pad_token_id",
    "_name_or_path",
    "name_or_path",
    "pretraining_tp",
    "return_dict",
    "output_hidden_states",
    "output_attentions",
    "torchscript",
    "use_bfloat16",
    "tie_encoder_decoder",
    "is_encoder_decoder",
    "is_decoder",
    "add_cross_attention",
    "chunk_size_feed_forward",
    "id2label",
    "label2id",
    "problem_type",
    "tokenizer_class",
    "task_specific_params",
    "finetuning_task",
    "_attn_implementation",
    "attn_implementation",
];

/// Rope types transformers has that ulysses does not implement, named in the refusal.
const SUPPORTED_ROPE: &str = "\"default\", \"linear\", \"llama3\", \"yarn\"";

/// Collects the problems of one config.json.
#[derive(Default)]
struct Problems(Vec<FieldProblem>);

impl Problems {
    fn add(&mut self, field: &str, problem: impl Into<String>) {
        self.0.push(FieldProblem { field: field.to_string(), problem: problem.into() });
    }

    /// A required positive integer.
    fn dim(&mut self, field: &str, v: &Field<i64>) -> i64 {
        match v {
            Field::Value(n) if *n > 0 => *n,
            Field::Value(n) => {
                self.add(field, format!("is {n}; it must be a positive integer"));
                1
            }
            Field::Absent => {
                self.add(field, "is missing; every model config must give it");
                1
            }
            Field::Null => {
                self.add(field, "is null; it must be a positive integer");
                1
            }
        }
    }

    /// An optional value: `default` when absent, refused when null.
    fn or_default<T: Clone>(&mut self, field: &str, v: &Field<T>, default: T) -> T {
        match v {
            Field::Value(x) => x.clone(),
            Field::Absent => default,
            Field::Null => {
                self.add(field, "is null; give a value or leave the field out");
                default
            }
        }
    }
}

/// The family's transformers defaults for fields that may be absent.
struct Defaults {
    num_key_value_heads: Option<i64>,
    max_position_embeddings: i64,
    /// None: `hidden_size / num_attention_heads`.
    head_dim: Option<i64>,
}

fn defaults(family: Family) -> Defaults {
    match family {
        Family::Llama => Defaults { num_key_value_heads: None, max_position_embeddings: 2048, head_dim: None },
        Family::Qwen3 => {
            Defaults { num_key_value_heads: Some(32), max_position_embeddings: 32768, head_dim: Some(128) }
        }
        Family::Qwen2 => Defaults { num_key_value_heads: Some(32), max_position_embeddings: 32768, head_dim: None },
        Family::Mistral => Defaults { num_key_value_heads: Some(8), max_position_embeddings: 131072, head_dim: None },
    }
}

/// Reads config.json `v`: the spec, or every problem found.
pub(super) fn read(v: &Value) -> Result<ModelSpec, Vec<FieldProblem>> {
    let raw: RawConfig = serde_path_to_error::deserialize(v).map_err(|e| {
        let field = e.path().to_string();
        vec![FieldProblem { field, problem: format!("has the wrong type: {}", e.inner()) }]
    })?;
    let mut p = Problems::default();
    let Some(family) = family(&raw, &mut p) else {
        return Err(p.0);
    };
    let d = defaults(family);
    let mut ignored = Vec::new();

    let hidden_size = p.dim("hidden_size", &raw.hidden_size);
    let num_attention_heads = p.dim("num_attention_heads", &raw.num_attention_heads);
    let num_key_value_heads = match (&raw.num_key_value_heads, d.num_key_value_heads) {
        (Field::Value(_), _) => p.dim("num_key_value_heads", &raw.num_key_value_heads),
        (Field::Absent, Some(n)) => n,
        (Field::Absent, None) | (Field::Null, _) => num_attention_heads,
    };
    let head_dim = match (&raw.head_dim, family) {
        (Field::Value(_), _) => p.dim("head_dim", &raw.head_dim),
        (Field::Null, Family::Qwen3 | Family::Qwen2) => {
            p.add("head_dim", "is null; a Qwen config needs a head_dim (or none, for the default)");
            1
        }
        (Field::Absent, _) if d.head_dim.is_some() => d.head_dim.unwrap_or(1),
        _ => {
            if hidden_size % num_attention_heads != 0 {
                p.add(
                    "head_dim",
                    format!(
                        "is not given and hidden_size = {hidden_size} is not a multiple of num_attention_heads = \
                         {num_attention_heads}; give head_dim"
                    ),
                );
            }
            hidden_size / num_attention_heads
        }
    };

    match p.or_default("hidden_act", &raw.hidden_act, "silu".to_string()).as_str() {
        "silu" => {}
        other => p.add(
            "hidden_act",
            format!("is \"{other}\"; the SwiGLU MLP of these families is implemented with \"silu\" only"),
        ),
    }
    let rms_norm_eps = p.or_default("rms_norm_eps", &raw.rms_norm_eps, 1e-6);
    if !(rms_norm_eps > 0.0) {
        p.add("rms_norm_eps", format!("is {rms_norm_eps}; it must be positive"));
    }
    let max_position_embeddings =
        p.or_default("max_position_embeddings", &raw.max_position_embeddings, d.max_position_embeddings);
    let (rope_theta, rope_scaling) = rope(&raw, max_position_embeddings, &mut p);

    let attention_bias = match family {
        Family::Llama | Family::Qwen3 => p.or_default("attention_bias", &raw.attention_bias, false),
        Family::Qwen2 | Family::Mistral => {
            if raw.attention_bias.is_present() {
                ignored.push("attention_bias".to_string());
            }
            false
        }
    };
    match (family, &raw.mlp_bias) {
        (Family::Llama, Field::Value(true)) => {
            p.add("mlp_bias", "is true; ulysses implements the SwiGLU MLP without biases (as every Llama release)")
        }
        (Family::Llama, Field::Null) => p.add("mlp_bias", "is null; give true or false"),
        (Family::Llama, _) => {}
        (_, f) if f.is_present() => ignored.push("mlp_bias".to_string()),
        _ => {}
    }
    let dropout = p.or_default("attention_dropout", &raw.attention_dropout, 0.0);
    if dropout != 0.0 {
        p.add("attention_dropout", format!("is {dropout}; training with attention dropout is not supported (use 0.0)"));
    }
    let num_hidden_layers = p.dim("num_hidden_layers", &raw.num_hidden_layers);
    let sliding_window = sliding_window(&raw, family, num_hidden_layers, &mut p, &mut ignored);
    for (field, value) in &raw.other {
        let empty = matches!(value, Value::Null | Value::Bool(false)) || value.as_i64() == Some(0);
        if MOE_FIELDS.contains(&field.as_str()) && !empty {
            p.add(field, format!("is {value}: a mixture-of-experts model; ulysses trains dense models only"));
        } else if field == "quantization_config" {
            p.add(field, "is set: a quantized checkpoint; train from the unquantized weights (bf16 or fp32)");
        } else if !(HARMLESS.contains(&field.as_str()) || MOE_FIELDS.contains(&field.as_str()))
            // Read by `rope` when the rope dict lacks it, as transformers does.
            && field != "original_max_position_embeddings"
        {
            ignored.push(field.clone());
        }
    }
    let token = |t: &Field<TokenIds>| match t {
        Field::Value(TokenIds::One(id)) => Some(*id),
        Field::Value(TokenIds::Many(ids)) => ids.first().copied(),
        Field::Absent | Field::Null => None,
    };
    let spec = ModelSpec {
        family,
        vocab_size: p.dim("vocab_size", &raw.vocab_size),
        hidden_size,
        intermediate_size: p.dim("intermediate_size", &raw.intermediate_size),
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        rms_norm_eps,
        rope_theta,
        rope_scaling,
        max_position_embeddings,
        tie_word_embeddings: p.or_default("tie_word_embeddings", &raw.tie_word_embeddings, false),
        qkv_bias: attention_bias || family == Family::Qwen2,
        o_bias: attention_bias,
        qk_norm: family == Family::Qwen3,
        sliding_window,
        bos_token_id: token(&raw.bos_token_id),
        eos_token_id: token(&raw.eos_token_id),
        source: Source { json: v.as_object().map(|m| Arc::new(m.clone())), ignored },
    };
    if p.0.is_empty() {
        Ok(spec)
    } else {
        Err(p.0)
    }
}

/// The family from `model_type` and `architectures` (they must agree when both are given).
fn family(raw: &RawConfig, p: &mut Problems) -> Option<Family> {
    let supported = Family::ALL.map(|f| format!("\"{}\"", f.model_type())).join(", ");
    let from_type = match &raw.model_type {
        Field::Value(t) => match Family::ALL.into_iter().find(|f| f.model_type() == t) {
            Some(f) => Some(f),
            None => {
                let moe = ["mixtral", "qwen2_moe", "qwen3_moe"].contains(&t.as_str());
                let what = if moe { " (a mixture-of-experts model)" } else { "" };
                p.add("model_type", format!("is \"{t}\"{what}; supported: {supported}"));
                return None;
            }
        },
        Field::Null | Field::Absent => None,
    };
    let archs = match &raw.architectures {
        Field::Value(a) => a.clone(),
        _ => Vec::new(),
    };
    let from_arch = archs.first().and_then(|a| Family::ALL.into_iter().find(|f| f.architecture() == a));
    let family = from_type.or(from_arch);
    let Some(family) = family else {
        match archs.first() {
            Some(a) => p.add(
                "architectures",
                format!("is [\"{a}\"] and model_type is missing; supported: {supported} (model_type)"),
            ),
            None => p.add("model_type", format!("is missing; set it to one of {supported}")),
        }
        return None;
    };
    if let Some(a) = archs.iter().find(|a| *a != family.architecture()) {
        p.add(
            "architectures",
            format!(
                "names \"{a}\" but model_type \"{}\" is loaded by \"{}\"",
                family.model_type(),
                family.architecture()
            ),
        );
        return None;
    }
    Some(family)
}

/// rope_theta and the rope scaling, resolved as transformers 5 does (`convert_rope_params_to_dict`,
/// `standardize_rope_params`, the `_compute_*_parameters` functions).
fn rope(raw: &RawConfig, max_position_embeddings: i64, p: &mut Problems) -> (f64, Option<RopeScaling>) {
    let (field, dict) = match (&raw.rope_scaling, &raw.rope_parameters) {
        (Field::Value(r), _) if !r.is_empty() => ("rope_scaling", Some(r)),
        (_, Field::Value(r)) => ("rope_parameters", Some(r)),
        _ => ("rope_parameters", None),
    };
    let key = |k: &str| format!("{field}.{k}");
    let top_theta = p.or_default("rope_theta", &raw.rope_theta, 10000.0);
    let theta = match dict {
        Some(r) => p.or_default(&key("rope_theta"), &r.rope_theta, top_theta),
        None => top_theta,
    };
    if !(theta > 0.0) {
        p.add("rope_theta", format!("is {theta}; it must be positive"));
    }
    let partial = match dict.map(|r| &r.partial_rotary_factor) {
        Some(f @ Field::Value(_)) => p.or_default(&key("partial_rotary_factor"), f, 1.0),
        _ => p.or_default("partial_rotary_factor", &raw.partial_rotary_factor, 1.0),
    };
    if partial != 1.0 {
        p.add("partial_rotary_factor", format!("is {partial}; ulysses rotates the whole head (1.0) only"));
    }
    let Some(r) = dict else {
        return (theta, None);
    };
    let kind = match (&r.rope_type, &r.legacy_type) {
        (Field::Value(a), Field::Value(b)) if a != b => {
            p.add(&key("type"), format!("is \"{b}\" but {field}.rope_type is \"{a}\"; keep one"));
            return (theta, None);
        }
        (Field::Value(t), _) | (_, Field::Value(t)) => t.clone(),
        _ => "default".to_string(),
    };
    let allowed: &[&str] = match kind.as_str() {
        "default" => &[],
        "linear" => &["factor"],
        "llama3" => &["factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"],
        "yarn" => &[
            "factor",
            "original_max_position_embeddings",
            "attention_factor",
            "beta_fast",
            "beta_slow",
            "mscale",
            "mscale_all_dim",
            "truncate",
        ],
        other => {
            p.add(&key("rope_type"), format!("is \"{other}\"; supported: {SUPPORTED_ROPE}"));
            return (theta, None);
        }
    };
    let extra: Vec<String> = r
        .present()
        .into_iter()
        .filter(|k| !allowed.contains(k) && !["rope_theta", "partial_rotary_factor"].contains(k))
        .map(str::to_string)
        .chain(r.other.keys().cloned())
        .collect();
    for k in &extra {
        let takes = if allowed.is_empty() { "no other keys".to_string() } else { allowed.join(", ") };
        p.add(&key(k), format!("is not a parameter of rope_type \"{kind}\" (which takes {takes})"));
    }
    let required = |p: &mut Problems, k: &str, v: &Field<f64>| match v {
        Field::Value(x) => *x,
        _ => {
            p.add(&key(k), format!("is missing; rope_type \"{kind}\" needs it"));
            1.0
        }
    };
    // transformers takes a missing original length from the top level, else max_position_embeddings.
    let original = |p: &mut Problems| {
        let top = raw.other.get("original_max_position_embeddings").and_then(Value::as_i64);
        p.or_default(
            &key("original_max_position_embeddings"),
            &r.original_max_position_embeddings,
            top.unwrap_or(max_position_embeddings),
        )
    };
    let scaling = match kind.as_str() {
        "default" => None,
        "linear" => Some(RopeScaling::Linear { factor: required(p, "factor", &r.factor) }),
        "llama3" => Some(RopeScaling::Llama3(Llama3RopeScaling {
            factor: required(p, "factor", &r.factor),
            low_freq_factor: required(p, "low_freq_factor", &r.low_freq_factor),
            high_freq_factor: required(p, "high_freq_factor", &r.high_freq_factor),
            original_max_position_embeddings: original(p),
        })),
        _ => Some(RopeScaling::Yarn(yarn(r, original(p), max_position_embeddings, p, &key))),
    };
    if let Some(RopeScaling::Linear { factor } | RopeScaling::Llama3(Llama3RopeScaling { factor, .. })) = &scaling {
        if !(*factor > 0.0) {
            p.add(&key("factor"), format!("is {factor}; it must be positive"));
        }
    }
    (theta, scaling)
}

/// YaRN's parameters with transformers' defaults (`_compute_yarn_parameters`).
fn yarn(r: &RawRope, original: i64, max_pos: i64, p: &mut Problems, key: &dyn Fn(&str) -> String) -> YarnRopeScaling {
    // A null factor means "the context extension": max_position_embeddings / original.
    let factor = match r.factor {
        Field::Value(f) => f,
        Field::Null => max_pos as f64 / original as f64,
        Field::Absent => {
            p.add(&key("factor"), "is missing; rope_type \"yarn\" needs it");
            1.0
        }
    };
    if !(factor > 0.0) {
        p.add(&key("factor"), format!("is {factor}; it must be positive"));
    }
    let mscale_of = |scale: f64, m: f64| if scale <= 1.0 { 1.0 } else { 0.1 * m * scale.ln() + 1.0 };
    let (mscale, mscale_all_dim) =
        (p.or_default(&key("mscale"), &r.mscale, 0.0), p.or_default(&key("mscale_all_dim"), &r.mscale_all_dim, 0.0));
    let derived = if mscale != 0.0 && mscale_all_dim != 0.0 {
        mscale_of(factor, mscale) / mscale_of(factor, mscale_all_dim)
    } else {
        mscale_of(factor, 1.0)
    };
    let nonzero_or = |p: &mut Problems, k: &str, v: &Field<f64>, d: f64| {
        let x = p.or_default(&key(k), v, d);
        // transformers writes `beta_fast or 32`: 0 means the default too.
        if x == 0.0 {
            d
        } else {
            x
        }
    };
    YarnRopeScaling {
        factor,
        original_max_position_embeddings: original,
        attention_factor: p.or_default(&key("attention_factor"), &r.attention_factor, derived),
        beta_fast: nonzero_or(p, "beta_fast", &r.beta_fast, 32.0),
        beta_slow: nonzero_or(p, "beta_slow", &r.beta_slow, 1.0),
        truncate: p.or_default(&key("truncate"), &r.truncate, true),
    }
}

/// The window of the layers that have one, as the family's transformers class decides it.
fn sliding_window(
    raw: &RawConfig,
    family: Family,
    layers: i64,
    p: &mut Problems,
    ignored: &mut Vec<String>,
) -> Option<i64> {
    let window = |p: &mut Problems, absent: Option<i64>| match raw.sliding_window {
        Field::Value(w) if w > 0 => Some(w),
        Field::Value(w) => {
            p.add("sliding_window", format!("is {w}; it must be a positive number of tokens or null"));
            None
        }
        Field::Null => None,
        Field::Absent => absent,
    };
    let qwen_fields = [
        ("use_sliding_window", raw.use_sliding_window.is_present()),
        ("max_window_layers", raw.max_window_layers.is_present()),
        ("layer_types", raw.layer_types.is_present()),
    ];
    match family {
        Family::Llama => {
            let all = qwen_fields.into_iter().chain([("sliding_window", raw.sliding_window.is_present())]);
            ignored.extend(all.filter(|(_, p)| *p).map(|(n, _)| n.to_string()));
            None
        }
        // MistralAttention applies `sliding_window` in every layer (4096 when absent).
        Family::Mistral => {
            ignored.extend(qwen_fields.iter().filter(|(_, p)| *p).map(|(n, _)| n.to_string()));
            window(p, Some(4096))
        }
        // Qwen: a window only with use_sliding_window, in the layers layer_types marks (by
        // default those from max_window_layers on).
        Family::Qwen3 | Family::Qwen2 => {
            let w = window(p, Some(4096));
            if !p.or_default("use_sliding_window", &raw.use_sliding_window, false) {
                return None;
            }
            let sliding_layers = match &raw.layer_types {
                Field::Value(types) => {
                    if types.len() as i64 != layers {
                        p.add("layer_types", format!("has {} entries for num_hidden_layers = {layers}", types.len()));
                    }
                    for t in types.iter().filter(|t| !["full_attention", "sliding_attention"].contains(&t.as_str())) {
                        p.add(
                            "layer_types",
                            format!("has \"{t}\"; supported: \"full_attention\", \"sliding_attention\""),
                        );
                    }
                    types.iter().filter(|t| *t == "sliding_attention").count() as i64
                }
                _ => layers - p.or_default("max_window_layers", &raw.max_window_layers, 28).min(layers),
            };
            w.filter(|_| sliding_layers > 0)
        }
    }
}

/// config.json for a spec that was not read from one (a preset), as transformers writes the
/// family's: what its class reads, nothing else.
pub(super) fn write(s: &ModelSpec) -> Value {
    let mut rope = json!({ "rope_type": "default", "rope_theta": s.rope_theta });
    match &s.rope_scaling {
        None => {}
        Some(RopeScaling::Linear { factor }) => {
            rope = json!({ "rope_type": "linear", "rope_theta": s.rope_theta, "factor": factor });
        }
        Some(RopeScaling::Llama3(l)) => {
            rope = json!({
                "rope_type": "llama3",
                "rope_theta": s.rope_theta,
                "factor": l.factor,
                "low_freq_factor": l.low_freq_factor,
                "high_freq_factor": l.high_freq_factor,
                "original_max_position_embeddings": l.original_max_position_embeddings,
            });
        }
        Some(RopeScaling::Yarn(y)) => {
            rope = json!({
                "rope_type": "yarn",
                "rope_theta": s.rope_theta,
                "factor": y.factor,
                "original_max_position_embeddings": y.original_max_position_embeddings,
                "attention_factor": y.attention_factor,
                "beta_fast": y.beta_fast,
                "beta_slow": y.beta_slow,
                "truncate": y.truncate,
            });
        }
    }
    let mut config = json!({
        "architectures": [s.family.architecture()],
        "model_type": s.family.model_type(),
        "vocab_size": s.vocab_size,
        "hidden_size": s.hidden_size,
        "intermediate_size": s.intermediate_size,
        "num_hidden_layers": s.num_hidden_layers,
        "num_attention_heads": s.num_attention_heads,
        "num_key_value_heads": s.num_key_value_heads,
        "head_dim": s.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": s.rms_norm_eps,
        // 4.x reads rope_theta and rope_scaling, 5.x rope_parameters.
        "rope_theta": s.rope_theta,
        "rope_scaling": if s.rope_scaling.is_some() { rope.clone() } else { Value::Null },
        "rope_parameters": rope,
        "max_position_embeddings": s.max_position_embeddings,
        "tie_word_embeddings": s.tie_word_embeddings,
        "attention_dropout": 0.0,
        "bos_token_id": s.bos_token_id,
        "eos_token_id": s.eos_token_id,
        "torch_dtype": "float32",
    });
    let extra = match s.family {
        Family::Llama => json!({ "attention_bias": s.qkv_bias, "mlp_bias": false }),
        // Every layer gets the window (max_window_layers = 0): a spec records one window.
        Family::Qwen3 | Family::Qwen2 => json!({
            "use_sliding_window": s.sliding_window.is_some(),
            "sliding_window": s.sliding_window,
            "max_window_layers": 0,
        }),
        Family::Mistral => json!({ "sliding_window": s.sliding_window }),
    };
    if let (Value::Object(c), Value::Object(e)) = (&mut config, extra) {
        c.extend(e);
        if s.family == Family::Qwen3 {
            c.insert("attention_bias".into(), s.qkv_bias.into());
        }
    }
    config
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::spec::Preset;

    fn problems(v: Value) -> Vec<String> {
        read(&v).expect_err("should be refused").iter().map(|p| p.to_string()).collect()
    }

    fn qwen3() -> Value {
        json!({ "model_type": "qwen3", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 96,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24,
                "rope_theta": 1e6 })
    }

    #[test]
    fn presets_round_trip_through_their_config_json() {
        for preset in Preset::ALL {
            let spec = ModelSpec::preset(preset);
            let back = read(&write(&spec)).unwrap_or_else(|p| panic!("{preset}: {p:?}"));
            assert_eq!(back, spec, "{preset}");
            assert!(back.source.ignored.is_empty(), "{preset}: {:?}", back.source.ignored);
        }
    }

    #[test]
    fn absent_fields_take_the_family_defaults_of_transformers() {
        let s = read(&qwen3()).unwrap();
        assert_eq!((s.family, s.head_dim, s.qk_norm, s.qkv_bias), (Family::Qwen3, 24, true, false));
        let mut v = qwen3();
        v.as_object_mut().unwrap().remove("head_dim");
        v.as_object_mut().unwrap().remove("num_key_value_heads");
        let s = read(&v).unwrap();
        assert_eq!((s.head_dim, s.num_key_value_heads, s.max_position_embeddings), (128, 32, 32768));
        v["model_type"] = "mistral".into();
        let s = read(&v).unwrap();
        assert_eq!((s.head_dim, s.num_key_value_heads, s.sliding_window), (16, 8, Some(4096)));
        v["sliding_window"] = Value::Null;
        assert_eq!(read(&v).unwrap().sliding_window, None);
        v["model_type"] = "qwen2".into();
        let s = read(&v).unwrap();
        assert!(s.qkv_bias && !s.o_bias && !s.qk_norm);
        assert_eq!(s.sliding_window, None, "Qwen slides only with use_sliding_window");
    }

    #[test]
    fn qwen_windows_follow_use_sliding_window_and_the_layer_types() {
        let mut v = qwen3();
        v["use_sliding_window"] = true.into();
        v["sliding_window"] = 128.into();
        assert_eq!(read(&v).unwrap().sliding_window, None, "max_window_layers 28 >= 2 layers: none slides");
        v["max_window_layers"] = 1.into();
        assert_eq!(read(&v).unwrap().sliding_window, Some(128));
        v["layer_types"] = json!(["full_attention", "full_attention"]);
        assert_eq!(read(&v).unwrap().sliding_window, None);
        v["layer_types"] = json!(["full_attention", "chunked_attention"]);
        assert!(problems(v)[0].contains("chunked_attention"));
    }

    #[test]
    fn rope_types_resolve_as_transformers_does() {
        let mut v = qwen3();
        v["rope_scaling"] = json!({ "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32 });
        let Some(RopeScaling::Yarn(y)) = read(&v).unwrap().rope_scaling else { panic!("yarn") };
        assert_eq!((y.beta_fast, y.beta_slow, y.truncate), (32.0, 1.0, true));
        assert!((y.attention_factor - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-15);
        v["rope_scaling"] = json!({ "rope_type": "yarn", "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 1.0 });
        let Some(RopeScaling::Yarn(y)) = read(&v).unwrap().rope_scaling else { panic!("yarn") };
        assert_eq!((y.attention_factor, y.original_max_position_embeddings), (1.0, 32768));
        // rope_scaling wins over rope_parameters when it is a non-empty object (transformers 5).
        v["rope_scaling"] = Value::Null;
        v["rope_parameters"] = json!({ "rope_type": "linear", "factor": 2.0, "rope_theta": 5e5 });
        let s = read(&v).unwrap();
        assert_eq!((s.rope_theta, s.rope_scaling), (5e5, Some(RopeScaling::Linear { factor: 2.0 })));
    }

    #[test]
    fn every_field_that_changes_the_computation_is_honoured_or_refused() {
        let with = |k: &str, x: Value| {
            let mut v = qwen3();
            v[k] = x;
            problems(v).join("\n")
        };
        let p = with("hidden_act", "gelu".into());
        assert!(p.contains("`hidden_act` is \"gelu\"") && p.contains("\"silu\""), "{p}");
        let p = with("model_type", "gemma2".into());
        assert!(p.contains("\"gemma2\"") && p.contains("\"qwen3\""), "{p}");
        let p = with("model_type", "qwen3_moe".into());
        assert!(p.contains("mixture-of-experts"), "{p}");
        let p = with("num_experts", 8.into());
        assert!(p.contains("`num_experts` is 8") && p.contains("dense"), "{p}");
        let p = with("rope_scaling", json!({ "rope_type": "dynamic", "factor": 2.0 }));
        assert!(p.contains("rope_scaling.rope_type") && p.contains("\"yarn\""), "{p}");
        let p = with("rope_scaling", json!({ "rope_type": "linear", "factor": 2.0, "low_freq_factor": 1.0 }));
        assert!(p.contains("rope_scaling.low_freq_factor") && p.contains("takes factor"), "{p}");
        let p = with("attention_dropout", 0.1.into());
        assert!(p.contains("attention_dropout"), "{p}");
        let p = with("partial_rotary_factor", 0.5.into());
        assert!(p.contains("partial_rotary_factor"), "{p}");
        let p = with("architectures", json!(["LlamaForCausalLM"]));
        assert!(p.contains("\"LlamaForCausalLM\"") && p.contains("Qwen3ForCausalLM"), "{p}");
        let p = with("hidden_size", "64".into());
        assert!(p.contains("`hidden_size` has the wrong type"), "{p}");
        let p = with("quantization_config", json!({ "bits": 4 }));
        assert!(p.contains("quantized"), "{p}");
        let mut v = qwen3();
        v["model_type"] = "llama".into();
        v["mlp_bias"] = true.into();
        assert!(problems(v).join("\n").contains("`mlp_bias` is true"));
    }

    #[test]
    fn missing_fields_and_model_type_are_refused_together() {
        let p = problems(json!({ "model_type": "llama", "hidden_size": 64 }));
        let joined = p.join("\n");
        for f in ["num_attention_heads", "vocab_size", "intermediate_size", "num_hidden_layers"] {
            assert!(joined.contains(&format!("`{f}` is missing")), "{joined}");
        }
        let p = problems(json!({ "hidden_size": 64 }));
        assert!(p[0].contains("`model_type` is missing") && p[0].contains("\"mistral\""), "{p:?}");
        // architectures alone picks the family.
        let mut v = qwen3();
        v.as_object_mut().unwrap().remove("model_type");
        v["architectures"] = json!(["Qwen2ForCausalLM"]);
        assert_eq!(read(&v).unwrap().family, Family::Qwen2);
    }

    #[test]
    fn attention_bias_adds_q_k_v_and_o_biases_and_unread_fields_are_reported() {
        let mut v = qwen3();
        v["attention_bias"] = true.into();
        v["mlp_bias"] = false.into();
        v["my_custom_flag"] = 3.into();
        v["transformers_version"] = "5.17.0".into();
        let s = read(&v).unwrap();
        assert!(s.qkv_bias && s.o_bias);
        assert_eq!(s.source.ignored, vec!["mlp_bias", "my_custom_flag"]);
    }
}
