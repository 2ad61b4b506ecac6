// What the C++ CPU kernels of this folder share: SIMD vectors of floats (GCC / Clang vector extensions, so one source
// builds for AVX2, AVX-512 or NEON with -march=native), exp and GELU on them, and the split of a kernel's work over
// XLA's intra-op thread pool, completing asynchronously.

#ifndef SEGNEXT_JAX_KERNELS_CPU_KERNELS_H_
#define SEGNEXT_JAX_KERNELS_CPU_KERNELS_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
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

typedef int32_t IVec __attribute__((vector_size(kLanes * sizeof(int32_t)), aligned(sizeof(int32_t))));
inline Vec Splat(float v) { return Vec{} + v; }
// The larger of a and b, NaN where either is NaN (a NaN logit must give a NaN loss, as in XLA).
inline Vec Max(Vec a, Vec b) { return (a > b || a != a) ? a : b; }

// exp on a vector: 2^n * exp(r), n = round(x / ln 2), |r| <= ln 2 / 2, with Cephes' expf polynomial (about 1 ulp).
inline Vec Exp(Vec x) {
  x = Max(x, Splat(-87.3f));                   // NaN stays NaN
  x = x > Splat(88.37626f) ? Splat(88.37626f) : x;  // below 2^128
  const Vec t = x * 1.44269504088896341f + 0.5f;
  IVec n = __builtin_convertvector(t, IVec);  // truncation; floor below
  n += __builtin_convertvector(n, Vec) > t;   // true is -1
  const Vec nf = __builtin_convertvector(n, Vec);
  const Vec r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  Vec p = Splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const Vec e = p * r * r + r + 1.0f;
  const IVec exponent = (n + 127) << 23;
  Vec scale;
  std::memcpy(&scale, &exponent, sizeof scale);
  return e * scale;
}

// PyTorch's exact GELU, 0.5 z erfc(-z / sqrt 2), on a vector; erfc by Numerical Recipes' Chebyshev fit (relative
// error below 1.2e-7) with Exp above.
inline Vec Gelu(Vec z) {
  const Vec u = z * -0.70710678118654752f;
  const Vec a = u < 0.0f ? -u : u;
  const Vec t = 1.0f / (1.0f + 0.5f * a);
  Vec p = Splat(0.17087277f);
  p = p * t - 0.82215223f;
  p = p * t + 1.48851587f;
  p = p * t - 1.13520398f;
  p = p * t + 0.27886807f;
  p = p * t - 0.18628806f;
  p = p * t + 0.09678418f;
  p = p * t + 0.37409196f;
  p = p * t + 1.00002368f;
  p = p * t - 1.26551223f;
  const Vec tail = t * Exp(p - a * a);  // erfc(|u|)
  return 0.5f * z * (u < 0.0f ? 2.0f - tail : tail);
}

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
