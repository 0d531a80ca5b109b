// Standalone GPU self-test of the BLPA CUDA kernels (no TensorFlow needed).
//
// Runs the very kernels of blpa_kernels.cu.cc (included below) on random data
// and compares them bit for bit with the same per-element functions of
// blpa_kernels.h run on the host. On the host it also checks those functions
// (both the GPU's and the CPU kernels' formulation) against a
// straight-from-the-spec reference of quantizer.py (floor, isnan, TF's
// NaN-propagating min/max).
// Covers odd sizes (4-bit padding), channel counts 1..1000, bits 4 and 8,
// gamma < 0, gamma == 0, thresholds far outside the window, NaN/Inf inputs,
// every byte value for the decoders and a non-default stream.
// The fused decode + BN backward (LaunchDecodeBnBackwardGpu) is compared with
// the host's double-sum reference within a tolerance (1e-5 of each output's
// largest magnitude: its sums are atomics in any order), and that reference
// bit for bit with a straight-from-the-spec one (same summation order).
//
// The exact path (bits=None: LaunchNormalizeReluGpu, LaunchExactReluGpu and
// the BN backward from xhat) is checked the same way (ExactCase), in place
// too (xhat over x, g_x over g_a), as the ops forward those buffers.
// Every check runs at the ReLU (negative_slope 0: never -0.0) and at leaky
// slopes (0.2, 0.01): activation `y * s` and gradient `g_a * s` off the mask.
//
// Build and run (nvcc 13, any GPU of sm_75 or newer; -arch=native picks it):
//   nvcc -std=c++17 -O3 --fmad=false -Xcompiler -ffp-contract=off
//        -arch=native -Icustom_ops -o gpu_selftest custom_ops/cuda/gpu_selftest.cu && ./gpu_selftest
// Prints "N passed, M failed"; exits 1 on any mismatch, 2 if CUDA fails.
// `--host-only` runs just the host-vs-spec checks (no GPU needed); `--large`
// adds a case per bit width past 2^31 elements (64-bit indices; ~40 GB of GPU
// memory, ~60 GB of host memory).

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "cuda/blpa_kernels.cu.cc"

namespace {

using blpa::BnBackwardArgs;
using blpa::DecodeArgs;
using blpa::EncodeArgs;
using blpa::ExactArgs;
using blpa::Grid;

int g_passed = 0;
int g_failed = 0;

#define CUDA_CHECK(expr)                                                    \
  do {                                                                      \
    cudaError_t err_ = (expr);                                              \
    if (err_ != cudaSuccess) {                                              \
      std::fprintf(stderr, "CUDA error %s at %s:%d: %s\n", #expr, __FILE__, \
                   __LINE__, cudaGetErrorString(err_));                     \
      std::exit(2);                                                         \
    }                                                                       \
  } while (0)

void Report(const std::string& name, int64_t mismatches, int64_t total) {
  if (mismatches == 0) {
    ++g_passed;
  } else {
    ++g_failed;
    std::printf("FAIL %s: %lld of %lld differ\n", name.c_str(),
                static_cast<long long>(mismatches),
                static_cast<long long>(total));
  }
}

uint32_t Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

// Bit-exact float comparison; any NaN equals any NaN (payloads differ
// between x86 and CUDA, and TF does not promise them either).
bool SameFloat(float a, float b) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  return Bits(a) == Bits(b);
}

// quantizer.leaky's negative side, from the spec: tf.where(on, v, 0.0 if s == 0
// else v * s).
float SpecLeakyNeg(float v, float s) {
  if (s == 0.0f) return 0.0f;
  volatile float prod = v * s;  // volatile: no contraction
  return prod;
}

template <typename T>
struct DeviceBuffer {
  T* ptr = nullptr;
  explicit DeviceBuffer(size_t n) { CUDA_CHECK(cudaMalloc(&ptr, (n ? n : 1) * sizeof(T))); }
  ~DeviceBuffer() { cudaFree(ptr); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
};

template <typename T>
T* Upload(DeviceBuffer<T>& dev, const std::vector<T>& host) {
  if (!host.empty()) {
    CUDA_CHECK(cudaMemcpy(dev.ptr, host.data(), host.size() * sizeof(T),
                          cudaMemcpyHostToDevice));
  }
  return dev.ptr;
}

template <typename T>
std::vector<T> Download(const T* dev, size_t n) {
  std::vector<T> host(n);
  if (n) {
    CUDA_CHECK(cudaMemcpy(host.data(), dev, n * sizeof(T), cudaMemcpyDeviceToHost));
  }
  return host;
}

// quantizer.quantizer_params, float32 arithmetic in TF's order.
struct Params {
  std::vector<float> lo, k, flip, aligned;
};

Params QuantizerParams(const std::vector<float>& gamma,
                       const std::vector<float>& beta, int bits, float window) {
  const float n = static_cast<float>(1 << bits);
  const float w = static_cast<float>(static_cast<double>(window) / (1 << bits));
  const float half = static_cast<float>(static_cast<double>(window) / 2);
  Params p;
  for (size_t c = 0; c < gamma.size(); ++c) {
    const bool nonzero = gamma[c] != 0.0f;
    const float t = -beta[c] / (nonzero ? gamma[c] : 1.0f);
    const bool al = (-half * gamma[c] + beta[c] > 0.0f) != (half * gamma[c] + beta[c] > 0.0f);
    const float t_in = al ? std::fmin(std::fmax(t, -half), half) : 0.0f;
    float ka = std::nearbyint((t_in + half) / w);  // tf.round: half to even
    ka = std::fmin(std::fmax(ka, 1.0f), n - 1.0f);
    p.lo.push_back(al ? t_in - ka * w : -half);
    p.k.push_back(al ? ka : (beta[c] > 0.0f ? 0.0f : n));
    p.flip.push_back(al && gamma[c] < 0.0f ? 1.0f : 0.0f);
    p.aligned.push_back(al ? 1.0f : 0.0f);
  }
  return p;
}

// Independent reference of quantizer.encode_codes, written from the spec.
float TfMaxRef(float a, float b) {
  return (std::isnan(a) || std::isnan(b)) ? std::numeric_limits<float>::quiet_NaN()
                                          : (a > b ? a : b);
}
float TfMinRef(float a, float b) {
  return (std::isnan(a) || std::isnan(b)) ? std::numeric_limits<float>::quiet_NaN()
                                          : (a < b ? a : b);
}
uint8_t SpecCode(float xhat, bool on, float lo, float k, float flip,
                 float aligned, int bits, float window) {
  const float top = static_cast<float>((1 << bits) - 1);
  const float inv_w = static_cast<float>(1.0 / (static_cast<double>(window) / (1 << bits)));
  volatile float prod = (xhat - lo) * inv_w;  // volatile: no contraction
  float u = std::floor(prod);
  if (std::isnan(u)) u = 0.0f;
  u = TfMaxRef(TfMinRef(u, top), 0.0f);  // tf.clip_by_value
  const bool want_hi = on == (flip < 0.5f);
  const bool al = aligned > 0.5f;
  const float lower = (al && want_hi) ? k : 0.0f;
  const float upper = (al && !want_hi) ? k - 1.0f : top;
  const float q = TfMinRef(TfMaxRef(u, lower), upper);
  return std::isnan(q) ? 0 : static_cast<uint8_t>(static_cast<int32_t>(q));
}

// Codes of a packed buffer (quantizer.unpack).
std::vector<uint8_t> Unpack(const std::vector<uint8_t>& packed, int64_t n, int bits) {
  std::vector<uint8_t> codes(n);
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t b = packed[bits == 8 ? i : i / 2];
    codes[i] = bits == 8 ? b : ((i & 1) ? blpa::HighNibble(b) : blpa::LowNibble(b));
  }
  return codes;
}

struct BnGrads {
  std::vector<float> g_x, d_gamma, d_beta;
};

// quantizer.decode_bn_backward written from the spec (separate float32 steps,
// sums in double in element order).
BnGrads SpecBnBackward(const std::vector<uint8_t>& codes, const std::vector<float>& g_a,
                       const Params& p, const std::vector<float>& gamma,
                       const std::vector<float>& inv_std, int64_t C, int bits,
                       float window, float slope) {
  const int64_t n = static_cast<int64_t>(codes.size());
  const float w = static_cast<float>(static_cast<double>(window) / (1 << bits));
  std::vector<float> xhat(n), g_y(n);
  std::vector<double> sum_b(C, 0.0), sum_g(C, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = i % C;
    const float q = static_cast<float>(codes[i]);
    volatile float scaled = (q + 0.5f) * w;  // volatile: no contraction
    xhat[i] = scaled + p.lo[c];
    const bool mask = (q >= p.k[c]) != (p.flip[c] > 0.5f);
    g_y[i] = mask ? g_a[i] : SpecLeakyNeg(g_a[i], slope);
    volatile float prod = g_y[i] * xhat[i];
    sum_b[c] += g_y[i];
    sum_g[c] += prod;
  }
  BnGrads r;
  const float count = static_cast<float>(n / (C ? C : 1));
  for (int64_t c = 0; c < C; ++c) {
    r.d_beta.push_back(static_cast<float>(sum_b[c]));
    r.d_gamma.push_back(static_cast<float>(sum_g[c]));
  }
  r.g_x.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = i % C;
    volatile float scale = gamma[c] * inv_std[c];
    volatile float mb = r.d_beta[c] / count;
    volatile float mg = r.d_gamma[c] / count;
    volatile float centred = g_y[i] - mb;
    volatile float slope = xhat[i] * mg;
    volatile float diff = centred - slope;
    r.g_x[i] = scale * diff;
  }
  return r;
}

// The same with the per-element functions of blpa_kernels.h (what the CPU and
// CUDA kernels call); sums in double in element order.
BnGrads HostBnBackward(const std::vector<uint8_t>& codes, const std::vector<float>& g_a,
                       const Params& p, const std::vector<float>& gamma,
                       const std::vector<float>& inv_std, int64_t C, int bits,
                       float window, float slope) {
  const int64_t n = static_cast<int64_t>(codes.size());
  const Grid g = blpa::MakeGrid(bits, window);
  std::vector<double> sum_b(C, 0.0), sum_g(C, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = i % C;
    float xhat;
    const float g_y =
        blpa::MaskedGradOne(codes[i], g_a[i], p.lo[c], p.k[c], p.flip[c], g, &xhat, slope);
    sum_b[c] += g_y;
    sum_g[c] += g_y * xhat;
  }
  BnGrads r;
  const float count = static_cast<float>(n / (C ? C : 1));
  std::vector<blpa::BnCoef> coef;
  for (int64_t c = 0; c < C; ++c) {
    r.d_beta.push_back(static_cast<float>(sum_b[c]));
    r.d_gamma.push_back(static_cast<float>(sum_g[c]));
    coef.push_back(blpa::MakeBnCoef(gamma[c], inv_std[c], r.d_beta[c], r.d_gamma[c], count));
  }
  r.g_x.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    const blpa::BnCoef& k = coef[i % C];
    r.g_x[i] = blpa::BnBackwardOne(codes[i], g_a[i], p.lo[i % C], p.k[i % C], p.flip[i % C],
                                   k.scale, k.mean_dbeta, k.mean_dgamma, g, slope);
  }
  return r;
}

int64_t CountDifferent(const std::vector<float>& a, const std::vector<float>& b) {
  int64_t bad = 0;
  for (size_t i = 0; i < a.size(); ++i) bad += !SameFloat(a[i], b[i]);
  return bad;
}

// Elements farther from `ref` than rtol * max|ref| (NaN only matches NaN).
int64_t CountNotClose(const std::vector<float>& actual, const std::vector<float>& ref,
                      double rtol) {
  double scale = 0.0;
  for (float v : ref) {
    if (std::isfinite(v)) scale = std::fmax(scale, std::fabs(static_cast<double>(v)));
  }
  const double tol = rtol * scale + 1e-30;
  int64_t bad = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const float a = actual[i], r = ref[i];
    if (std::isnan(a) || std::isnan(r) || std::isinf(a) || std::isinf(r)) {
      bad += !SameFloat(a, r);
    } else {
      bad += std::fabs(static_cast<double>(a) - r) > tol;
    }
  }
  return bad;
}

struct Case {
  std::string name;
  int64_t n;
  int64_t channels;
  int bits;
  bool specials;  // NaN/Inf/huge/denormal inputs and odd parameters
  float window;   // grid window in standard deviations
  float slope;    // leaky ReLU negative_slope (0: the ReLU)
};

// Per-channel BN statistics and parameters, with the edge cases every C >= 7
// covers: gamma < 0, gamma == 0, thresholds far outside the window.
struct Channels {
  std::vector<float> mean, inv_std, gamma, beta;
};

Channels RandomChannels(int64_t C, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  std::vector<float> mean(C), inv_std(C), gamma(C), beta(C);
  for (int64_t c = 0; c < C; ++c) {
    mean[c] = 0.3f * normal(rng);
    inv_std[c] = 0.5f + 1.5f * uniform(rng);
    gamma[c] = normal(rng);
    beta[c] = normal(rng);
    switch (c % 7) {  // gamma < 0, gamma == 0, thresholds far outside
      case 1: gamma[c] = -std::fabs(gamma[c]); break;
      case 2: gamma[c] = 0.0f; break;
      case 3: beta[c] = 50.0f * std::fabs(gamma[c]) + 1.0f; break;    // always on
      case 4: beta[c] = -50.0f * std::fabs(gamma[c]) - 1.0f; break;   // always off
      case 5: gamma[c] = 0.0f; beta[c] = -beta[c] * beta[c]; break;   // off, beta <= 0
      default: break;
    }
  }
  return {mean, inv_std, gamma, beta};
}

void RunCase(const Case& tc, std::mt19937& rng, cudaStream_t stream, bool device) {
  const int64_t n = tc.n;
  const int64_t C = tc.channels;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Channels ch = RandomChannels(C, rng);
  std::vector<float> x(n);
  for (auto& v : x) v = 2.5f * normal(rng);
  std::vector<float>& mean = ch.mean;
  std::vector<float>& inv_std = ch.inv_std;
  std::vector<float>& gamma = ch.gamma;
  std::vector<float>& beta = ch.beta;
  if (tc.specials) {
    const float specials[] = {std::numeric_limits<float>::quiet_NaN(),
                              std::numeric_limits<float>::infinity(),
                              -std::numeric_limits<float>::infinity(),
                              3.0e38f, -3.0e38f, 1.0e-40f, -0.0f, 0.0f};
    for (int64_t i = 0; i < n; i += 3) x[i] = specials[(i / 3) % 8];
    if (C > 2) {
      mean[0] = std::numeric_limits<float>::quiet_NaN();
      inv_std[1] = std::numeric_limits<float>::infinity();
    }
  }
  // Elements on the threshold (y rounds to either side of 0) and nudged by one
  // ulp: there the side clamp of the code decides.
  for (int64_t i = 1; i < n; i += 5) {
    const int64_t c = i % C;
    const float t = -beta[c] / (gamma[c] != 0.0f ? gamma[c] : 1.0f);
    float v = mean[c] + t / inv_std[c];
    if (i % 3 == 1) v = std::nextafter(v, 1e30f);
    if (i % 3 == 2) v = std::nextafter(v, -1e30f);
    x[i] = v;
  }
  Params p = QuantizerParams(gamma, beta, tc.bits, tc.window);
  if (tc.specials && C > 6) {
    p.k[6] = std::numeric_limits<float>::quiet_NaN();  // NaN propagation
    p.aligned[6] = 1.0f;
  }
  const Grid g = blpa::MakeGrid(tc.bits, tc.window);
  const int64_t bytes = tc.bits == 8 ? n : (n + 1) / 2;

  // ---- host: same functions, and the spec reference
  std::vector<float> a_host(n);
  std::vector<uint8_t> codes(n), spec_codes(n), packed_host(bytes, 0);
  int64_t spec_mismatch = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = i % C;
    a_host[i] = blpa::EncodeOne(x[i], mean[c], inv_std[c], gamma[c], beta[c],
                                p.lo[c], p.k[c], p.flip[c], p.aligned[c], g,
                                &codes[i], tc.slope);
    // The CPU kernels' formulation: bounds precomputed per channel.
    uint8_t code_cpu;
    const float a_cpu = blpa::EncodeOneBounded(
        x[i], mean[c], inv_std[c], gamma[c], beta[c], p.lo[c],
        blpa::SideBounds(true, p.k[c], p.flip[c], p.aligned[c], g),
        blpa::SideBounds(false, p.k[c], p.flip[c], p.aligned[c], g), g, &code_cpu,
        tc.slope);
    if (code_cpu != codes[i] || !SameFloat(a_cpu, a_host[i])) ++spec_mismatch;
    volatile float xhat = (x[i] - mean[c]) * inv_std[c];
    volatile float prod = xhat * gamma[c];
    const float y = prod + beta[c];
    const bool on = y > 0.0f;
    spec_codes[i] = SpecCode(xhat, on, p.lo[c], p.k[c], p.flip[c], p.aligned[c], tc.bits,
                             tc.window);
    // tf.where(~(y <= 0), y, leaky): NaN passes, the negative side is y * s.
    const float a_spec = on ? y : (y <= 0.0f ? SpecLeakyNeg(y, tc.slope) : y);
    if (spec_codes[i] != codes[i] || !SameFloat(a_spec, a_host[i])) ++spec_mismatch;
  }
  for (int64_t i = 0; i < n; ++i) {
    if (tc.bits == 8) {
      packed_host[i] = codes[i];
    } else {
      packed_host[i / 2] |= static_cast<uint8_t>((i & 1) ? codes[i] << 4 : codes[i]);
    }
  }
  Report(tc.name + " host-vs-spec", spec_mismatch, n);

  // ---- fused decode + BN backward: upstream gradient with a non-zero mean,
  // finite inv_std (the specials' Inf would make whole channels NaN).
  std::vector<float> g_a(n), bn_inv_std(inv_std);
  for (auto& v : g_a) v = normal(rng) + 0.3f;
  for (auto& v : bn_inv_std) v = std::isfinite(v) ? v : 1.0f;
  Params bn_p = p;
  if (tc.specials && C > 6) bn_p.k[6] = 3.0f;  // a NaN k has no decode meaning
  std::vector<uint8_t> bn_random_packed(bytes);
  for (auto& b : bn_random_packed) b = static_cast<uint8_t>(rng() & 0xFF);
  std::vector<BnGrads> bn_ref;
  for (const auto* src : {&packed_host, &bn_random_packed}) {
    const std::vector<uint8_t> src_codes = Unpack(*src, n, tc.bits);
    bn_ref.push_back(HostBnBackward(src_codes, g_a, bn_p, gamma, bn_inv_std, C, tc.bits,
                                    tc.window, tc.slope));
    const BnGrads spec = SpecBnBackward(src_codes, g_a, bn_p, gamma, bn_inv_std, C, tc.bits,
                                          tc.window, tc.slope);
    // decode_relu (quantizer.relu_from_decoded) against the spec.
    const float w = static_cast<float>(static_cast<double>(tc.window) / (1 << tc.bits));
    int64_t relu_bad = 0;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t c = i % C;
      const float q = static_cast<float>(src_codes[i]);
      volatile float scaled = (q + 0.5f) * w;
      volatile float xhat = scaled + bn_p.lo[c];
      volatile float prod = xhat * gamma[c];
      const float y = prod + beta[c];
      const bool mask = (q >= bn_p.k[c]) != (bn_p.flip[c] > 0.5f);
      const float spec_relu = mask ? y : SpecLeakyNeg(y, tc.slope);
      relu_bad += !SameFloat(spec_relu,
                             blpa::DecodeReluOne(src_codes[i], bn_p.lo[c], bn_p.k[c],
                                                 bn_p.flip[c], gamma[c], beta[c], g, tc.slope));
    }
    Report(tc.name + " decode_relu host-vs-spec", relu_bad, n);
    const BnGrads& host = bn_ref.back();
    Report(tc.name + " bn_backward host-vs-spec",
           CountDifferent(host.g_x, spec.g_x) + CountDifferent(host.d_gamma, spec.d_gamma) +
               CountDifferent(host.d_beta, spec.d_beta),
           n + 2 * C);
  }
  if (!device) return;

  // ---- device encode
  DeviceBuffer<float> d_x(n), d_a(n), d_mean(C), d_inv(C), d_gamma(C), d_beta(C);
  DeviceBuffer<float> d_lo(C), d_k(C), d_flip(C), d_al(C);
  DeviceBuffer<uint8_t> d_packed(bytes);
  CUDA_CHECK(cudaMemset(d_packed.ptr, 0xAB, bytes ? bytes : 1));  // catch unwritten bytes
  EncodeArgs ea{};
  ea.x = Upload(d_x, x);
  ea.mean = Upload(d_mean, mean);
  ea.inv_std = Upload(d_inv, inv_std);
  ea.gamma = Upload(d_gamma, gamma);
  ea.beta = Upload(d_beta, beta);
  ea.lo = Upload(d_lo, p.lo);
  ea.k = Upload(d_k, p.k);
  ea.flip = Upload(d_flip, p.flip);
  ea.aligned = Upload(d_al, p.aligned);
  ea.n = n;
  ea.channels = C;
  ea.bits = tc.bits;
  ea.window = tc.window;
  ea.a = d_a.ptr;
  ea.packed = d_packed.ptr;
  ea.negative_slope = tc.slope;
  if (const char* err = blpa::LaunchEncodeGpu(ea, stream)) {
    std::fprintf(stderr, "encode launch failed: %s\n", err);
    std::exit(2);
  }
  CUDA_CHECK(cudaStreamSynchronize(stream));
  const std::vector<float> a_dev = Download(d_a.ptr, n);
  const std::vector<uint8_t> packed_dev = Download(d_packed.ptr, bytes);
  int64_t bad = 0;
  for (int64_t i = 0; i < bytes; ++i) bad += packed_dev[i] != packed_host[i];
  Report(tc.name + " encode codes", bad, bytes);
  bad = 0;
  for (int64_t i = 0; i < n; ++i) bad += !SameFloat(a_dev[i], a_host[i]);
  Report(tc.name + " encode a", bad, n);

  // ---- device decode / decode_relu on every byte value, not only encoder output
  std::vector<uint8_t> random_packed(bytes);
  for (int64_t i = 0; i < bytes; ++i) random_packed[i] = static_cast<uint8_t>(rng() & 0xFF);
  if (tc.specials && C > 6) p.k[6] = 3.0f;  // keep NaN out of the float outputs
  Upload(d_k, p.k);
  for (int pass = 0; pass < 2; ++pass) {
    const std::vector<uint8_t>& src = pass == 0 ? packed_host : random_packed;
    const std::string tag = pass == 0 ? " decode(encoded)" : " decode(random)";
    Upload(d_packed, src);
    DeviceBuffer<float> d_xhat(n), d_relu(n);
    DeviceBuffer<bool> d_mask(n);
    DecodeArgs da{};
    da.packed = d_packed.ptr;
    da.lo = d_lo.ptr;
    da.k = d_k.ptr;
    da.flip = d_flip.ptr;
    da.gamma = d_gamma.ptr;
    da.beta = d_beta.ptr;
    da.n = n;
    da.channels = C;
    da.bits = tc.bits;
    da.window = tc.window;
    da.xhat = d_xhat.ptr;
    da.mask = d_mask.ptr;
    da.a = d_relu.ptr;
    da.negative_slope = tc.slope;
    const char* err = blpa::LaunchDecodeGpu(da, stream);
    if (err == nullptr) err = blpa::LaunchDecodeReluGpu(da, stream);
    if (err != nullptr) {
      std::fprintf(stderr, "decode launch failed: %s\n", err);
      std::exit(2);
    }
    CUDA_CHECK(cudaStreamSynchronize(stream));
    const std::vector<float> xhat_dev = Download(d_xhat.ptr, n);
    const std::vector<bool> mask_dev = [&] {
      std::vector<uint8_t> raw(n);
      if (n) CUDA_CHECK(cudaMemcpy(raw.data(), d_mask.ptr, n, cudaMemcpyDeviceToHost));
      return std::vector<bool>(raw.begin(), raw.end());
    }();
    const std::vector<float> relu_dev = Download(d_relu.ptr, n);
    int64_t bad_x = 0, bad_m = 0, bad_r = 0;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t c = i % C;
      const uint8_t b = src[tc.bits == 8 ? i : i / 2];
      const uint8_t code =
          tc.bits == 8 ? b : ((i & 1) ? blpa::HighNibble(b) : blpa::LowNibble(b));
      bool mask;
      const float xhat = blpa::DecodeOne(code, p.lo[c], p.k[c], p.flip[c], g, &mask);
      const float relu = blpa::DecodeReluOne(code, p.lo[c], p.k[c], p.flip[c],
                                             gamma[c], beta[c], g, tc.slope);
      bad_x += !SameFloat(xhat_dev[i], xhat);
      bad_m += mask_dev[i] != mask;
      bad_r += !SameFloat(relu_dev[i], relu);
    }
    Report(tc.name + tag + " xhat", bad_x, n);
    Report(tc.name + tag + " mask", bad_m, n);
    Report(tc.name + tag + " relu", bad_r, n);
  }

  // ---- device fused decode + BN backward (d_x holds g_a, d_a receives g_x).
  Upload(d_k, bn_p.k);
  Upload(d_inv, bn_inv_std);
  Upload(d_x, g_a);
  DeviceBuffer<float> d_dgamma(C), d_dbeta(C);
  DeviceBuffer<uint8_t> d_scratch(blpa::BnBackwardScratchBytes(C));
  for (int pass = 0; pass < 2; ++pass) {
    const std::string tag = pass == 0 ? " bn_backward(encoded)" : " bn_backward(random)";
    Upload(d_packed, pass == 0 ? packed_host : bn_random_packed);
    // Poison the outputs: every element must be written.
    CUDA_CHECK(cudaMemset(d_a.ptr, 0xFF, (n ? n : 1) * sizeof(float)));
    CUDA_CHECK(cudaMemset(d_dgamma.ptr, 0xFF, (C ? C : 1) * sizeof(float)));
    CUDA_CHECK(cudaMemset(d_dbeta.ptr, 0xFF, (C ? C : 1) * sizeof(float)));
    BnBackwardArgs ba{};
    ba.g_a = d_x.ptr;
    ba.packed = d_packed.ptr;
    ba.lo = d_lo.ptr;
    ba.k = d_k.ptr;
    ba.flip = d_flip.ptr;
    ba.gamma = d_gamma.ptr;
    ba.inv_std = d_inv.ptr;
    ba.n = n;
    ba.channels = C;
    ba.bits = tc.bits;
    ba.window = tc.window;
    ba.g_x = d_a.ptr;
    ba.d_gamma = d_dgamma.ptr;
    ba.d_beta = d_dbeta.ptr;
    ba.scratch = d_scratch.ptr;
    ba.negative_slope = tc.slope;
    if (const char* err = blpa::LaunchDecodeBnBackwardGpu(ba, stream)) {
      std::fprintf(stderr, "bn_backward launch failed: %s\n", err);
      std::exit(2);
    }
    CUDA_CHECK(cudaStreamSynchronize(stream));
    const BnGrads& ref = bn_ref[pass];
    Report(tc.name + tag + " g_x", CountNotClose(Download(d_a.ptr, n), ref.g_x, 1e-5), n);
    Report(tc.name + tag + " d_gamma",
           CountNotClose(Download(d_dgamma.ptr, C), ref.d_gamma, 1e-5), C);
    Report(tc.name + tag + " d_beta",
           CountNotClose(Download(d_dbeta.ptr, C), ref.d_beta, 1e-5), C);
  }
}

// The exact path (bits=None). Host: the per-element functions against
// separate float32 steps of quantizer.py's exact branch, bit for bit, and the
// backward against a double-sum reference. Device: the kernels against the
// host functions (bit for bit; the backward within 1e-5), out of place and
// in place.
void ExactCase(int64_t rows, int64_t C, bool specials, float slope, std::mt19937& rng,
               cudaStream_t stream, bool device) {
  const int64_t n = rows * C;
  const std::string name = "exact C=" + std::to_string(C) + " n=" + std::to_string(n) +
                           (specials ? " specials" : "") +
                           " slope=" + std::to_string(slope);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Channels ch = RandomChannels(C, rng);
  std::vector<float> x(n), g_a(n);
  for (auto& v : x) v = 2.5f * normal(rng);
  for (auto& v : g_a) v = normal(rng) + 0.3f;
  if (specials) {
    const float values[] = {std::numeric_limits<float>::quiet_NaN(),
                            std::numeric_limits<float>::infinity(), -0.0f, 1.0e-40f};
    for (int64_t i = 0; i < n; i += 5) x[i] = values[(i / 5) % 4];
  }
  // Host: functions vs spec.
  std::vector<float> a(n), xhat(n), relu(n);
  int64_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = i % C;
    a[i] = blpa::NormalizeReluOne(x[i], ch.mean[c], ch.inv_std[c], ch.gamma[c], ch.beta[c],
                                  &xhat[i], slope);
    relu[i] = blpa::ExactReluOne(xhat[i], ch.gamma[c], ch.beta[c], slope);
    volatile float centred = x[i] - ch.mean[c];
    volatile float h = centred * ch.inv_std[c];
    volatile float scaled = h * ch.gamma[c];
    volatile float y = scaled + ch.beta[c];
    // tf.where(~(y <= 0), y, leaky) and tf.where(y > 0, y, leaky).
    const float spec_a = y <= 0.0f ? SpecLeakyNeg(y, slope) : y;
    const float spec_relu = y > 0.0f ? y : SpecLeakyNeg(y, slope);
    bad += !SameFloat(xhat[i], h) + !SameFloat(a[i], spec_a) + !SameFloat(relu[i], spec_relu);
  }
  Report(name + " host forward/rebuild vs spec", bad, n);
  std::vector<double> sum_b(C, 0.0), sum_g(C, 0.0);
  int64_t bad_gy = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = i % C;
    const float g_y = blpa::ExactMaskedGradOne(xhat[i], g_a[i], ch.gamma[c], ch.beta[c], slope);
    volatile float scaled = xhat[i] * ch.gamma[c];
    const float y = scaled + ch.beta[c];
    // quantizer.relu_bn_backward: leaky(g_a, exact_mask, s).
    bad_gy += !SameFloat(g_y, y > 0.0f ? g_a[i] : SpecLeakyNeg(g_a[i], slope));
    sum_b[c] += g_y;
    sum_g[c] += static_cast<double>(g_y) * xhat[i];
  }
  Report(name + " host g_y vs spec", bad_gy, n);
  BnGrads ref;
  ref.g_x.resize(n);
  for (int64_t c = 0; c < C; ++c) {
    ref.d_beta.push_back(static_cast<float>(sum_b[c]));
    ref.d_gamma.push_back(static_cast<float>(sum_g[c]));
  }
  const double count = static_cast<double>(rows);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = i % C;
    const double g_y =
        blpa::ExactMaskedGradOne(xhat[i], g_a[i], ch.gamma[c], ch.beta[c], slope);
    const double scale = static_cast<double>(ch.gamma[c]) * ch.inv_std[c];
    ref.g_x[i] = static_cast<float>(
        scale * ((g_y - sum_b[c] / count) - static_cast<double>(xhat[i]) * (sum_g[c] / count)));
  }
  if (!device) return;

  DeviceBuffer<float> d_x(n), d_a(n), d_xhat(n), d_g(n), d_gx(n), d_mean(C), d_inv(C),
      d_gamma(C), d_beta(C), d_dgamma(C), d_dbeta(C);
  DeviceBuffer<uint8_t> d_scratch(blpa::BnBackwardScratchBytes(C));
  Upload(d_mean, ch.mean);
  Upload(d_inv, ch.inv_std);
  Upload(d_gamma, ch.gamma);
  Upload(d_beta, ch.beta);
  for (bool in_place : {false, true}) {
    const std::string tag = in_place ? " in place" : "";
    Upload(d_x, x);
    CUDA_CHECK(cudaMemset(d_a.ptr, 0xFF, (n ? n : 1) * sizeof(float)));
    ExactArgs fa{};
    fa.x = d_x.ptr;
    fa.mean = d_mean.ptr;
    fa.inv_std = d_inv.ptr;
    fa.gamma = d_gamma.ptr;
    fa.beta = d_beta.ptr;
    fa.n = n;
    fa.channels = C;
    fa.a = d_a.ptr;
    fa.xhat = in_place ? d_x.ptr : d_xhat.ptr;
    fa.negative_slope = slope;
    if (const char* err = blpa::LaunchNormalizeReluGpu(fa, stream)) {
      std::fprintf(stderr, "exact forward launch failed: %s\n", err);
      std::exit(2);
    }
    CUDA_CHECK(cudaStreamSynchronize(stream));
    const std::vector<float> xhat_dev = Download(fa.xhat, n);
    Report(name + tag + " device a", CountDifferent(Download(d_a.ptr, n), a), n);
    Report(name + tag + " device xhat", CountDifferent(xhat_dev, xhat), n);

    ExactArgs ra{};
    ra.x = fa.xhat;
    ra.gamma = d_gamma.ptr;
    ra.beta = d_beta.ptr;
    ra.n = n;
    ra.channels = C;
    ra.a = d_a.ptr;
    ra.negative_slope = slope;
    if (const char* err = blpa::LaunchExactReluGpu(ra, stream)) {
      std::fprintf(stderr, "exact relu launch failed: %s\n", err);
      std::exit(2);
    }
    CUDA_CHECK(cudaStreamSynchronize(stream));
    Report(name + tag + " device rebuild", CountDifferent(Download(d_a.ptr, n), relu), n);

    Upload(d_g, g_a);
    BnBackwardArgs ba{};
    ba.g_a = d_g.ptr;
    ba.gamma = d_gamma.ptr;
    ba.inv_std = d_inv.ptr;
    ba.exact = true;
    ba.xhat = fa.xhat;
    ba.beta = d_beta.ptr;
    ba.n = n;
    ba.channels = C;
    ba.g_x = in_place ? d_g.ptr : d_gx.ptr;
    ba.d_gamma = d_dgamma.ptr;
    ba.d_beta = d_dbeta.ptr;
    ba.scratch = d_scratch.ptr;
    ba.negative_slope = slope;
    if (const char* err = blpa::LaunchDecodeBnBackwardGpu(ba, stream)) {
      std::fprintf(stderr, "exact bn_backward launch failed: %s\n", err);
      std::exit(2);
    }
    CUDA_CHECK(cudaStreamSynchronize(stream));
    Report(name + tag + " device g_x", CountNotClose(Download(ba.g_x, n), ref.g_x, 1e-5), n);
    Report(name + tag + " device d_gamma",
           CountNotClose(Download(d_dgamma.ptr, C), ref.d_gamma, 1e-5), C);
    Report(name + tag + " device d_beta",
           CountNotClose(Download(d_dbeta.ptr, C), ref.d_beta, 1e-5), C);
  }
}

// Past 2^31 elements the kernels index with 64 bits. One lean case there
// (data from a counter hash, no per-element spec reference: the small cases
// cover the arithmetic) checks that every element, the last ones included,
// is encoded, decoded and back-propagated as the host functions say.
// Needs ~40 GB of GPU memory and ~60 GB of host memory.
void LargeIndexCheck(cudaStream_t stream, int bits) {
  const int64_t C = 37;
  const int64_t n = ((int64_t{1} << 31) / C + 3) * C;  // whole rows, past 2^31
  const int64_t bytes = bits == 8 ? n : (n + 1) / 2;
  const float window = bits == 4 ? 8.0f : 12.0f;
  const float slope = bits == 4 ? 0.0f : 0.2f;  // the ReLU at 4 bits, leaky at 8
  const std::string name = "bits=" + std::to_string(bits) + " C=37 n=2^31+" +
                           std::to_string(n - (int64_t{1} << 31)) + " (64-bit index)" +
                           " slope=" + std::to_string(slope);
  std::mt19937 rng(99);
  const Channels ch = RandomChannels(C, rng);
  const Params p = QuantizerParams(ch.gamma, ch.beta, bits, window);
  const Grid g = blpa::MakeGrid(bits, window);
  std::vector<float> x(n);
  for (int64_t i = 0; i < n; ++i) {  // splitmix64 of i -> uniform in [-4, 4)
    uint64_t z = static_cast<uint64_t>(i) + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    x[i] = static_cast<float>(z >> 40) * (8.0f / 16777216.0f) - 4.0f;
  }
  DeviceBuffer<float> d_x(n), d_out(n), d_par(11 * C);
  DeviceBuffer<uint8_t> d_packed(bytes);
  DeviceBuffer<double> d_scratch((blpa::BnBackwardScratchBytes(C) + 7) / 8);
  Upload(d_x, x);
  const std::vector<const std::vector<float>*> host_par = {
      &ch.mean, &ch.inv_std, &ch.gamma, &ch.beta, &p.lo, &p.k, &p.flip, &p.aligned};
  for (size_t j = 0; j < host_par.size(); ++j) {
    CUDA_CHECK(cudaMemcpy(d_par.ptr + j * C, host_par[j]->data(), C * sizeof(float),
                          cudaMemcpyHostToDevice));
  }
  const float* mean = d_par.ptr;
  const float *inv_std = mean + C, *gamma = mean + 2 * C, *beta = mean + 3 * C;
  const float *lo = mean + 4 * C, *k = mean + 5 * C, *flip = mean + 6 * C;
  const float* aligned = mean + 7 * C;
  float *d_gamma = d_par.ptr + 8 * C, *d_beta = d_par.ptr + 9 * C;
  auto check = [](const char* what, const char* err) {
    if (err != nullptr) {
      std::fprintf(stderr, "%s launch failed: %s\n", what, err);
      std::exit(2);
    }
  };

  // Encode: codes and activations, element by element.
  CUDA_CHECK(cudaMemset(d_packed.ptr, 0xAB, bytes));
  EncodeArgs ea{d_x.ptr, mean, inv_std, gamma, beta, lo, k, flip, aligned,
                n, C, bits, window, d_out.ptr, d_packed.ptr, slope};
  check("encode", blpa::LaunchEncodeGpu(ea, stream));
  CUDA_CHECK(cudaStreamSynchronize(stream));
  const std::vector<uint8_t> packed = Download(d_packed.ptr, bytes);
  std::vector<float> out = Download(d_out.ptr, n);
  std::vector<uint8_t> codes(n);
  int64_t bad_code = 0, bad_a = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = i % C;
    const float a = blpa::EncodeOne(x[i], ch.mean[c], ch.inv_std[c], ch.gamma[c], ch.beta[c],
                                    p.lo[c], p.k[c], p.flip[c], p.aligned[c], g, &codes[i],
                                    slope);
    const uint8_t b = packed[bits == 8 ? i : i / 2];
    bad_code += codes[i] != (bits == 8 ? b : ((i & 1) ? blpa::HighNibble(b)
                                                      : blpa::LowNibble(b)));
    bad_a += !SameFloat(out[i], a);
  }
  Report(name + " encode codes", bad_code, n);
  Report(name + " encode a", bad_a, n);

  // Decode + ReLU (the forward's inference path) of those codes.
  DecodeArgs da{d_packed.ptr, lo, k, flip, gamma, beta, n, C, bits, window,
                nullptr, nullptr, d_out.ptr, slope};
  CUDA_CHECK(cudaMemset(d_out.ptr, 0xFF, n * sizeof(float)));
  check("decode_relu", blpa::LaunchDecodeReluGpu(da, stream));
  CUDA_CHECK(cudaStreamSynchronize(stream));
  out = Download(d_out.ptr, n);
  int64_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = i % C;
    bad += !SameFloat(out[i], blpa::DecodeReluOne(codes[i], p.lo[c], p.k[c], p.flip[c],
                                                  ch.gamma[c], ch.beta[c], g, slope));
  }
  Report(name + " decode_relu", bad, n);

  // Fused decode + BN backward with x as the upstream gradient.
  CUDA_CHECK(cudaMemset(d_out.ptr, 0xFF, n * sizeof(float)));
  BnBackwardArgs ba{d_x.ptr, d_packed.ptr, lo, k, flip, gamma, inv_std, n, C, bits, window,
                    d_out.ptr, d_gamma, d_beta, d_scratch.ptr};
  ba.negative_slope = slope;
  check("bn_backward", blpa::LaunchDecodeBnBackwardGpu(ba, stream));
  CUDA_CHECK(cudaStreamSynchronize(stream));
  const BnGrads ref = HostBnBackward(codes, x, p, ch.gamma, ch.inv_std, C, bits, window, slope);
  Report(name + " bn_backward g_x", CountNotClose(Download(d_out.ptr, n), ref.g_x, 1e-5), n);
  Report(name + " bn_backward d_gamma", CountNotClose(Download(d_gamma, C), ref.d_gamma, 1e-5),
         C);
  Report(name + " bn_backward d_beta", CountNotClose(Download(d_beta, C), ref.d_beta, 1e-5), C);
}

// Effective bandwidth of the kernels on a large input (fp32 bytes per second).
void Bandwidth(cudaStream_t stream) {
  const int64_t n = int64_t{64} << 20;  // 256 MiB of fp32
  const int64_t C = 64;
  DeviceBuffer<float> d_x(n), d_a(n), d_par(8 * C), d_xhat(n);
  DeviceBuffer<uint8_t> d_packed(n);
  DeviceBuffer<bool> d_mask(n);
  CUDA_CHECK(cudaMemset(d_x.ptr, 0, n * sizeof(float)));
  CUDA_CHECK(cudaMemset(d_par.ptr, 0, 8 * C * sizeof(float)));
  cudaEvent_t start, stop;
  CUDA_CHECK(cudaEventCreate(&start));
  CUDA_CHECK(cudaEventCreate(&stop));
  for (int bits : {4, 8}) {
    EncodeArgs ea{d_x.ptr, d_par.ptr, d_par.ptr + C, d_par.ptr + 2 * C,
                  d_par.ptr + 3 * C, d_par.ptr + 4 * C, d_par.ptr + 5 * C,
                  d_par.ptr + 6 * C, d_par.ptr + 7 * C, n, C, bits, bits == 4 ? 6.0f : 12.0f, d_a.ptr,
                  d_packed.ptr};
    DecodeArgs da{d_packed.ptr, d_par.ptr, d_par.ptr + C, d_par.ptr + 2 * C,
                  d_par.ptr + 3 * C, d_par.ptr + 4 * C, n, C, bits, bits == 4 ? 6.0f : 12.0f, d_xhat.ptr,
                  d_mask.ptr, d_a.ptr};
    for (int which = 0; which < 3; ++which) {
      float ms_total = 0.0f;
      const int reps = 10;
      for (int r = -1; r < reps; ++r) {  // r = -1: warm-up
        CUDA_CHECK(cudaEventRecord(start, stream));
        const char* err = which == 0   ? blpa::LaunchEncodeGpu(ea, stream)
                          : which == 1 ? blpa::LaunchDecodeGpu(da, stream)
                                       : blpa::LaunchDecodeReluGpu(da, stream);
        if (err != nullptr) {
          std::fprintf(stderr, "launch failed: %s\n", err);
          std::exit(2);
        }
        CUDA_CHECK(cudaEventRecord(stop, stream));
        CUDA_CHECK(cudaEventSynchronize(stop));
        float ms;
        CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
        if (r >= 0) ms_total += ms;
      }
      const char* names[] = {"encode", "decode", "decode_relu"};
      std::printf("bandwidth %-11s bits=%d: %.1f GB/s of fp32 activations\n",
                  names[which], bits,
                  n * 4.0 / (ms_total / reps * 1e-3) / 1e9);
    }
  }
  // Fused decode + BN backward: GB/s of fp32 g_a (reads g_a twice, writes g_x).
  DeviceBuffer<float> d_small(2 * C);
  DeviceBuffer<uint8_t> d_scratch(blpa::BnBackwardScratchBytes(C));
  for (int bits : {4, 8}) {
    BnBackwardArgs ba{d_x.ptr, d_packed.ptr, d_par.ptr, d_par.ptr + C,
                      d_par.ptr + 2 * C, d_par.ptr + 3 * C, d_par.ptr + 4 * C,
                      n, C, bits, bits == 4 ? 6.0f : 12.0f, d_a.ptr, d_small.ptr,
                      d_small.ptr + C, d_scratch.ptr};
    float ms_total = 0.0f;
    const int reps = 10;
    for (int r = -1; r < reps; ++r) {
      CUDA_CHECK(cudaEventRecord(start, stream));
      if (const char* err = blpa::LaunchDecodeBnBackwardGpu(ba, stream)) {
        std::fprintf(stderr, "launch failed: %s\n", err);
        std::exit(2);
      }
      CUDA_CHECK(cudaEventRecord(stop, stream));
      CUDA_CHECK(cudaEventSynchronize(stop));
      float ms;
      CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
      if (r >= 0) ms_total += ms;
    }
    std::printf("bandwidth %-11s bits=%d: %.1f GB/s of fp32 activations\n",
                "bn_backward", bits, n * 4.0 / (ms_total / reps * 1e-3) / 1e9);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // lines survive a timeout
  bool host_only = false, large = false;
  for (int i = 1; i < argc; ++i) {
    host_only |= std::string(argv[i]) == "--host-only";
    large |= std::string(argv[i]) == "--large";
  }
  cudaStream_t stream = nullptr;
  if (!host_only) {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
      std::fprintf(stderr, "no CUDA device available (use --host-only)\n");
      return 2;
    }
    cudaDeviceProp prop;  // the selftest is built with this nvcc: layouts agree
    CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    std::printf("device: %s (sm_%d%d)\n", prop.name, prop.major, prop.minor);
    CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  }
  std::mt19937 rng(1234);
  std::vector<Case> cases;
  const int64_t sizes[] = {0, 1, 2, 3, 7, 111, 1001, 4096 * 37 + 1, (1 << 20) + 3};
  const int64_t channel_counts[] = {1, 3, 37, 64, 1000};
  for (int bits : {4, 8}) {
    for (int64_t C : channel_counts) {
      for (int64_t size : sizes) {
        const int64_t n = (size / C) * C + (size % 2 ? C : 0);  // whole rows
        for (bool specials : {false, true}) {
          // The paper's window, the wider 4- and 8-bit ones and an odd one.
          // Each window with its own negative_slope: the ReLU at the paper's
          // window, leaky slopes at the others.
          const float windows[] = {6.0f, bits == 4 ? 8.0f : 12.0f, 7.3f};
          const float slopes[] = {0.0f, 0.2f, 0.01f};
          for (int j = 0; j < 3; ++j) {
            cases.push_back({"bits=" + std::to_string(bits) + " C=" + std::to_string(C) +
                                 " n=" + std::to_string(n) + (specials ? " specials" : "") +
                                 " window=" + std::to_string(windows[j]) +
                                 " slope=" + std::to_string(slopes[j]),
                             n, C, bits, specials, windows[j], slopes[j]});
          }
        }
      }
    }
  }
  for (const Case& tc : cases) RunCase(tc, rng, stream, !host_only);
  for (int64_t C : channel_counts) {
    for (int64_t rows : {1, 7, 4096}) {
      for (bool specials : {false, true}) {
        for (float slope : {0.0f, 0.2f}) {
          ExactCase(rows, C, specials, slope, rng, stream, !host_only);
        }
      }
    }
  }
  if (!host_only) {
    Bandwidth(stream);
    if (large) {
      for (int bits : {4, 8}) LargeIndexCheck(stream, bits);
    }
    CUDA_CHECK(cudaStreamDestroy(stream));
  }
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
