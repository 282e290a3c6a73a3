// Caching-allocator statistics of a CUDA device through c10's device-generic allocator
// interface, so no CUDA headers are needed (the pip wheels ship an incomplete set).
#include <c10/core/CachingDeviceAllocator.h>
#include <cstdint>

extern "C" {

// Bytes allocated now, peak allocated and peak reserved by torch's caching allocator on `dev`
// since the last reset (like torch.cuda.memory_allocated / max_memory_allocated /
// max_memory_reserved). Returns 0 on success, -1 when CUDA is unavailable.
int ulysses_cuda_memory(int dev, int64_t *allocated, int64_t *peak_allocated, int64_t *peak_reserved) {
  try {
    auto *alloc = c10::getDeviceAllocator(c10::DeviceType::CUDA);
    auto stats = alloc->getDeviceStats((c10::DeviceIndex)dev);
    auto agg = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    *allocated = stats.allocated_bytes[agg].current;
    *peak_allocated = stats.allocated_bytes[agg].peak;
    *peak_reserved = stats.reserved_bytes[agg].peak;
    return 0;
  } catch (...) {
    return -1;
  }
}

int ulysses_cuda_reset_peak(int dev) {
  try {
    c10::getDeviceAllocator(c10::DeviceType::CUDA)->resetPeakStats((c10::DeviceIndex)dev);
    return 0;
  } catch (...) {
    return -1;
  }
}
}
