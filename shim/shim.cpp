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
