//! The fused elementwise CUDA kernels (`ffi::elementwise`: SwiGLU and its backward) against the
//! op-by-op forms they replace (`model::llama`), on a GPU at Llama-3.1-8B's sizes; one MLP tile's
//! backward as the step now runs it (`train::layer::mlp_tile_backward`: SwiGLU by hand) against
//! autograd through the MLP; and the log-sum-exp merge kernel of attention in query blocks
//! (`ffi::lse_merge`) against `parallel::ring::merge`. On the CPU these functions are the op-by-op
//! forms themselves (the equivalence tests cover them); what
//! a machine without a GPU can check is that the functors compile, with NVRTC as jiterator does.
use std::process::Command;
use std::time::Instant;
use tch::{Device, Kind, Tensor};
use ulysses::ffi::{autograd, elementwise};
use ulysses::model::llama::{self, LayerWeights};
use ulysses::model::spec::{ModelSpec, Preset};
use ulysses::train::layer::mlp_tile_backward;

const GPU: Device = Device::Cuda(0);

/// Each functor `ffi::elementwise` launches, with its numbers of inputs and outputs.
const ENTRIES: [&str; 2] = ["swiglu:2:1", "swiglu_backward:3:2"];

/// The PTX of kernel `name` in `ptx`: from its `.entry` to the end of its body.
fn kernel_ptx<'a>(ptx: &'a str, name: &str) -> &'a str {
    let start = ptx.find(&format!(".entry {name}_kernel(")).unwrap_or_else(|| panic!("no kernel {name} in the PTX"));
    let len = ptx[start..].find("\n}").expect("the kernel's body ends");
    &ptx[start..start + len]
}

/// On any machine: the functors compile with NVRTC as jiterator compiles and calls them
/// (tests/torch/nvrtc_compile.py), for bf16 and fp32 tensors, so an edit that breaks them fails
/// here rather than first on a GPU. The PTX shows the rounding the exactness rests on: in bf16 the
/// SwiGLU rounds silu's result to bf16 before the product, as libtorch's two kernels do, and
/// every product is rounded alone (`__fmul_rn`).
#[test]
fn functors_compile_with_nvrtc_as_jiterator_calls_them() {
    let dir = tempfile::tempdir().unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/torch/nvrtc_compile.py");
    for (kind, storage) in [(Kind::BFloat16, "at::BFloat16"), (Kind::Float, "float")] {
        let (code, ptx) = (dir.path().join("fused.cu"), dir.path().join("fused.ptx"));
        std::fs::write(&code, elementwise::code(kind).expect("a fused kernel for this dtype")).unwrap();
        let out = Command::new(env!("ULYSSES_PYTHON"))
            .arg(script)
            .arg(&code)
            .arg(storage)
            .arg(&ptx)
            .args(ENTRIES)
            .output()
            .expect("run the venv's python3");
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "the {kind:?} functors do not compile with NVRTC:\n{said}");
        let ptx = std::fs::read_to_string(&ptx).unwrap();
        for name in ENTRIES.map(|e| e.split(':').next().unwrap()) {
            let body = kernel_ptx(&ptx, name);
            assert!(body.contains("mul.rn.f32"), "{kind:?} {name}: no product rounded alone");
            if kind == Kind::BFloat16 && name == "swiglu" {
                assert!(body.contains("cvt.rn.bf16.f32"), "bf16 swiglu: silu's result is not rounded to bf16");
            }
        }
    }
    assert!(elementwise::code(Kind::Int64).is_none(), "int64 tensors take the op-by-op path");
}

/// Milliseconds per call of `f` (after one call that also compiles a fused kernel).
fn ms_per_call<T>(f: &dyn Fn() -> T) -> f64 {
    drop(f());
    tch::Cuda::synchronize(0);
    let reps = 5;
    let started = Instant::now();
    for _ in 0..reps {
        drop(f());
    }
    tch::Cuda::synchronize(0);
    started.elapsed().as_secs_f64() * 1e3 / reps as f64
}

/// How many elements differ and the largest difference, for a message.
fn mismatches(a: &Tensor, b: &Tensor) -> (i64, f64) {
    assert_eq!(a.size(), b.size(), "shapes differ");
    let (a, b) = (a.to_kind(Kind::Float), b.to_kind(Kind::Float));
    let count = a.ne_tensor(&b).sum(Kind::Int64).int64_value(&[]);
    (count, (&a - &b).abs().max().double_value(&[]))
}

/// Asserts `fused` equals `reference` bit for bit, naming `what`.
fn assert_equal(what: &str, fused: &Tensor, reference: &Tensor) {
    let (count, max) = mismatches(fused, reference);
    println!("{what}: {count} of {} elements differ (max {max:e})", fused.numel());
    assert_eq!(
        count, 0,
        "{what}: the fused kernel differs from the op-by-op form in {count} elements, by up to {max:e}"
    );
}

/// Times the op-by-op form and the fused kernel and prints both (figures, not asserted).
fn timed<T>(what: &str, op_by_op: &dyn Fn() -> T, fused: &dyn Fn() -> T) {
    let (before, after) = (ms_per_call(op_by_op), ms_per_call(fused));
    println!("{what}: op by op {before:.2} ms, fused {after:.2} ms ({:.2}x)", before / after);
}

/// SwiGLU forward and backward, fused against op by op, on `[rows, cols]` tiles of `kind`.
fn check_swiglu(kind: Kind, rows: i64, cols: i64, time: bool) {
    tch::manual_seed(5);
    let randn = |scale: f64| (Tensor::randn([rows, cols], (Kind::Float, GPU)) * scale).to_kind(kind);
    // A gate spread wide enough to reach silu's both tails.
    let (gate, up, grad_act) = (randn(4.0), randn(1.0), randn(1e-2));
    let name = format!("{kind:?} [{rows}, {cols}]");

    let reference = llama::swiglu_in_place(gate.copy(), &up);
    assert_equal(&format!("swiglu {name}"), &elementwise::swiglu(&gate, &up).unwrap(), &reference);
    assert_equal(
        &format!("swiglu into gate {name}"),
        &elementwise::swiglu_into_gate(gate.copy(), &up).unwrap(),
        &reference,
    );
    let (want_gate, want_up) = llama::swiglu_backward(&gate, &up, &grad_act);
    let (got_gate, got_up) = elementwise::swiglu_backward(&gate, &up, &grad_act).unwrap();
    assert_equal(&format!("swiglu backward, gate's gradient {name}"), &got_gate, &want_gate);
    assert_equal(&format!("swiglu backward, up's gradient {name}"), &got_up, &want_up);

    // The kept projections are views of [b, s, intermediate] buffers: with b = 2 a tile of tokens
    // is not contiguous (jiterator's strided path).
    let kept = |t: &Tensor| t.view([2, rows / 2, cols]).narrow(1, 1, rows / 4);
    let (g, u, ga) = (kept(&gate), kept(&up), kept(&grad_act));
    assert!(!g.is_contiguous());
    assert_equal(&format!("swiglu on strided views {name}"), &elementwise::swiglu(&g, &u).unwrap(), &(g.silu() * &u));
    let (want_gate, want_up) = llama::swiglu_backward(&g, &u, &ga);
    let (got_gate, got_up) = elementwise::swiglu_backward(&g, &u, &ga).unwrap();
    assert_equal(
        &format!("swiglu backward on strided views {name}"),
        &Tensor::cat(&[got_gate, got_up], 0),
        &Tensor::cat(&[want_gate, want_up], 0),
    );

    if time {
        timed(&format!("swiglu {name}"), &|| gate.silu() * &up, &|| elementwise::swiglu(&gate, &up).unwrap());
        timed(&format!("swiglu backward {name}"), &|| llama::swiglu_backward(&gate, &up, &grad_act), &|| {
            elementwise::swiglu_backward(&gate, &up, &grad_act).unwrap()
        });
    }
}

/// On a GPU (tests/gpu/run.sh PARTS=fused runs this binary from the bundle with `--ignored
/// gpu_`): every fused kernel equals its op-by-op form bit for bit, in bf16 at the step's sizes
/// (an MLP tile of 16384 tokens × 14336) and in fp32 at a smaller one;
/// each form's time printed (a figure, not asserted).
#[test]
#[ignore = "needs a CUDA GPU (tests/gpu/run.sh)"]
fn gpu_fused_kernels_equal_op_by_op() {
    assert!(tch::Cuda::is_available(), "this test needs a CUDA GPU");
    let spec = ModelSpec::preset(Preset::Llama31_8b);
    check_swiglu(Kind::BFloat16, 16384, spec.intermediate_size, true);
    check_swiglu(Kind::Float, 4096, spec.intermediate_size, false);
}

/// A layer of `spec` on `device` in `kind`, every tensor a leaf, scaled so activations are O(1).
fn layer(spec: &ModelSpec, device: Device, kind: Kind) -> LayerWeights {
    tch::manual_seed(7);
    let named = LayerWeights::shapes(spec)
        .into_iter()
        .map(|(name, shape)| {
            let t = Tensor::randn(shape.as_slice(), (Kind::Float, device));
            let t = if shape.len() == 1 { t * 0.1 + 1.0 } else { t / (shape[1] as f64).sqrt() };
            (name.to_string(), t.to_kind(kind).set_requires_grad(true))
        })
        .collect();
    LayerWeights::from_tensors(spec, named).expect("layer tensors")
}

/// Copies of the gradients a backward left, h's (with the residual's share) and the MLP weights',
/// which are then zeroed for the next backward.
fn mlp_grads(w: &LayerWeights, h: &Tensor, residual: Option<&Tensor>) -> Vec<(&'static str, Tensor)> {
    let grad_h = match residual {
        Some(g) => h.grad() + g,
        None => h.grad().copy(),
    };
    let grads = vec![
        ("h", grad_h),
        ("mlp norm", w.mlp_norm.grad().copy()),
        ("gate", w.w_gate.grad().copy()),
        ("up", w.w_up.grad().copy()),
        ("down", w.w_down.grad().copy()),
    ];
    for t in [h, &w.mlp_norm, &w.w_gate, &w.w_up, &w.w_down] {
        let _ = t.grad().zero_();
    }
    grads
}

/// One MLP tile of `tile` tokens backpropagated as the step does (`mlp_tile_backward`, the gate
/// and up projections recomputed, and kept) and by autograd through `llama::mlp_residual` (the
/// graph the step's MLP backward built before: norm, projections, silu and product): every
/// gradient (h's, the norm's, the three projections') within `tol` of its largest entry. Prints
/// the differences and, with `time`, each path's time per tile.
fn check_mlp_tile_backward(spec: &ModelSpec, device: Device, kind: Kind, tile: i64, tol: f64, time: bool) {
    let w = layer(spec, device, kind);
    tch::manual_seed(8);
    let h = Tensor::randn([1, tile, spec.hidden_size], (Kind::Float, device)).to_kind(kind).set_requires_grad(true);
    let g = (Tensor::randn([1, tile, spec.hidden_size], (Kind::Float, device)) * 1e-2).to_kind(kind);

    let autograd = || autograd::backward(&[(&llama::mlp_residual(spec, &w, &h), &g)]).unwrap();
    let by_hand = || mlp_tile_backward(spec, &w, &h, None, &g).unwrap();
    let kept = || {
        let (gate, up) = tch::no_grad(|| llama::mlp_projections(spec, &w, &h));
        mlp_tile_backward(spec, &w, &h, Some((gate, up)), &g).unwrap()
    };
    autograd();
    let want = mlp_grads(&w, &h, None);
    let paths: [(&str, &dyn Fn()); 2] = [("recomputed", &by_hand), ("kept", &kept)];
    for (path, run) in paths {
        run();
        for ((name, a), (_, b)) in want.iter().zip(mlp_grads(&w, &h, Some(&g)).iter()) {
            let (a, b) = (a.to_kind(Kind::Float), b.to_kind(Kind::Float));
            let scale = a.abs().max().double_value(&[]);
            let err = (&a - &b).abs().max().double_value(&[]) / scale;
            println!(
                "mlp tile backward {kind:?} ({path} projections), d {name}: {err:.2e} of the largest entry {scale:.3e}"
            );
            assert!(
                scale > 0.0 && err <= tol,
                "d {name} ({path} projections) differs from autograd's by {err:.2e} of its largest entry (tolerance {tol:e})"
            );
        }
    }
    if time {
        let (before, after) = (ms_per_call(&autograd), ms_per_call(&by_hand));
        println!(
            "mlp tile backward, {tile} tokens: autograd {before:.2} ms, by hand {after:.2} ms ({:.2}x)",
            before / after
        );
    }
}

/// On the CPU in fp32 (the op-by-op SwiGLU): the MLP tile's backward by hand equals autograd's
/// to rounding.
#[test]
fn mlp_tile_backward_equals_autograd_in_fp32() {
    check_mlp_tile_backward(&ModelSpec::preset(Preset::Tiny), Device::Cpu, Kind::Float, 37, 1e-5, false);
}

/// On a GPU: one MLP tile (16384 tokens) of Llama-3.1-8B in bf16 with the fused SwiGLU, within
/// 1e-2 of the largest entry: the same operations in bf16, but h's gradient is rounded once more
/// (the MLP's share rounded before the residual's is added), so the bound is loose (the largest
/// differences printed). Each path's time per tile printed.
#[test]
#[ignore = "needs a CUDA GPU (tests/gpu/run.sh)"]
fn gpu_mlp_tile_backward_equals_autograd_in_bf16() {
    assert!(tch::Cuda::is_available(), "this test needs a CUDA GPU");
    check_mlp_tile_backward(&ModelSpec::preset(Preset::Llama31_8b), GPU, Kind::BFloat16, 16384, 1e-2, true);
}

/// The log-sum-exp merge of attention in query blocks (`ffi::lse_merge`, one kernel) against
/// `parallel::ring::merge` (op by op in fp32, rounded once to bf16 after), on one 64K-token block
/// of Llama-3.1-8B's 32 heads of 128: the first output a strided view as the block's output in the
/// whole sequence's buffer is, a tenth of the rows' second part without keys (log-sum-exp −inf,
/// NaN output: it must add nothing). The merged output within one bf16 rounding (2⁻⁸ of its
/// largest entry; the same fp32 math, up to the order the compilers give it), the log-sum-exp
/// within 1e-5 absolute; times printed.
#[test]
#[ignore = "needs a CUDA GPU (tests/gpu/run.sh)"]
fn gpu_lse_merge_kernel_equals_ring_merge() {
    use ulysses::ffi::lse_merge;
    use ulysses::parallel::ring;
    assert!(tch::Cuda::is_available(), "this test needs a CUDA GPU");
    let gpu = Device::Cuda(0);
    let (seq, heads, d) = (65536, 32, 128);
    tch::manual_seed(3);
    // The block's rows of a [1, 2·seq, heads, d] buffer, as `blocks::forward_in_blocks` merges.
    let whole = Tensor::randn([1, 2 * seq, heads, d], (Kind::BFloat16, gpu));
    let a = whole.narrow(1, seq, seq);
    let b = Tensor::randn([1, seq, heads, d], (Kind::BFloat16, gpu));
    let lse_a = Tensor::rand([1, heads, seq], (Kind::Float, gpu)) * 10.0 + 5.0;
    let empty = Tensor::rand([1, heads, seq], (Kind::Float, gpu)).lt(0.1);
    let lse_b = (Tensor::rand([1, heads, seq], (Kind::Float, gpu)) * 10.0 + 5.0).masked_fill(&empty, f64::NEG_INFINITY);
    // Where the second part has no keys its kernel may have written NaN.
    let b = b.masked_fill(&empty.transpose(1, 2).unsqueeze(-1), f64::NAN);
    assert!(lse_merge::KERNEL.function(0).is_ok(), "the merge kernel does not build on this GPU");
    let op_by_op = || {
        let (mut acc, mut acc_lse) = (a.to_kind(Kind::Float), lse_a.copy());
        ring::merge(&mut acc, &mut acc_lse, &b, &lse_b);
        (acc.to_kind(Kind::BFloat16), acc_lse)
    };
    let fused = || {
        let (out, lse) = (a.empty_like(), lse_a.empty_like());
        assert!(lse_merge::merge_into(&out, &lse, &a, &lse_a, &b, &lse_b), "the kernel did not run");
        (out, lse)
    };
    let ((want, want_lse), (got, got_lse)) = (op_by_op(), fused());
    let (count, max) = mismatches(&got, &want);
    let size = want.to_kind(Kind::Float).abs().max().double_value(&[]);
    println!(
        "lse merge [1, {seq}, {heads}, {d}] bf16: {count} elements differ, by up to {max:e} (largest entry {size:e})"
    );
    assert!(got.isnan().any().int64_value(&[]) == 0, "the merged output has NaN");
    assert!(max <= size / 256.0, "the merged output differs by {max:e}, more than one bf16 rounding of {size:e}");
    let lse_err = (&got_lse - &want_lse).abs().max().double_value(&[]);
    println!("lse merge: log-sum-exp differs by up to {lse_err:e}");
    assert!(lse_err <= 1e-5, "the merged log-sum-exp differs by {lse_err:e}");
    timed("lse merge (one 64K block)", &op_by_op, &fused);
}
