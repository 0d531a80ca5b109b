// The CPU kernels of the BLPA quantizer (see blpa_cpu.h).

#include "shared/blpa_cpu.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#include "shared/blpa_kernels.h"

namespace blpa {
namespace {

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

// The capped ReLU's loops (quantizer.*_capped; slope 0). `a` may alias `x`
// and g_x may alias g_a, as above.
BLPA_CPU_CLONES
void EncodeCappedRun(const float* x, const float* __restrict mean,
                     const float* __restrict inv_std,
                     const float* __restrict gamma, const float* __restrict beta,
                     const float* __restrict lo, const float* const* bounds,
                     int64_t len, Grid g, float m, float* a,
                     uint8_t* __restrict codes) {
  const float* __restrict on_lo = bounds[0];
  const float* __restrict on_hi = bounds[1];
  const float* __restrict off_lo = bounds[2];
  const float* __restrict off_hi = bounds[3];
  const float* __restrict sat_lo = bounds[4];
  const float* __restrict sat_hi = bounds[5];
  const float* __restrict unsat_lo = bounds[6];
  const float* __restrict unsat_hi = bounds[7];
#pragma GCC ivdep
  for (int64_t t = 0; t < len; ++t) {
    a[t] = EncodeOneCappedBounded(
        x[t], mean[t], inv_std[t], gamma[t], beta[t], lo[t],
        Bounds{on_lo[t], on_hi[t]}, Bounds{off_lo[t], off_hi[t]},
        Bounds{sat_lo[t], sat_hi[t]}, Bounds{unsat_lo[t], unsat_hi[t]}, g, m,
        &codes[t]);
  }
}

BLPA_CPU_CLONES
void DecodeCappedRun(const uint8_t* __restrict codes, const float* __restrict lo,
                     const float* __restrict k, const float* __restrict flip,
                     const float* __restrict kc,
                     const float* __restrict cap_flip, int64_t len, Grid g,
                     float* __restrict xhat, bool* __restrict mask) {
  for (int64_t t = 0; t < len; ++t) {
    bool saturated;
    xhat[t] = DecodeOneCapped(codes[t], lo[t], k[t], flip[t], kc[t],
                              cap_flip[t], g, &mask[t], &saturated);
  }
}

BLPA_CPU_CLONES
void DecodeReluCappedRun(const uint8_t* __restrict codes,
                         const float* __restrict lo, const float* __restrict k,
                         const float* __restrict flip,
                         const float* __restrict kc,
                         const float* __restrict cap_flip,
                         const float* __restrict gamma,
                         const float* __restrict beta, int64_t len, Grid g,
                         float m, float* __restrict a) {
  for (int64_t t = 0; t < len; ++t) {
    a[t] = DecodeReluOneCapped(codes[t], lo[t], k[t], flip[t], kc[t],
                               cap_flip[t], gamma[t], beta[t], g, m);
  }
}

template <typename Acc>
inline void BnSumsCappedLoop(const uint8_t* __restrict codes,
                             const float* __restrict g_a,
                             const float* __restrict lo,
                             const float* __restrict k,
                             const float* __restrict flip,
                             const float* __restrict kc,
                             const float* __restrict cap_flip, int64_t len,
                             Grid g, Acc* __restrict sum_b,
                             Acc* __restrict sum_g) {
  for (int64_t t = 0; t < len; ++t) {
    float xhat;
    const float g_y = MaskedGradOneCapped(codes[t], g_a[t], lo[t], k[t], flip[t],
                                          kc[t], cap_flip[t], g, &xhat);
    sum_b[t] += static_cast<Acc>(g_y);
    sum_g[t] += static_cast<Acc>(g_y * xhat);
  }
}

BLPA_CPU_CLONES
void BnSumsCappedRun(const uint8_t* __restrict codes, const float* __restrict g_a,
                     const float* __restrict lo, const float* __restrict k,
                     const float* __restrict flip, const float* __restrict kc,
                     const float* __restrict cap_flip, int64_t len, Grid g,
                     float* __restrict sum_b, float* __restrict sum_g) {
  BnSumsCappedLoop(codes, g_a, lo, k, flip, kc, cap_flip, len, g, sum_b, sum_g);
}

BLPA_CPU_CLONES
void BnSumsCappedRun(const uint8_t* __restrict codes, const float* __restrict g_a,
                     const float* __restrict lo, const float* __restrict k,
                     const float* __restrict flip, const float* __restrict kc,
                     const float* __restrict cap_flip, int64_t len, Grid g,
                     double* __restrict sum_b, double* __restrict sum_g) {
  BnSumsCappedLoop(codes, g_a, lo, k, flip, kc, cap_flip, len, g, sum_b, sum_g);
}

BLPA_CPU_CLONES
void BnBackwardCappedRun(const uint8_t* __restrict codes, const float* g_a,
                         const float* __restrict lo, const float* __restrict k,
                         const float* __restrict flip,
                         const float* __restrict kc,
                         const float* __restrict cap_flip,
                         const float* __restrict scale,
                         const float* __restrict mean_dbeta,
                         const float* __restrict mean_dgamma, int64_t len,
                         Grid g, float* g_x) {
#pragma GCC ivdep
  for (int64_t t = 0; t < len; ++t) {
    g_x[t] = BnBackwardOneCapped(codes[t], g_a[t], lo[t], k[t], flip[t], kc[t],
                                 cap_flip[t], scale[t], mean_dbeta[t],
                                 mean_dgamma[t], g);
  }
}

// The exact path of a capped ReLU (ExactArgs/BnBackwardArgs max_value > 0).
BLPA_CPU_CLONES
void NormalizeReluCappedRun(const float* x, const float* __restrict mean,
                            const float* __restrict inv_std,
                            const float* __restrict gamma,
                            const float* __restrict beta, int64_t len,
                            float* __restrict a, float* xhat, float m) {
#pragma GCC ivdep
  for (int64_t t = 0; t < len; ++t) {
    a[t] = NormalizeReluOneCapped(x[t], mean[t], inv_std[t], gamma[t], beta[t],
                                  &xhat[t], m);
  }
}

BLPA_CPU_CLONES
void ExactReluCappedRun(const float* __restrict xhat,
                        const float* __restrict gamma,
                        const float* __restrict beta, int64_t len,
                        float* __restrict a, float m) {
  for (int64_t t = 0; t < len; ++t) {
    a[t] = ExactReluOneCapped(xhat[t], gamma[t], beta[t], m);
  }
}

template <typename Acc>
inline void ExactSumsCappedLoop(const float* __restrict xhat,
                                const float* __restrict g_a,
                                const float* __restrict gamma,
                                const float* __restrict beta, int64_t len,
                                Acc* __restrict sum_b, Acc* __restrict sum_g,
                                float m) {
  for (int64_t t = 0; t < len; ++t) {
    const float g_y =
        ExactMaskedGradOneCapped(xhat[t], g_a[t], gamma[t], beta[t], m);
    sum_b[t] += static_cast<Acc>(g_y);
    sum_g[t] += static_cast<Acc>(g_y * xhat[t]);
  }
}

BLPA_CPU_CLONES
void ExactSumsCappedRun(const float* __restrict xhat,
                        const float* __restrict g_a,
                        const float* __restrict gamma,
                        const float* __restrict beta, int64_t len,
                        float* __restrict sum_b, float* __restrict sum_g,
                        float m) {
  ExactSumsCappedLoop(xhat, g_a, gamma, beta, len, sum_b, sum_g, m);
}

BLPA_CPU_CLONES
void ExactSumsCappedRun(const float* __restrict xhat,
                        const float* __restrict g_a,
                        const float* __restrict gamma,
                        const float* __restrict beta, int64_t len,
                        double* __restrict sum_b, double* __restrict sum_g,
                        float m) {
  ExactSumsCappedLoop(xhat, g_a, gamma, beta, len, sum_b, sum_g, m);
}

BLPA_CPU_CLONES
void ExactBnBackwardCappedRun(const float* __restrict xhat, const float* g_a,
                              const float* __restrict gamma,
                              const float* __restrict beta,
                              const float* __restrict scale,
                              const float* __restrict mean_dbeta,
                              const float* __restrict mean_dgamma, int64_t len,
                              float* g_x, float m) {
#pragma GCC ivdep
  for (int64_t t = 0; t < len; ++t) {
    const float g_y =
        ExactMaskedGradOneCapped(xhat[t], g_a[t], gamma[t], beta[t], m);
    g_x[t] = BnInputGradOne(g_y, xhat[t], scale[t], mean_dbeta[t], mean_dgamma[t]);
  }
}

// ---- blocks -----------------------------------------------------------------

void EncodeBlock(const EncodeArgs& args, const Periodic& p, int64_t begin,
                 int64_t end) {
  const Grid g = MakeGrid(args.bits, args.window);
  alignas(64) uint8_t buffer[kBlock];
  uint8_t* codes = args.bits == 8 ? args.packed + begin : buffer;
  ForEachRun(p, begin, end, [&](int64_t o, int64_t c, int64_t len) {
    if (args.kc != nullptr) {
      const float* bounds[8];
      for (int i = 0; i < 8; ++i) bounds[i] = p[5 + i] + c;
      EncodeCappedRun(args.x + begin + o, p[0] + c, p[1] + c, p[2] + c,
                      p[3] + c, p[4] + c, bounds, len, g, args.max_value,
                      args.a + begin + o, codes + o);
      return;
    }
    EncodeRun(args.x + begin + o, p[0] + c, p[1] + c, p[2] + c, p[3] + c,
              p[4] + c, p[5] + c, p[6] + c, p[7] + c, p[8] + c, len, g,
              args.a + begin + o, codes + o, args.negative_slope);
  });
  if (args.bits == 4) PackRun(buffer, end - begin, args.packed + begin / 2);
}

// Per-channel code bounds for both ReLU sides, [lower_on, upper_on, lower_off,
// upper_off]: hoists the side logic out of the per-element loop. A capped
// ReLU adds the cap edge's [lower_sat, upper_sat, lower_unsat, upper_unsat],
// and keeps NaN bounds (CappedCode propagates them as TF does).
std::vector<std::vector<float>> ChannelBounds(const EncodeArgs& args) {
  const Grid g = MakeGrid(args.bits, args.window);
  const bool capped = args.kc != nullptr;
  std::vector<std::vector<float>> out(capped ? 8 : 4,
                                      std::vector<float>(args.channels));
  auto side = capped ? SideBoundsRaw : SideBounds;
  for (int64_t c = 0; c < args.channels; ++c) {
    const Bounds on = side(true, args.k[c], args.flip[c], args.aligned[c], g);
    const Bounds off = side(false, args.k[c], args.flip[c], args.aligned[c], g);
    out[0][c] = on.lower;
    out[1][c] = on.upper;
    out[2][c] = off.lower;
    out[3][c] = off.upper;
    if (!capped) continue;
    const Bounds sat =
        SideBoundsRaw(true, args.kc[c], args.cap_flip[c], args.cap_aligned[c], g);
    const Bounds unsat =
        SideBoundsRaw(false, args.kc[c], args.cap_flip[c], args.cap_aligned[c], g);
    out[4][c] = sat.lower;
    out[5][c] = sat.upper;
    out[6][c] = unsat.lower;
    out[7][c] = unsat.upper;
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
    if (args.kc != nullptr) {
      DecodeCappedRun(codes + o, p[0] + c, p[1] + c, p[2] + c, p[3] + c,
                      p[4] + c, len, g, args.xhat + begin + o,
                      args.mask + begin + o);
      return;
    }
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
    if (args.kc != nullptr) {
      DecodeReluCappedRun(codes + o, p[0] + c, p[1] + c, p[2] + c, p[5] + c,
                          p[6] + c, p[3] + c, p[4] + c, len, g, args.max_value,
                          args.a + begin + o);
      return;
    }
    DecodeReluRun(codes + o, p[0] + c, p[1] + c, p[2] + c, p[3] + c, p[4] + c,
                  len, g, args.a + begin + o, args.negative_slope);
  });
}

// p holds mean, inv_std, gamma, beta.
void NormalizeReluBlock(const ExactArgs& args, const Periodic& p, int64_t begin,
                        int64_t end) {
  ForEachRun(p, begin, end, [&](int64_t o, int64_t c, int64_t len) {
    if (args.max_value > 0.0f) {
      NormalizeReluCappedRun(args.x + begin + o, p[0] + c, p[1] + c, p[2] + c,
                             p[3] + c, len, args.a + begin + o,
                             args.xhat + begin + o, args.max_value);
      return;
    }
    NormalizeReluRun(args.x + begin + o, p[0] + c, p[1] + c, p[2] + c, p[3] + c,
                     len, args.a + begin + o, args.xhat + begin + o,
                     args.negative_slope);
  });
}

// p holds gamma, beta.
void ExactReluBlock(const ExactArgs& args, const Periodic& p, int64_t begin,
                    int64_t end) {
  ForEachRun(p, begin, end, [&](int64_t o, int64_t c, int64_t len) {
    if (args.max_value > 0.0f) {
      ExactReluCappedRun(args.x + begin + o, p[0] + c, p[1] + c, len,
                         args.a + begin + o, args.max_value);
      return;
    }
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
        const float m = args.max_value;
        if (m > 0.0f && use_float) {
          ExactSumsCappedRun(xhat, g_a, p[0] + c, p[1] + c, len, part + c,
                             part + period + c, m);
        } else if (m > 0.0f) {
          ExactSumsCappedRun(xhat, g_a, p[0] + c, p[1] + c, len, sum_b + c,
                             sum_g + c, m);
        } else if (use_float) {
          ExactSumsRun(xhat, g_a, p[0] + c, p[1] + c, len, part + c,
                       part + period + c, s);
        } else {
          ExactSumsRun(xhat, g_a, p[0] + c, p[1] + c, len, sum_b + c,
                       sum_g + c, s);
        }
      } else if (args.kc != nullptr) {
        // p holds lo, k, flip, kc, cap_flip.
        if (use_float) {
          BnSumsCappedRun(codes + o, args.g_a + b + o, p[0] + c, p[1] + c,
                          p[2] + c, p[3] + c, p[4] + c, len, g, part + c,
                          part + period + c);
        } else {
          BnSumsCappedRun(codes + o, args.g_a + b + o, p[0] + c, p[1] + c,
                          p[2] + c, p[3] + c, p[4] + c, len, g, sum_b + c,
                          sum_g + c);
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
      if (args.max_value > 0.0f) {
        ExactBnBackwardCappedRun(args.xhat + begin + o, args.g_a + begin + o,
                                 p[0] + c, p[1] + c, p[2] + c, p[3] + c,
                                 p[4] + c, len, args.g_x + begin + o,
                                 args.max_value);
        return;
      }
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
    if (args.kc != nullptr) {
      BnBackwardCappedRun(codes + o, args.g_a + begin + o, p[0] + c, p[1] + c,
                          p[2] + c, p[3] + c, p[4] + c, p[5] + c, p[6] + c,
                          p[7] + c, len, g, args.g_x + begin + o);
      return;
    }
    BnBackwardRun(codes + o, args.g_a + begin + o, p[0] + c, p[1] + c, p[2] + c,
                  p[3] + c, p[4] + c, p[5] + c, len, g, args.g_x + begin + o,
                  args.negative_slope);
  });
}


// Runs block_fn(begin, end) over [0, n) in kBlock pieces on the pool.
void ParallelBlocks(const CpuPool& pool, int64_t n,
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
  // with AVX2, plus memory), so that a cost model (TF's Eigen pool) only
  // spreads tensors of a few hundred KiB and up over threads.
  pool.parallel_for(blocks, kBlock * 2, run);
}

// Pass 1 uses one shard per this many blocks at most (small tensors run on
// one thread: splitting costs more than it saves).
constexpr int64_t kMinShardBlocks = 4;

std::vector<const float*> CodeOrExactParams(const BnBackwardArgs& args) {
  if (args.exact) return {args.gamma, args.beta};
  if (args.kc != nullptr) {
    return {args.lo, args.k, args.flip, args.kc, args.cap_flip};
  }
  return {args.lo, args.k, args.flip};
}

// A capped decode adds kc and cap_flip to the parameters.
std::vector<const float*> DecodeParams(const DecodeArgs& args,
                                       std::vector<const float*> params) {
  if (args.kc != nullptr) params.insert(params.end(), {args.kc, args.cap_flip});
  return params;
}

}  // namespace

CpuPool SerialPool() {
  CpuPool pool;
  pool.parallel_for = [](int64_t units, int64_t,
                         const std::function<void(int64_t, int64_t)>& fn) {
    fn(0, units);
  };
  pool.threads = 1;
  return pool;
}

void EncodeCpu(const EncodeArgs& args, const CpuPool& pool) {
  const std::vector<std::vector<float>> bounds = ChannelBounds(args);
  std::vector<const float*> params = {args.mean, args.inv_std, args.gamma,
                                      args.beta, args.lo};
  for (const std::vector<float>& b : bounds) params.push_back(b.data());
  const Periodic p(params, args.channels);
  ParallelBlocks(pool, args.n, [&](int64_t begin, int64_t end) {
    EncodeBlock(args, p, begin, end);
  });
}

void DecodeCpu(const DecodeArgs& args, const CpuPool& pool) {
  const Periodic p(DecodeParams(args, {args.lo, args.k, args.flip}),
                   args.channels);
  ParallelBlocks(pool, args.n, [&](int64_t begin, int64_t end) {
    DecodeBlock(args, p, begin, end);
  });
}

void DecodeReluCpu(const DecodeArgs& args, const CpuPool& pool) {
  const Periodic p(
      DecodeParams(args, {args.lo, args.k, args.flip, args.gamma, args.beta}),
      args.channels);
  ParallelBlocks(pool, args.n, [&](int64_t begin, int64_t end) {
    DecodeReluBlock(args, p, begin, end);
  });
}

void NormalizeReluCpu(const ExactArgs& args, const CpuPool& pool) {
  const Periodic p({args.mean, args.inv_std, args.gamma, args.beta},
                   args.channels);
  ParallelBlocks(pool, args.n, [&](int64_t begin, int64_t end) {
    NormalizeReluBlock(args, p, begin, end);
  });
}

void ExactReluCpu(const ExactArgs& args, const CpuPool& pool) {
  const Periodic p({args.gamma, args.beta}, args.channels);
  ParallelBlocks(pool, args.n, [&](int64_t begin, int64_t end) {
    ExactReluBlock(args, p, begin, end);
  });
}

// A fixed number of shards (contiguous kBlock-aligned ranges), each with its
// own double accumulators, combined in shard order: the sums depend on the
// thread count only, not on scheduling.
void BnSumsCpu(const BnBackwardArgs& args, const CpuPool& pool, double* d_beta,
               double* d_gamma) {
  const int64_t channels = args.channels;
  std::fill(d_beta, d_beta + channels, 0.0);
  std::fill(d_gamma, d_gamma + channels, 0.0);
  const int64_t n = args.n;
  if (n == 0) return;
  const Periodic p1(CodeOrExactParams(args), channels);
  const int64_t period = p1.period();
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  const int64_t shards = std::max<int64_t>(
      1, std::min<int64_t>(pool.threads, blocks / kMinShardBlocks));
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
    pool.parallel_for(shards, kBlock * 4 * (blocks / shards), shard_fn);
  }
  for (int64_t s = 0; s < shards; ++s) {
    const double* sum_b = sums.data() + 2 * s * period;
    const double* sum_g = sum_b + period;
    for (int64_t j = 0; j < period; ++j) {
      d_beta[j % channels] += sum_b[j];
      d_gamma[j % channels] += sum_g[j];
    }
  }
}

void BnInputGradCpu(const BnBackwardArgs& args, const CpuPool& pool,
                    const float* scale, const float* mean_dbeta,
                    const float* mean_dgamma) {
  std::vector<const float*> params = CodeOrExactParams(args);
  params.insert(params.end(), {scale, mean_dbeta, mean_dgamma});
  const Periodic p2(params, args.channels);
  ParallelBlocks(pool, args.n, [&](int64_t begin, int64_t end) {
    BnBackwardBlock(args, p2, begin, end);
  });
}

void BnBackwardCpu(const BnBackwardArgs& args, const CpuPool& pool) {
  const int64_t channels = args.channels;
  std::vector<double> d_beta(channels), d_gamma(channels);
  BnSumsCpu(args, pool, d_beta.data(), d_gamma.data());
  if (args.n == 0) {
    std::fill(args.d_gamma, args.d_gamma + channels, 0.0f);
    std::fill(args.d_beta, args.d_beta + channels, 0.0f);
    return;
  }
  // The per-channel coefficients, as float32 in TF's order.
  const float count = static_cast<float>(args.n / channels);
  std::vector<float> scale(channels), mean_dbeta(channels), mean_dgamma(channels);
  for (int64_t c = 0; c < channels; ++c) {
    args.d_beta[c] = static_cast<float>(d_beta[c]);
    args.d_gamma[c] = static_cast<float>(d_gamma[c]);
    const BnCoef coef = MakeBnCoef(args.gamma[c], args.inv_std[c],
                                   args.d_beta[c], args.d_gamma[c], count);
    scale[c] = coef.scale;
    mean_dbeta[c] = coef.mean_dbeta;
    mean_dgamma[c] = coef.mean_dgamma;
  }
  BnInputGradCpu(args, pool, scale.data(), mean_dbeta.data(), mean_dgamma.data());
}

}  // namespace blpa
