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

// PyTorch's exact GELU as it computes it, 0.5 z (1 + erf(z / sqrt 2)), on a vector. erf(u) = u P(u^2) / Q(u^2) for
// |u| <= 4 and +-1 beyond (Eigen's float fit: within 4.2e-7 of erf; no exp, one division).
inline Vec Gelu(Vec z) {
  Vec u = z * 0.70710678118654752f;
  u = u > 4.0f ? Splat(4.0f) : u;
  u = u < -4.0f ? Splat(-4.0f) : u;
  const Vec u2 = u * u;
  Vec p = Splat(-2.72614225801306e-10f);
  p = p * u2 + 2.77068142495902e-08f;
  p = p * u2 - 2.10102402082508e-06f;
  p = p * u2 - 5.69250639462346e-05f;
  p = p * u2 - 7.34990630326855e-04f;
  p = p * u2 - 2.95459980854025e-03f;
  p = p * u2 - 1.60960333262415e-02f;
  Vec q = Splat(-1.45660718464996e-05f);
  q = q * u2 - 2.13374055278905e-04f;
  q = q * u2 - 1.68282697438203e-03f;
  q = q * u2 - 7.37332916720468e-03f;
  q = q * u2 - 1.42647390514189e-02f;
  Vec erf = u * p / q;
  erf = erf < -1.0f ? Splat(-1.0f) : erf;  // the fit overshoots +-1 slightly; -1 matters: GELU(z < 0) <= 0
  const Vec half = 0.5f * z;
  return half + half * erf;  // +0 where PyTorch gives -0 (z <= -5.66 and z = -0)
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
