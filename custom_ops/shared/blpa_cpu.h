// The CPU kernels of the BLPA quantizer, free of TensorFlow and of XLA: the
// TensorFlow op (blpa_kernels.cc) and the JAX custom calls (jax_ffi.cc) run
// the same loops, each on its own thread pool.
//
// The per-element math is in blpa_kernels.h, shared with the CUDA kernels.
// Work is split into fixed blocks of the flat tensor; inside a block,
// elements are visited in runs of whole channel periods so that the inner
// loops index contiguous parameter arrays and vectorize.

#ifndef KERAS_BLPA_CUSTOM_OPS_BLPA_CPU_H_
#define KERAS_BLPA_CUSTOM_OPS_BLPA_CPU_H_

#include <cstdint>
#include <functional>

#include "shared/blpa_kernels.h"

namespace blpa {

// How a caller runs work: `parallel_for(units, cost, fn)` calls fn(first,
// last) over disjoint ranges covering [0, units), possibly on several
// threads, and returns when all are done; `cost` estimates cycles per unit.
// `threads` is how many run at once (it fixes how the BN sums are sharded,
// so that their rounding does not depend on scheduling).
struct CpuPool {
  std::function<void(int64_t units, int64_t cost,
                     const std::function<void(int64_t, int64_t)>& fn)>
      parallel_for;
  int64_t threads = 1;
};

// Everything on the calling thread.
CpuPool SerialPool();

void EncodeCpu(const EncodeArgs& args, const CpuPool& pool);
void DecodeCpu(const DecodeArgs& args, const CpuPool& pool);
void DecodeReluCpu(const DecodeArgs& args, const CpuPool& pool);
void NormalizeReluCpu(const ExactArgs& args, const CpuPool& pool);
void ExactReluCpu(const ExactArgs& args, const CpuPool& pool);

// Pass 1 of the BN backward: per-channel sums of g_y and g_y * xhat, in
// double (d_beta, d_gamma: `args.channels` each). Reads g_a and the codes (or
// xhat with args.exact); ignores the outputs of `args`.
void BnSumsCpu(const BnBackwardArgs& args, const CpuPool& pool, double* d_beta,
               double* d_gamma);

// Pass 2: args.g_x from per-channel coefficients (MakeBnCoef's fields).
void BnInputGradCpu(const BnBackwardArgs& args, const CpuPool& pool,
                    const float* scale, const float* mean_dbeta,
                    const float* mean_dgamma);

// Both passes with the coefficients in between (the TensorFlow op):
// fills args.d_gamma, args.d_beta and args.g_x.
void BnBackwardCpu(const BnBackwardArgs& args, const CpuPool& pool);

}  // namespace blpa

#endif  // KERAS_BLPA_CUSTOM_OPS_BLPA_CPU_H_
