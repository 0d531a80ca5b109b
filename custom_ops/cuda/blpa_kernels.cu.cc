// CUDA kernels and their host launchers for the BLPA ops.
//
// Deliberately free of TensorFlow headers: nvcc 13 need not parse TF's GPU
// headers (the wheel was built with CUDA 12.5), and gpu_selftest.cu can
// include this file to test the very same kernels on a machine without TF.
// The OpKernels in blpa_kernels.cc call the launchers with the op's stream.
//
// Compile with --fmad=false so the float math matches the CPU bit for bit.

#include <cuda_runtime.h>

#include <cstdint>

#include "shared/blpa_kernels.h"

namespace blpa {
namespace {

constexpr int kThreads = 256;
// Fixed grid (grid-stride loops): no device-property query, whose struct
// layout differs between the CUDA versions of nvcc and of the TF wheel.
constexpr int64_t kMaxBlocks = 4096;

int GridFor(int64_t units) {
  const int64_t blocks = (units + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < kMaxBlocks ? (blocks > 0 ? blocks : 1)
                                              : kMaxBlocks);
}

// Index type: 32-bit division is much cheaper on the GPU than 64-bit.
template <typename Index>
__device__ __forceinline__ uint8_t EncodeAt(const EncodeArgs& p, Index i,
                                            Index channels, const Grid& g) {
  const Index c = i % channels;
  uint8_t code;
  // A capped ReLU (kc set) branches uniformly: every thread takes one side.
  if (p.kc != nullptr) {
    p.a[i] = EncodeOneCapped(p.x[i], p.mean[c], p.inv_std[c], p.gamma[c],
                             p.beta[c], p.lo[c], p.k[c], p.flip[c],
                             p.aligned[c], p.kc[c], p.cap_flip[c],
                             p.cap_aligned[c], g, p.max_value, &code);
    return code;
  }
  p.a[i] = EncodeOne(p.x[i], p.mean[c], p.inv_std[c], p.gamma[c], p.beta[c],
                     p.lo[c], p.k[c], p.flip[c], p.aligned[c], g, &code,
                     p.negative_slope);
  return code;
}

// One thread per output byte: one element at 8 bits, two at 4 bits.
template <typename Index>
__global__ void EncodeKernel(EncodeArgs p, Grid g) {
  const Index n = static_cast<Index>(p.n);
  const Index channels = static_cast<Index>(p.channels);
  const Index bytes = p.bits == 8 ? n : (n + 1) / 2;
  const Index stride = static_cast<Index>(gridDim.x) * blockDim.x;
  for (Index j = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x;
       j < bytes; j += stride) {
    if (p.bits == 8) {
      p.packed[j] = EncodeAt(p, j, channels, g);
    } else {
      const Index i = 2 * j;
      const uint8_t low = EncodeAt(p, i, channels, g);
      const uint8_t high = i + 1 < n ? EncodeAt(p, i + 1, channels, g) : 0;
      p.packed[j] = PackPair(low, high);
    }
  }
}

template <typename Index>
__device__ __forceinline__ uint8_t CodeAt(const uint8_t* packed, int bits,
                                          Index i) {
  if (bits == 8) return packed[i];
  const uint8_t b = packed[i / 2];
  return (i & 1) ? HighNibble(b) : LowNibble(b);
}

template <typename Index>
__device__ __forceinline__ uint8_t CodeAt(const DecodeArgs& p, Index i) {
  return CodeAt(p.packed, p.bits, i);
}

// One thread per element (decode writes 5 bytes per element, so writes
// dominate; re-reading a packed byte from L1 is cheap).
template <typename Index>
__global__ void DecodeKernel(DecodeArgs p, Grid g) {
  const Index n = static_cast<Index>(p.n);
  const Index channels = static_cast<Index>(p.channels);
  const Index stride = static_cast<Index>(gridDim.x) * blockDim.x;
  for (Index i = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x;
       i < n; i += stride) {
    const Index c = i % channels;
    bool mask, saturated;
    p.xhat[i] = p.kc != nullptr
                    ? DecodeOneCapped(CodeAt(p, i), p.lo[c], p.k[c], p.flip[c],
                                      p.kc[c], p.cap_flip[c], g, &mask,
                                      &saturated)
                    : DecodeOne(CodeAt(p, i), p.lo[c], p.k[c], p.flip[c], g,
                                &mask);
    p.mask[i] = mask;
  }
}

template <typename Index>
__global__ void DecodeReluKernel(DecodeArgs p, Grid g) {
  const Index n = static_cast<Index>(p.n);
  const Index channels = static_cast<Index>(p.channels);
  const Index stride = static_cast<Index>(gridDim.x) * blockDim.x;
  for (Index i = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x;
       i < n; i += stride) {
    const Index c = i % channels;
    p.a[i] = p.kc != nullptr
                 ? DecodeReluOneCapped(CodeAt(p, i), p.lo[c], p.k[c], p.flip[c],
                                       p.kc[c], p.cap_flip[c], p.gamma[c],
                                       p.beta[c], g, p.max_value)
                 : DecodeReluOne(CodeAt(p, i), p.lo[c], p.k[c], p.flip[c],
                                 p.gamma[c], p.beta[c], g, p.negative_slope);
  }
}

// ---- exact path (bits=None) -------------------------------------------------
// xhat may alias x, g_x may alias g_a: each thread reads its element first.

template <typename Index>
__global__ void NormalizeReluKernel(ExactArgs p) {
  const Index n = static_cast<Index>(p.n);
  const Index channels = static_cast<Index>(p.channels);
  const Index stride = static_cast<Index>(gridDim.x) * blockDim.x;
  for (Index i = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x;
       i < n; i += stride) {
    const Index c = i % channels;
    float xhat;
    // A cap (max_value > 0) branches uniformly, as the codes' kc does.
    p.a[i] = p.max_value > 0.0f
                 ? NormalizeReluOneCapped(p.x[i], p.mean[c], p.inv_std[c],
                                          p.gamma[c], p.beta[c], &xhat,
                                          p.max_value)
                 : NormalizeReluOne(p.x[i], p.mean[c], p.inv_std[c],
                                    p.gamma[c], p.beta[c], &xhat,
                                    p.negative_slope);
    p.xhat[i] = xhat;
  }
}

template <typename Index>
__global__ void ExactReluKernel(ExactArgs p) {
  const Index n = static_cast<Index>(p.n);
  const Index channels = static_cast<Index>(p.channels);
  const Index stride = static_cast<Index>(gridDim.x) * blockDim.x;
  for (Index i = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x;
       i < n; i += stride) {
    const Index c = i % channels;
    p.a[i] = p.max_value > 0.0f
                 ? ExactReluOneCapped(p.x[i], p.gamma[c], p.beta[c], p.max_value)
                 : ExactReluOne(p.x[i], p.gamma[c], p.beta[c], p.negative_slope);
  }
}

// g_y of element i (channel c) and its xhat, from the codes or, on the exact
// path, from the stored xhat.
template <bool kExact, typename Index>
__device__ __forceinline__ float MaskedGradAt(const BnBackwardArgs& p,
                                              const Grid& g, Index i, Index c,
                                              float* xhat) {
  if constexpr (kExact) {
    *xhat = p.xhat[i];
    if (p.max_value > 0.0f) {
      return ExactMaskedGradOneCapped(*xhat, p.g_a[i], p.gamma[c], p.beta[c],
                                      p.max_value);
    }
    return ExactMaskedGradOne(*xhat, p.g_a[i], p.gamma[c], p.beta[c],
                              p.negative_slope);
  } else {
    if (p.kc != nullptr) {
      return MaskedGradOneCapped(CodeAt(p.packed, p.bits, i), p.g_a[i], p.lo[c],
                                 p.k[c], p.flip[c], p.kc[c], p.cap_flip[c], g,
                                 xhat);
    }
    return MaskedGradOne(CodeAt(p.packed, p.bits, i), p.g_a[i], p.lo[c], p.k[c],
                         p.flip[c], g, xhat, p.negative_slope);
  }
}

// ---- fused decode + BN backward ---------------------------------------------
// Pass 1 (BnSumsKernel): the grid stride is a multiple of C, so each thread
// stays on one channel and sums its elements in registers (float runs of
// kFlush elements folded into double); a block then combines its threads per
// channel in shared memory (C <= kThreads) and adds to the double sums with
// atomicAdd. BnCoefKernel turns the sums into d_gamma, d_beta and the
// per-channel coefficients; BnBackwardKernel is elementwise.

constexpr int kReduceBlocks = 1024;
constexpr int kFlush = 32;

template <bool kExact, typename Index>
__global__ void BnSumsKernel(BnBackwardArgs p, Grid g, Index stride,
                             double* sums) {
  extern __shared__ double block_sums[];  // [2 * C] when C <= kThreads
  const Index n = static_cast<Index>(p.n);
  const Index channels = static_cast<Index>(p.channels);
  const Index gid = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool shared = channels <= static_cast<Index>(kThreads);
  if (shared) {
    for (Index j = threadIdx.x; j < 2 * channels; j += blockDim.x) {
      block_sums[j] = 0.0;
    }
    __syncthreads();
  }
  const bool active = gid < stride;
  const Index c = gid % channels;
  double sum_b = 0.0, sum_g = 0.0;
  if (active) {
    float run_b = 0.0f, run_g = 0.0f;
    int pending = 0;
    for (Index i = gid; i < n; i += stride) {
      float xhat;
      const float g_y = MaskedGradAt<kExact>(p, g, i, c, &xhat);
      run_b += g_y;
      run_g += g_y * xhat;
      if (++pending == kFlush) {
        sum_b += run_b;
        sum_g += run_g;
        run_b = run_g = 0.0f;
        pending = 0;
      }
    }
    sum_b += run_b;
    sum_g += run_g;
  }
  if (shared) {
    if (active) {
      atomicAdd(&block_sums[c], sum_b);
      atomicAdd(&block_sums[channels + c], sum_g);
    }
    __syncthreads();
    for (Index j = threadIdx.x; j < channels; j += blockDim.x) {
      atomicAdd(&sums[j], block_sums[j]);
      atomicAdd(&sums[channels + j], block_sums[channels + j]);
    }
  } else if (active) {
    // A block's threads are on distinct channels.
    atomicAdd(&sums[c], sum_b);
    atomicAdd(&sums[channels + c], sum_g);
  }
}

__global__ void BnCoefKernel(BnBackwardArgs p, const double* sums, float count,
                             float* coef) {
  const int64_t channels = p.channels;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       c < channels; c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float d_beta = static_cast<float>(sums[c]);
    const float d_gamma = static_cast<float>(sums[channels + c]);
    p.d_beta[c] = d_beta;
    p.d_gamma[c] = d_gamma;
    const BnCoef k = MakeBnCoef(p.gamma[c], p.inv_std[c], d_beta, d_gamma, count);
    coef[c] = k.scale;
    coef[channels + c] = k.mean_dbeta;
    coef[2 * channels + c] = k.mean_dgamma;
  }
}

template <bool kExact, typename Index>
__global__ void BnBackwardKernel(BnBackwardArgs p, Grid g, const float* coef) {
  const Index n = static_cast<Index>(p.n);
  const Index channels = static_cast<Index>(p.channels);
  const Index stride = static_cast<Index>(gridDim.x) * blockDim.x;
  for (Index i = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x;
       i < n; i += stride) {
    const Index c = i % channels;
    float xhat;
    const float g_y = MaskedGradAt<kExact>(p, g, i, c, &xhat);
    p.g_x[i] = BnInputGradOne(g_y, xhat, coef[c], coef[channels + c],
                              coef[2 * channels + c]);
  }
}

// 32-bit indices while every index (and the grid stride past the end) fits.
bool Fits32(int64_t n) { return n < (int64_t{1} << 31) - kMaxBlocks * kThreads; }

const char* LastError() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* LaunchEncodeGpu(const EncodeArgs& args, void* stream) {
  if (args.n == 0) return nullptr;
  const int64_t bytes = args.bits == 8 ? args.n : (args.n + 1) / 2;
  const Grid g = MakeGrid(args.bits, args.window);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (Fits32(args.n)) {
    EncodeKernel<uint32_t><<<GridFor(bytes), kThreads, 0, s>>>(args, g);
  } else {
    EncodeKernel<uint64_t><<<GridFor(bytes), kThreads, 0, s>>>(args, g);
  }
  return LastError();
}

const char* LaunchDecodeGpu(const DecodeArgs& args, void* stream) {
  if (args.n == 0) return nullptr;
  const Grid g = MakeGrid(args.bits, args.window);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (Fits32(args.n)) {
    DecodeKernel<uint32_t><<<GridFor(args.n), kThreads, 0, s>>>(args, g);
  } else {
    DecodeKernel<uint64_t><<<GridFor(args.n), kThreads, 0, s>>>(args, g);
  }
  return LastError();
}

const char* LaunchDecodeReluGpu(const DecodeArgs& args, void* stream) {
  if (args.n == 0) return nullptr;
  const Grid g = MakeGrid(args.bits, args.window);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (Fits32(args.n)) {
    DecodeReluKernel<uint32_t><<<GridFor(args.n), kThreads, 0, s>>>(args, g);
  } else {
    DecodeReluKernel<uint64_t><<<GridFor(args.n), kThreads, 0, s>>>(args, g);
  }
  return LastError();
}

namespace {

// Pass 1 into sums[2 * C] (double, zeroed here): at least one thread per
// channel; stride = a multiple of C.
cudaError_t LaunchSums(const BnBackwardArgs& args, const Grid& g, double* sums,
                       cudaStream_t s) {
  const int64_t channels = args.channels;
  cudaError_t err = cudaMemsetAsync(sums, 0, 2 * channels * sizeof(double), s);
  if (err != cudaSuccess) return err;
  int64_t blocks = (args.n + kThreads - 1) / kThreads;
  blocks = blocks < kReduceBlocks ? blocks : kReduceBlocks;
  const int64_t min_blocks = (channels + kThreads - 1) / kThreads;
  blocks = blocks > min_blocks ? blocks : min_blocks;
  const int64_t stride = blocks * kThreads / channels * channels;
  const size_t shared_bytes =
      channels <= kThreads ? 2 * channels * sizeof(double) : 0;
  const int grid = static_cast<int>(blocks);
  const bool narrow = Fits32(args.n) && Fits32(blocks * kThreads);
  if (args.exact && narrow) {
    BnSumsKernel<true, uint32_t><<<grid, kThreads, shared_bytes, s>>>(
        args, g, static_cast<uint32_t>(stride), sums);
  } else if (args.exact) {
    BnSumsKernel<true, uint64_t><<<grid, kThreads, shared_bytes, s>>>(
        args, g, static_cast<uint64_t>(stride), sums);
  } else if (narrow) {
    BnSumsKernel<false, uint32_t><<<grid, kThreads, shared_bytes, s>>>(
        args, g, static_cast<uint32_t>(stride), sums);
  } else {
    BnSumsKernel<false, uint64_t><<<grid, kThreads, shared_bytes, s>>>(
        args, g, static_cast<uint64_t>(stride), sums);
  }
  return cudaSuccess;
}

// Pass 2: elementwise, from coef[3 * C] (scale, mean_dbeta, mean_dgamma).
void LaunchInputGrad(const BnBackwardArgs& args, const Grid& g,
                     const float* coef, cudaStream_t s) {
  const int grid2 = GridFor(args.n);
  if (args.exact && Fits32(args.n)) {
    BnBackwardKernel<true, uint32_t><<<grid2, kThreads, 0, s>>>(args, g, coef);
  } else if (args.exact) {
    BnBackwardKernel<true, uint64_t><<<grid2, kThreads, 0, s>>>(args, g, coef);
  } else if (Fits32(args.n)) {
    BnBackwardKernel<false, uint32_t><<<grid2, kThreads, 0, s>>>(args, g, coef);
  } else {
    BnBackwardKernel<false, uint64_t><<<grid2, kThreads, 0, s>>>(args, g, coef);
  }
}

// The sums as float32: d_beta = sums[c], d_gamma = sums[C + c].
__global__ void SumsToFloatKernel(const double* sums, int64_t channels,
                                  float* d_beta, float* d_gamma) {
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       c < channels; c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    d_beta[c] = static_cast<float>(sums[c]);
    d_gamma[c] = static_cast<float>(sums[channels + c]);
  }
}

}  // namespace

const char* LaunchDecodeBnBackwardGpu(const BnBackwardArgs& args,
                                      void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int64_t channels = args.channels;
  if (channels == 0) return nullptr;
  cudaError_t err;
  if (args.n == 0) {  // no rows: zero parameter gradients, empty g_x
    err = cudaMemsetAsync(args.d_gamma, 0, channels * sizeof(float), s);
    if (err == cudaSuccess) {
      err = cudaMemsetAsync(args.d_beta, 0, channels * sizeof(float), s);
    }
    return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
  }
  const Grid g = MakeGrid(args.bits, args.window);
  double* sums = static_cast<double*>(args.scratch);
  float* coef = reinterpret_cast<float*>(sums + 2 * channels);
  err = LaunchSums(args, g, sums, s);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  const float count = static_cast<float>(args.n / channels);
  BnCoefKernel<<<GridFor(channels), kThreads, 0, s>>>(args, sums, count, coef);
  LaunchInputGrad(args, g, coef, s);
  return LastError();
}

const char* LaunchBnSumsGpu(const BnBackwardArgs& args, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int64_t channels = args.channels;
  if (channels == 0) return nullptr;
  double* sums = static_cast<double*>(args.scratch);
  cudaError_t err;
  if (args.n == 0) {
    err = cudaMemsetAsync(sums, 0, 2 * channels * sizeof(double), s);
  } else {
    err = LaunchSums(args, MakeGrid(args.exact ? 8 : args.bits,
                                    args.exact ? 1.0f : args.window),
                     sums, s);
  }
  if (err != cudaSuccess) return cudaGetErrorString(err);
  SumsToFloatKernel<<<GridFor(channels), kThreads, 0, s>>>(
      sums, channels, args.d_beta, args.d_gamma);
  return LastError();
}

const char* LaunchBnInputGradGpu(const BnBackwardArgs& args, const float* coef,
                                 void* stream) {
  if (args.n == 0) return nullptr;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  LaunchInputGrad(args, MakeGrid(args.exact ? 8 : args.bits,
                                 args.exact ? 1.0f : args.window),
                  coef, s);
  return LastError();
}

namespace {

// Launches an elementwise exact-path kernel: its 32-bit-index instance where
// every index fits, else its 64-bit one.
const char* LaunchExact(void (*narrow)(ExactArgs), void (*wide)(ExactArgs),
                        const ExactArgs& args, void* stream) {
  if (args.n == 0) return nullptr;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  (Fits32(args.n) ? narrow : wide)<<<GridFor(args.n), kThreads, 0, s>>>(args);
  return LastError();
}

}  // namespace

const char* LaunchNormalizeReluGpu(const ExactArgs& args, void* stream) {
  return LaunchExact(NormalizeReluKernel<uint32_t>, NormalizeReluKernel<uint64_t>,
                     args, stream);
}

const char* LaunchExactReluGpu(const ExactArgs& args, void* stream) {
  return LaunchExact(ExactReluKernel<uint32_t>, ExactReluKernel<uint64_t>, args, stream);
}

}  // namespace blpa
