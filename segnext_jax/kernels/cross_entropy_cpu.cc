// Softmax cross-entropy of bilinearly upsampled logits (mmseg's `resize(seg_logits, label size, 'bilinear',
// align_corners=False)` followed by `CrossEntropyLoss`) for CPU, called from JAX through the XLA FFI
// (segnext_jax/kernels/cross_entropy.py). The upsampled logits exist only one pixel at a time: XLA:CPU would write
// and re-read the full-resolution (N, H, W, K) tensor, its softmax and their gradients (315 MB each for two 512x512
// crops of 150 classes) in slow loops.
//
// Two handlers on float32 NHWC logits (N, h, w, K) and int32 labels (N, H, W), any sizes:
//   SegnextUpsampledCrossEntropyForward(logits, labels; ignore_index) -> (row_loss (N, H), lse (N, H, W))
//     u = the logits interpolated at label pixel (y, x) (PyTorch's half-pixel source index, clamped at the edges)
//     lse[n, y, x] = log sum_k exp(u_k);  row_loss[n, y] = sum over x with a label != ignore_index of lse - u_label
//   SegnextUpsampledCrossEntropyBackward(logits, labels, lse; ignore_index) -> grad (N, h, w, K)
//     the gradient of sum(row_loss) with respect to the logits: softmax(u) - onehot(label) at every labelled pixel,
//     spread back onto the four source logits with the interpolation weights.
// Work is split over XLA's intra-op thread pool by rows (label rows forward, logit rows backward, each output written
// by one task), so results do not depend on the number of threads.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "cpu_kernels.h"
#include "xla/ffi/api/ffi.h"

namespace segnext {
namespace {

inline float HorizontalMax(Vec v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = (v[i] > m || v[i] != v[i]) ? v[i] : m;
  return m;
}

inline float HorizontalSum(Vec v) {
  float s = 0.0f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

// The two source positions and weights of each output position along one axis (PyTorch's bilinear,
// align_corners=False): source = max(0, (o + 0.5) * in / out - 0.5).
struct Taps {
  std::vector<int64_t> first, second;
  std::vector<float> first_weight, second_weight;

  Taps(int64_t in, int64_t out) : first(out), second(out), first_weight(out), second_weight(out) {
    for (int64_t o = 0; o < out; ++o) {
      const double source = std::max(0.0, (o + 0.5) * static_cast<double>(in) / out - 0.5);
      const int64_t i = std::min<int64_t>(static_cast<int64_t>(source), in - 1);
      const double frac = std::clamp(source - i, 0.0, 1.0);
      first[o] = i;
      second[o] = std::min<int64_t>(i + 1, in - 1);
      first_weight[o] = static_cast<float>(1.0 - frac);
      second_weight[o] = static_cast<float>(frac);
    }
  }
};

struct Problem {
  int64_t n, h, w, k;  // logits
  int64_t oh, ow;      // labels
  int64_t padded_k;    // k rounded up to whole vectors
  int32_t ignore_index;
  Taps rows, cols;

  Problem(int64_t n, int64_t h, int64_t w, int64_t k, int64_t oh, int64_t ow, int32_t ignore_index)
      : n(n), h(h), w(w), k(k), oh(oh), ow(ow), padded_k((k + kLanes - 1) / kLanes * kLanes),
        ignore_index(ignore_index), rows(h, oh), cols(w, ow) {}

  const float* LogitRow(const float* logits, int64_t b, int64_t y) const { return logits + (b * h + y) * w * k; }
};

// Per-task scratch: one label row's logits interpolated vertically (w * k) and one pixel's logits (padded_k; the
// lanes past k start as -inf for the forward's LogSumExp, and the backward, which never reads them, overwrites them).
struct Scratch {
  std::vector<float> row, pixel;
  explicit Scratch(const Problem& p) : row(p.w * p.k), pixel(p.padded_k, -INFINITY) {}
};

// Label row `y` of image `b`: the logits interpolated between their two source rows, into scratch.row.
void InterpolateRow(const Problem& p, const float* logits, int64_t b, int64_t y, Scratch& s) {
  const float* r0 = p.LogitRow(logits, b, p.rows.first[y]);
  const float* r1 = p.LogitRow(logits, b, p.rows.second[y]);
  const float w0 = p.rows.first_weight[y], w1 = p.rows.second_weight[y];
  float* out = s.row.data();
  for (int64_t i = 0; i < p.w * p.k; ++i) out[i] = w0 * r0[i] + w1 * r1[i];
}

// Pixel x of the interpolated row, into scratch.pixel[0, k).
void InterpolatePixel(const Problem& p, int64_t x, Scratch& s) {
  const float* c0 = s.row.data() + p.cols.first[x] * p.k;
  const float* c1 = s.row.data() + p.cols.second[x] * p.k;
  const float w0 = p.cols.first_weight[x], w1 = p.cols.second_weight[x];
  float* out = s.pixel.data();
  for (int64_t i = 0; i < p.k; ++i) out[i] = w0 * c0[i] + w1 * c1[i];
}

float LogSumExp(const Problem& p, const float* u) {
  Vec m = Load(u);
  for (int64_t i = kLanes; i < p.padded_k; i += kLanes) m = Max(m, Load(u + i));
  const float top = HorizontalMax(m);
  Vec sum = {};
  for (int64_t i = 0; i < p.padded_k; i += kLanes) sum += Exp(Load(u + i) - top);
  return top + std::log(HorizontalSum(sum));
}

// Label rows [row0, row1): their loss sums and log-normalisers (0 at ignored pixels). Returns false if a label is
// neither a class nor ignore_index (that pixel then counts as ignored).
bool ForwardRows(const Problem& p, const float* logits, const int32_t* labels, float* row_loss, float* lse,
                 int64_t row0, int64_t row1) {
  Scratch s(p);
  bool labels_valid = true;
  for (int64_t row = row0; row < row1; ++row) {
    const int64_t b = row / p.oh, y = row % p.oh;
    InterpolateRow(p, logits, b, y, s);
    const int32_t* label = labels + row * p.ow;
    double total = 0.0;
    for (int64_t x = 0; x < p.ow; ++x) {
      lse[row * p.ow + x] = 0.0f;
      if (label[x] == p.ignore_index) continue;
      if (label[x] < 0 || label[x] >= p.k) {
        labels_valid = false;
        continue;
      }
      InterpolatePixel(p, x, s);
      const float normaliser = LogSumExp(p, s.pixel.data());
      lse[row * p.ow + x] = normaliser;
      total += normaliser - s.pixel[label[x]];
    }
    row_loss[row] = static_cast<float>(total);
  }
  return labels_valid;
}

// Logit row `a` of image `b`: the gradients of every label row that reads it (one or two source rows each). Labels
// that are neither a class nor ignore_index count as ignored, as in the forward pass.
void BackwardRow(const Problem& p, const float* logits, const int32_t* labels, const float* lse, float* grad,
                 int64_t b, int64_t a, Scratch& s) {
  float* g = grad + (b * p.h + a) * p.w * p.k;
  std::fill(g, g + p.w * p.k, 0.0f);
  for (int64_t y = 0; y < p.oh; ++y) {
    const float wy = (p.rows.first[y] == a ? p.rows.first_weight[y] : 0.0f) +
                     (p.rows.second[y] == a ? p.rows.second_weight[y] : 0.0f);
    if (wy == 0.0f) continue;
    InterpolateRow(p, logits, b, y, s);
    const int64_t row = b * p.oh + y;
    const int32_t* label = labels + row * p.ow;
    for (int64_t x = 0; x < p.ow; ++x) {
      if (label[x] == p.ignore_index || label[x] < 0 || label[x] >= p.k) continue;
      InterpolatePixel(p, x, s);
      float* u = s.pixel.data();
      const Vec normaliser = Splat(lse[row * p.ow + x]);
      for (int64_t i = 0; i < p.padded_k; i += kLanes) Store(u + i, Exp(Load(u + i) - normaliser));
      u[label[x]] -= 1.0f;  // softmax - onehot
      float* g0 = g + p.cols.first[x] * p.k;
      float* g1 = g + p.cols.second[x] * p.k;
      const float w0 = wy * p.cols.first_weight[x], w1 = wy * p.cols.second_weight[x];
      for (int64_t i = 0; i < p.k; ++i) g0[i] += w0 * u[i];
      for (int64_t i = 0; i < p.k; ++i) g1[i] += w1 * u[i];
    }
  }
}

// The problem of `logits` and `labels`, or an error message.
std::string MakeProblem(const ffi::Buffer<ffi::F32>& logits, const ffi::Buffer<ffi::S32>& labels,
                        int64_t ignore_index, std::unique_ptr<Problem>* problem) {
  auto d = logits.dimensions();
  auto l = labels.dimensions();
  if (d.size() != 4 || l.size() != 3 || l[0] != d[0]) {
    return "upsampled cross-entropy: logits must be (N, h, w, K) and labels (N, H, W)";
  }
  if (d[1] < 1 || d[2] < 1 || d[3] < 1) return "upsampled cross-entropy: the logits are empty";
  *problem = std::make_unique<Problem>(d[0], d[1], d[2], d[3], l[1], l[2], static_cast<int32_t>(ignore_index));
  return "";
}

int64_t NumChunks(int64_t rows) { return std::clamp<int64_t>(rows, 1, 64); }

ffi::Future ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits, ffi::Buffer<ffi::S32> labels,
                        int64_t ignore_index, ffi::ResultBuffer<ffi::F32> row_loss, ffi::ResultBuffer<ffi::F32> lse) {
  std::unique_ptr<Problem> owned;
  if (std::string error = MakeProblem(logits, labels, ignore_index, &owned); !error.empty()) return Failed(error);
  std::shared_ptr<const Problem> p(std::move(owned));
  const float* in = logits.typed_data();
  const int32_t* target = labels.typed_data();
  float* loss_out = row_loss->typed_data();
  float* lse_out = lse->typed_data();
  const int64_t rows = p->n * p->oh, chunks = NumChunks(rows);
  const std::string error = "upsampled cross-entropy: a label is neither a class in [0, " + std::to_string(p->k) +
                            ") nor ignore_index " + std::to_string(ignore_index) + ": check the dataset's labels";
  return RunChunks(
      pool, chunks,
      [=](int64_t chunk) {
        return ForwardRows(*p, in, target, loss_out, lse_out, rows * chunk / chunks, rows * (chunk + 1) / chunks);
      },
      [error](bool labels_valid) { return labels_valid ? std::string() : error; });
}

ffi::Future BackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits, ffi::Buffer<ffi::S32> labels,
                         ffi::Buffer<ffi::F32> lse, int64_t ignore_index, ffi::ResultBuffer<ffi::F32> grad) {
  std::unique_ptr<Problem> owned;
  if (std::string error = MakeProblem(logits, labels, ignore_index, &owned); !error.empty()) return Failed(error);
  std::shared_ptr<const Problem> p(std::move(owned));
  auto e = lse.dimensions();
  if (e.size() != 3 || e[0] != p->n || e[1] != p->oh || e[2] != p->ow) {
    return Failed("upsampled cross-entropy: lse must have the labels' shape");
  }
  const float* in = logits.typed_data();
  const int32_t* target = labels.typed_data();
  const float* normaliser = lse.typed_data();
  float* out = grad->typed_data();
  const int64_t rows = p->n * p->h, chunks = NumChunks(rows);
  return RunChunks(
      pool, chunks,
      [=](int64_t chunk) {
        Scratch s(*p);
        for (int64_t row = rows * chunk / chunks; row < rows * (chunk + 1) / chunks; ++row) {
          BackwardRow(*p, in, target, normaliser, out, row / p->h, row % p->h, s);
        }
        return true;
      },
      [](bool) { return std::string(); });
}

}  // namespace
}  // namespace segnext

namespace ffi = xla::ffi;

XLA_FFI_DEFINE_HANDLER_SYMBOL(SegnextUpsampledCrossEntropyForward, segnext::ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("ignore_index")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SegnextUpsampledCrossEntropyBackward, segnext::BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("ignore_index")
                                  .Ret<ffi::Buffer<ffi::F32>>());
