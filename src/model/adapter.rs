//! LoRA adapters as tensors: one projection's A and B with their math (the adapter's share of
//! the projection and its hand-written backward), and a decoder layer's set of them. Plain tensors
//! that `LayerWeights` holds, so the model's parameters need nothing else of LoRA (`lora` builds on
//! both: applying, initialising, reading, writing and merging adapters).
use super::dropout::LayerDropout;
use super::spec::adapter::layer_adapter_shapes;
use super::spec::ModelSpec;
use crate::config::lora::{LoraConfig, LoraTarget};
use std::cell::RefCell;
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
    /// input `x` [b, t, in]: adds x's share `scale·(g·B)·A` into `grad_x` [b, t, in] and returns
    /// (A's gradient `scale·(g·B)ᵀ·x`, B's gradient `scale·gᵀ·(x·Aᵀ)`), all rank-r products;
    /// with `dropout`, `dropout(x)` in place of x and x's share masked alike.
    pub fn backward(
        &self,
        target: LoraTarget,
        x: &Tensor,
        g: &Tensor,
        dropout: Option<&LayerDropout>,
        grad_x: &mut Tensor,
    ) -> (Tensor, Tensor) {
        let r = self.a.size()[0];
        let (out, inp) = (self.b.size()[0], self.a.size()[1]);
        // [b·t, out] @ [out, r] -> [b·t, r]
        let gb = g.reshape([-1, out]).mm(&self.b) * self.scale;
        let (grad_a, u) = match dropout {
            Some(d) => d.backward(target, x, &self.a, &gb, grad_x),
            None => {
                let xf = x.reshape([-1, inp]);
                // [b·t, r] @ [r, in] -> [b, t, in]
                let _ = grad_x.g_add_(&gb.mm(&self.a).view(x.size().as_slice()));
                // [r, b·t] @ [b·t, in] -> [r, in]; [b·t, r]
                (gb.tr().mm(&xf), xf.mm(&self.a.tr()))
            }
        };
        // [out, b·t] @ [b·t, r] -> [out, r]
        let grad_b = g.reshape([-1, out]).tr().mm(&u) * self.scale;
        debug_assert_eq!(grad_a.size(), [r, inp]);
        (grad_a, grad_b)
    }
}

/// The adapters of one decoder layer, by target (none: the plain layer), and in training with
/// `lora.dropout` > 0 the dropout of their inputs.
#[derive(Default)]
pub struct LayerAdapters {
    adapters: Vec<(LoraTarget, Adapter)>,
    pub dropout: Option<LayerDropout>,
    /// Inside `deferring`: the dropped branches the graph being built holds as leaves.
    deferred: RefCell<Option<Vec<Deferred>>>,
}

/// A dropped adapter branch left out of a graph (`LayerAdapters::deferring`): its input and the
/// leaf `u = dropout(x)·Aᵀ` [b, t, r] that the graph starts from.
pub struct Deferred {
    target: LoraTarget,
    x: Tensor,
    u: Tensor,
}

impl LayerAdapters {
    pub fn get(&self, target: LoraTarget) -> Option<&Adapter> {
        self.adapters.iter().find(|(t, _)| *t == target).map(|(_, a)| a)
    }

    pub fn is_empty(&self) -> bool {
        self.adapters.is_empty()
    }

    /// `target`'s adapter share of the projection of x (`Adapter::delta`), None without one.
    /// Inside `deferring`, a dropped branch on an input with a graph enters the graph from the
    /// leaf `dropout(x)·Aᵀ`, drawn without one.
    pub fn delta(&self, target: LoraTarget, x: &Tensor) -> Option<Tensor> {
        let a = self.get(target)?;
        let mut deferred = self.deferred.borrow_mut();
        match (deferred.as_mut(), &self.dropout) {
            (Some(list), Some(d)) if x.requires_grad() => {
                let u = tch::no_grad(|| d.project(target, x, &a.a)).set_requires_grad(true);
                list.push(Deferred { target, x: x.detach(), u: u.shallow_clone() });
                Some(u.linear(&a.b, None::<Tensor>) * a.scale)
            }
            _ => Some(a.delta(target, x, self.dropout.as_ref())),
        }
    }

    /// `build`'s result with every dropped branch it projects left out of its graph: a graph over
    /// `dropout(x)·Aᵀ` would keep each mask tile and dropped input (3 bytes an input element in
    /// bf16) until its backward; here it starts from the leaf `dropout(x)·Aᵀ` (r values a token)
    /// and `settle` does the rest by hand after that backward, drawing the masks again. Without
    /// dropout, `build` as it is and nothing deferred.
    pub fn deferring<T>(&self, build: impl FnOnce() -> T) -> (T, Vec<Deferred>) {
        if self.dropout.is_none() {
            return (build(), Vec::new());
        }
        *self.deferred.borrow_mut() = Some(Vec::new());
        let out = build();
        let deferred = self.deferred.borrow_mut().take().expect("set above");
        (out, deferred)
    }

    /// After the backward of the graph `deferring` built: adds each deferred branch's share of its
    /// input's gradient into `grad_x` (the branches of one graph share an input: q, k and v; gate
    /// and up; o alone) one mask tile at a time, and pushes its A's gradient (B's came through
    /// the graph).
    pub fn settle<'a>(&'a self, deferred: Vec<Deferred>, grads: &mut Vec<(&'a Tensor, Tensor)>, grad_x: &mut Tensor) {
        let Some(d) = &self.dropout else { return };
        for Deferred { target, x, u } in deferred {
            let a = self.get(target).expect("a deferred target has an adapter");
            let gu = u.grad();
            let gu = if gu.defined() { gu } else { u.zeros_like() };
            let gu = gu.reshape([-1, u.size()[2]]);
            let (grad_a, _) = tch::no_grad(|| d.backward(target, &x, &a.a, &gu, grad_x));
            grads.push((&a.a, grad_a));
        }
    }

    /// `target`'s `Adapter::backward` (x's share added into `grad_x`): its A and B with their
    /// gradients, None without an adapter.
    pub fn backward(
        &self,
        target: LoraTarget,
        x: &Tensor,
        g: &Tensor,
        grad_x: &mut Tensor,
    ) -> Option<[(&Tensor, Tensor); 2]> {
        let a = self.get(target)?;
        let (grad_a, grad_b) = a.backward(target, x, g, self.dropout.as_ref(), grad_x);
        Some([(&a.a, grad_a), (&a.b, grad_b)])
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
        Some(LayerAdapters { adapters, dropout: Some(dropout), deferred: RefCell::new(None) })
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
        LayerAdapters { adapters: out, dropout: None, deferred: RefCell::new(None) }
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
