//! The LM head and loss by hand (`model::head::tile_loss`, what the training step runs) against
//! autograd through `llama::head_token_losses` (what it ran before), in bf16 on a GPU at
//! Llama-3.1-8B's head (hidden 4096, vocabulary 128256) and the step's default loss tile (2048
//! tokens). fp32 equality on the CPU is the unit test in src/model/head.rs.
use std::time::Instant;
use tch::{Device, Kind, Tensor};
use ulysses::ffi::cross_entropy::FusedLogitsLoss;
use ulysses::model::head::{tile_loss, LogitsLoss, OpByOp};
use ulysses::model::llama::{head_token_losses, rms_norm, IGNORE_INDEX};
use ulysses::model::spec::{ModelSpec, Preset};

fn leaf(t: &Tensor) -> Tensor {
    t.detach().set_requires_grad(true)
}

/// The largest difference relative to the larger tensor's largest magnitude.
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.to_kind(Kind::Float), b.to_kind(Kind::Float));
    let diff = (&a - &b).abs().max().double_value(&[]);
    diff / a.abs().max().double_value(&[]).max(b.abs().max().double_value(&[]))
}

/// On a GPU (tests/gpu/run.sh PARTS=head runs this binary from the bundle with `--ignored gpu_`):
/// one loss tile, bf16, a tenth of the labels ignored, by hand with the softmax cross-entropy op by
/// op and by the fused kernel (`ffi::cross_entropy`, which must build here). Against autograd: the
/// summed loss within 1e-4 relative and each token's within 1e-3 (all read the same bf16 logits
/// into fp32), the gradients of the input, the norm and the LM head within 2e-2 of the largest
/// entry (bf16 rounding in a different place: the softmax is rounded before the loss scale, not
/// after); the kernel's gradients within 1e-2 of op by op's. Prints each path's time per tile (a
/// figure, not asserted).
#[test]
#[ignore = "needs a CUDA GPU (tests/gpu/run.sh)"]
fn gpu_head_loss_by_hand_equals_autograd_in_bf16() {
    assert!(tch::Cuda::is_available(), "this test needs a CUDA GPU");
    let gpu = Device::Cuda(0);
    let spec = ModelSpec::preset(Preset::Llama31_8b);
    let (tile, h, v) = (2048, spec.hidden_size, spec.vocab_size);
    tch::manual_seed(11);
    let x = Tensor::randn([1, tile, h], (Kind::BFloat16, gpu));
    let norm = (Tensor::rand([h], (Kind::Float, gpu)) + 0.5).to_kind(Kind::BFloat16);
    let w = (Tensor::randn([v, h], (Kind::Float, gpu)) * 0.02).to_kind(Kind::BFloat16);
    let ignored = Tensor::rand([1, tile], (Kind::Float, gpu)).lt(0.1);
    let labels = Tensor::randint(v, [1, tile], (Kind::Int64, gpu)).masked_fill(&ignored, IGNORE_INDEX);
    let scale = 1.0 / labels.ne(IGNORE_INDEX).sum(Kind::Int64).double_value(&[]);

    // (loss, dx, d norm, d lm_head)
    let autograd = || {
        let (x, norm, w) = (leaf(&x), leaf(&norm), leaf(&w));
        let loss = head_token_losses(&spec, &norm, &w, &x, &labels).sum(Kind::Float);
        (&loss * scale).backward();
        let token_loss = head_token_losses(&spec, &norm, &w, &x, &labels).detach();
        [loss.detach(), x.grad(), norm.grad(), w.grad(), token_loss]
    };
    let by_hand = |logits_loss: &dyn LogitsLoss| {
        let (x, norm) = (leaf(&x), leaf(&norm));
        let mut grad_w = w.zeros_like();
        let xn = rms_norm(&x, &norm, spec.rms_norm_eps);
        let t = tile_loss(&xn.detach(), &w, &labels, scale, Some(&mut grad_w), logits_loss);
        (&xn * &t.grad_xn).sum(Kind::Float).backward();
        [t.token_loss.sum(Kind::Float), x.grad(), norm.grad(), grad_w, t.token_loss]
    };
    let timed = |name: &str, f: &dyn Fn() -> [Tensor; 5]| {
        let _ = f();
        tch::Cuda::synchronize(0);
        let started = Instant::now();
        let reps = 5;
        for _ in 0..reps {
            let _ = f();
        }
        tch::Cuda::synchronize(0);
        let ms = started.elapsed().as_secs_f64() * 1e3 / reps as f64;
        println!("{name}: {ms:.2} ms per tile of {tile} tokens x {v} (with the norm and both GEMMs)");
        f()
    };
    if let Err(e) = ulysses::ffi::cross_entropy::KERNEL.function(0) {
        panic!("the fused softmax cross-entropy kernel does not build on this GPU: {e}");
    }
    let want = timed("autograd", &autograd);
    let op_by_op = timed("by hand, softmax op by op", &|| by_hand(&OpByOp));
    let got = timed("by hand, softmax by the fused kernel", &|| by_hand(&FusedLogitsLoss));
    for (path, got) in [("op by op", &op_by_op), ("fused kernel", &got)] {
        let loss_err = rel_err(&want[0], &got[0]);
        println!(
            "{path}: loss: autograd {:.6}, by hand {:.6}, relative {loss_err:.2e}",
            want[0].double_value(&[]),
            got[0].double_value(&[])
        );
        assert!(loss_err <= 1e-4, "{path}: the summed loss differs by {loss_err:.2e} relative");
        // Each token's loss: the fp32 log-softmax's, up to the order of the row's sum.
        let token_err = (&want[4] - &got[4]).abs().max().double_value(&[]);
        println!("{path}: largest difference of one token's loss {token_err:.2e}");
        assert!(token_err <= 1e-3, "{path}: a token's loss differs by {token_err:.2e}");
        for (name, (a, b)) in ["dx", "d norm", "d lm_head"].iter().zip(want[1..4].iter().zip(got[1..4].iter())) {
            let err = rel_err(a, b);
            println!("{path}: {name}: largest difference {err:.2e} of the largest entry");
            assert!(err <= 2e-2, "{path}: {name} differs by {err:.2e} of its largest entry");
        }
    }
    // The kernel's gradient is the op-by-op one but for bf16 rounding of the same fp32 softmax.
    for (name, (a, b)) in ["dx", "d norm", "d lm_head"].iter().zip(op_by_op[1..4].iter().zip(got[1..4].iter())) {
        let err = rel_err(a, b);
        println!("fused kernel vs op by op: {name}: largest difference {err:.2e} of the largest entry");
        assert!(err <= 1e-2, "fused kernel vs op by op: {name} differs by {err:.2e}");
    }
    // Ignored labels give their rows no gradient.
    let rows = got[1].squeeze_dim(0).abs().amax([1], false).masked_select(&ignored.squeeze_dim(0));
    assert_eq!(rows.max().double_value(&[]), 0.0, "an ignored label's row has a gradient");
}
