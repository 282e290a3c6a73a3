//! LoRA adapters as tensors: one projection's A and B with their math (the adapter's share of
//! the projection and its hand-written backward), and a decoder layer's set of them. Plain tensors
//! that `LayerWeights` holds, so the model's parameters need nothing else of LoRA (`lora` builds on
//! both: applying, initialising, reading, writing and merging adapters).
use super::dropout::LayerDropout;
use super::spec::adapter::layer_adapter_shapes;
use super::spec::ModelSpec;
use crate::config::lora::{LoraConfig, LoraTarget};
use tch::Tensor;

/// One projection's adapter: A [r, in], B [out, r], and the factor alpha / r.
pub struct Adapter {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
}

impl Adapter {
    /// The adapter's share of the projection of x [.., in]: `scale · (x·Aᵀ)·Bᵀ`, [.., out]; with
    /// `dropout`, of `dropout(x)` (`target`'s mask).
    pub fn delta(&self, target: LoraTarget, x: &Tensor, dropout: Option<&LayerDropout>) -> Tensor {
        let u = match dropout {
            None => x.linear(&self.a, None::<Tensor>),
            Some(d) => d.project(target, x, &self.a),
        };
        u.linear(&self.b, None::<Tensor>) * self.scale
    }

    /// By hand, for a backward that has the projection's output gradient `g` [b, t, out] and its
    /// input `x` [b, t, in]: (x's extra gradient `scale·(g·B)·A`, A's gradient
    /// `scale·(g·B)ᵀ·x`, B's gradient `scale·gᵀ·(x·Aᵀ)`), all rank-r products; with `dropout`,
    /// `dropout(x)` in place of x and x's gradient masked alike.
    pub fn backward(
        &self,
        target: LoraTarget,
        x: &Tensor,
        g: &Tensor,
        dropout: Option<&LayerDropout>,
    ) -> (Tensor, Tensor, Tensor) {
        let r = self.a.size()[0];
        let (out, inp) = (self.b.size()[0], self.a.size()[1]);
        // [b·t, out] @ [out, r] -> [b·t, r]
        let gb = g.reshape([-1, out]).mm(&self.b) * self.scale;
        let (grad_x, grad_a, u) = match dropout {
            Some(d) => d.backward(target, x, &self.a, &gb),
            None => {
                let xf = x.reshape([-1, inp]);
                // [b·t, r] @ [r, in] -> [b, t, in]; [r, b·t] @ [b·t, in] -> [r, in]; [b·t, r]
                (gb.mm(&self.a).view(x.size().as_slice()), gb.tr().mm(&xf), xf.mm(&self.a.tr()))
            }
        };
        // [out, b·t] @ [b·t, r] -> [out, r]
        let grad_b = g.reshape([-1, out]).tr().mm(&u) * self.scale;
        debug_assert_eq!(grad_a.size(), [r, inp]);
        (grad_x, grad_a, grad_b)
    }
}

/// The adapters of one decoder layer, by target (none: the plain layer), and in training with
/// `lora.dropout` > 0 the dropout of their inputs.
#[derive(Default)]
pub struct LayerAdapters {
    adapters: Vec<(LoraTarget, Adapter)>,
    pub dropout: Option<LayerDropout>,
}

impl LayerAdapters {
    pub fn get(&self, target: LoraTarget) -> Option<&Adapter> {
        self.adapters.iter().find(|(t, _)| *t == target).map(|(_, a)| a)
    }

    pub fn is_empty(&self) -> bool {
        self.adapters.is_empty()
    }

    /// `target`'s adapter share of the projection of x (`Adapter::delta`), None without one.
    pub fn delta(&self, target: LoraTarget, x: &Tensor) -> Option<Tensor> {
        self.get(target).map(|a| a.delta(target, x, self.dropout.as_ref()))
    }

    /// `target`'s `Adapter::backward` and its A and B, None without one.
    pub fn backward(&self, target: LoraTarget, x: &Tensor, g: &Tensor) -> Option<(Tensor, [(&Tensor, Tensor); 2])> {
        let a = self.get(target)?;
        let (grad_x, grad_a, grad_b) = a.backward(target, x, g, self.dropout.as_ref());
        Some((grad_x, [(&a.a, grad_a), (&a.b, grad_b)]))
    }

    /// The same adapters for the tokens `start..start + len` of the layer's (an MLP tile): their
    /// dropout narrowed to those tokens. None without dropout: the adapters themselves serve.
    pub fn tokens(&self, start: i64, len: i64) -> Option<LayerAdapters> {
        let dropout = self.dropout.as_ref()?.tokens(start, len);
        let adapters = self
            .adapters
            .iter()
            .map(|(t, a)| (*t, Adapter { a: a.a.shallow_clone(), b: a.b.shallow_clone(), scale: a.scale }))
            .collect();
        Some(LayerAdapters { adapters, dropout: Some(dropout) })
    }

    /// From one layer's adapter tensors in `layer_adapter_shapes` order (A then B per target).
    pub fn from_ordered(spec: &ModelSpec, lora: &LoraConfig, tensors: Vec<Tensor>) -> LayerAdapters {
        let names = layer_adapter_shapes(spec, lora);
        assert_eq!(names.len(), tensors.len(), "one tensor per adapter shape");
        let mut it = tensors.into_iter();
        let mut out = Vec::new();
        for pair in names.chunks(2) {
            let module = pair[0].0.trim_end_matches(".lora_A.weight");
            let target = LoraTarget::ALL.into_iter().find(|t| t.module() == module).expect("a target's module");
            let (a, b) = (it.next().expect("A"), it.next().expect("B"));
            out.push((target, Adapter { a, b, scale: lora.scale() }));
        }
        LayerAdapters { adapters: out, dropout: None }
    }

    /// The tensors, in `layer_adapter_shapes` order.
    pub fn tensors(&self) -> Vec<&Tensor> {
        self.adapters.iter().flat_map(|(_, a)| [&a.a, &a.b]).collect()
    }
}

impl IntoIterator for LayerAdapters {
    type Item = (LoraTarget, Adapter);
    type IntoIter = std::vec::IntoIter<(LoraTarget, Adapter)>;

    fn into_iter(self) -> Self::IntoIter {
        self.adapters.into_iter()
    }
}
