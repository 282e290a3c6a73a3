// Fused elementwise CUDA kernels compiled at run time: libtorch's jiterator
// (at::cuda::CompileAndLaunchKernel) compiles a CUDA C++ functor with NVRTC on its first use in
// the process (and caches it on disk under ~/.cache/torch/kernels), then runs it through
// TensorIterator (broadcasting, strided views, vectorized loads when contiguous) on the current
// stream. So the build needs only torch's headers, no nvcc or CUDA toolkit, and a CPU-only
// libtorch still links (the symbol is in libtorch_cuda.so, which the build links anyway).
#include <ATen/ATen.h>
#include <ATen/cuda/jiterator.h>
#include <cstring>

extern "C" {

// Runs the functor `name` of `code` (jiterator's convention: `template <typename T> void
// name(T in0, ..., T& out0, ...)`, T being the compute type, float for bf16/fp16/fp32 tensors)
// over `inputs[0..n_inputs)` (at most 8, broadcast together, all CUDA, one dtype), writing
// `n_outputs` new tensors of the broadcast shape and the inputs' dtype into `outputs`. Returns
// nullptr or a malloc'ed message (the NVRTC log on a compile error).
char *ulysses_jiterator(const char *code, const char *name, const at::Tensor *const *inputs, int n_inputs,
                        int n_outputs, at::Tensor **outputs) {
  try {
    c10::SmallVector<at::Tensor> tensors;
    for (int i = 0; i < n_inputs; ++i) {
      tensors.push_back(*inputs[i]);
    }
    auto outs = at::cuda::CompileAndLaunchKernel(code, name, n_outputs, tensors, {}, /*return_by_ref=*/true);
    for (int i = 0; i < n_outputs; ++i) {
      outputs[i] = new at::Tensor(std::move(outs[i]));
    }
    return nullptr;
  } catch (const c10::Error &e) {
    return strdup(e.what_without_backtrace());
  } catch (const std::exception &e) {
    return strdup(e.what());
  }
}

}  // extern "C"
