//! The MLP's elementwise work as one CUDA kernel each: the SwiGLU `silu(gate) * up` and its
//! backward over the `[tokens, intermediate]` tiles. Op by op, each is several passes over tensors
//! of that size (a kernel per operation, each reading its inputs and writing a temporary); fused,
//! one pass reads the inputs once and writes the outputs once.
//!
//! The kernels are CUDA C++ functors compiled at run time by libtorch's jiterator
//! (shim/elementwise.cpp): NVRTC compiles each once per process, so the build needs no nvcc. Each
//! rounds to the tensors' dtype where the op-by-op form writes a tensor (`storage_t` below), with
//! every product rounded alone (`__fmul_rn`: never contracted into a fused multiply-add), so the
//! results equal the op-by-op ones bit for bit: tests/fused_elementwise.rs checks it on a GPU.
//!
//! Each function here takes any tensors: on CUDA (bf16, fp16, fp32) it runs the fused kernel, else
//! the op-by-op form in `model` (the readable reference, and the CPU path).
use super::{check, ShimError};
use crate::model::llama;
use std::ffi::{c_char, c_int, CString};
use tch::{Kind, Tensor};
use torch_sys::C_tensor;

extern "C" {
    fn ulysses_jiterator(
        code: *const c_char,
        name: *const c_char,
        inputs: *const *const C_tensor,
        n_inputs: c_int,
        n_outputs: c_int,
        outputs: *mut *mut C_tensor,
    ) -> *mut c_char;
}

/// The functors. Jiterator calls the entry as `name<float>(inputs..., outputs...)` for bf16, fp16
/// and fp32 tensors alike (float is their compute type) and rounds each output to the tensors'
/// dtype as it stores it; `stored` rounds an intermediate result the same way. `ulysses_silu` and
/// the backward's expression are libtorch's silu and silu_backward kernels' (ActivationSiluKernel.cu)
/// as written there, so the compiler makes the same code of them.
const SOURCE: &str = r#"
float stored(float x) { return float(storage_t(x)); }

float ulysses_silu(float x) { return x / (1.0f + expf(-x)); }

// silu(gate) * up: gate.silu() written, then multiplied by up.
template <typename T> void swiglu(T gate, T up, T& act) {
  act = __fmul_rn(stored(ulysses_silu(gate)), up);
}

// (grad_act * up * silu'(gate), grad_act * silu(gate)): silu_backward(grad_act * up, gate) and
// grad_act * gate.silu(), each product written before it is used.
template <typename T> void swiglu_backward(T gate, T up, T grad_act, T& grad_gate, T& grad_up) {
  const float dy = stored(__fmul_rn(grad_act, up));
  const float x = gate;
  const float s = 1.0f / (1.0f + expf(-x));
  grad_gate = dy * s * (1.0f + x * (1.0f - s));
  grad_up = __fmul_rn(grad_act, stored(ulysses_silu(x)));
}
"#;

/// jiterator's name of a dtype the functors take, for `storage_t`; None: no fused kernel.
fn storage_type(kind: Kind) -> Option<&'static str> {
    match kind {
        Kind::BFloat16 => Some("at::BFloat16"),
        Kind::Half => Some("at::Half"),
        Kind::Float => Some("float"),
        _ => None,
    }
}

/// The code string jiterator compiles for tensors of `kind` (None: no fused kernel for it): the
/// functors after the dtype they round to. It is also jiterator's cache key: one compiled kernel
/// per dtype.
pub fn code(kind: Kind) -> Option<String> {
    storage_type(kind).map(|storage| format!("typedef {storage} storage_t;\n{SOURCE}"))
}

/// Whether `tensors` take the fused kernels: on CUDA, all in one dtype they are written for (mixed
/// dtypes would be promoted, and the functors round to the first one's).
fn fused(tensors: &[&Tensor]) -> bool {
    let kind = tensors[0].kind();
    storage_type(kind).is_some() && tensors.iter().all(|t| t.device().is_cuda() && t.kind() == kind)
}

/// Runs the functor `name` of `SOURCE` over `inputs` (broadcast together, one dtype, on CUDA):
/// N new tensors of the broadcast shape.
fn launch<const N: usize>(name: &str, inputs: &[&Tensor]) -> Result<[Tensor; N], ShimError> {
    let op = "fused elementwise kernel";
    let kind = inputs[0].kind();
    let code =
        code(kind).ok_or_else(|| ShimError { op, message: format!("{name}: no fused kernel for {kind:?} tensors") })?;
    // jiterator caches a compiled kernel by its code string and arity, not by the functor's name:
    // without the name in the string, two functors of one arity run the first one's kernel (a RoPE
    // inverse functor ran its forward one on an H200 on 2026-12-06).
    let code = CString::new(format!("{code}// functor: {name}\n")).expect("no NUL in the source");
    let name = CString::new(name).expect("no NUL in a kernel name");
    let handles: Vec<*const C_tensor> = inputs.iter().map(|t| t.as_ptr()).collect();
    let mut outs = [std::ptr::null_mut(); N];
    // SAFETY: live tch handles borrowed for the call and NUL-terminated strings; on success the
    // shim sets N new `at::Tensor*` that we own from here on (wrapped once each).
    check(op, unsafe {
        ulysses_jiterator(
            code.as_ptr(),
            name.as_ptr(),
            handles.as_ptr(),
            handles.len() as c_int,
            N as c_int,
            outs.as_mut_ptr(),
        )
    })?;
    Ok(outs.map(|p| unsafe { Tensor::from_ptr(p) }))
}

/// `silu(gate) * up`, gate's memory free to reuse: on CUDA one kernel into a new tensor (gate is
/// dropped on return; jiterator cannot write into an input), else in place in gate.
pub fn swiglu_into_gate(gate: Tensor, up: &Tensor) -> Result<Tensor, ShimError> {
    if fused(&[&gate, up]) {
        return swiglu(&gate, up);
    }
    Ok(llama::swiglu_in_place(gate, up))
}

/// `silu(gate) * up` into a new tensor.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor, ShimError> {
    if fused(&[gate, up]) {
        let [act] = launch("swiglu", &[gate, up])?;
        return Ok(act);
    }
    Ok(gate.silu() * up)
}

/// The gradients of the gate and up projections' outputs from the gradient of `silu(gate) * up`
/// (`llama::swiglu_backward`): reads three tensors and writes two, where the op-by-op form makes
/// four kernels and three temporaries.
pub fn swiglu_backward(gate: &Tensor, up: &Tensor, grad_act: &Tensor) -> Result<(Tensor, Tensor), ShimError> {
    if fused(&[gate, up, grad_act]) {
        let [grad_gate, grad_up] = launch("swiglu_backward", &[gate, up, grad_act])?;
        return Ok((grad_gate, grad_up));
    }
    Ok(llama::swiglu_backward(gate, up, grad_act))
}
