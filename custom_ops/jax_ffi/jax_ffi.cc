// XLA FFI handlers of the BLPA kernels for JAX (`jax.ffi`): the same CPU
// loops as the TensorFlow op (blpa_cpu.cc) and, built with BLPA_JAX_CUDA, the
// same CUDA kernels (blpa_kernels.cu.cc). Python side:
// keras_blpa/backend/jax/kernels.py, which registers each handler below for
// "cpu" and "CUDA" under one target name.
//
// Layout: the codes of an activation of shape [N, ..., C] are uint8[N, B],
// B bytes per sample (B = m at 8 bits, m / 2 at 4 bits, m = its elements per
// sample, even at 4 bits: Python keeps odd ones on the jnp path). Flattened,
// they are the TensorFlow op's bytes. Per-channel operands are f32[C]. Every
// operand and result has the batch as its leading axis or is per-channel, so
// a shard of the batch runs the same handler on its own rows
// (keras_blpa/backend/jax/kernels.py maps them over devices with shard_map).
//
// The BN backward is two calls: the per-channel sums (f32[1, 2, C]: d_beta,
// d_gamma, accumulated in double) and, from coefficients f32[3, C] that
// Python computes from the summed totals (blpa_kernels.h's MakeBnCoef, in
// jnp), the input gradient. The decodes take a scalar `gate` (a reduction of
// their upstream gradient) that they do not read: it keeps XLA from
// scheduling them before that gradient exists.
//
// A ReLU capped at `max_value` (ReLU6; quantizer.cap_params), as the
// TensorFlow op takes it: the coded handlers read the cap edge's per-channel
// kc, cap_flip (and, to encode, cap_aligned), f32[C] each with the attribute
// max_value > 0, or f32[0] each with max_value 0 (no cap). The exact handlers
// take only max_value.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>

#include "shared/blpa_cpu.h"
#include "shared/blpa_kernels.h"
#include "xla/ffi/api/ffi.h"

namespace blpa {
namespace {

namespace ffi = ::xla::ffi;

using F32 = ffi::Buffer<ffi::F32>;
using U8 = ffi::Buffer<ffi::U8>;
using F32Out = ffi::ResultBuffer<ffi::F32>;
using U8Out = ffi::ResultBuffer<ffi::U8>;

// ---- validation --------------------------------------------------------------

int64_t Channels(const ffi::AnyBuffer::Dimensions& dims) {
  return dims.size() == 0 ? 0 : dims.back();
}

ffi::Error CheckGrid(int32_t bits, float window) {
  if (bits != 4 && bits != 8) {
    return ffi::Error::InvalidArgument("bits must be 4 or 8, got " +
                                       std::to_string(bits));
  }
  if (!(window > 0.0f) || window != window || window > 3.4e38f) {
    return ffi::Error::InvalidArgument("window must be a positive, finite number");
  }
  return ffi::Error::Success();
}

ffi::Error CheckSlope(float slope) {
  if (!(slope >= 0.0f) || slope > 3.4e38f) {
    return ffi::Error::InvalidArgument(
        "negative_slope must be a finite number >= 0");
  }
  return ffi::Error::Success();
}

// Every per-channel operand has C elements.
ffi::Error CheckVectors(std::initializer_list<const F32*> vectors,
                        int64_t channels) {
  for (const F32* v : vectors) {
    if (static_cast<int64_t>(v->element_count()) != channels) {
      return ffi::Error::InvalidArgument(
          "per-channel operands must have " + std::to_string(channels) +
          " elements (the last axis), got " + std::to_string(v->element_count()));
    }
  }
  return ffi::Error::Success();
}

// The codes hold exactly the bytes of `n` codes of `bits` bits.
ffi::Error CheckCodes(const U8& codes, int64_t n, int32_t bits) {
  const int64_t want = bits == 8 ? n : (n + 1) / 2;
  if (static_cast<int64_t>(codes.element_count()) != want) {
    return ffi::Error::InvalidArgument(
        "codes must hold " + std::to_string(want) + " bytes for " +
        std::to_string(n) + " elements at " + std::to_string(bits) +
        " bits, got " + std::to_string(codes.element_count()));
  }
  return ffi::Error::Success();
}

// A cap needs a finite max_value > 0 and no leaky slope; 0 is no cap.
ffi::Error CheckMaxValue(float max_value, float slope) {
  if (!(max_value >= 0.0f) || !std::isfinite(max_value)) {
    return ffi::Error::InvalidArgument(
        "max_value must be a finite number > 0 (a capped ReLU) or 0 (none)");
  }
  if (max_value > 0.0f && slope != 0.0f) {
    return ffi::Error::InvalidArgument(
        "a capped ReLU (max_value) takes no negative_slope");
  }
  return ffi::Error::Success();
}

// The cap edge's per-channel operands: C elements each with max_value > 0,
// none without a cap. `out` gets their data, or nulls without a cap.
ffi::Error ReadCap(std::initializer_list<const F32*> vectors, int64_t channels,
                   float max_value, float slope, const float** out) {
  ffi::Error err = CheckMaxValue(max_value, slope);
  if (err.failure()) return err;
  const bool capped = max_value > 0.0f;
  const int64_t want = capped ? channels : 0;
  for (const F32* v : vectors) {
    if (static_cast<int64_t>(v->element_count()) != want) {
      return ffi::Error::InvalidArgument(
          "cap operands must have " + std::to_string(want) + " elements (" +
          (capped ? "C, max_value > 0" : "none, max_value 0") + "), got " +
          std::to_string(v->element_count()));
    }
    *out++ = capped ? v->typed_data() : nullptr;
  }
  return ffi::Error::Success();
}

#define BLPA_RETURN_IF_ERROR(expr)          \
  do {                                      \
    ffi::Error _err = (expr);               \
    if (_err.failure()) return _err;        \
  } while (0)

// ---- argument structs from buffers (shared by the CPU and GPU handlers) -----

EncodeArgs MakeEncodeArgs(const F32& x, const F32& mean, const F32& inv_std,
                          const F32& gamma, const F32& beta, const F32& lo,
                          const F32& k, const F32& flip, const F32& aligned,
                          int32_t bits, float window, float slope, float* a,
                          uint8_t* codes) {
  EncodeArgs args{};
  args.x = x.typed_data();
  args.mean = mean.typed_data();
  args.inv_std = inv_std.typed_data();
  args.gamma = gamma.typed_data();
  args.beta = beta.typed_data();
  args.lo = lo.typed_data();
  args.k = k.typed_data();
  args.flip = flip.typed_data();
  args.aligned = aligned.typed_data();
  args.n = static_cast<int64_t>(x.element_count());
  args.channels = Channels(x.dimensions());
  args.bits = bits;
  args.window = window;
  args.a = a;
  args.packed = codes;
  args.negative_slope = slope;
  return args;
}

ffi::Error CheckEncode(const F32& x, std::initializer_list<const F32*> vectors,
                       int32_t bits, float window, float slope) {
  BLPA_RETURN_IF_ERROR(CheckGrid(bits, window));
  BLPA_RETURN_IF_ERROR(CheckSlope(slope));
  if (x.dimensions().size() < 1) {
    return ffi::Error::InvalidArgument("x must have rank >= 1 (channels last)");
  }
  return CheckVectors(vectors, Channels(x.dimensions()));
}

DecodeArgs MakeDecodeArgs(const U8& codes, const F32& lo, const F32& k,
                          const F32& flip, const F32& gamma, const F32& beta,
                          int64_t n, int64_t channels, int32_t bits,
                          float window, float slope, float* a) {
  DecodeArgs args{};
  args.packed = codes.typed_data();
  args.lo = lo.typed_data();
  args.k = k.typed_data();
  args.flip = flip.typed_data();
  args.gamma = gamma.typed_data();
  args.beta = beta.typed_data();
  args.n = n;
  args.channels = channels;
  args.bits = bits;
  args.window = window;
  args.a = a;
  args.negative_slope = slope;
  return args;
}

// The BN backward's arguments from the codes (exact = false) or from xhat.
BnBackwardArgs MakeBnArgs(const F32& g_a, int64_t channels, float slope) {
  BnBackwardArgs args{};
  args.g_a = g_a.typed_data();
  args.n = static_cast<int64_t>(g_a.element_count());
  args.channels = channels;
  args.negative_slope = slope;
  return args;
}

void SetCodes(BnBackwardArgs* args, const U8& codes, const F32& lo,
              const F32& k, const F32& flip, int32_t bits, float window) {
  args->packed = codes.typed_data();
  args->lo = lo.typed_data();
  args->k = k.typed_data();
  args->flip = flip.typed_data();
  args->bits = bits;
  args->window = window;
}

void SetExact(BnBackwardArgs* args, const F32& xhat, const F32& gamma,
              const F32& beta) {
  args->exact = true;
  args->xhat = xhat.typed_data();
  args->gamma = gamma.typed_data();
  args->beta = beta.typed_data();
}

ExactArgs MakeExactArgs(const F32& x, const F32* mean, const F32* inv_std,
                        const F32& gamma, const F32& beta, float slope,
                        float* a, float* xhat) {
  ExactArgs args{};
  args.x = x.typed_data();
  args.mean = mean ? mean->typed_data() : nullptr;
  args.inv_std = inv_std ? inv_std->typed_data() : nullptr;
  args.gamma = gamma.typed_data();
  args.beta = beta.typed_data();
  args.n = static_cast<int64_t>(x.element_count());
  args.channels = Channels(x.dimensions());
  args.a = a;
  args.xhat = xhat;
  args.negative_slope = slope;
  return args;
}

ffi::Error CheckSumsShape(F32Out& sums, int64_t channels) {
  if (static_cast<int64_t>(sums->element_count()) != 2 * channels) {
    return ffi::Error::InvalidArgument("sums must have 2 * C elements");
  }
  return ffi::Error::Success();
}

ffi::Error CheckCoef(const F32& coef, int64_t channels) {
  if (static_cast<int64_t>(coef.element_count()) != 3 * channels) {
    return ffi::Error::InvalidArgument(
        "coef must be f32[3, C] (scale, mean_dbeta, mean_dgamma)");
  }
  return ffi::Error::Success();
}

// The cap edge into the arguments (nothing without a cap).
ffi::Error SetCap(EncodeArgs* args, const F32& kc, const F32& cap_flip,
                  const F32& cap_aligned, float max_value) {
  const float* cap[3];
  BLPA_RETURN_IF_ERROR(ReadCap({&kc, &cap_flip, &cap_aligned}, args->channels,
                               max_value, args->negative_slope, cap));
  args->kc = cap[0];
  args->cap_flip = cap[1];
  args->cap_aligned = cap[2];
  args->max_value = max_value;
  return ffi::Error::Success();
}

ffi::Error SetCap(DecodeArgs* args, const F32& kc, const F32& cap_flip,
                  float max_value) {
  const float* cap[2];
  BLPA_RETURN_IF_ERROR(ReadCap({&kc, &cap_flip}, args->channels, max_value,
                               args->negative_slope, cap));
  args->kc = cap[0];
  args->cap_flip = cap[1];
  args->max_value = max_value;
  return ffi::Error::Success();
}

ffi::Error SetCap(BnBackwardArgs* args, const F32& kc, const F32& cap_flip,
                  float max_value) {
  const float* cap[2];
  BLPA_RETURN_IF_ERROR(ReadCap({&kc, &cap_flip}, args->channels, max_value,
                               args->negative_slope, cap));
  args->kc = cap[0];
  args->cap_flip = cap[1];
  return ffi::Error::Success();
}

// The exact path's cap: max_value alone.
ffi::Error SetExactCap(ExactArgs* args, float max_value) {
  BLPA_RETURN_IF_ERROR(CheckMaxValue(max_value, args->negative_slope));
  args->max_value = max_value;
  return ffi::Error::Success();
}

ffi::Error SetExactCap(BnBackwardArgs* args, float max_value) {
  BLPA_RETURN_IF_ERROR(CheckMaxValue(max_value, args->negative_slope));
  args->max_value = max_value;
  return ffi::Error::Success();
}

// ---- CPU: XLA's intra-op thread pool ----------------------------------------

// parallel_for on the FFI thread pool. The caller works too and then waits
// only for the tasks that have started: a task that runs after the caller
// returned finds the range closed and touches nothing but the shared state,
// so no schedule can deadlock on a busy pool.
CpuPool FfiPool(ffi::ThreadPool pool_handle) {
  struct State {
    std::mutex mu;
    std::condition_variable cv;
    std::atomic<int64_t> next{0};
    int64_t active = 0;
    bool closed = false;
    int64_t units = 0;
    const std::function<void(int64_t, int64_t)>* fn = nullptr;
  };
  auto handle = std::make_shared<ffi::ThreadPool>(pool_handle);
  CpuPool pool;
  pool.threads = std::max<int64_t>(1, handle->num_threads());
  const int64_t threads = pool.threads;
  pool.parallel_for = [handle, threads](
                          int64_t units, int64_t cost,
                          const std::function<void(int64_t, int64_t)>& fn) {
    // Below about 100k cycles of work, threads cost more than they save.
    const int64_t helpers = std::min(threads, units) - 1;
    if (helpers <= 0 || units * cost < 100000) {
      fn(0, units);
      return;
    }
    auto state = std::make_shared<State>();
    state->units = units;
    state->fn = &fn;
    auto drain = [](State* s) {
      for (int64_t u = s->next.fetch_add(1); u < s->units; u = s->next.fetch_add(1)) {
        (*s->fn)(u, u + 1);
      }
    };
    for (int64_t h = 0; h < helpers; ++h) {
      handle->Schedule([state, drain]() {
        {
          std::lock_guard<std::mutex> lock(state->mu);
          if (state->closed) return;
          ++state->active;
        }
        drain(state.get());
        std::lock_guard<std::mutex> lock(state->mu);
        if (--state->active == 0) state->cv.notify_all();
      });
    }
    drain(state.get());
    std::unique_lock<std::mutex> lock(state->mu);
    state->closed = true;
    state->cv.wait(lock, [&] { return state->active == 0; });
  };
  return pool;
}

ffi::Error EncodeCpuImpl(ffi::ThreadPool tp, F32 x, F32 mean, F32 inv_std,
                         F32 gamma, F32 beta, F32 lo, F32 k, F32 flip,
                         F32 aligned, F32 kc, F32 cap_flip, F32 cap_aligned,
                         F32Out a, U8Out codes, int32_t bits, float window,
                         float negative_slope, float max_value) {
  BLPA_RETURN_IF_ERROR(CheckEncode(
      x, {&mean, &inv_std, &gamma, &beta, &lo, &k, &flip, &aligned}, bits,
      window, negative_slope));
  EncodeArgs args =
      MakeEncodeArgs(x, mean, inv_std, gamma, beta, lo, k, flip, aligned, bits,
                     window, negative_slope, a->typed_data(), codes->typed_data());
  BLPA_RETURN_IF_ERROR(SetCap(&args, kc, cap_flip, cap_aligned, max_value));
  BLPA_RETURN_IF_ERROR(CheckCodes(*codes, args.n, bits));
  if (args.n > 0) EncodeCpu(args, FfiPool(tp));
  return ffi::Error::Success();
}

ffi::Error DecodeReluCpuImpl(ffi::ThreadPool tp, U8 codes, F32 lo, F32 k,
                             F32 flip, F32 gamma, F32 beta, F32 kc,
                             F32 cap_flip, F32 /*gate*/, F32Out a, int32_t bits,
                             float window, float negative_slope,
                             float max_value) {
  BLPA_RETURN_IF_ERROR(CheckGrid(bits, window));
  BLPA_RETURN_IF_ERROR(CheckSlope(negative_slope));
  const int64_t channels = Channels(a->dimensions());
  const int64_t n = static_cast<int64_t>(a->element_count());
  BLPA_RETURN_IF_ERROR(CheckVectors({&lo, &k, &flip, &gamma, &beta}, channels));
  BLPA_RETURN_IF_ERROR(CheckCodes(codes, n, bits));
  DecodeArgs args = MakeDecodeArgs(codes, lo, k, flip, gamma, beta, n, channels,
                                   bits, window, negative_slope, a->typed_data());
  BLPA_RETURN_IF_ERROR(SetCap(&args, kc, cap_flip, max_value));
  if (n > 0) DecodeReluCpu(args, FfiPool(tp));
  return ffi::Error::Success();
}

// Writes float32(d_beta), float32(d_gamma) into sums [2, C].
ffi::Error SumsCpu(ffi::ThreadPool tp, const BnBackwardArgs& args, float* sums) {
  std::vector<double> d_beta(args.channels), d_gamma(args.channels);
  BnSumsCpu(args, FfiPool(tp), d_beta.data(), d_gamma.data());
  for (int64_t c = 0; c < args.channels; ++c) {
    sums[c] = static_cast<float>(d_beta[c]);
    sums[args.channels + c] = static_cast<float>(d_gamma[c]);
  }
  return ffi::Error::Success();
}

ffi::Error BnSumsCpuImpl(ffi::ThreadPool tp, F32 g_a, U8 codes, F32 lo, F32 k,
                         F32 flip, F32 kc, F32 cap_flip, F32Out sums,
                         int32_t bits, float window, float negative_slope,
                         float max_value) {
  BLPA_RETURN_IF_ERROR(CheckGrid(bits, window));
  BLPA_RETURN_IF_ERROR(CheckSlope(negative_slope));
  const int64_t channels = Channels(g_a.dimensions());
  BLPA_RETURN_IF_ERROR(CheckVectors({&lo, &k, &flip}, channels));
  BLPA_RETURN_IF_ERROR(CheckSumsShape(sums, channels));
  BnBackwardArgs args = MakeBnArgs(g_a, channels, negative_slope);
  BLPA_RETURN_IF_ERROR(CheckCodes(codes, args.n, bits));
  SetCodes(&args, codes, lo, k, flip, bits, window);
  BLPA_RETURN_IF_ERROR(SetCap(&args, kc, cap_flip, max_value));
  return SumsCpu(tp, args, sums->typed_data());
}

ffi::Error BnInputGradCpuImpl(ffi::ThreadPool tp, F32 g_a, U8 codes, F32 lo,
                              F32 k, F32 flip, F32 kc, F32 cap_flip, F32 coef,
                              F32Out g_x, int32_t bits, float window,
                              float negative_slope, float max_value) {
  BLPA_RETURN_IF_ERROR(CheckGrid(bits, window));
  BLPA_RETURN_IF_ERROR(CheckSlope(negative_slope));
  const int64_t channels = Channels(g_a.dimensions());
  BLPA_RETURN_IF_ERROR(CheckVectors({&lo, &k, &flip}, channels));
  BLPA_RETURN_IF_ERROR(CheckCoef(coef, channels));
  BnBackwardArgs args = MakeBnArgs(g_a, channels, negative_slope);
  BLPA_RETURN_IF_ERROR(CheckCodes(codes, args.n, bits));
  SetCodes(&args, codes, lo, k, flip, bits, window);
  BLPA_RETURN_IF_ERROR(SetCap(&args, kc, cap_flip, max_value));
  args.g_x = g_x->typed_data();
  const float* c = coef.typed_data();
  if (args.n > 0) {
    BnInputGradCpu(args, FfiPool(tp), c, c + channels, c + 2 * channels);
  }
  return ffi::Error::Success();
}

ffi::Error ExactForwardCpuImpl(ffi::ThreadPool tp, F32 x, F32 mean, F32 inv_std,
                               F32 gamma, F32 beta, F32Out a, F32Out xhat,
                               float negative_slope, float max_value) {
  BLPA_RETURN_IF_ERROR(CheckSlope(negative_slope));
  const int64_t channels = Channels(x.dimensions());
  BLPA_RETURN_IF_ERROR(CheckVectors({&mean, &inv_std, &gamma, &beta}, channels));
  ExactArgs args = MakeExactArgs(x, &mean, &inv_std, gamma, beta,
                                 negative_slope, a->typed_data(),
                                 xhat->typed_data());
  BLPA_RETURN_IF_ERROR(SetExactCap(&args, max_value));
  if (args.n > 0) NormalizeReluCpu(args, FfiPool(tp));
  return ffi::Error::Success();
}

ffi::Error ExactReluCpuImpl(ffi::ThreadPool tp, F32 xhat, F32 gamma, F32 beta,
                            F32 /*gate*/, F32Out a, float negative_slope,
                            float max_value) {
  BLPA_RETURN_IF_ERROR(CheckSlope(negative_slope));
  BLPA_RETURN_IF_ERROR(CheckVectors({&gamma, &beta}, Channels(xhat.dimensions())));
  ExactArgs args = MakeExactArgs(xhat, nullptr, nullptr, gamma, beta,
                                 negative_slope, a->typed_data(), nullptr);
  BLPA_RETURN_IF_ERROR(SetExactCap(&args, max_value));
  if (args.n > 0) ExactReluCpu(args, FfiPool(tp));
  return ffi::Error::Success();
}

ffi::Error ExactSumsCpuImpl(ffi::ThreadPool tp, F32 g_a, F32 xhat, F32 gamma,
                            F32 beta, F32Out sums, float negative_slope,
                            float max_value) {
  BLPA_RETURN_IF_ERROR(CheckSlope(negative_slope));
  const int64_t channels = Channels(g_a.dimensions());
  BLPA_RETURN_IF_ERROR(CheckVectors({&gamma, &beta}, channels));
  BLPA_RETURN_IF_ERROR(CheckSumsShape(sums, channels));
  BnBackwardArgs args = MakeBnArgs(g_a, channels, negative_slope);
  SetExact(&args, xhat, gamma, beta);
  BLPA_RETURN_IF_ERROR(SetExactCap(&args, max_value));
  return SumsCpu(tp, args, sums->typed_data());
}

ffi::Error ExactInputGradCpuImpl(ffi::ThreadPool tp, F32 g_a, F32 xhat,
                                 F32 gamma, F32 beta, F32 coef, F32Out g_x,
                                 float negative_slope, float max_value) {
  BLPA_RETURN_IF_ERROR(CheckSlope(negative_slope));
  const int64_t channels = Channels(g_a.dimensions());
  BLPA_RETURN_IF_ERROR(CheckVectors({&gamma, &beta}, channels));
  BLPA_RETURN_IF_ERROR(CheckCoef(coef, channels));
  BnBackwardArgs args = MakeBnArgs(g_a, channels, negative_slope);
  SetExact(&args, xhat, gamma, beta);
  BLPA_RETURN_IF_ERROR(SetExactCap(&args, max_value));
  args.g_x = g_x->typed_data();
  const float* c = coef.typed_data();
  if (args.n > 0) {
    BnInputGradCpu(args, FfiPool(tp), c, c + channels, c + 2 * channels);
  }
  return ffi::Error::Success();
}

#if BLPA_JAX_CUDA

// ---- CUDA: the launchers of blpa_kernels.cu.cc on XLA's stream --------------

ffi::Error Launched(const char* error) {
  if (error == nullptr) return ffi::Error::Success();
  return ffi::Error::Internal(std::string("BLPA CUDA kernel failed: ") + error);
}

ffi::Error EncodeGpuImpl(void* stream, F32 x, F32 mean, F32 inv_std, F32 gamma,
                         F32 beta, F32 lo, F32 k, F32 flip, F32 aligned,
                         F32 kc, F32 cap_flip, F32 cap_aligned, F32Out a,
                         U8Out codes, int32_t bits, float window,
                         float negative_slope, float max_value) {
  BLPA_RETURN_IF_ERROR(CheckEncode(
      x, {&mean, &inv_std, &gamma, &beta, &lo, &k, &flip, &aligned}, bits,
      window, negative_slope));
  EncodeArgs args =
      MakeEncodeArgs(x, mean, inv_std, gamma, beta, lo, k, flip, aligned, bits,
                     window, negative_slope, a->typed_data(), codes->typed_data());
  BLPA_RETURN_IF_ERROR(SetCap(&args, kc, cap_flip, cap_aligned, max_value));
  BLPA_RETURN_IF_ERROR(CheckCodes(*codes, args.n, bits));
  return Launched(LaunchEncodeGpu(args, stream));
}

ffi::Error DecodeReluGpuImpl(void* stream, U8 codes, F32 lo, F32 k, F32 flip,
                             F32 gamma, F32 beta, F32 kc, F32 cap_flip,
                             F32 /*gate*/, F32Out a, int32_t bits, float window,
                             float negative_slope, float max_value) {
  BLPA_RETURN_IF_ERROR(CheckGrid(bits, window));
  BLPA_RETURN_IF_ERROR(CheckSlope(negative_slope));
  const int64_t channels = Channels(a->dimensions());
  const int64_t n = static_cast<int64_t>(a->element_count());
  BLPA_RETURN_IF_ERROR(CheckVectors({&lo, &k, &flip, &gamma, &beta}, channels));
  BLPA_RETURN_IF_ERROR(CheckCodes(codes, n, bits));
  DecodeArgs args = MakeDecodeArgs(codes, lo, k, flip, gamma, beta, n, channels,
                                   bits, window, negative_slope, a->typed_data());
  BLPA_RETURN_IF_ERROR(SetCap(&args, kc, cap_flip, max_value));
  return Launched(LaunchDecodeReluGpu(args, stream));
}

// Pass 1 on the device: double sums in scratch memory, written as float.
ffi::Error SumsGpu(void* stream, ffi::ScratchAllocator& scratch,
                   BnBackwardArgs& args, float* sums) {
  if (args.channels == 0) return ffi::Error::Success();
  auto memory = scratch.Allocate(BnBackwardScratchBytes(args.channels), 8);
  if (!memory.has_value()) {
    return ffi::Error::Internal("BLPA: scratch allocation failed");
  }
  args.scratch = *memory;
  args.d_beta = sums;
  args.d_gamma = sums + args.channels;
  return Launched(LaunchBnSumsGpu(args, stream));
}

ffi::Error BnSumsGpuImpl(void* stream, ffi::ScratchAllocator scratch, F32 g_a,
                         U8 codes, F32 lo, F32 k, F32 flip, F32 kc,
                         F32 cap_flip, F32Out sums, int32_t bits, float window,
                         float negative_slope, float max_value) {
  BLPA_RETURN_IF_ERROR(CheckGrid(bits, window));
  BLPA_RETURN_IF_ERROR(CheckSlope(negative_slope));
  const int64_t channels = Channels(g_a.dimensions());
  BLPA_RETURN_IF_ERROR(CheckVectors({&lo, &k, &flip}, channels));
  BLPA_RETURN_IF_ERROR(CheckSumsShape(sums, channels));
  BnBackwardArgs args = MakeBnArgs(g_a, channels, negative_slope);
  BLPA_RETURN_IF_ERROR(CheckCodes(codes, args.n, bits));
  SetCodes(&args, codes, lo, k, flip, bits, window);
  BLPA_RETURN_IF_ERROR(SetCap(&args, kc, cap_flip, max_value));
  return SumsGpu(stream, scratch, args, sums->typed_data());
}

ffi::Error BnInputGradGpuImpl(void* stream, F32 g_a, U8 codes, F32 lo, F32 k,
                              F32 flip, F32 kc, F32 cap_flip, F32 coef,
                              F32Out g_x, int32_t bits, float window,
                              float negative_slope, float max_value) {
  BLPA_RETURN_IF_ERROR(CheckGrid(bits, window));
  BLPA_RETURN_IF_ERROR(CheckSlope(negative_slope));
  const int64_t channels = Channels(g_a.dimensions());
  BLPA_RETURN_IF_ERROR(CheckVectors({&lo, &k, &flip}, channels));
  BLPA_RETURN_IF_ERROR(CheckCoef(coef, channels));
  BnBackwardArgs args = MakeBnArgs(g_a, channels, negative_slope);
  BLPA_RETURN_IF_ERROR(CheckCodes(codes, args.n, bits));
  SetCodes(&args, codes, lo, k, flip, bits, window);
  BLPA_RETURN_IF_ERROR(SetCap(&args, kc, cap_flip, max_value));
  args.g_x = g_x->typed_data();
  return Launched(LaunchBnInputGradGpu(args, coef.typed_data(), stream));
}

ffi::Error ExactForwardGpuImpl(void* stream, F32 x, F32 mean, F32 inv_std,
                               F32 gamma, F32 beta, F32Out a, F32Out xhat,
                               float negative_slope, float max_value) {
  BLPA_RETURN_IF_ERROR(CheckSlope(negative_slope));
  const int64_t channels = Channels(x.dimensions());
  BLPA_RETURN_IF_ERROR(CheckVectors({&mean, &inv_std, &gamma, &beta}, channels));
  ExactArgs args = MakeExactArgs(x, &mean, &inv_std, gamma, beta,
                                 negative_slope, a->typed_data(),
                                 xhat->typed_data());
  BLPA_RETURN_IF_ERROR(SetExactCap(&args, max_value));
  return Launched(LaunchNormalizeReluGpu(args, stream));
}

ffi::Error ExactReluGpuImpl(void* stream, F32 xhat, F32 gamma, F32 beta,
                            F32 /*gate*/, F32Out a, float negative_slope,
                            float max_value) {
  BLPA_RETURN_IF_ERROR(CheckSlope(negative_slope));
  BLPA_RETURN_IF_ERROR(CheckVectors({&gamma, &beta}, Channels(xhat.dimensions())));
  ExactArgs args = MakeExactArgs(xhat, nullptr, nullptr, gamma, beta,
                                 negative_slope, a->typed_data(), nullptr);
  BLPA_RETURN_IF_ERROR(SetExactCap(&args, max_value));
  return Launched(LaunchExactReluGpu(args, stream));
}

ffi::Error ExactSumsGpuImpl(void* stream, ffi::ScratchAllocator scratch,
                            F32 g_a, F32 xhat, F32 gamma, F32 beta,
                            F32Out sums, float negative_slope,
                            float max_value) {
  BLPA_RETURN_IF_ERROR(CheckSlope(negative_slope));
  const int64_t channels = Channels(g_a.dimensions());
  BLPA_RETURN_IF_ERROR(CheckVectors({&gamma, &beta}, channels));
  BLPA_RETURN_IF_ERROR(CheckSumsShape(sums, channels));
  BnBackwardArgs args = MakeBnArgs(g_a, channels, negative_slope);
  SetExact(&args, xhat, gamma, beta);
  BLPA_RETURN_IF_ERROR(SetExactCap(&args, max_value));
  return SumsGpu(stream, scratch, args, sums->typed_data());
}

ffi::Error ExactInputGradGpuImpl(void* stream, F32 g_a, F32 xhat, F32 gamma,
                                 F32 beta, F32 coef, F32Out g_x,
                                 float negative_slope, float max_value) {
  BLPA_RETURN_IF_ERROR(CheckSlope(negative_slope));
  const int64_t channels = Channels(g_a.dimensions());
  BLPA_RETURN_IF_ERROR(CheckVectors({&gamma, &beta}, channels));
  BLPA_RETURN_IF_ERROR(CheckCoef(coef, channels));
  BnBackwardArgs args = MakeBnArgs(g_a, channels, negative_slope);
  SetExact(&args, xhat, gamma, beta);
  BLPA_RETURN_IF_ERROR(SetExactCap(&args, max_value));
  args.g_x = g_x->typed_data();
  return Launched(LaunchBnInputGradGpu(args, coef.typed_data(), stream));
}

#endif  // BLPA_JAX_CUDA

}  // namespace
}  // namespace blpa

// ---- handler symbols -------------------------------------------------------
// Bindings list operands, results and attrs in the order of the Python calls.

namespace ffi = ::xla::ffi;

#define BLPA_GRID_ATTRS                                  \
  .Attr<int32_t>("bits")                                 \
      .Attr<float>("window")                             \
      .Attr<float>("negative_slope")                     \
      .Attr<float>("max_value")
#define BLPA_EXACT_ATTRS                                 \
  .Attr<float>("negative_slope").Attr<float>("max_value")

XLA_FFI_DEFINE_HANDLER_SYMBOL(BlpaEncodeCpu, blpa::EncodeCpuImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::U8>>() BLPA_GRID_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(BlpaDecodeReluCpu, blpa::DecodeReluCpuImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<blpa::U8>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Ret<ffi::Buffer<ffi::F32>>() BLPA_GRID_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(BlpaBnSumsCpu, blpa::BnSumsCpuImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::U8>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Ret<ffi::Buffer<ffi::F32>>() BLPA_GRID_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(BlpaBnInputGradCpu, blpa::BnInputGradCpuImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::U8>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Ret<ffi::Buffer<ffi::F32>>() BLPA_GRID_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(BlpaExactForwardCpu, blpa::ExactForwardCpuImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  BLPA_EXACT_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(BlpaExactReluCpu, blpa::ExactReluCpuImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  BLPA_EXACT_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(BlpaExactSumsCpu, blpa::ExactSumsCpuImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  BLPA_EXACT_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(BlpaExactInputGradCpu, blpa::ExactInputGradCpuImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  BLPA_EXACT_ATTRS);

#if BLPA_JAX_CUDA

XLA_FFI_DEFINE_HANDLER_SYMBOL(BlpaEncodeGpu, blpa::EncodeGpuImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<void*>>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::U8>>() BLPA_GRID_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(BlpaDecodeReluGpu, blpa::DecodeReluGpuImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<void*>>()
                                  .Arg<blpa::U8>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Ret<ffi::Buffer<ffi::F32>>() BLPA_GRID_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(BlpaBnSumsGpu, blpa::BnSumsGpuImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<void*>>()
                                  .Ctx<ffi::ScratchAllocator>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::U8>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Ret<ffi::Buffer<ffi::F32>>() BLPA_GRID_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(BlpaBnInputGradGpu, blpa::BnInputGradGpuImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<void*>>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::U8>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Ret<ffi::Buffer<ffi::F32>>() BLPA_GRID_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(BlpaExactForwardGpu, blpa::ExactForwardGpuImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<void*>>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  BLPA_EXACT_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(BlpaExactReluGpu, blpa::ExactReluGpuImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<void*>>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  BLPA_EXACT_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(BlpaExactSumsGpu, blpa::ExactSumsGpuImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<void*>>()
                                  .Ctx<ffi::ScratchAllocator>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  BLPA_EXACT_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(BlpaExactInputGradGpu, blpa::ExactInputGradGpuImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<void*>>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Arg<blpa::F32>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  BLPA_EXACT_ATTRS);

#endif  // BLPA_JAX_CUDA
