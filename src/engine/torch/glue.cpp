// What tch does not expose of libtorch: casting a module's floating-point state (weights,
// buffers and the tensor constants a traced or frozen graph keeps inline), a CUDA stream per
// engine thread, and the CUDA caching allocator's statistics. Only CPU headers are used: CUDA is
// reached through libtorch's device-generic interfaces, so this builds against any libtorch and
// the CUDA parts answer "no" where CUDA is absent. Every entry point catches C++ exceptions: an
// exception must not cross into Rust.

#include <torch/script.h>
#include <ATen/autocast_mode.h>
#include <c10/core/CachingDeviceAllocator.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include <cstring>
#include <limits>
#include <string>

namespace {

char* copy_message(const char* what) {
  char* out = static_cast<char*>(std::malloc(std::strlen(what) + 1));
  if (out) std::strcpy(out, what);
  return out;
}

// A floating tensor in the target type; fp16's range is far narrower than fp32's, so values
// beyond it (a traced `finfo(float32).min` mask constant) become fp16's largest finite values
// rather than infinities, whose products with zero would be NaN.
at::Tensor cast(const at::Tensor& t, at::ScalarType type) {
  if (type == at::kHalf) {
    const double max = 65504.0;
    return t.clamp(-max, max).to(type);
  }
  return t.to(type);
}

int64_t cast_constants(torch::jit::Block* block, at::ScalarType type) {
  int64_t n = 0;
  for (torch::jit::Node* node : block->nodes()) {
    if (node->kind() == c10::prim::Constant && node->hasAttribute(c10::attr::value) &&
        node->kindOf(c10::attr::value) == torch::jit::AttributeKind::t) {
      const at::Tensor& value = node->t(c10::attr::value);
      if (value.is_floating_point() && value.scalar_type() != type) {
        at::Tensor cast_value = cast(value, type);
        node->t_(c10::attr::value, cast_value);
        node->output()->inferTypeFrom(cast_value);
        n++;
      }
    }
    for (torch::jit::Block* sub : node->blocks()) n += cast_constants(sub, type);
  }
  return n;
}

}  // namespace

extern "C" {

void aiaas_free_message(char* message) { std::free(message); }

// Casts the floating-point parameters, buffers and graph constants of `module` (a
// torch::jit::Module*) and of its submodules to `scalar_type` (c10::ScalarType's number);
// integer ones (token type ids, position ids, counters) keep their type. Returns how many
// tensors were cast, or -1 with `*error` set (free it with aiaas_free_message).
int64_t aiaas_cast_floating(void* module, int scalar_type, char** error) {
  try {
    auto& m = *static_cast<torch::jit::Module*>(module);
    const auto type = static_cast<at::ScalarType>(scalar_type);
    int64_t n = 0;
    torch::NoGradGuard no_grad;
    for (at::Tensor t : m.parameters()) {
      if (t.is_floating_point() && t.scalar_type() != type) {
        t.set_data(cast(t, type));
        n++;
      }
    }
    for (at::Tensor t : m.buffers()) {
      if (t.is_floating_point() && t.scalar_type() != type) {
        t.set_data(cast(t, type));
        n++;
      }
    }
    for (const torch::jit::Module& sub : m.modules()) {
      for (const torch::jit::Method& method : sub.get_methods()) {
        n += cast_constants(method.graph()->block(), type);
      }
    }
    return n;
  } catch (const std::exception& e) {
    *error = copy_message(e.what());
    return -1;
  } catch (...) {
    *error = copy_message("unknown C++ exception");
    return -1;
  }
}

// A stream from libtorch's pool on CUDA device `device`, as its id in `*id`. Returns false
// where CUDA is absent or the call fails.
bool aiaas_cuda_pool_stream(int device, int64_t* id) {
  try {
    if (!at::hasCUDA()) return false;
    c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
    const c10::Device d(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device));
    *id = impl.getStreamFromGlobalPool(d, false).id();
    return true;
  } catch (...) {
    return false;
  }
}

// Makes stream `id` of CUDA device `device` the calling thread's current stream there; the
// stream it replaces goes to `*previous`. Returns false where the call fails.
bool aiaas_cuda_exchange_stream(int device, int64_t id, int64_t* previous) {
  try {
    c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
    const c10::Device d(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device));
    *previous = impl.exchangeStream(c10::Stream(c10::Stream::UNSAFE, d, id)).id();
    return true;
  } catch (...) {
    return false;
  }
}

// Waits for everything queued on CUDA device `device`.
bool aiaas_cuda_synchronize(int device) {
  try {
    c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
    impl.synchronizeDevice(static_cast<c10::DeviceIndex>(device));
    return true;
  } catch (...) {
    return false;
  }
}

// The CUDA caching allocator's bytes on `device`: allocated to tensors, and reserved from the
// driver (allocated plus cached). Returns false where CUDA is absent or the call fails.
bool aiaas_cuda_memory(int device, int64_t* allocated, int64_t* reserved) {
  try {
    if (!at::hasCUDA()) return false;
    auto* allocator = c10::getDeviceAllocator(c10::DeviceType::CUDA);
    if (!allocator->initialized()) {
      // CUDA not used yet: nothing allocated (its statistics would throw)
      *allocated = 0;
      *reserved = 0;
      return true;
    }
    const auto stats = allocator->getDeviceStats(static_cast<c10::DeviceIndex>(device));
    const auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    *allocated = stats.allocated_bytes[all].current;
    *reserved = stats.reserved_bytes[all].current;
    return true;
  } catch (...) {
    return false;
  }
}

}  // extern "C"

extern "C" {

// A new uninitialised tensor of `dims` and `scalar_type` in pinned (page-locked) host memory,
// from libtorch's caching host allocator, as tch's `at::Tensor*`; null where CUDA is absent
// or the call fails.
void* aiaas_empty_pinned(const int64_t* dims, size_t ndims, int scalar_type) {
  try {
    if (!at::hasCUDA()) return nullptr;
    auto options = at::TensorOptions()
                       .dtype(static_cast<at::ScalarType>(scalar_type))
                       .pinned_memory(true);
    return new at::Tensor(at::empty(at::IntArrayRef(dims, ndims), options));
  } catch (...) {
    return nullptr;
  }
}

}  // extern "C"

extern "C" {

// Turns autocast on for the calling thread: on `cuda` (else the CPU) the operators autocast
// lists run in `scalar_type`, and their floating inputs of another type are cast to it (what
// lets a graph that fixes fp32 somewhere run with reduced-precision weights). The cast cache is
// off: it only serves training. What it replaces goes to `saved` (3 values) for
// aiaas_autocast_exit. Returns false where the call fails.
bool aiaas_autocast_enter(bool cuda, int scalar_type, int64_t* saved) {
  try {
    const auto device = cuda ? c10::DeviceType::CUDA : c10::DeviceType::CPU;
    saved[0] = at::autocast::is_autocast_enabled(device);
    saved[1] = static_cast<int64_t>(at::autocast::get_autocast_dtype(device));
    saved[2] = at::autocast::is_autocast_cache_enabled();
    at::autocast::set_autocast_enabled(device, true);
    at::autocast::set_autocast_dtype(device, static_cast<at::ScalarType>(scalar_type));
    at::autocast::set_autocast_cache_enabled(false);
    return true;
  } catch (...) {
    return false;
  }
}

// Puts back what aiaas_autocast_enter replaced.
void aiaas_autocast_exit(bool cuda, const int64_t* saved) {
  try {
    const auto device = cuda ? c10::DeviceType::CUDA : c10::DeviceType::CPU;
    at::autocast::set_autocast_enabled(device, saved[0] != 0);
    at::autocast::set_autocast_dtype(device, static_cast<at::ScalarType>(saved[1]));
    at::autocast::set_autocast_cache_enabled(saved[2] != 0);
  } catch (...) {
  }
}

}  // extern "C"
