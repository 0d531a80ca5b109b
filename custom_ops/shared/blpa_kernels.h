// Per-element arithmetic of the BLPA quantizer, shared by the CPU kernels, the
// CUDA kernels and gpu_selftest.cu so that every backend runs the same code.
//
// It must stay bit-exact with keras_blpa/backend/tensorflow/quantizer.py: every float operation
// is float32, in the same order, separately rounded. Build with
// -ffp-contract=off (g++) and --fmad=false (nvcc) so no FMA is formed.
//
// This header includes nothing from TensorFlow (the GPU self-test builds
// without it).

#ifndef KERAS_BLPA_CUSTOM_OPS_BLPA_KERNELS_H_
#define KERAS_BLPA_CUSTOM_OPS_BLPA_KERNELS_H_

#include <cstdint>

#if defined(__CUDACC__)
#define BLPA_HD __host__ __device__ __forceinline__
#else
#define BLPA_HD inline __attribute__((always_inline))
#endif

namespace blpa {

// Grid constants for `bits` (4 or 8) over a window of `window` standard
// deviations. Computed on the host and passed by value.
struct Grid {
  float w;      // window / n
  float inv_w;  // float32(1.0 / (window / n)): Python computes both in double
  float top;    // n - 1
};

inline Grid MakeGrid(int bits, float window) {
  const double n = static_cast<double>(1 << bits);
  const double width = static_cast<double>(window) / n;
  Grid g;
  g.w = static_cast<float>(width);
  g.inv_w = static_cast<float>(1.0 / width);
  g.top = static_cast<float>(n - 1.0);
  return g;
}

// Allowed code range [lower, upper] on one side of the ReLU threshold
// (quantizer.encode_codes): codes must say "on" iff the forward's y > 0.
struct Bounds {
  float lower;
  float upper;
};

// Bounds of a channel for elements whose forward mask is `on`. Depends only
// on per-channel values, so the CPU precomputes it per channel and the GPU
// calls it per element: the same function either way.
// SideBoundsRaw keeps a NaN bound (a NaN k); SideBounds maps it to [0, 0].
BLPA_HD Bounds SideBoundsRaw(bool on, float k, float flip, float aligned,
                             const Grid& g) {
  const bool hi_side_on = flip < 0.5f;
  const bool want_hi = on == hi_side_on;
  const bool al = aligned > 0.5f;
  Bounds b;
  b.lower = (al && want_hi) ? k : 0.0f;
  b.upper = (al && !want_hi) ? k - 1.0f : g.top;
  return b;
}

BLPA_HD Bounds SideBounds(bool on, float k, float flip, float aligned,
                          const Grid& g) {
  Bounds b = SideBoundsRaw(on, k, flip, aligned, g);
  // TF: tf.maximum/tf.minimum propagate a NaN bound (only a NaN k makes one)
  // and tf.cast(NaN -> uint8) gives 0. The range [0, 0] gives that same 0 for
  // every u, so the per-element code needs no NaN checks.
  if ((b.lower != b.lower) | (b.upper != b.upper)) {
    b.lower = 0.0f;
    b.upper = 0.0f;
  }
  return b;
}

// The code of xhat, clamped into `b` (u = clip(floor((xhat - lo) / w))).
BLPA_HD uint8_t ClampedCode(float xhat, float lo, Bounds b, const Grid& g) {
  // TF: u = clip(where(isnan(floor(v)), 0, floor(v)), 0, n-1). Clipping first
  // (NaN -> 0) and then truncating gives the same integer for every input,
  // including +-Inf, and truncation vectorizes without SSE4.1's floor.
  float v = (xhat - lo) * g.inv_w;
  v = v > 0.0f ? v : 0.0f;
  v = v < g.top ? v : g.top;
  float q = static_cast<float>(static_cast<int32_t>(v));
  // tf.minimum(tf.maximum(u, lower), upper); neither side can be NaN here.
  q = q > b.lower ? q : b.lower;
  q = q < b.upper ? q : b.upper;
  // tf.cast(float32 -> uint8): the conversion through int32, as TF's.
  return static_cast<uint8_t>(static_cast<int32_t>(q));
}

// The leaky ReLU's negative side, quantizer.leaky: `y * s`, but exactly 0.0
// at slope 0 (never -0.0, nor NaN from -Inf or NaN), as tf.nn.relu gives.
// The CPU loops pass a literal 0.0f for slope 0, so that this folds away and
// the ReLU runs exactly as before the slope existed.
BLPA_HD float LeakyNeg(float y, float s) { return s == 0.0f ? 0.0f : y * s; }

// The forward's exact (leaky) ReLU output. A NaN passes through (as
// tf.nn.relu's does) so that a non-finite input surfaces in the layer's
// output instead of hiding behind finite codes; for every other value this is
// `y > 0 ? y : LeakyNeg(y, s)`.
BLPA_HD float ReluKeepNan(float y, float s) {
  return y <= 0.0f ? LeakyNeg(y, s) : y;
}

// quantizer.bn_relu_encode for one element with precomputed per-side bounds:
// returns `a` (negative slope `s`), writes the code (which `s` does not change).
BLPA_HD float EncodeOneBounded(float x, float mean, float inv_std, float gamma,
                               float beta, float lo, Bounds on_bounds,
                               Bounds off_bounds, const Grid& g, uint8_t* code,
                               float s) {
  const float xhat = (x - mean) * inv_std;
  const float y = xhat * gamma + beta;
  const bool on = y > 0.0f;
  *code = ClampedCode(xhat, lo, on ? on_bounds : off_bounds, g);
  return ReluKeepNan(y, s);
}

// The same from the raw grid parameters (what the CUDA kernel calls).
BLPA_HD float EncodeOne(float x, float mean, float inv_std, float gamma,
                        float beta, float lo, float k, float flip,
                        float aligned, const Grid& g, uint8_t* code,
                        float s) {
  const float xhat = (x - mean) * inv_std;
  const float y = xhat * gamma + beta;
  const bool on = y > 0.0f;
  *code = ClampedCode(xhat, lo, SideBounds(on, k, flip, aligned, g), g);
  return ReluKeepNan(y, s);
}

// ---- capped ReLU, min(max(y, 0), m) (quantizer.*_capped) -------------------
// A second per-channel grid edge kc (flip, aligned) sits at the cap's kink:
// codes are clamped onto the threshold edge's side that y > 0 says, then onto
// the cap edge's side that y >= m says, so both masks decode exactly.

// tf.maximum / tf.minimum: a NaN in either operand gives NaN.
BLPA_HD float MaxNan(float a, float b) { return (a != a || a > b) ? a : b; }
BLPA_HD float MinNan(float a, float b) { return (a != a || a < b) ? a : b; }

// The capped ReLU's output: 0 where y <= 0, m where y >= m, else y (NaN passes).
BLPA_HD float CappedRelu(float y, float m) {
  return y <= 0.0f ? 0.0f : (y >= m ? m : y);
}

// The code of xhat clamped into `side` (raw SideBoundsRaw bounds of y > 0)
// and then into `cap_side` (of y >= m), with TF's NaN propagation: a NaN
// bound makes the code 0, as tf.cast(NaN -> uint8) does.
BLPA_HD uint8_t CappedCode(float xhat, float lo, Bounds side, Bounds cap_side,
                           const Grid& g) {
  float v = (xhat - lo) * g.inv_w;
  v = v > 0.0f ? v : 0.0f;
  v = v < g.top ? v : g.top;
  float q = static_cast<float>(static_cast<int32_t>(v));
  q = MinNan(MaxNan(q, side.lower), side.upper);
  q = MinNan(MaxNan(q, cap_side.lower), cap_side.upper);
  return q != q ? uint8_t{0} : static_cast<uint8_t>(static_cast<int32_t>(q));
}

// quantizer.bn_relu_encode_capped for one element, with per-channel raw
// bounds for y > 0 (on / off) and y >= m (sat / unsat).
BLPA_HD float EncodeOneCappedBounded(float x, float mean, float inv_std,
                                     float gamma, float beta, float lo,
                                     Bounds on_b, Bounds off_b, Bounds sat_b,
                                     Bounds unsat_b, const Grid& g, float m,
                                     uint8_t* code) {
  const float xhat = (x - mean) * inv_std;
  const float y = xhat * gamma + beta;
  *code = CappedCode(xhat, lo, y > 0.0f ? on_b : off_b,
                     y >= m ? sat_b : unsat_b, g);
  return CappedRelu(y, m);
}

// The same from the raw grid parameters (the CUDA kernel).
BLPA_HD float EncodeOneCapped(float x, float mean, float inv_std, float gamma,
                              float beta, float lo, float k, float flip,
                              float aligned, float kc, float cap_flip,
                              float cap_aligned, const Grid& g, float m,
                              uint8_t* code) {
  const float xhat = (x - mean) * inv_std;
  const float y = xhat * gamma + beta;
  *code = CappedCode(xhat, lo, SideBoundsRaw(y > 0.0f, k, flip, aligned, g),
                     SideBoundsRaw(y >= m, kc, cap_flip, cap_aligned, g), g);
  return CappedRelu(y, m);
}

// 4-bit packing as in quantizer.pack: element 2j in the low nibble.
BLPA_HD uint8_t PackPair(uint8_t low, uint8_t high) {
  return static_cast<uint8_t>(low | static_cast<uint8_t>(high << 4));
}
BLPA_HD uint8_t LowNibble(uint8_t b) { return b & 15; }
BLPA_HD uint8_t HighNibble(uint8_t b) { return b >> 4; }

// quantizer.decode for one element: returns xhat (bin centre), writes mask.
BLPA_HD float DecodeOne(uint8_t code, float lo, float k, float flip,
                        const Grid& g, bool* mask) {
  const float q = static_cast<float>(code);
  *mask = (q >= k) != (flip > 0.5f);
  return (q + 0.5f) * g.w + lo;
}

// Fused decode + BN affine + (leaky) ReLU:
// where(mask, y, LeakyNeg(y, s)), y = xhat * gamma + beta.
BLPA_HD float DecodeReluOne(uint8_t code, float lo, float k, float flip,
                            float gamma, float beta, const Grid& g, float s) {
  bool mask;
  const float xhat = DecodeOne(code, lo, k, flip, g, &mask);
  const float y = xhat * gamma + beta;
  return mask ? y : LeakyNeg(y, s);
}

// quantizer.centres_and_masks_capped for one element: returns xhat, writes
// the gradient mask 0 < y < m and the saturated mask y >= m.
BLPA_HD float DecodeOneCapped(uint8_t code, float lo, float k, float flip,
                              float kc, float cap_flip, const Grid& g,
                              bool* mask, bool* saturated) {
  bool on;
  const float xhat = DecodeOne(code, lo, k, flip, g, &on);
  *saturated = (static_cast<float>(code) >= kc) != (cap_flip > 0.5f);
  *mask = on && !*saturated;
  return xhat;
}

// quantizer.relu_from_decoded_capped: m where saturated, min(y, m) where on.
BLPA_HD float DecodeReluOneCapped(uint8_t code, float lo, float k, float flip,
                                  float kc, float cap_flip, float gamma,
                                  float beta, const Grid& g, float m) {
  bool mask, saturated;
  const float xhat =
      DecodeOneCapped(code, lo, k, flip, kc, cap_flip, g, &mask, &saturated);
  const float y = MinNan(xhat * gamma + beta, m);
  return saturated ? m : (mask ? y : 0.0f);
}

// ---- fused decode + ReLU/BN backward (quantizer.decode_bn_backward) --------
// Pass 1 sums g_y and g_y * xhat per channel; pass 2 maps every element to
// g_x with per-channel coefficients. Reductions cannot be bit-exact with TF's
// (their order differs); each product and the pass-2 formula are float32 in
// TF's order.

// g_y = where(mask, g_a, LeakyNeg(g_a, s)) of one element; writes the
// decoded xhat.
BLPA_HD float MaskedGradOne(uint8_t code, float g_a, float lo, float k,
                            float flip, const Grid& g, float* xhat, float s) {
  bool mask;
  *xhat = DecodeOne(code, lo, k, flip, g, &mask);
  return mask ? g_a : LeakyNeg(g_a, s);
}

// Per-channel coefficients of g_x = scale * (g_y - mean_dbeta - xhat * mean_dgamma).
struct BnCoef {
  float scale;        // gamma * inv_std
  float mean_dbeta;   // d_beta / count
  float mean_dgamma;  // d_gamma / count
};

// `count` is float32(rows), as TF's tf.cast(reduce_prod(shape[:-1]), float32).
BLPA_HD BnCoef MakeBnCoef(float gamma, float inv_std, float d_beta,
                          float d_gamma, float count) {
  BnCoef c;
  c.scale = gamma * inv_std;
  c.mean_dbeta = d_beta / count;
  c.mean_dgamma = d_gamma / count;
  return c;
}

// The input gradient of one element: (gamma * inv_std) * ((g_y - d_beta /
// count) - xhat * (d_gamma / count)).
BLPA_HD float BnInputGradOne(float g_y, float xhat, float scale,
                             float mean_dbeta, float mean_dgamma) {
  return scale * ((g_y - mean_dbeta) - xhat * mean_dgamma);
}

// Pass 2 for one element, with the decode of pass 1 redone.
BLPA_HD float BnBackwardOne(uint8_t code, float g_a, float lo, float k,
                            float flip, float scale, float mean_dbeta,
                            float mean_dgamma, const Grid& g, float s) {
  float xhat;
  const float g_y = MaskedGradOne(code, g_a, lo, k, flip, g, &xhat, s);
  return BnInputGradOne(g_y, xhat, scale, mean_dbeta, mean_dgamma);
}

// The capped unit's g_y = where(0 < y < m, g_a, 0); writes xhat.
BLPA_HD float MaskedGradOneCapped(uint8_t code, float g_a, float lo, float k,
                                  float flip, float kc, float cap_flip,
                                  const Grid& g, float* xhat) {
  bool mask, saturated;
  *xhat = DecodeOneCapped(code, lo, k, flip, kc, cap_flip, g, &mask, &saturated);
  return mask ? g_a : 0.0f;
}

BLPA_HD float BnBackwardOneCapped(uint8_t code, float g_a, float lo, float k,
                                  float flip, float kc, float cap_flip,
                                  float scale, float mean_dbeta,
                                  float mean_dgamma, const Grid& g) {
  float xhat;
  const float g_y =
      MaskedGradOneCapped(code, g_a, lo, k, flip, kc, cap_flip, g, &xhat);
  return BnInputGradOne(g_y, xhat, scale, mean_dbeta, mean_dgamma);
}

// ---- exact path (bits=None): the saved tensor is xhat itself ---------------
// The float32 operations of quantizer.py's exact path, in its order, so that
// the mask rebuilt in the backward pass is the forward's, bit for bit.

// Forward: xhat = (x - mean) * inv_std (written),
// a = leaky_relu(xhat * gamma + beta) (NaN passes).
BLPA_HD float NormalizeReluOne(float x, float mean, float inv_std, float gamma,
                               float beta, float* xhat, float s) {
  const float h = (x - mean) * inv_std;
  *xhat = h;
  return ReluKeepNan(h * gamma + beta, s);
}

// The (leaky) ReLU output rebuilt from xhat: where(y > 0, y, LeakyNeg(y, s)),
// y = xhat * gamma + beta (a NaN y gives 0 at slope 0, as quantizer.relu_exact).
BLPA_HD float ExactReluOne(float xhat, float gamma, float beta, float s) {
  const float y = xhat * gamma + beta;
  return y > 0.0f ? y : LeakyNeg(y, s);
}

// g_y = where(xhat * gamma + beta > 0, g_a, LeakyNeg(g_a, s)).
BLPA_HD float ExactMaskedGradOne(float xhat, float g_a, float gamma,
                                 float beta, float s) {
  return xhat * gamma + beta > 0.0f ? g_a : LeakyNeg(g_a, s);
}

// The exact path of a capped ReLU (quantizer.normalize_relu_capped,
// relu_exact_capped, exact_masks_capped): m where y >= m, gradient only where
// 0 < y < m. The JAX custom calls use these; the TensorFlow op's exact
// kernels have no cap (its capped exact unit runs pure TF).
BLPA_HD float NormalizeReluOneCapped(float x, float mean, float inv_std,
                                     float gamma, float beta, float* xhat,
                                     float m) {
  const float h = (x - mean) * inv_std;
  *xhat = h;
  return CappedRelu(h * gamma + beta, m);
}

BLPA_HD float ExactReluOneCapped(float xhat, float gamma, float beta, float m) {
  return CappedRelu(xhat * gamma + beta, m);
}

BLPA_HD float ExactMaskedGradOneCapped(float xhat, float g_a, float gamma,
                                       float beta, float m) {
  const float y = xhat * gamma + beta;
  return ((y > 0.0f) & (y < m)) ? g_a : 0.0f;
}

// Arguments of one encode over `n` elements with `channels` channels (channel
// of flat element i is i % channels). Device pointers for the GPU launchers.
struct EncodeArgs {
  const float* x;
  const float* mean;
  const float* inv_std;
  const float* gamma;
  const float* beta;
  const float* lo;
  const float* k;
  const float* flip;
  const float* aligned;
  int64_t n;
  int64_t channels;
  int bits;
  float window;  // grid window in standard deviations
  float* a;         // [n]
  uint8_t* packed;  // [n] (8 bits) or [(n + 1) / 2] (4 bits)
  float negative_slope = 0.0f;  // leaky ReLU slope of `a` (>= 0, finite)
  // A capped ReLU (max_value > 0, slope 0): the cap edge's kc, flip and
  // aligned ([channels] each); null kc: no cap.
  const float* kc = nullptr;
  const float* cap_flip = nullptr;
  const float* cap_aligned = nullptr;
  float max_value = 0.0f;
};

// Arguments of one decode. gamma/beta/a are for the fused decode + ReLU,
// xhat/mask for the plain decode; unused pointers may be null.
struct DecodeArgs {
  const uint8_t* packed;
  const float* lo;
  const float* k;
  const float* flip;
  const float* gamma;
  const float* beta;
  int64_t n;
  int64_t channels;
  int bits;
  float window;  // grid window in standard deviations
  float* xhat;
  bool* mask;
  float* a;
  float negative_slope = 0.0f;  // leaky ReLU slope of `a` (>= 0, finite)
  // A capped ReLU: the cap edge (null kc: no cap); max_value for `a`.
  const float* kc = nullptr;
  const float* cap_flip = nullptr;
  float max_value = 0.0f;
};

// Arguments of one exact forward (NormalizeReluOne) or exact rebuild
// (ExactReluOne, x = xhat) over `n` elements. Device pointers on the GPU.
struct ExactArgs {
  const float* x;  // the BN input (forward) or xhat (rebuild)
  const float* mean;
  const float* inv_std;
  const float* gamma;
  const float* beta;
  int64_t n;
  int64_t channels;
  float* a;
  float* xhat;  // forward only; may alias x (the op forwards x's buffer)
  float negative_slope = 0.0f;  // leaky ReLU slope of `a` (>= 0, finite)
  // > 0: a ReLU capped at max_value (slope 0); 0: no cap.
  float max_value = 0.0f;
};

// Arguments of one fused BN backward over `n` elements (`n / channels` rows),
// from the codes (`packed`, lo, k, flip) or, on the exact path, from `xhat`
// (then `exact`, with gamma and beta). Device pointers for the GPU launcher.
struct BnBackwardArgs {
  const float* g_a;        // [n]; g_x may alias it (the op forwards g_a)
  const uint8_t* packed;   // [n] (8 bits) or [(n + 1) / 2] (4 bits)
  const float* lo;
  const float* k;
  const float* flip;
  const float* gamma;
  const float* inv_std;
  int64_t n;
  int64_t channels;
  int bits;
  float window;  // grid window in standard deviations
  float* g_x;      // [n]
  float* d_gamma;  // [channels]
  float* d_beta;   // [channels]
  // GPU only: BnBackwardScratchBytes(channels) bytes of device memory, 8-byte
  // aligned (double sums [2 * channels], then float coefficients [3 * channels]).
  void* scratch;
  // The exact path: the BN backward from the stored xhat (then packed, lo,
  // k, flip, bits and window are unused).
  bool exact;
  const float* xhat;  // [n]
  const float* beta;  // [channels]
  // Leaky ReLU slope (>= 0, finite): g_y = mask ? g_a : g_a * slope.
  float negative_slope = 0.0f;
  // A capped ReLU's cap edge (codes only; null kc: no cap): g_y = 0 where
  // saturated.
  const float* kc = nullptr;
  const float* cap_flip = nullptr;
  // The exact path's cap (> 0; 0: none): g_y = 0 unless 0 < y < max_value.
  float max_value = 0.0f;
};

inline int64_t BnBackwardScratchBytes(int64_t channels) {
  return channels * (2 * static_cast<int64_t>(sizeof(double)) +
                     3 * static_cast<int64_t>(sizeof(float)));
}

// CUDA launchers (blpa_kernels.cu.cc). `stream` is a cudaStream_t; they
// return nullptr on success, else the CUDA error string. Kept free of CUDA and
// TensorFlow types so that g++ and nvcc see the same declarations.
const char* LaunchEncodeGpu(const EncodeArgs& args, void* stream);
const char* LaunchDecodeGpu(const DecodeArgs& args, void* stream);
const char* LaunchDecodeReluGpu(const DecodeArgs& args, void* stream);
const char* LaunchDecodeBnBackwardGpu(const BnBackwardArgs& args,
                                      void* stream);
// The two passes of LaunchDecodeBnBackwardGpu apart (the JAX custom calls,
// whose sums are added over devices in between): the per-channel sums into
// args.d_beta and args.d_gamma (args.scratch: BnBackwardScratchBytes), and
// g_x from device coefficients coef[3 * C] (scale, mean_dbeta, mean_dgamma).
const char* LaunchBnSumsGpu(const BnBackwardArgs& args, void* stream);
const char* LaunchBnInputGradGpu(const BnBackwardArgs& args, const float* coef,
                                 void* stream);
const char* LaunchNormalizeReluGpu(const ExactArgs& args, void* stream);
const char* LaunchExactReluGpu(const ExactArgs& args, void* stream);

}  // namespace blpa

#endif  // KERAS_BLPA_CUSTOM_OPS_BLPA_KERNELS_H_
