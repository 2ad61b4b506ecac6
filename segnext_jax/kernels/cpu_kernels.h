// What the C++ CPU kernels of this folder share: SIMD vectors of floats (GCC / Clang vector extensions, so one source
// builds for AVX2, AVX-512 or NEON with -march=native) and the split of a kernel's work over XLA's intra-op thread
// pool, completing asynchronously.

#ifndef SEGNEXT_JAX_KERNELS_CPU_KERNELS_H_
#define SEGNEXT_JAX_KERNELS_CPU_KERNELS_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace segnext {

namespace ffi = xla::ffi;

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif

typedef float Vec __attribute__((vector_size(kLanes * sizeof(float)), aligned(sizeof(float))));

inline Vec Load(const float* p) { return *reinterpret_cast<const Vec*>(p); }
inline void Store(float* p, Vec v) { *reinterpret_cast<Vec*>(p) = v; }

// Runs body(chunk) -> ok for chunks 0..chunks-1 on the calling thread and on the pool's threads; the thread finishing
// the last chunk runs finish(all chunks ok) -> error message ("" for success) and completes the returned future. The
// calling thread takes part, so progress never depends on a free pool thread.
template <typename Body, typename Finish>
ffi::Future RunChunks(ffi::ThreadPool& pool, int64_t chunks, Body body, Finish finish) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> remaining{0};
    std::atomic<bool> ok{true};
    ffi::Promise promise;
  };
  auto state = std::make_shared<State>();
  state->remaining = chunks;
  ffi::Future future(state->promise);
  auto work = [state, chunks, body, finish]() {
    for (int64_t chunk; (chunk = state->next.fetch_add(1)) < chunks;) {
      if (!body(chunk)) state->ok = false;
      if (state->remaining.fetch_sub(1) == 1) {
        const std::string error = finish(state->ok.load());
        if (error.empty()) {
          state->promise.SetAvailable();
        } else {
          state->promise.SetError(ffi::Error::InvalidArgument(error));
        }
      }
    }
  };
  const int64_t helpers = std::min<int64_t>(chunks, pool.num_threads()) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule(decltype(work)(work));
  work();
  return future;
}

// A future that has failed with `message`.
inline ffi::Future Failed(std::string message) {
  ffi::Promise promise;
  ffi::Future future(promise);
  promise.SetError(ffi::Error::InvalidArgument(std::move(message)));
  return future;
}

}  // namespace segnext

#endif  // SEGNEXT_JAX_KERNELS_CPU_KERNELS_H_
