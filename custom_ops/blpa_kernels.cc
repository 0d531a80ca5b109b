// CPU kernels (and, with GOOGLE_CUDA, the GPU OpKernels that call the
// launchers of blpa_kernels.cu.cc) for the ops registered in blpa_ops.cc.
//
// The per-element math is in blpa_kernels.h, shared with the CUDA kernels.
// The CPU path splits the flat tensor into fixed blocks run on TF's intra-op
// thread pool; inside a block, elements are visited in runs of whole channel
// periods so the inner loops index contiguous parameter arrays and vectorize.

// Before any Eigen include: makes Eigen::GpuDevice (the op's CUDA stream)
// available to the GPU OpKernels.
#if GOOGLE_CUDA
#define EIGEN_USE_GPU
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#include "blpa_kernels.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/framework/types.h"

#if GOOGLE_CUDA
#include "unsupported/Eigen/CXX11/Tensor"
#endif

namespace blpa {
namespace {

using ::tensorflow::DEVICE_CPU;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;

// Elements per work item. Even, so a 4-bit byte never straddles two items.
constexpr int64_t kBlock = int64_t{1} << 14;
// Parameter runs are at least this long, so small channel counts still give
// long vectorizable inner loops.
constexpr int64_t kMinPeriod = 256;

// GCC builds an AVX2 clone next to the baseline one and picks at load time;
// the library stays loadable on any x86-64 CPU. No FMA: avx2 does not imply
// it, and -ffp-contract=off forbids contraction anyway. (The loops also need
// -fno-trapping-math to if-convert; it changes no result.)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && \
    !defined(__CUDACC__)
#define BLPA_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define BLPA_CPU_CLONES
#endif

// Per-channel parameters repeated to a period P (a multiple of C, >= kMinPeriod
// unless C is larger), so that element i uses entry (i % C) + j * C.
class Periodic {
 public:
  Periodic(const std::vector<const float*>& params, int64_t channels)
      : channels_(channels) {
    const int64_t reps =
        channels >= kMinPeriod ? 1 : (kMinPeriod + channels - 1) / channels;
    period_ = channels * reps;
    for (const float* p : params) {
      if (reps == 1) {
        ptrs_.push_back(p);
        continue;
      }
      storage_.emplace_back(period_);
      float* dst = storage_.back().data();
      for (int64_t r = 0; r < reps; ++r) {
        std::memcpy(dst + r * channels, p, channels * sizeof(float));
      }
      ptrs_.push_back(dst);
    }
  }
  int64_t channels() const { return channels_; }
  int64_t period() const { return period_; }
  const float* operator[](size_t i) const { return ptrs_[i]; }

 private:
  int64_t channels_;
  int64_t period_ = 0;
  std::vector<std::vector<float>> storage_;
  std::vector<const float*> ptrs_;
};

// Calls fn(offset_in_block, param_offset, length) over [begin, end) in runs
// that stay inside one parameter period.
template <typename Fn>
inline void ForEachRun(const Periodic& p, int64_t begin, int64_t end, Fn fn) {
  int64_t i = begin;
  int64_t off = begin % p.channels();
  while (i < end) {
    const int64_t len = std::min(p.period() - off, end - i);
    fn(i - begin, off, len);
    i += len;
    off = 0;
  }
}

// ---- inner loops ------------------------------------------------------------
// One run of elements whose parameters are contiguous. Plain pointer/value
// arguments (no closures) so GCC vectorizes them; each has an AVX2 clone.
//
// The loops that produce an activation or a gradient take the leaky ReLU's
// negative slope `s` and are templates on kLeaky: the cloned entry point picks
// the instance once per run, and the ReLU instance (kLeaky false) passes the
// per-element functions a literal 0.0f, so it compiles to exactly the loop of
// the plain ReLU (LeakyNeg folds to 0.0f).

// `a` may alias `x` (the op forwards x's buffer): each element is read before
// it is written and no element depends on another, which `ivdep` promises so
// that the loop still vectorizes without __restrict on the pair.
template <bool kLeaky>
inline void EncodeLoop(const float* x, const float* __restrict mean,
                       const float* __restrict inv_std,
                       const float* __restrict gamma,
                       const float* __restrict beta, const float* __restrict lo,
                       const float* __restrict lower_on,
                       const float* __restrict upper_on,
                       const float* __restrict lower_off,
                       const float* __restrict upper_off, int64_t len, Grid g,
                       float* a, uint8_t* __restrict codes, float s) {
  const float slope = kLeaky ? s : 0.0f;
#pragma GCC ivdep
  for (int64_t t = 0; t < len; ++t) {
    a[t] = EncodeOneBounded(x[t], mean[t], inv_std[t], gamma[t], beta[t], lo[t],
                            Bounds{lower_on[t], upper_on[t]},
                            Bounds{lower_off[t], upper_off[t]}, g, &codes[t],
                            slope);
  }
}

BLPA_CPU_CLONES
void EncodeRun(const float* x, const float* __restrict mean,
               const float* __restrict inv_std, const float* __restrict gamma,
               const float* __restrict beta, const float* __restrict lo,
               const float* __restrict lower_on, const float* __restrict upper_on,
               const float* __restrict lower_off,
               const float* __restrict upper_off, int64_t len, Grid g,
               float* a, uint8_t* __restrict codes, float s) {
  if (s == 0.0f) {
    EncodeLoop<false>(x, mean, inv_std, gamma, beta, lo, lower_on, upper_on,
                      lower_off, upper_off, len, g, a, codes, s);
  } else {
    EncodeLoop<true>(x, mean, inv_std, gamma, beta, lo, lower_on, upper_on,
                     lower_off, upper_off, len, g, a, codes, s);
  }
}

BLPA_CPU_CLONES
void PackRun(const uint8_t* __restrict codes, int64_t count,
             uint8_t* __restrict out) {
  const int64_t pairs = count / 2;
  for (int64_t j = 0; j < pairs; ++j) {
    out[j] = PackPair(codes[2 * j], codes[2 * j + 1]);
  }
  // Odd total count: the last element pads its byte with a zero nibble.
  if (count & 1) out[pairs] = PackPair(codes[count - 1], 0);
}

BLPA_CPU_CLONES
void UnpackRun(const uint8_t* __restrict in, int64_t count,
               uint8_t* __restrict codes) {
  for (int64_t j = 0; j < count / 2; ++j) {
    codes[2 * j] = LowNibble(in[j]);
    codes[2 * j + 1] = HighNibble(in[j]);
  }
  if (count & 1) codes[count - 1] = LowNibble(in[count / 2]);
}

BLPA_CPU_CLONES
void DecodeRun(const uint8_t* __restrict codes, const float* __restrict lo,
               const float* __restrict k, const float* __restrict flip,
               int64_t len, Grid g, float* __restrict xhat,
               bool* __restrict mask) {
  for (int64_t t = 0; t < len; ++t) {
    xhat[t] = DecodeOne(codes[t], lo[t], k[t], flip[t], g, &mask[t]);
  }
}

template <bool kLeaky>
inline void DecodeReluLoop(const uint8_t* __restrict codes,
                           const float* __restrict lo,
                           const float* __restrict k,
                           const float* __restrict flip,
                           const float* __restrict gamma,
                           const float* __restrict beta, int64_t len, Grid g,
                           float* __restrict a, float s) {
  const float slope = kLeaky ? s : 0.0f;
  for (int64_t t = 0; t < len; ++t) {
    a[t] = DecodeReluOne(codes[t], lo[t], k[t], flip[t], gamma[t], beta[t], g,
                         slope);
  }
}

BLPA_CPU_CLONES
void DecodeReluRun(const uint8_t* __restrict codes, const float* __restrict lo,
                   const float* __restrict k, const float* __restrict flip,
                   const float* __restrict gamma, const float* __restrict beta,
                   int64_t len, Grid g, float* __restrict a, float s) {
  if (s == 0.0f) {
    DecodeReluLoop<false>(codes, lo, k, flip, gamma, beta, len, g, a, s);
  } else {
    DecodeReluLoop<true>(codes, lo, k, flip, gamma, beta, len, g, a, s);
  }
}

// Pass 1 of the BN backward: adds g_y and g_y * xhat of each element to its
// own slot of accumulators (one per parameter-period entry, so slots are
// distinct within a run and the loop vectorizes). Acc is float for short
// per-block partial sums (flushed into double), or double.
template <bool kLeaky, typename Acc>
inline void BnSumsLoop(const uint8_t* __restrict codes,
                       const float* __restrict g_a, const float* __restrict lo,
                       const float* __restrict k, const float* __restrict flip,
                       int64_t len, Grid g, Acc* __restrict sum_b,
                       Acc* __restrict sum_g, float s) {
  const float slope = kLeaky ? s : 0.0f;
  for (int64_t t = 0; t < len; ++t) {
    float xhat;
    const float g_y =
        MaskedGradOne(codes[t], g_a[t], lo[t], k[t], flip[t], g, &xhat, slope);
    sum_b[t] += static_cast<Acc>(g_y);
    sum_g[t] += static_cast<Acc>(g_y * xhat);
  }
}

BLPA_CPU_CLONES
void BnSumsRun(const uint8_t* __restrict codes, const float* __restrict g_a,
               const float* __restrict lo, const float* __restrict k,
               const float* __restrict flip, int64_t len, Grid g,
               float* __restrict sum_b, float* __restrict sum_g, float s) {
  if (s == 0.0f) {
    BnSumsLoop<false>(codes, g_a, lo, k, flip, len, g, sum_b, sum_g, s);
  } else {
    BnSumsLoop<true>(codes, g_a, lo, k, flip, len, g, sum_b, sum_g, s);
  }
}

BLPA_CPU_CLONES
void BnSumsRun(const uint8_t* __restrict codes, const float* __restrict g_a,
               const float* __restrict lo, const float* __restrict k,
               const float* __restrict flip, int64_t len, Grid g,
               double* __restrict sum_b, double* __restrict sum_g, float s) {
  if (s == 0.0f) {
    BnSumsLoop<false>(codes, g_a, lo, k, flip, len, g, sum_b, sum_g, s);
  } else {
    BnSumsLoop<true>(codes, g_a, lo, k, flip, len, g, sum_b, sum_g, s);
  }
}

// Adds float partial sums into double ones and clears them.
BLPA_CPU_CLONES
void FlushSums(float* __restrict part, int64_t len, double* __restrict sum) {
  for (int64_t t = 0; t < len; ++t) {
    sum[t] += static_cast<double>(part[t]);
    part[t] = 0.0f;
  }
}

// Pass 2 of the BN backward: the input gradient. g_x may alias g_a (see
// EncodeLoop).
template <bool kLeaky>
inline void BnBackwardLoop(const uint8_t* __restrict codes, const float* g_a,
                           const float* __restrict lo,
                           const float* __restrict k,
                           const float* __restrict flip,
                           const float* __restrict scale,
                           const float* __restrict mean_dbeta,
                           const float* __restrict mean_dgamma, int64_t len,
                           Grid g, float* g_x, float s) {
  const float slope = kLeaky ? s : 0.0f;
#pragma GCC ivdep
  for (int64_t t = 0; t < len; ++t) {
    g_x[t] = BnBackwardOne(codes[t], g_a[t], lo[t], k[t], flip[t], scale[t],
                           mean_dbeta[t], mean_dgamma[t], g, slope);
  }
}

BLPA_CPU_CLONES
void BnBackwardRun(const uint8_t* __restrict codes, const float* g_a,
                   const float* __restrict lo, const float* __restrict k,
                   const float* __restrict flip, const float* __restrict scale,
                   const float* __restrict mean_dbeta,
                   const float* __restrict mean_dgamma, int64_t len, Grid g,
                   float* g_x, float s) {
  if (s == 0.0f) {
    BnBackwardLoop<false>(codes, g_a, lo, k, flip, scale, mean_dbeta,
                          mean_dgamma, len, g, g_x, s);
  } else {
    BnBackwardLoop<true>(codes, g_a, lo, k, flip, scale, mean_dbeta,
                         mean_dgamma, len, g, g_x, s);
  }
}

// The exact path's loops (bits=None): xhat is stored, not codes. In the
// forward, xhat may alias x; in pass 2, g_x may alias g_a (see EncodeLoop).
template <bool kLeaky>
inline void NormalizeReluLoop(const float* x, const float* __restrict mean,
                              const float* __restrict inv_std,
                              const float* __restrict gamma,
                              const float* __restrict beta, int64_t len,
                              float* __restrict a, float* xhat, float s) {
  const float slope = kLeaky ? s : 0.0f;
#pragma GCC ivdep
  for (int64_t t = 0; t < len; ++t) {
    a[t] = NormalizeReluOne(x[t], mean[t], inv_std[t], gamma[t], beta[t],
                            &xhat[t], slope);
  }
}

BLPA_CPU_CLONES
void NormalizeReluRun(const float* x, const float* __restrict mean,
                      const float* __restrict inv_std,
                      const float* __restrict gamma,
                      const float* __restrict beta, int64_t len,
                      float* __restrict a, float* xhat, float s) {
  if (s == 0.0f) {
    NormalizeReluLoop<false>(x, mean, inv_std, gamma, beta, len, a, xhat, s);
  } else {
    NormalizeReluLoop<true>(x, mean, inv_std, gamma, beta, len, a, xhat, s);
  }
}

template <bool kLeaky>
inline void ExactReluLoop(const float* __restrict xhat,
                          const float* __restrict gamma,
                          const float* __restrict beta, int64_t len,
                          float* __restrict a, float s) {
  const float slope = kLeaky ? s : 0.0f;
  for (int64_t t = 0; t < len; ++t) {
    a[t] = ExactReluOne(xhat[t], gamma[t], beta[t], slope);
  }
}

BLPA_CPU_CLONES
void ExactReluRun(const float* __restrict xhat, const float* __restrict gamma,
                  const float* __restrict beta, int64_t len,
                  float* __restrict a, float s) {
  if (s == 0.0f) {
    ExactReluLoop<false>(xhat, gamma, beta, len, a, s);
  } else {
    ExactReluLoop<true>(xhat, gamma, beta, len, a, s);
  }
}

template <bool kLeaky, typename Acc>
inline void ExactSumsLoop(const float* __restrict xhat,
                          const float* __restrict g_a,
                          const float* __restrict gamma,
                          const float* __restrict beta, int64_t len,
                          Acc* __restrict sum_b, Acc* __restrict sum_g,
                          float s) {
  const float slope = kLeaky ? s : 0.0f;
  for (int64_t t = 0; t < len; ++t) {
    const float g_y =
        ExactMaskedGradOne(xhat[t], g_a[t], gamma[t], beta[t], slope);
    sum_b[t] += static_cast<Acc>(g_y);
    sum_g[t] += static_cast<Acc>(g_y * xhat[t]);
  }
}

BLPA_CPU_CLONES
void ExactSumsRun(const float* __restrict xhat, const float* __restrict g_a,
                  const float* __restrict gamma, const float* __restrict beta,
                  int64_t len, float* __restrict sum_b, float* __restrict sum_g,
                  float s) {
  if (s == 0.0f) {
    ExactSumsLoop<false>(xhat, g_a, gamma, beta, len, sum_b, sum_g, s);
  } else {
    ExactSumsLoop<true>(xhat, g_a, gamma, beta, len, sum_b, sum_g, s);
  }
}

BLPA_CPU_CLONES
void ExactSumsRun(const float* __restrict xhat, const float* __restrict g_a,
                  const float* __restrict gamma, const float* __restrict beta,
                  int64_t len, double* __restrict sum_b,
                  double* __restrict sum_g, float s) {
  if (s == 0.0f) {
    ExactSumsLoop<false>(xhat, g_a, gamma, beta, len, sum_b, sum_g, s);
  } else {
    ExactSumsLoop<true>(xhat, g_a, gamma, beta, len, sum_b, sum_g, s);
  }
}

template <bool kLeaky>
inline void ExactBnBackwardLoop(const float* __restrict xhat, const float* g_a,
                                const float* __restrict gamma,
                                const float* __restrict beta,
                                const float* __restrict scale,
                                const float* __restrict mean_dbeta,
                                const float* __restrict mean_dgamma,
                                int64_t len, float* g_x, float s) {
  const float slope = kLeaky ? s : 0.0f;
#pragma GCC ivdep
  for (int64_t t = 0; t < len; ++t) {
    const float g_y =
        ExactMaskedGradOne(xhat[t], g_a[t], gamma[t], beta[t], slope);
    g_x[t] = BnInputGradOne(g_y, xhat[t], scale[t], mean_dbeta[t], mean_dgamma[t]);
  }
}

BLPA_CPU_CLONES
void ExactBnBackwardRun(const float* __restrict xhat, const float* g_a,
                        const float* __restrict gamma,
                        const float* __restrict beta,
                        const float* __restrict scale,
                        const float* __restrict mean_dbeta,
                        const float* __restrict mean_dgamma, int64_t len,
                        float* g_x, float s) {
  if (s == 0.0f) {
    ExactBnBackwardLoop<false>(xhat, g_a, gamma, beta, scale, mean_dbeta,
                               mean_dgamma, len, g_x, s);
  } else {
    ExactBnBackwardLoop<true>(xhat, g_a, gamma, beta, scale, mean_dbeta,
                              mean_dgamma, len, g_x, s);
  }
}

// ---- blocks -----------------------------------------------------------------

void EncodeBlock(const EncodeArgs& args, const Periodic& p, int64_t begin,
                 int64_t end) {
  const Grid g = MakeGrid(args.bits, args.window);
  alignas(64) uint8_t buffer[kBlock];
  uint8_t* codes = args.bits == 8 ? args.packed + begin : buffer;
  ForEachRun(p, begin, end, [&](int64_t o, int64_t c, int64_t len) {
    EncodeRun(args.x + begin + o, p[0] + c, p[1] + c, p[2] + c, p[3] + c,
              p[4] + c, p[5] + c, p[6] + c, p[7] + c, p[8] + c, len, g,
              args.a + begin + o, codes + o, args.negative_slope);
  });
  if (args.bits == 4) PackRun(buffer, end - begin, args.packed + begin / 2);
}

// Per-channel code bounds for both ReLU sides, [lower_on, upper_on, lower_off,
// upper_off]: hoists the side logic out of the per-element loop.
std::vector<std::vector<float>> ChannelBounds(const EncodeArgs& args) {
  const Grid g = MakeGrid(args.bits, args.window);
  std::vector<std::vector<float>> out(4, std::vector<float>(args.channels));
  for (int64_t c = 0; c < args.channels; ++c) {
    const Bounds on = SideBounds(true, args.k[c], args.flip[c], args.aligned[c], g);
    const Bounds off = SideBounds(false, args.k[c], args.flip[c], args.aligned[c], g);
    out[0][c] = on.lower;
    out[1][c] = on.upper;
    out[2][c] = off.lower;
    out[3][c] = off.upper;
  }
  return out;
}

// Codes of [begin, end): unpacked into `buffer`, or the packed bytes
// themselves for 8 bits.
const uint8_t* BlockCodes(const uint8_t* packed, int bits, int64_t begin,
                          int64_t end, uint8_t* buffer) {
  if (bits == 8) return packed + begin;
  UnpackRun(packed + begin / 2, end - begin, buffer);
  return buffer;
}

const uint8_t* BlockCodes(const DecodeArgs& args, int64_t begin, int64_t end,
                          uint8_t* buffer) {
  return BlockCodes(args.packed, args.bits, begin, end, buffer);
}

void DecodeBlock(const DecodeArgs& args, const Periodic& p, int64_t begin,
                 int64_t end) {
  const Grid g = MakeGrid(args.bits, args.window);
  alignas(64) uint8_t buffer[kBlock];
  const uint8_t* codes = BlockCodes(args, begin, end, buffer);
  ForEachRun(p, begin, end, [&](int64_t o, int64_t c, int64_t len) {
    DecodeRun(codes + o, p[0] + c, p[1] + c, p[2] + c, len, g,
              args.xhat + begin + o, args.mask + begin + o);
  });
}

void DecodeReluBlock(const DecodeArgs& args, const Periodic& p, int64_t begin,
                     int64_t end) {
  const Grid g = MakeGrid(args.bits, args.window);
  alignas(64) uint8_t buffer[kBlock];
  const uint8_t* codes = BlockCodes(args, begin, end, buffer);
  ForEachRun(p, begin, end, [&](int64_t o, int64_t c, int64_t len) {
    DecodeReluRun(codes + o, p[0] + c, p[1] + c, p[2] + c, p[3] + c, p[4] + c,
                  len, g, args.a + begin + o, args.negative_slope);
  });
}

// p holds mean, inv_std, gamma, beta.
void NormalizeReluBlock(const ExactArgs& args, const Periodic& p, int64_t begin,
                        int64_t end) {
  ForEachRun(p, begin, end, [&](int64_t o, int64_t c, int64_t len) {
    NormalizeReluRun(args.x + begin + o, p[0] + c, p[1] + c, p[2] + c, p[3] + c,
                     len, args.a + begin + o, args.xhat + begin + o,
                     args.negative_slope);
  });
}

// p holds gamma, beta.
void ExactReluBlock(const ExactArgs& args, const Periodic& p, int64_t begin,
                    int64_t end) {
  ForEachRun(p, begin, end, [&](int64_t o, int64_t c, int64_t len) {
    ExactReluRun(args.x + begin + o, p[0] + c, p[1] + c, len, args.a + begin + o,
                 args.negative_slope);
  });
}

// Periods up to this many slots accumulate each block in float (at least
// kBlock / kMaxFloatPeriod = 16 elements per slot and block, flushed into
// double after the block: cheaper than double per element); longer ones add
// into double directly.
constexpr int64_t kMaxFloatPeriod = kBlock / 16;

// Pass 1 over [begin, end) (a multiple of kBlock apart, except at n): adds
// into the shard's double accumulators sum_b, sum_g of p.period() slots each.
// p holds lo, k, flip (codes) or gamma, beta (exact).
void BnSumsShard(const BnBackwardArgs& args, const Periodic& p, int64_t begin,
                 int64_t end, double* sum_b, double* sum_g) {
  const Grid g = MakeGrid(args.bits, args.window);
  const float s = args.negative_slope;
  const int64_t period = p.period();
  const bool use_float = period <= kMaxFloatPeriod;
  alignas(64) uint8_t buffer[kBlock];
  alignas(64) float part[2 * kMaxFloatPeriod];
  if (use_float) std::fill(part, part + 2 * period, 0.0f);
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t e = std::min(end, b + kBlock);
    const uint8_t* codes =
        args.exact ? nullptr : BlockCodes(args.packed, args.bits, b, e, buffer);
    ForEachRun(p, b, e, [&](int64_t o, int64_t c, int64_t len) {
      if (args.exact) {
        const float* xhat = args.xhat + b + o;
        const float* g_a = args.g_a + b + o;
        if (use_float) {
          ExactSumsRun(xhat, g_a, p[0] + c, p[1] + c, len, part + c,
                       part + period + c, s);
        } else {
          ExactSumsRun(xhat, g_a, p[0] + c, p[1] + c, len, sum_b + c,
                       sum_g + c, s);
        }
      } else if (use_float) {
        BnSumsRun(codes + o, args.g_a + b + o, p[0] + c, p[1] + c, p[2] + c,
                  len, g, part + c, part + period + c, s);
      } else {
        BnSumsRun(codes + o, args.g_a + b + o, p[0] + c, p[1] + c, p[2] + c,
                  len, g, sum_b + c, sum_g + c, s);
      }
    });
    if (use_float) {
      FlushSums(part, period, sum_b);
      FlushSums(part + period, period, sum_g);
    }
  }
}

// Pass 2 over one block; p holds lo, k, flip (codes) or gamma, beta (exact),
// then scale, mean_dbeta, mean_dgamma.
void BnBackwardBlock(const BnBackwardArgs& args, const Periodic& p,
                     int64_t begin, int64_t end) {
  if (args.exact) {
    ForEachRun(p, begin, end, [&](int64_t o, int64_t c, int64_t len) {
      ExactBnBackwardRun(args.xhat + begin + o, args.g_a + begin + o, p[0] + c,
                         p[1] + c, p[2] + c, p[3] + c, p[4] + c, len,
                         args.g_x + begin + o, args.negative_slope);
    });
    return;
  }
  const Grid g = MakeGrid(args.bits, args.window);
  alignas(64) uint8_t buffer[kBlock];
  const uint8_t* codes = BlockCodes(args.packed, args.bits, begin, end, buffer);
  ForEachRun(p, begin, end, [&](int64_t o, int64_t c, int64_t len) {
    BnBackwardRun(codes + o, args.g_a + begin + o, p[0] + c, p[1] + c, p[2] + c,
                  p[3] + c, p[4] + c, p[5] + c, len, g, args.g_x + begin + o,
                  args.negative_slope);
  });
}

// Runs block_fn(begin, end) over [0, n) in kBlock pieces on the intra-op pool.
void ParallelBlocks(OpKernelContext* ctx, int64_t n,
                    const std::function<void(int64_t, int64_t)>& block_fn) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  auto run = [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      block_fn(b * kBlock, std::min(n, (b + 1) * kBlock));
    }
  };
  if (blocks <= 1) {
    run(0, blocks);
    return;
  }
  // Cost per block in cycles, about 2 per element (measured ~1.2 of compute
  // with AVX2, plus memory), so that Eigen's cost model only spreads tensors
  // of a few hundred KiB and up over threads.
  ctx->device()->tensorflow_cpu_worker_threads()->workers->ParallelFor(
      blocks, kBlock * 2, run);
}

// ---- shared validation ------------------------------------------------------

int64_t ByteCount(int64_t n, int bits) { return bits == 8 ? n : (n + 1) / 2; }

// Reads and validates the `negative_slope` attr (the leaky ReLU's slope).
void GetSlopeAttr(OpKernelConstruction* ctx, float* slope) {
  OP_REQUIRES_OK(ctx, ctx->GetAttr("negative_slope", slope));
  OP_REQUIRES(ctx, std::isfinite(*slope) && *slope >= 0.0f,
              absl::InvalidArgumentError(absl::StrCat(
                  "negative_slope must be a finite number >= 0, got ", *slope)));
  // -0.0 is the ReLU too: the kernels test `slope == 0`, never its sign.
}

void GetGridAttrs(OpKernelConstruction* ctx, int* bits, float* window) {
  OP_REQUIRES_OK(ctx, ctx->GetAttr("bits", bits));
  OP_REQUIRES(ctx, *bits == 4 || *bits == 8,
              absl::InvalidArgumentError("bits must be 4 or 8"));
  OP_REQUIRES_OK(ctx, ctx->GetAttr("window", window));
  OP_REQUIRES(ctx, std::isfinite(*window) && *window > 0.0f,
              absl::InvalidArgumentError("window must be a positive, finite number"));
}

// Checks that inputs [first, last) are vectors of `channels` elements.
absl::Status CheckChannelInputs(OpKernelContext* ctx, int first, int last,
                                int64_t channels) {
  for (int i = first; i < last; ++i) {
    const Tensor& t = ctx->input(i);
    if (t.dims() != 1 || t.dim_size(0) != channels) {
      return absl::InvalidArgumentError(absl::StrCat(
          "per-channel input ", i, " must have shape [", channels,
          "] (the last axis), got ", t.shape().DebugString()));
    }
  }
  return absl::OkStatus();
}

// Validates the encode inputs; fills args except the output pointers.
absl::Status PrepareEncode(OpKernelContext* ctx, int bits, float window,
                           EncodeArgs* args) {
  const Tensor& x = ctx->input(0);
  if (x.dims() < 1) {
    return absl::InvalidArgumentError("x must have rank >= 1 (channels last)");
  }
  const int64_t channels = x.dim_size(x.dims() - 1);
  TF_RETURN_IF_ERROR(CheckChannelInputs(ctx, 1, 9, channels));
  args->x = x.flat<float>().data();
  const float** params[] = {&args->mean, &args->inv_std, &args->gamma,
                            &args->beta, &args->lo,      &args->k,
                            &args->flip, &args->aligned};
  for (int i = 0; i < 8; ++i) *params[i] = ctx->input(i + 1).flat<float>().data();
  args->n = x.NumElements();
  args->channels = channels;
  args->bits = bits;
  args->window = window;
  return absl::OkStatus();
}

// Validates the decode inputs (shape input at `shape_index`, per-channel
// inputs 1..shape_index-1); fills args except the output pointers.
absl::Status PrepareDecode(OpKernelContext* ctx, int bits, float window,
                           int shape_index, TensorShape* shape, DecodeArgs* args) {
  const Tensor& shape_t = ctx->input(shape_index);
  if (shape_t.dims() != 1 || shape_t.NumElements() < 1) {
    return absl::InvalidArgumentError(
        "shape must be a non-empty vector (channels last)");
  }
  // MakeShape rejects negative sizes and element-count overflow.
  if (shape_t.dtype() == tensorflow::DT_INT32) {
    TF_RETURN_IF_ERROR(tensorflow::TensorShapeUtils::MakeShape(
        shape_t.flat<int32_t>().data(), shape_t.NumElements(), shape));
  } else {
    TF_RETURN_IF_ERROR(tensorflow::TensorShapeUtils::MakeShape(
        shape_t.flat<int64_t>().data(), shape_t.NumElements(), shape));
  }
  const int64_t channels = shape->dim_size(shape->dims() - 1);
  TF_RETURN_IF_ERROR(CheckChannelInputs(ctx, 1, shape_index, channels));
  const Tensor& packed = ctx->input(0);
  const int64_t n = shape->num_elements();
  if (packed.dims() != 1 || packed.dim_size(0) != ByteCount(n, bits)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "packed must be a vector of ", ByteCount(n, bits), " bytes for shape ",
        shape->DebugString(), " at ", bits, " bits, got ",
        packed.shape().DebugString()));
  }
  args->packed = packed.flat<uint8_t>().data();
  args->lo = ctx->input(1).flat<float>().data();
  args->k = ctx->input(2).flat<float>().data();
  args->flip = ctx->input(3).flat<float>().data();
  if (shape_index == 6) {
    args->gamma = ctx->input(4).flat<float>().data();
    args->beta = ctx->input(5).flat<float>().data();
  }
  args->n = n;
  args->channels = channels;
  args->bits = bits;
  args->window = window;
  return absl::OkStatus();
}

// Validates the fused BN-backward inputs (g_a, packed, lo, k, flip, gamma,
// inv_std); fills args except the outputs and scratch.
absl::Status PrepareBnBackward(OpKernelContext* ctx, int bits, float window,
                               BnBackwardArgs* args) {
  const Tensor& g_a = ctx->input(0);
  if (g_a.dims() < 1) {
    return absl::InvalidArgumentError("g_a must have rank >= 1 (channels last)");
  }
  const int64_t channels = g_a.dim_size(g_a.dims() - 1);
  TF_RETURN_IF_ERROR(CheckChannelInputs(ctx, 2, 7, channels));
  const Tensor& packed = ctx->input(1);
  const int64_t n = g_a.NumElements();
  if (packed.dims() != 1 || packed.dim_size(0) != ByteCount(n, bits)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "packed must be a vector of ", ByteCount(n, bits), " bytes for g_a of ",
        "shape ", g_a.shape().DebugString(), " at ", bits, " bits, got ",
        packed.shape().DebugString()));
  }
  args->g_a = g_a.flat<float>().data();
  args->packed = packed.flat<uint8_t>().data();
  args->lo = ctx->input(2).flat<float>().data();
  args->k = ctx->input(3).flat<float>().data();
  args->flip = ctx->input(4).flat<float>().data();
  args->gamma = ctx->input(5).flat<float>().data();
  args->inv_std = ctx->input(6).flat<float>().data();
  args->n = n;
  args->channels = channels;
  args->bits = bits;
  args->window = window;
  return absl::OkStatus();
}

// Validates the exact BN-backward inputs (g_a, xhat, gamma, beta, inv_std);
// fills args except the outputs.
absl::Status PrepareExactBnBackward(OpKernelContext* ctx, BnBackwardArgs* args) {
  const Tensor& g_a = ctx->input(0);
  const Tensor& xhat = ctx->input(1);
  if (g_a.dims() < 1) {
    return absl::InvalidArgumentError("g_a must have rank >= 1 (channels last)");
  }
  if (xhat.shape() != g_a.shape()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "xhat must have the shape of g_a, ", g_a.shape().DebugString(), ", got ",
        xhat.shape().DebugString()));
  }
  const int64_t channels = g_a.dim_size(g_a.dims() - 1);
  TF_RETURN_IF_ERROR(CheckChannelInputs(ctx, 2, 5, channels));
  args->g_a = g_a.flat<float>().data();
  args->exact = true;
  args->xhat = xhat.flat<float>().data();
  args->gamma = ctx->input(2).flat<float>().data();
  args->beta = ctx->input(3).flat<float>().data();
  args->inv_std = ctx->input(4).flat<float>().data();
  args->n = g_a.NumElements();
  args->channels = channels;
  return absl::OkStatus();
}

// Allocates g_x (shape of g_a, in g_a's buffer when no one else holds it: the
// backward pass then needs one full-size tensor less), d_gamma and d_beta
// ([C]) into args.
absl::Status AllocateBnBackward(OpKernelContext* ctx, BnBackwardArgs* args) {
  Tensor* g_x = nullptr;
  Tensor* d_gamma = nullptr;
  Tensor* d_beta = nullptr;
  const TensorShape vec({args->channels});
  TF_RETURN_IF_ERROR(
      ctx->forward_input_or_allocate_output({0}, 0, ctx->input(0).shape(), &g_x));
  TF_RETURN_IF_ERROR(ctx->allocate_output(1, vec, &d_gamma));
  TF_RETURN_IF_ERROR(ctx->allocate_output(2, vec, &d_beta));
  args->g_x = g_x->flat<float>().data();
  args->d_gamma = d_gamma->flat<float>().data();
  args->d_beta = d_beta->flat<float>().data();
  return absl::OkStatus();
}

// ---- Device back ends ------------------------------------------------------
// Each OpKernel below is written once, over a device type that runs its
// kernel on validated, allocated arguments: `Cpu` on TF's thread pool,
// `Gpu` through the launchers of blpa_kernels.cu.cc on the op's stream.

struct Cpu {
  static absl::Status Encode(OpKernelContext* ctx, const EncodeArgs& args) {
    const std::vector<std::vector<float>> bounds = ChannelBounds(args);
    const Periodic p({args.mean, args.inv_std, args.gamma, args.beta, args.lo,
                      bounds[0].data(), bounds[1].data(), bounds[2].data(),
                      bounds[3].data()},
                     args.channels);
    ParallelBlocks(ctx, args.n, [&](int64_t begin, int64_t end) {
      EncodeBlock(args, p, begin, end);
    });
    return absl::OkStatus();
  }

  static absl::Status Decode(OpKernelContext* ctx, const DecodeArgs& args) {
    const Periodic p({args.lo, args.k, args.flip}, args.channels);
    ParallelBlocks(ctx, args.n, [&](int64_t begin, int64_t end) {
      DecodeBlock(args, p, begin, end);
    });
    return absl::OkStatus();
  }

  static absl::Status DecodeRelu(OpKernelContext* ctx, const DecodeArgs& args) {
    const Periodic p({args.lo, args.k, args.flip, args.gamma, args.beta},
                     args.channels);
    ParallelBlocks(ctx, args.n, [&](int64_t begin, int64_t end) {
      DecodeReluBlock(args, p, begin, end);
    });
    return absl::OkStatus();
  }

  static absl::Status NormalizeRelu(OpKernelContext* ctx, const ExactArgs& args) {
    const Periodic p({args.mean, args.inv_std, args.gamma, args.beta},
                     args.channels);
    ParallelBlocks(ctx, args.n, [&](int64_t begin, int64_t end) {
      NormalizeReluBlock(args, p, begin, end);
    });
    return absl::OkStatus();
  }

  static absl::Status ExactRelu(OpKernelContext* ctx, const ExactArgs& args) {
    const Periodic p({args.gamma, args.beta}, args.channels);
    ParallelBlocks(ctx, args.n, [&](int64_t begin, int64_t end) {
      ExactReluBlock(args, p, begin, end);
    });
    return absl::OkStatus();
  }

  // Pass 1 runs on a fixed number of shards (contiguous kBlock-aligned
  // ranges), each with its own double accumulators, combined in shard order:
  // the sums depend on the thread count only, not on scheduling. Pass 2 is
  // elementwise.
  static absl::Status BnBackward(OpKernelContext* ctx, BnBackwardArgs& args) {
    const int64_t channels = args.channels;
    if (args.n == 0) {
      std::fill(args.d_gamma, args.d_gamma + channels, 0.0f);
      std::fill(args.d_beta, args.d_beta + channels, 0.0f);
      return absl::OkStatus();
    }
    const int64_t n = args.n;

    // ---- pass 1: per-shard sums over [period] slots, then per channel.
    const Periodic p1(args.exact ? std::vector<const float*>{args.gamma, args.beta}
                                 : std::vector<const float*>{args.lo, args.k, args.flip},
                      channels);
    const int64_t period = p1.period();
    const auto* threads = ctx->device()->tensorflow_cpu_worker_threads();
    const int64_t blocks = (n + kBlock - 1) / kBlock;
    const int64_t shards = std::max<int64_t>(
        1, std::min<int64_t>(threads->num_threads, blocks / kMinShardBlocks));
    std::vector<double> sums(2 * shards * period, 0.0);
    auto shard_fn = [&](int64_t first, int64_t last) {
      for (int64_t s = first; s < last; ++s) {
        const int64_t begin = std::min(n, blocks * s / shards * kBlock);
        const int64_t end = std::min(n, blocks * (s + 1) / shards * kBlock);
        double* sum_b = sums.data() + 2 * s * period;
        BnSumsShard(args, p1, begin, end, sum_b, sum_b + period);
      }
    };
    if (shards == 1) {
      shard_fn(0, 1);
    } else {
      // One unit per shard, costed so that each runs as its own task.
      threads->workers->ParallelFor(shards, kBlock * 4 * (blocks / shards),
                                    shard_fn);
    }
    std::vector<double> d_beta(channels, 0.0), d_gamma(channels, 0.0);
    for (int64_t s = 0; s < shards; ++s) {
      const double* sum_b = sums.data() + 2 * s * period;
      const double* sum_g = sum_b + period;
      for (int64_t j = 0; j < period; ++j) {
        d_beta[j % channels] += sum_b[j];
        d_gamma[j % channels] += sum_g[j];
      }
    }

    // ---- per-channel coefficients, as float32 in TF's order.
    const float count = static_cast<float>(n / channels);
    std::vector<float> scale(channels), mean_dbeta(channels),
        mean_dgamma(channels);
    for (int64_t c = 0; c < channels; ++c) {
      args.d_beta[c] = static_cast<float>(d_beta[c]);
      args.d_gamma[c] = static_cast<float>(d_gamma[c]);
      const BnCoef coef = MakeBnCoef(args.gamma[c], args.inv_std[c],
                                     args.d_beta[c], args.d_gamma[c], count);
      scale[c] = coef.scale;
      mean_dbeta[c] = coef.mean_dbeta;
      mean_dgamma[c] = coef.mean_dgamma;
    }

    // ---- pass 2: g_x.
    std::vector<const float*> p2_params =
        args.exact ? std::vector<const float*>{args.gamma, args.beta}
                   : std::vector<const float*>{args.lo, args.k, args.flip};
    p2_params.insert(p2_params.end(),
                     {scale.data(), mean_dbeta.data(), mean_dgamma.data()});
    const Periodic p2(p2_params, channels);
    ParallelBlocks(ctx, n, [&](int64_t begin, int64_t end) {
      BnBackwardBlock(args, p2, begin, end);
    });
    return absl::OkStatus();
  }

 private:
  // Pass 1 uses one shard per this many blocks at most (small tensors run on
  // one thread: splitting costs more than it saves).
  static constexpr int64_t kMinShardBlocks = 4;
};

#if GOOGLE_CUDA

struct Gpu {
  static absl::Status Encode(OpKernelContext* ctx, const EncodeArgs& args) {
    return LaunchStatus(LaunchEncodeGpu(args, Stream(ctx)));
  }

  static absl::Status Decode(OpKernelContext* ctx, const DecodeArgs& args) {
    return LaunchStatus(LaunchDecodeGpu(args, Stream(ctx)));
  }

  static absl::Status DecodeRelu(OpKernelContext* ctx, const DecodeArgs& args) {
    return LaunchStatus(LaunchDecodeReluGpu(args, Stream(ctx)));
  }

  static absl::Status NormalizeRelu(OpKernelContext* ctx, const ExactArgs& args) {
    return LaunchStatus(LaunchNormalizeReluGpu(args, Stream(ctx)));
  }

  static absl::Status ExactRelu(OpKernelContext* ctx, const ExactArgs& args) {
    return LaunchStatus(LaunchExactReluGpu(args, Stream(ctx)));
  }

  // Both passes on the device; the per-channel sums live in scratch memory.
  static absl::Status BnBackward(OpKernelContext* ctx, BnBackwardArgs& args) {
    if (args.channels == 0) return absl::OkStatus();
    Tensor scratch;
    TF_RETURN_IF_ERROR(ctx->allocate_temp(
        tensorflow::DT_UINT8,
        TensorShape({BnBackwardScratchBytes(args.channels)}), &scratch));
    args.scratch = scratch.flat<uint8_t>().data();
    return LaunchStatus(LaunchDecodeBnBackwardGpu(args, Stream(ctx)));
  }

 private:
  static void* Stream(OpKernelContext* ctx) {
    return static_cast<void*>(ctx->eigen_device<Eigen::GpuDevice>().stream());
  }

  static absl::Status LaunchStatus(const char* error) {
    if (error == nullptr) return absl::OkStatus();
    return absl::InternalError(absl::StrCat("BLPA CUDA kernel failed: ", error));
  }
};

#endif  // GOOGLE_CUDA

// ---- OpKernels, one per op, registered per device ----------------------------

// Reads the `bits` and `window` attrs every op has.
class GridOp : public OpKernel {
 public:
  explicit GridOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    GetGridAttrs(ctx, &bits_, &window_);
  }

 protected:
  int bits_;
  float window_;
};

// A GridOp whose output is a (leaky) ReLU activation or its backward: also
// reads `negative_slope`.
class LeakyGridOp : public GridOp {
 public:
  explicit LeakyGridOp(OpKernelConstruction* ctx) : GridOp(ctx) {
    GetSlopeAttr(ctx, &slope_);
  }

 protected:
  float slope_ = 0.0f;
};

// The exact-path ops (no grid): only `negative_slope`.
class LeakyOp : public OpKernel {
 public:
  explicit LeakyOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    GetSlopeAttr(ctx, &slope_);
  }

 protected:
  float slope_ = 0.0f;
};

template <typename Device>
class EncodeOp : public LeakyGridOp {
 public:
  using LeakyGridOp::LeakyGridOp;

  void Compute(OpKernelContext* ctx) override {
    EncodeArgs args{};
    OP_REQUIRES_OK(ctx, PrepareEncode(ctx, bits_, window_, &args));
    args.negative_slope = slope_;
    Tensor* a = nullptr;
    Tensor* packed = nullptr;
    // `a` in x's buffer when no one else holds x: the forward pass then
    // needs one full-size tensor less.
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output(
                            {0}, 0, ctx->input(0).shape(), &a));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            1, TensorShape({ByteCount(args.n, bits_)}), &packed));
    if (args.n == 0) return;
    args.a = a->flat<float>().data();
    args.packed = packed->flat<uint8_t>().data();
    OP_REQUIRES_OK(ctx, Device::Encode(ctx, args));
  }
};

template <typename Device>
class DecodeOp : public GridOp {
 public:
  using GridOp::GridOp;

  void Compute(OpKernelContext* ctx) override {
    DecodeArgs args{};
    TensorShape shape;
    OP_REQUIRES_OK(ctx, PrepareDecode(ctx, bits_, window_, 4, &shape, &args));
    Tensor* xhat = nullptr;
    Tensor* mask = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, shape, &xhat));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, shape, &mask));
    if (args.n == 0) return;
    args.xhat = xhat->flat<float>().data();
    args.mask = mask->flat<bool>().data();
    OP_REQUIRES_OK(ctx, Device::Decode(ctx, args));
  }
};

template <typename Device>
class DecodeReluOp : public LeakyGridOp {
 public:
  using LeakyGridOp::LeakyGridOp;

  void Compute(OpKernelContext* ctx) override {
    DecodeArgs args{};
    TensorShape shape;
    OP_REQUIRES_OK(ctx, PrepareDecode(ctx, bits_, window_, 6, &shape, &args));
    args.negative_slope = slope_;
    Tensor* a = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, shape, &a));
    if (args.n == 0) return;
    args.a = a->flat<float>().data();
    OP_REQUIRES_OK(ctx, Device::DecodeRelu(ctx, args));
  }
};

template <typename Device>
class DecodeBnBackwardOp : public LeakyGridOp {
 public:
  using LeakyGridOp::LeakyGridOp;

  void Compute(OpKernelContext* ctx) override {
    BnBackwardArgs args{};
    OP_REQUIRES_OK(ctx, PrepareBnBackward(ctx, bits_, window_, &args));
    args.negative_slope = slope_;
    OP_REQUIRES_OK(ctx, AllocateBnBackward(ctx, &args));
    OP_REQUIRES_OK(ctx, Device::BnBackward(ctx, args));
  }
};

// ---- exact path (bits=None) ---------------------------------------------------

// Validates x (rank >= 1) and the per-channel inputs [1, last).
absl::Status PrepareExact(OpKernelContext* ctx, int last, ExactArgs* args) {
  const Tensor& x = ctx->input(0);
  if (x.dims() < 1) {
    return absl::InvalidArgumentError("the input must have rank >= 1 (channels last)");
  }
  args->channels = x.dim_size(x.dims() - 1);
  TF_RETURN_IF_ERROR(CheckChannelInputs(ctx, 1, last, args->channels));
  args->x = x.flat<float>().data();
  args->n = x.NumElements();
  return absl::OkStatus();
}

// BlpaBnReluExact: (a, xhat), xhat in x's buffer when no one else holds x.
template <typename Device>
class NormalizeReluOp : public LeakyOp {
 public:
  using LeakyOp::LeakyOp;

  void Compute(OpKernelContext* ctx) override {
    ExactArgs args{};
    OP_REQUIRES_OK(ctx, PrepareExact(ctx, 5, &args));
    args.negative_slope = slope_;
    args.mean = ctx->input(1).flat<float>().data();
    args.inv_std = ctx->input(2).flat<float>().data();
    args.gamma = ctx->input(3).flat<float>().data();
    args.beta = ctx->input(4).flat<float>().data();
    Tensor* a = nullptr;
    Tensor* xhat = nullptr;
    const TensorShape& shape = ctx->input(0).shape();
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, shape, &a));
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0}, 1, shape, &xhat));
    if (args.n == 0) return;
    args.a = a->flat<float>().data();
    args.xhat = xhat->flat<float>().data();
    OP_REQUIRES_OK(ctx, Device::NormalizeRelu(ctx, args));
  }
};

// BlpaReluExact: a = where(y > 0, y, s * y), y = xhat * gamma + beta.
template <typename Device>
class ExactReluOp : public LeakyOp {
 public:
  using LeakyOp::LeakyOp;

  void Compute(OpKernelContext* ctx) override {
    ExactArgs args{};
    OP_REQUIRES_OK(ctx, PrepareExact(ctx, 3, &args));
    args.negative_slope = slope_;
    args.gamma = ctx->input(1).flat<float>().data();
    args.beta = ctx->input(2).flat<float>().data();
    Tensor* a = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, ctx->input(0).shape(), &a));
    if (args.n == 0) return;
    args.a = a->flat<float>().data();
    OP_REQUIRES_OK(ctx, Device::ExactRelu(ctx, args));
  }
};

// BlpaBnBackwardExact: the fused ReLU + BN backward from xhat.
template <typename Device>
class ExactBnBackwardOp : public LeakyOp {
 public:
  using LeakyOp::LeakyOp;

  void Compute(OpKernelContext* ctx) override {
    BnBackwardArgs args{};
    OP_REQUIRES_OK(ctx, PrepareExactBnBackward(ctx, &args));
    args.negative_slope = slope_;
    OP_REQUIRES_OK(ctx, AllocateBnBackward(ctx, &args));
    OP_REQUIRES_OK(ctx, Device::BnBackward(ctx, args));
  }
};

// The decode ops' shape input is read on the host to size the outputs (a
// no-op on CPU, where all memory is host memory).
#define BLPA_REGISTER_KERNELS(device_type, backend)                           \
  REGISTER_KERNEL_BUILDER(Name("BlpaBnReluEncode").Device(device_type),       \
                          EncodeOp<backend>);                                 \
  REGISTER_KERNEL_BUILDER(                                                    \
      Name("BlpaDecode").Device(device_type).HostMemory("shape"),             \
      DecodeOp<backend>);                                                     \
  REGISTER_KERNEL_BUILDER(                                                    \
      Name("BlpaDecodeRelu").Device(device_type).HostMemory("shape"),         \
      DecodeReluOp<backend>);                                                 \
  REGISTER_KERNEL_BUILDER(Name("BlpaDecodeBnBackward").Device(device_type),   \
                          DecodeBnBackwardOp<backend>);                       \
  REGISTER_KERNEL_BUILDER(Name("BlpaBnReluExact").Device(device_type),        \
                          NormalizeReluOp<backend>);                          \
  REGISTER_KERNEL_BUILDER(Name("BlpaReluExact").Device(device_type),          \
                          ExactReluOp<backend>);                              \
  REGISTER_KERNEL_BUILDER(Name("BlpaBnBackwardExact").Device(device_type),    \
                          ExactBnBackwardOp<backend>)

BLPA_REGISTER_KERNELS(DEVICE_CPU, Cpu);
#if GOOGLE_CUDA
BLPA_REGISTER_KERNELS(::tensorflow::DEVICE_GPU, Gpu);
#endif

}  // namespace
}  // namespace blpa
