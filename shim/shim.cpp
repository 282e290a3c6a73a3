// What tch 0.24 does not expose, reached through libtorch's C++ API. Needs only torch headers
// (no CUDA headers): device and stream calls go through c10's device-guard interface.
#include <ATen/Context.h>
#include <c10/core/Device.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <cstdint>
#include <cstring>
#include <vector>

extern "C" {

// Same as torch.backends.cuda.enable_{flash,mem_efficient,math,cudnn}_sdp.
void ulysses_set_sdp_backends(int flash, int mem_efficient, int math, int cudnn) {
  auto &ctx = at::globalContext();
  ctx.setSDPUseFlash(flash != 0);
  ctx.setSDPUseMemEfficient(mem_efficient != 0);
  ctx.setSDPUseMath(math != 0);
  ctx.setSDPUseCuDNN(cudnn != 0);
}

// torch.cuda.set_device(idx); returns 0 on success.
int ulysses_cuda_set_device(int idx) {
  try {
    auto impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
    impl->setDevice(c10::Device(c10::DeviceType::CUDA, (c10::DeviceIndex)idx));
    return 0;
  } catch (...) {
    return -1;
  }
}

// Native cudaStream_t of torch's current stream on device idx (nullptr is the legacy default
// stream). Returns (void*)-1 when CUDA is unavailable.
void *ulysses_cuda_current_stream(int idx) {
  try {
    auto impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
    c10::Stream s = impl->getStream(c10::Device(c10::DeviceType::CUDA, (c10::DeviceIndex)idx));
    return impl->getStreamNativeHandle(s);
  } catch (...) {
    return (void *)-1;
  }
}
}

#include <torch/csrc/autograd/autograd.h>

extern "C" {

// torch.autograd.backward(outputs, grad_outputs): backpropagates each output's graph from its
// incoming gradient without building the (output * grad).sum() scalar, which would cost one extra
// activation-sized tensor. Gradients accumulate into the leaves' .grad. Tensors are tch's handles
// (torch::Tensor*). Returns nullptr on success, else a malloc'ed message the caller frees.
char *ulysses_backward(const at::Tensor **outputs, const at::Tensor **grads, int n) {
  try {
    std::vector<at::Tensor> outs, gs;
    for (int i = 0; i < n; ++i) {
      outs.push_back(*outputs[i]);
      gs.push_back(*grads[i]);
    }
    torch::autograd::backward(outs, gs);
    return nullptr;
  } catch (const std::exception &e) {
    return strdup(e.what());
  }
}
}

#include <ATen/ops/_fused_adamw.h>
#include <ATen/ops/full.h>

extern "C" {

// torch._fused_adamw_ on one flat fp32 shard (libtorch's fused, vectorized and multi-threaded CPU
// kernel, or its CUDA kernel): one pass over parameter, gradient and both moments instead of a
// chain of element-wise ops with temporaries. No weight decay here (the caller decays matrices
// only); `step` is the 1-based step for the bias corrections. Returns nullptr or a malloc'ed
// message.
char *ulysses_fused_adamw(const at::Tensor *param, const at::Tensor *grad, const at::Tensor *exp_avg,
                          const at::Tensor *exp_avg_sq, double step, double lr, double beta1, double beta2,
                          double eps) {
  try {
    std::vector<at::Tensor> params{*param}, grads{*grad}, exp_avgs{*exp_avg}, exp_avg_sqs{*exp_avg_sq}, none,
        steps{at::full({}, step, at::TensorOptions().dtype(at::kFloat).device(param->device()))};
    at::_fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, none, steps, lr, beta1, beta2, /*weight_decay=*/0.0, eps,
                      /*amsgrad=*/false, /*maximize=*/false);
    return nullptr;
  } catch (const std::exception &e) {
    return strdup(e.what());
  }
}
}
