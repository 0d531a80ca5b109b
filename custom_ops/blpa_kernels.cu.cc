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

#include "blpa_kernels.h"

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
  p.a[i] = EncodeOne(p.x[i], p.mean[c], p.inv_std[c], p.gamma[c], p.beta[c],
                     p.lo[c], p.k[c], p.flip[c], p.aligned[c], g, &code);
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
__device__ __forceinline__ uint8_t CodeAt(const DecodeArgs& p, Index i) {
  if (p.bits == 8) return p.packed[i];
  const uint8_t b = p.packed[i / 2];
  return (i & 1) ? HighNibble(b) : LowNibble(b);
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
    bool mask;
    p.xhat[i] = DecodeOne(CodeAt(p, i), p.lo[c], p.k[c], p.flip[c], g, &mask);
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
    p.a[i] = DecodeReluOne(CodeAt(p, i), p.lo[c], p.k[c], p.flip[c],
                           p.gamma[c], p.beta[c], g);
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
  const Grid g = MakeGrid(args.bits);
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
  const Grid g = MakeGrid(args.bits);
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
  const Grid g = MakeGrid(args.bits);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (Fits32(args.n)) {
    DecodeReluKernel<uint32_t><<<GridFor(args.n), kThreads, 0, s>>>(args, g);
  } else {
    DecodeReluKernel<uint64_t><<<GridFor(args.n), kThreads, 0, s>>>(args, g);
  }
  return LastError();
}

}  // namespace blpa
