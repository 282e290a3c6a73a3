//! LoRA adapters as tensors: one projection's A and B with their math (the adapter's share of
//! the projection and its hand-written backward), and a decoder layer's set of them. Plain tensors
//! that `LayerWeights` holds, so the model's parameters need nothing else of LoRA (`lora` builds on
//! both: applying, initialising, reading, writing and merging adapters).
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
    /// The adapter's share of the projection of x [.., in]: `scale · (x·Aᵀ)·Bᵀ`, [.., out].
    pub fn delta(&self, x: &Tensor) -> Tensor {
        x.linear(&self.a, None::<Tensor>).linear(&self.b, None::<Tensor>) * self.scale
    }

    /// By hand, for a backward that has the projection's output gradient `g` [b, t, out] and its
    /// input `x` [b, t, in]: (x's extra gradient `scale·(g·B)·A`, A's gradient
    /// `scale·(g·B)ᵀ·x`, B's gradient `scale·gᵀ·(x·Aᵀ)`), all rank-r products.
    pub fn backward(&self, x: &Tensor, g: &Tensor) -> (Tensor, Tensor, Tensor) {
        let r = self.a.size()[0];
        let (out, inp) = (self.b.size()[0], self.a.size()[1]);
        // [b·t, out] @ [out, r] -> [b·t, r]
        let gb = g.reshape([-1, out]).mm(&self.b) * self.scale;
        let xf = x.reshape([-1, inp]);
        // [b·t, r] @ [r, in] -> [b, t, in]
        let grad_x = gb.mm(&self.a).view(x.size().as_slice());
        // [r, b·t] @ [b·t, in] -> [r, in]
        let grad_a = gb.tr().mm(&xf);
        // [out, b·t] @ [b·t, r] -> [out, r]
        let grad_b = g.reshape([-1, out]).tr().mm(&xf.mm(&self.a.tr())) * self.scale;
        debug_assert_eq!(grad_a.size(), [r, inp]);
        (grad_x, grad_a, grad_b)
    }
}

/// The adapters of one decoder layer, by target (none: the plain layer).
#[derive(Default)]
pub struct LayerAdapters(Vec<(LoraTarget, Adapter)>);

impl LayerAdapters {
    pub fn get(&self, target: LoraTarget) -> Option<&Adapter> {
        self.0.iter().find(|(t, _)| *t == target).map(|(_, a)| a)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
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
        LayerAdapters(out)
    }

    /// The tensors, in `layer_adapter_shapes` order.
    pub fn tensors(&self) -> Vec<&Tensor> {
        self.0.iter().flat_map(|(_, a)| [&a.a, &a.b]).collect()
    }
}

impl IntoIterator for LayerAdapters {
    type Item = (LoraTarget, Adapter);
    type IntoIter = std::vec::IntoIter<(LoraTarget, Adapter)>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}
