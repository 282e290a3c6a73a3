// libtorch's own profiler (Kineto over CUPTI) for one measured step: every GPU kernel, copy and
// memset with its start and end, and the step's named ranges (RecordFunction user scopes), so
// the Rust side can say where the GPU time of each phase went. Needs only torch headers.
#include <ATen/record_function.h>
#include <torch/csrc/autograd/profiler_kineto.h>
#include <cstring>
#include <sstream>
#include <string>

namespace prof = torch::profiler::impl;

extern "C" {

// Starts collecting: CPU user ranges, and GPU activity when `cuda` is non-zero. Returns nullptr
// or a malloc'ed message.
char *ulysses_profiler_start(int cuda) {
  try {
    prof::ProfilerConfig config(prof::ProfilerState::KINETO);
    std::set<prof::ActivityType> activities{prof::ActivityType::CPU};
    if (cuda) {
      activities.insert(prof::ActivityType::CUDA);
    }
    torch::autograd::profiler::prepareProfiler(config, activities);
    torch::autograd::profiler::enableProfiler(config, activities, {at::RecordScope::USER_SCOPE});
    return nullptr;
  } catch (const std::exception &e) {
    return strdup(e.what());
  }
}

// Opens a named range on this thread; `*range` is closed (and freed) by ulysses_range_pop.
char *ulysses_range_push(const char *name, void **range) {
  try {
    auto *rf = new at::RecordFunction(at::RecordScope::USER_SCOPE);
    rf->before(std::string_view(name));
    *range = rf;
    return nullptr;
  } catch (const std::exception &e) {
    return strdup(e.what());
  }
}

void ulysses_range_pop(void *range) { delete static_cast<at::RecordFunction *>(range); }

// Stops collecting and returns the events as text, one per line:
// "<activity type>\t<device type>\t<start ns>\t<end ns>\t<name>" (Kineto's activity type number,
// c10's device type number). `*text` is malloc'ed; the caller frees it.
char *ulysses_profiler_stop(char **text) {
  try {
    auto result = torch::autograd::profiler::disableProfiler();
    std::ostringstream out;
    for (const auto &e : result->events()) {
      std::string name = e.name();
      for (auto &c : name) {
        if (c == '\t' || c == '\n') c = ' ';
      }
      out << int(e.activityType()) << '\t' << int(e.deviceType()) << '\t' << e.startNs() << '\t' << e.endNs()
          << '\t' << name << '\n';
    }
    *text = strdup(out.str().c_str());
    return nullptr;
  } catch (const std::exception &e) {
    return strdup(e.what());
  }
}
}
