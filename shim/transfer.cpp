// Copies between GPU memory and pinned host memory on a side stream, so activation offload
// overlaps compute on the current ("compute") stream; and the communication stream that ring
// attention's shifts run on beside compute (src/ffi/comm_stream.rs). Needs only torch headers:
// streams and events through c10's device-guard interface, pinned memory through ATen's host
// allocator.
//
// Every function catches all exceptions: returns nullptr on success, else a malloc'ed message
// that the caller frees. Events are cudaEvent_t handles created by the guard interface (timing
// disabled); each belongs to one device and is destroyed by ulysses_event_destroy.
#include <ATen/ATen.h>
#include <ATen/core/CachingHostAllocator.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/GradMode.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <cstring>
#include <map>
#include <mutex>

namespace {

const c10::impl::DeviceGuardImplInterface *cuda() {
  return c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
}

c10::Device gpu(int dev) { return c10::Device(c10::DeviceType::CUDA, (c10::DeviceIndex)dev); }

// One stream per GPU and purpose, taken from torch's stream pool on first use and kept for the
// process (`streams` is the purpose's), so all work of that purpose on a device is ordered on it.
c10::Stream pooled(std::map<int, c10::Stream> &streams, int dev, bool high_priority) {
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  auto it = streams.find(dev);
  if (it == streams.end()) {
    it = streams.emplace(dev, cuda()->getStreamFromGlobalPool(gpu(dev), high_priority)).first;
  }
  return it->second;
}

// The stream of every offload copy of a device.
c10::Stream side_stream(int dev) {
  static std::map<int, c10::Stream> streams;
  return pooled(streams, dev, /*high_priority=*/false);
}

// The communication stream: high priority (its transfers take the SMs they need while compute
// kernels fill the rest), apart from the copy stream so a ring shift never queues behind an
// activation copy.
c10::Stream comm_stream(int dev) {
  static std::map<int, c10::Stream> streams;
  return pooled(streams, dev, /*high_priority=*/true);
}

// Records `event` (created on first use) on `stream`, after all work queued there so far.
void *record(const c10::Stream &stream, int dev) {
  void *event = nullptr;
  cuda()->record(&event, stream, (c10::DeviceIndex)dev, c10::EventFlag::PYTORCH_DEFAULT);
  return event;
}

// The message of the exception being handled, for the caller to free (torch's without the C++
// stack trace).
char *error_message() {
  try {
    throw;
  } catch (const c10::Error &e) {
    return strdup(e.what_without_backtrace());
  } catch (const std::exception &e) {
    return strdup(e.what());
  } catch (...) {
    return strdup("unknown C++ exception");
  }
}

} // namespace

extern "C" {

// Records a new event on the calling thread's current stream of GPU `dev`.
char *ulysses_event_record_current(int dev, void **event) {
  try {
    c10::DeviceGuard device_guard(gpu(dev));
    *event = record(cuda()->getStream(gpu(dev)), dev);
    return nullptr;
  } catch (...) {
    return error_message();
  }
}

// The calling thread's current stream of GPU `dev` waits for `event` on the device (no host wait).
char *ulysses_event_block_current(void *event, int dev) {
  try {
    c10::DeviceGuard device_guard(gpu(dev));
    cuda()->block(event, cuda()->getStream(gpu(dev)));
    return nullptr;
  } catch (...) {
    return error_message();
  }
}

// The host waits until `event` completes. Selects GPU `dev` first so that a thread that never
// touched CUDA does not create a context on GPU 0.
char *ulysses_event_synchronize(void *event, int dev) {
  try {
    c10::DeviceGuard device_guard(gpu(dev));
    cuda()->synchronizeEvent(event);
    return nullptr;
  } catch (...) {
    return error_message();
  }
}

// *done = 1 when `event` has completed, else 0 (no wait).
char *ulysses_event_query(void *event, int dev, int *done) {
  try {
    c10::DeviceGuard device_guard(gpu(dev));
    *done = cuda()->queryEvent(event) ? 1 : 0;
    return nullptr;
  } catch (...) {
    return error_message();
  }
}

// Releases `event`; safe while work that records or waits on it is still queued (CUDA frees it
// once that work completes). The guard interface's destroyEvent is noexcept.
void ulysses_event_destroy(void *event, int dev) {
  try {
    cuda()->destroyEvent(event, (c10::DeviceIndex)dev);
  } catch (...) {
  }
}

// A new contiguous tensor in pinned (page-locked) host memory from torch's caching host
// allocator, with the shape and dtype of `like`.
char *ulysses_empty_pinned_like(const at::Tensor *like, at::Tensor **out) {
  try {
    auto options = at::TensorOptions().dtype(like->scalar_type()).device(at::kCPU).pinned_memory(true);
    *out = new at::Tensor(at::empty(like->sizes(), options));
    return nullptr;
  } catch (...) {
    return error_message();
  }
}

// dst.copy_(src) on GPU `dev`'s side stream, after `after` (if not null), then records *done on
// the side stream. One of dst/src is on GPU `dev`, the other in (pinned) host memory; the caller
// checked shapes and dtypes. The copy is issued while the side stream is current, and both
// buffers are then marked as used on the side stream: the CUDA caching allocator does not hand
// the GPU block to anyone else, nor the caching host allocator the pinned block, until the side
// stream has passed the copy, even if the caller drops its tensors at once.
char *ulysses_side_copy(const at::Tensor *dst, const at::Tensor *src, void *after, int dev, void **done) {
  try {
    c10::AutoGradMode no_grad(false);
    c10::DeviceGuard device_guard(gpu(dev));
    c10::Stream side = side_stream(dev);
    if (after != nullptr) {
      cuda()->block(after, side);
    }
    {
      c10::StreamGuard stream_guard(side);
      dst->copy_(*src, /*non_blocking=*/true);
    }
    for (const at::Tensor *t : {dst, src}) {
      const c10::DataPtr &data = t->storage().data_ptr();
      if (t->is_cuda()) {
        cuda()->recordDataPtrOnStream(data, side);
      } else {
        // A no-op (returns false) for memory the caching host allocator did not hand out.
        at::getHostAllocator(at::kCUDA)->record_event(data.get(), data.get_context(), side);
      }
    }
    *done = record(side, dev);
    return nullptr;
  } catch (...) {
    return error_message();
  }
}

// GPU `dev`'s communication stream, made to wait (on the device) for the work queued on the
// calling thread's current stream so far: what it sends has been produced, and what last used
// the memory it receives into is done. *stream is its cudaStream_t, for NCCL.
char *ulysses_comm_stream_after_current(int dev, void **stream) {
  try {
    c10::DeviceGuard device_guard(gpu(dev));
    c10::Stream comm = comm_stream(dev);
    void *ready = record(cuda()->getStream(gpu(dev)), dev);
    cuda()->block(ready, comm);
    cuda()->destroyEvent(ready, (c10::DeviceIndex)dev);
    *stream = cuda()->getStreamNativeHandle(comm);
    return nullptr;
  } catch (...) {
    return error_message();
  }
}

// GPU `dev`'s communication stream as it stands, ordered after nothing new (for the watchdog,
// which records its completion event there).
char *ulysses_comm_stream(int dev, void **stream) {
  try {
    c10::DeviceGuard device_guard(gpu(dev));
    *stream = cuda()->getStreamNativeHandle(comm_stream(dev));
    return nullptr;
  } catch (...) {
    return error_message();
  }
}

// After work queued on GPU `dev`'s communication stream that reads or writes `tensors`: marks
// their memory as used there, so the caching allocator hands none of it out again before the
// stream has passed this point, whenever the caller drops them; then records *event there.
char *ulysses_comm_stream_done(int dev, const at::Tensor **tensors, int n, void **event) {
  try {
    c10::DeviceGuard device_guard(gpu(dev));
    c10::Stream comm = comm_stream(dev);
    for (int i = 0; i < n; i++) {
      cuda()->recordDataPtrOnStream(tensors[i]->storage().data_ptr(), comm);
    }
    *event = record(comm, dev);
    return nullptr;
  } catch (...) {
    return error_message();
  }
}
}
