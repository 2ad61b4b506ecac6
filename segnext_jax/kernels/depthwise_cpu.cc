// Depth-wise 2-D convolution (PyTorch's Conv2d(C, C, (kh, kw), padding=(ph, pw), groups=C), stride 1) for CPU,
// called from JAX through the XLA FFI (segnext_jax/kernels/depthwise.py). XLA:CPU has no fast grouped
// convolution, and the weight gradient of the shifted-add form it compiles is a reduction it runs slowly.
//
// Two handlers, both on NHWC float32 arrays, both splitting the output rows over XLA's intra-op thread pool and
// completing asynchronously:
//   SegnextDepthwiseForward(x (N, H, W, C), taps (kh, kw, C), input_bias (C), bias (C); ph, pw, use_input_bias, gelu)
//       -> y (N, H + 2ph - kh + 1, W + 2pw - kw + 1, C)
//     z[n, oh, ow, c] = bias[c] + sum_ij u[n, oh + i - ph, ow + j - pw, c] * taps[i, j, c],
//     u = x + input_bias inside x (if use_input_bias) and zero outside;  y = GELU(z) if gelu else z.
//     The input bias and the GELU fuse the block's feed-forward (1x1 conv's bias, depth-wise conv, GELU) into one
//     pass. The input gradient is this same correlation (no biases, no GELU) of dz with the flipped taps.
//   SegnextDepthwiseKernelGrad(x (N, H, W, C), input_bias (C), dz (N, OH, OW, C); kh, kw, ph, pw, use_input_bias)
//       -> dtaps (kh, kw, C)
//     dtaps[i, j, c] = sum_{n, oh, ow} u[n, oh + i - ph, ow + j - pw, c] * dz[n, oh, ow, c]
// Channels are processed in SIMD vectors (GCC / Clang vector extensions, so the same source builds for AVX2,
// AVX-512 or NEON with -march=native) with the accumulators in registers. The row split depends only on the shapes,
// so results do not depend on the number of threads.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "cpu_kernels.h"
#include "xla/ffi/api/ffi.h"

namespace segnext {
namespace {

constexpr int kBlock = 4;        // vectors of channels accumulated together for one pixel
constexpr int kTile = 4;         // neighbouring output pixels accumulated together
constexpr int kTileVectors = 2;  // vectors of channels per pixel of a tile

struct Shape {
  int64_t n, h, w, c;     // input
  int64_t kh, kw, ph, pw; // taps and zero padding on each side
  int64_t oh, ow;         // output

  int64_t Rows() const { return n * oh; }
  // Taps i in [I0, I1) read an input row for output row `y` (the others fall in the padding); likewise j for `x`.
  int64_t I0(int64_t y) const { return std::max<int64_t>(0, ph - y); }
  int64_t I1(int64_t y) const { return std::min<int64_t>(kh, h + ph - y); }
  int64_t J0(int64_t x) const { return std::max<int64_t>(0, pw - x); }
  int64_t J1(int64_t x) const { return std::min<int64_t>(kw, w + pw - x); }
  const float* InputAt(const float* in, int64_t b, int64_t y, int64_t x) const {
    return in + ((b * h + y) * w + x) * c;
  }
};

// The forward's operands.
struct Forward {
  const float* x;
  const float* taps;
  const float* input_bias;
  const float* bias;
  float* y;
};

// Output pixel (b, oy, ox), channels [c0, c0 + V * kLanes): the taps' sum accumulated in registers.
template <int V, bool kInputBias, bool kGelu>
inline void ForwardVectors(const Shape& s, const Forward& f, float* out, int64_t b, int64_t oy, int64_t ox,
                           int64_t c0) {
  const int64_t j0 = s.J0(ox), j1 = s.J1(ox);
  Vec acc[V], input_bias[V];
  for (int v = 0; v < V; ++v) {
    acc[v] = Load(f.bias + c0 + v * kLanes);
    if (kInputBias) input_bias[v] = Load(f.input_bias + c0 + v * kLanes);
  }
  for (int64_t i = s.I0(oy); i < s.I1(oy); ++i) {
    const float* in = s.InputAt(f.x, b, oy + i - s.ph, ox + j0 - s.pw) + c0;
    const float* tap = f.taps + (i * s.kw + j0) * s.c + c0;
    for (int64_t j = j0; j < j1; ++j, in += s.c, tap += s.c) {
      for (int v = 0; v < V; ++v) {
        Vec u = Load(in + v * kLanes);
        if (kInputBias) u += input_bias[v];
        acc[v] += u * Load(tap + v * kLanes);
      }
    }
  }
  for (int v = 0; v < V; ++v) Store(out + c0 + v * kLanes, kGelu ? Gelu(acc[v]) : acc[v]);
}

template <bool kInputBias, bool kGelu>
inline void ForwardScalars(const Shape& s, const Forward& f, float* out, int64_t b, int64_t oy, int64_t ox,
                           int64_t c0) {
  const int64_t j0 = s.J0(ox), j1 = s.J1(ox);
  for (int64_t ch = c0; ch < s.c; ++ch) {
    float acc = f.bias[ch];
    for (int64_t i = s.I0(oy); i < s.I1(oy); ++i) {
      for (int64_t j = j0; j < j1; ++j) {
        const float u = s.InputAt(f.x, b, oy + i - s.ph, ox + j - s.pw)[ch] + (kInputBias ? f.input_bias[ch] : 0.0f);
        acc += u * f.taps[(i * s.kw + j) * s.c + ch];
      }
    }
    out[ch] = kGelu ? 0.5f * acc * (1.0f + std::erf(acc * 0.70710678118654752f)) : acc;
  }
}

// kTile neighbouring output pixels (b, oy, ox + p), channels [c0, c0 + V * kLanes), all of whose taps fall inside
// the row: each tap's vectors are loaded once for the kTile pixels (1.25 loads per multiply-add instead of 2).
template <int V, bool kInputBias, bool kGelu>
inline void ForwardTile(const Shape& s, const Forward& f, float* out, int64_t b, int64_t oy, int64_t ox, int64_t c0) {
  Vec acc[kTile][V], input_bias[V];
  for (int v = 0; v < V; ++v) {
    const Vec bias = Load(f.bias + c0 + v * kLanes);
    for (int p = 0; p < kTile; ++p) acc[p][v] = bias;
    if (kInputBias) input_bias[v] = Load(f.input_bias + c0 + v * kLanes);
  }
  for (int64_t i = s.I0(oy); i < s.I1(oy); ++i) {
    const float* in = s.InputAt(f.x, b, oy + i - s.ph, ox - s.pw) + c0;
    const float* tap = f.taps + i * s.kw * s.c + c0;
    for (int64_t j = 0; j < s.kw; ++j, in += s.c, tap += s.c) {
      Vec t[V];
      for (int v = 0; v < V; ++v) t[v] = Load(tap + v * kLanes);
      for (int p = 0; p < kTile; ++p) {
        for (int v = 0; v < V; ++v) {
          Vec u = Load(in + p * s.c + v * kLanes);
          if (kInputBias) u += input_bias[v];
          acc[p][v] += u * t[v];
        }
      }
    }
  }
  for (int p = 0; p < kTile; ++p) {
    for (int v = 0; v < V; ++v) Store(out + p * s.c + c0 + v * kLanes, kGelu ? Gelu(acc[p][v]) : acc[p][v]);
  }
}

// One output pixel, all channels.
template <bool kInputBias, bool kGelu>
inline void ForwardPixel(const Shape& s, const Forward& f, float* out, int64_t b, int64_t oy, int64_t ox) {
  int64_t c0 = 0;
  for (; c0 + kBlock * kLanes <= s.c; c0 += kBlock * kLanes) {
    ForwardVectors<kBlock, kInputBias, kGelu>(s, f, out, b, oy, ox, c0);
  }
  for (; c0 + kLanes <= s.c; c0 += kLanes) ForwardVectors<1, kInputBias, kGelu>(s, f, out, b, oy, ox, c0);
  if (c0 < s.c) ForwardScalars<kInputBias, kGelu>(s, f, out, b, oy, ox, c0);
}

// Along each output row, tiles of kTile pixels where all taps fall inside the row (only for more than kBlock vectors
// of channels: below that, one pixel at a time measured faster; benchmarks/README.md), pixel by pixel at the borders;
// all channels of a tile or pixel before the next (reads the input and taps contiguously, which beats channel blocks
// outermost once C is in the hundreds).
template <bool kInputBias, bool kGelu>
void ForwardRows(const Shape& s, const Forward& f, int64_t row0, int64_t row1) {
  // where a pixel's channels fit in one register block, one pixel at a time reads the taps as well
  const bool tiles = s.c > kBlock * kLanes;
  for (int64_t row = row0; row < row1; ++row) {
    const int64_t b = row / s.oh, oy = row % s.oh;
    float* out = f.y + row * s.ow * s.c;
    for (int64_t ox = 0; ox < s.ow;) {
      if (tiles && ox >= s.pw && ox + kTile - 1 <= s.w + s.pw - s.kw && ox + kTile <= s.ow) {
        int64_t c0 = 0;
        for (; c0 + kTileVectors * kLanes <= s.c; c0 += kTileVectors * kLanes) {
          ForwardTile<kTileVectors, kInputBias, kGelu>(s, f, out, b, oy, ox, c0);
        }
        for (; c0 + kLanes <= s.c; c0 += kLanes) ForwardTile<1, kInputBias, kGelu>(s, f, out, b, oy, ox, c0);
        for (int p = 0; c0 < s.c && p < kTile; ++p) {
          ForwardScalars<kInputBias, kGelu>(s, f, out + p * s.c, b, oy, ox + p, c0);
        }
        ox += kTile;
        out += kTile * s.c;
      } else {
        ForwardPixel<kInputBias, kGelu>(s, f, out, b, oy, ox);
        ox += 1;
        out += s.c;
      }
    }
  }
}

// ForwardRows for the runtime choice of input bias and GELU.
void SelectForwardRows(const Shape& s, const Forward& f, bool input_bias, bool gelu, int64_t row0, int64_t row1) {
  if (input_bias && gelu) return ForwardRows<true, true>(s, f, row0, row1);
  if (input_bias) return ForwardRows<true, false>(s, f, row0, row1);
  if (gelu) return ForwardRows<false, true>(s, f, row0, row1);
  ForwardRows<false, false>(s, f, row0, row1);
}

// Adds one output row's contribution to `dtaps`, channels [c0, c0 + V * kLanes).
template <int V, bool kInputBias>
void KernelGradVectors(const Shape& s, const float* x, const float* input_bias, const float* dy, float* dtaps,
                       int64_t b, int64_t oy, int64_t c0) {
  const float* grad_row = dy + (b * s.oh + oy) * s.ow * s.c + c0;
  Vec bias[V];
  if (kInputBias) {
    for (int v = 0; v < V; ++v) bias[v] = Load(input_bias + c0 + v * kLanes);
  }
  for (int64_t i = s.I0(oy); i < s.I1(oy); ++i) {
    for (int64_t j = 0; j < s.kw; ++j) {
      // output columns whose input column ox + j - pw lies inside the row
      const int64_t ox0 = std::max<int64_t>(0, s.pw - j), ox1 = std::min<int64_t>(s.ow, s.w + s.pw - j);
      if (ox0 >= ox1) continue;
      const float* in = s.InputAt(x, b, oy + i - s.ph, ox0 + j - s.pw) + c0;
      const float* grad = grad_row + ox0 * s.c;
      Vec acc[V] = {};
      for (int64_t ox = ox0; ox < ox1; ++ox, in += s.c, grad += s.c) {
        for (int v = 0; v < V; ++v) {
          Vec u = Load(in + v * kLanes);
          if (kInputBias) u += bias[v];
          acc[v] += u * Load(grad + v * kLanes);
        }
      }
      float* tap = dtaps + (i * s.kw + j) * s.c + c0;
      for (int v = 0; v < V; ++v) Store(tap + v * kLanes, Load(tap + v * kLanes) + acc[v]);
    }
  }
}

template <bool kInputBias>
void KernelGradScalars(const Shape& s, const float* x, const float* input_bias, const float* dy, float* dtaps,
                       int64_t b, int64_t oy, int64_t c0) {
  const float* grad_row = dy + (b * s.oh + oy) * s.ow * s.c;
  for (int64_t i = s.I0(oy); i < s.I1(oy); ++i) {
    for (int64_t j = 0; j < s.kw; ++j) {
      const int64_t ox0 = std::max<int64_t>(0, s.pw - j), ox1 = std::min<int64_t>(s.ow, s.w + s.pw - j);
      for (int64_t ch = c0; ch < s.c; ++ch) {
        float acc = 0.0f;
        for (int64_t ox = ox0; ox < ox1; ++ox) {
          const float u = s.InputAt(x, b, oy + i - s.ph, ox + j - s.pw)[ch] + (kInputBias ? input_bias[ch] : 0.0f);
          acc += u * grad_row[ox * s.c + ch];
        }
        dtaps[(i * s.kw + j) * s.c + ch] += acc;
      }
    }
  }
}

template <bool kInputBias>
void KernelGradRows(const Shape& s, const float* x, const float* input_bias, const float* dy, float* dtaps,
                    int64_t row0, int64_t row1) {
  for (int64_t row = row0; row < row1; ++row) {
    const int64_t b = row / s.oh, oy = row % s.oh;
    int64_t c0 = 0;
    for (; c0 + kBlock * kLanes <= s.c; c0 += kBlock * kLanes) {
      KernelGradVectors<kBlock, kInputBias>(s, x, input_bias, dy, dtaps, b, oy, c0);
    }
    for (; c0 + kLanes <= s.c; c0 += kLanes) KernelGradVectors<1, kInputBias>(s, x, input_bias, dy, dtaps, b, oy, c0);
    if (c0 < s.c) KernelGradScalars<kInputBias>(s, x, input_bias, dy, dtaps, b, oy, c0);
  }
}

// Number of row chunks: about 256k multiply-adds each, at most one per row and 64 in all. A function of the shapes
// only, so that the summation order of the kernel gradient does not depend on the number of threads (bit-exact
// results for one build: -march=native may contract multiply-adds differently on another CPU).
int64_t NumChunks(const Shape& s) {
  const int64_t work = s.Rows() * s.ow * s.c * s.kh * s.kw;
  return std::clamp<int64_t>(work / (1 << 18), 1, std::clamp<int64_t>(s.Rows(), 1, 64));
}

// The shape of a correlation of `x` with kh x kw taps, or an error message.
std::string MakeShape(const ffi::Buffer<ffi::F32>& x, int64_t kh, int64_t kw, int64_t ph, int64_t pw, Shape* s) {
  auto d = x.dimensions();
  if (d.size() != 4) return "depth-wise convolution: the input must be NHWC (rank 4)";
  *s = Shape{d[0], d[1], d[2], d[3], kh, kw, ph, pw, d[1] + 2 * ph - kh + 1, d[2] + 2 * pw - kw + 1};
  if (kh < 1 || kw < 1 || ph < 0 || pw < 0 || ph >= kh || pw >= kw || s->oh < 1 || s->ow < 1) {
    return "depth-wise convolution: padding must be in [0, kernel size) and the output non-empty";
  }
  return "";
}

// An error message unless `bias` is a vector of C values.
std::string CheckChannels(const ffi::Buffer<ffi::F32>& bias, int64_t c, const char* name) {
  auto d = bias.dimensions();
  if (d.size() != 1 || d[0] != c) return std::string("depth-wise convolution: ") + name + " must have shape (C,)";
  return "";
}

ffi::Future ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> taps,
                        ffi::Buffer<ffi::F32> input_bias, ffi::Buffer<ffi::F32> bias, int64_t ph, int64_t pw,
                        bool use_input_bias, bool gelu, ffi::ResultBuffer<ffi::F32> y) {
  auto t = taps.dimensions();
  if (t.size() != 3) return Failed("depth-wise convolution: taps must be (kh, kw, C)");
  Shape s;
  if (std::string error = MakeShape(x, t[0], t[1], ph, pw, &s); !error.empty()) return Failed(error);
  if (t[2] != s.c) return Failed("depth-wise convolution: taps and input differ in channels");
  for (auto [buffer, name] : {std::pair{&input_bias, "the input bias"}, std::pair{&bias, "the bias"}}) {
    if (std::string error = CheckChannels(*buffer, s.c, name); !error.empty()) return Failed(error);
  }
  const Forward f{x.typed_data(), taps.typed_data(), input_bias.typed_data(), bias.typed_data(), y->typed_data()};
  const int64_t rows = s.Rows(), chunks = NumChunks(s);
  return RunChunks(
      pool, chunks,
      [=](int64_t chunk) {
        SelectForwardRows(s, f, use_input_bias, gelu, rows * chunk / chunks, rows * (chunk + 1) / chunks);
        return true;
      },
      [](bool) { return std::string(); });
}

ffi::Future KernelGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> input_bias,
                           ffi::Buffer<ffi::F32> dy, int64_t kh, int64_t kw, int64_t ph, int64_t pw,
                           bool use_input_bias, ffi::ResultBuffer<ffi::F32> dtaps) {
  Shape s;
  if (std::string error = MakeShape(x, kh, kw, ph, pw, &s); !error.empty()) return Failed(error);
  if (std::string error = CheckChannels(input_bias, s.c, "the input bias"); !error.empty()) return Failed(error);
  auto g = dy.dimensions();
  if (g.size() != 4 || g[0] != s.n || g[1] != s.oh || g[2] != s.ow || g[3] != s.c) {
    return Failed("depth-wise convolution: the output gradient does not match the output shape");
  }
  const float* in = x.typed_data();
  const float* bias = input_bias.typed_data();
  const float* grad = dy.typed_data();
  float* out = dtaps->typed_data();
  const int64_t rows = s.Rows(), chunks = NumChunks(s), size = kh * kw * s.c;
  // one partial sum per chunk, added in chunk order at the end
  auto partials = std::make_shared<std::vector<float>>(chunks * size, 0.0f);
  return RunChunks(
      pool, chunks,
      [=](int64_t chunk) {
        float* part = partials->data() + chunk * size;
        const int64_t row0 = rows * chunk / chunks, row1 = rows * (chunk + 1) / chunks;
        if (use_input_bias) {
          KernelGradRows<true>(s, in, bias, grad, part, row0, row1);
        } else {
          KernelGradRows<false>(s, in, bias, grad, part, row0, row1);
        }
        return true;
      },
      [=](bool) {
        const float* p = partials->data();
        std::memcpy(out, p, size * sizeof(float));
        for (int64_t chunk = 1; chunk < chunks; ++chunk) {
          for (int64_t k = 0; k < size; ++k) out[k] += p[chunk * size + k];
        }
        return std::string();
      });
}

}  // namespace
}  // namespace segnext

namespace ffi = xla::ffi;

XLA_FFI_DEFINE_HANDLER_SYMBOL(SegnextDepthwiseForward, segnext::ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("ph")
                                  .Attr<int64_t>("pw")
                                  .Attr<bool>("use_input_bias")
                                  .Attr<bool>("gelu")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SegnextDepthwiseKernelGrad, segnext::KernelGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("kh")
                                  .Attr<int64_t>("kw")
                                  .Attr<int64_t>("ph")
                                  .Attr<int64_t>("pw")
                                  .Attr<bool>("use_input_bias")
                                  .Ret<ffi::Buffer<ffi::F32>>());
