// CPU kernels (and, with GOOGLE_CUDA, the GPU OpKernels that call the
// launchers of blpa_kernels.cu.cc) for the ops registered in blpa_ops.cc.
//
// The per-element math is in blpa_kernels.h, shared with the CUDA kernels;
// the CPU loops are in blpa_cpu.cc (shared with the JAX custom calls), run
// here on TF's intra-op thread pool.

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

#include "shared/blpa_cpu.h"
#include "shared/blpa_kernels.h"
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

// The optional cap inputs [first, first + count): [0] each (no cap: null
// pointers) or [channels] each (a capped ReLU).
absl::Status ReadCapInputs(OpKernelContext* ctx, int first, int count,
                           int64_t channels, const float** out) {
  const bool capped = ctx->input(first).NumElements() > 0;
  for (int i = 0; i < count; ++i) {
    const Tensor& t = ctx->input(first + i);
    const int64_t want = capped ? channels : 0;
    if (t.dims() != 1 || t.dim_size(0) != want) {
      return absl::InvalidArgumentError(absl::StrCat(
          "cap input ", first + i, " must have shape [", channels,
          "] (a capped ReLU) or [0] (none), like input ", first, "; got ",
          t.shape().DebugString()));
    }
    out[i] = capped ? t.flat<float>().data() : nullptr;
  }
  return absl::OkStatus();
}

// A cap needs max_value > 0 and no leaky slope; max_value > 0 needs the cap.
absl::Status CheckCap(bool capped, float max_value, float slope) {
  if (capped && !(max_value > 0.0f)) {
    return absl::InvalidArgumentError(
        "the cap inputs are set, so max_value must be > 0");
  }
  if (!capped && max_value != 0.0f) {
    return absl::InvalidArgumentError(
        "max_value > 0 needs the cap inputs (cap_k, cap_flip, ...) of shape [C]");
  }
  if (capped && slope != 0.0f) {
    return absl::InvalidArgumentError(
        "a capped ReLU (max_value) takes no negative_slope");
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
  const float* cap[3];
  TF_RETURN_IF_ERROR(ReadCapInputs(ctx, 9, 3, channels, cap));
  args->kc = cap[0];
  args->cap_flip = cap[1];
  args->cap_aligned = cap[2];
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
  const float* cap[2];
  TF_RETURN_IF_ERROR(ReadCapInputs(ctx, shape_index + 1, 2, channels, cap));
  args->kc = cap[0];
  args->cap_flip = cap[1];
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
  const float* cap[2];
  TF_RETURN_IF_ERROR(ReadCapInputs(ctx, 7, 2, channels, cap));
  args->kc = cap[0];
  args->cap_flip = cap[1];
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
    EncodeCpu(args, Pool(ctx));
    return absl::OkStatus();
  }

  static absl::Status Decode(OpKernelContext* ctx, const DecodeArgs& args) {
    DecodeCpu(args, Pool(ctx));
    return absl::OkStatus();
  }

  static absl::Status DecodeRelu(OpKernelContext* ctx, const DecodeArgs& args) {
    DecodeReluCpu(args, Pool(ctx));
    return absl::OkStatus();
  }

  static absl::Status NormalizeRelu(OpKernelContext* ctx, const ExactArgs& args) {
    NormalizeReluCpu(args, Pool(ctx));
    return absl::OkStatus();
  }

  static absl::Status ExactRelu(OpKernelContext* ctx, const ExactArgs& args) {
    ExactReluCpu(args, Pool(ctx));
    return absl::OkStatus();
  }

  static absl::Status BnBackward(OpKernelContext* ctx, BnBackwardArgs& args) {
    BnBackwardCpu(args, Pool(ctx));
    return absl::OkStatus();
  }

 private:
  // TF's intra-op pool (Eigen's cost model decides how far to spread).
  static CpuPool Pool(OpKernelContext* ctx) {
    const auto* threads = ctx->device()->tensorflow_cpu_worker_threads();
    CpuPool pool;
    pool.threads = threads->num_threads;
    pool.parallel_for = [threads](int64_t units, int64_t cost,
                                  const std::function<void(int64_t, int64_t)>& fn) {
      threads->workers->ParallelFor(units, cost, fn);
    };
    return pool;
  }
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

// A LeakyGridOp whose activation may be capped: also reads `max_value`
// (0: no cap).
class CappedGridOp : public LeakyGridOp {
 public:
  explicit CappedGridOp(OpKernelConstruction* ctx) : LeakyGridOp(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("max_value", &max_value_));
    OP_REQUIRES(ctx, std::isfinite(max_value_) && max_value_ >= 0.0f,
                absl::InvalidArgumentError(absl::StrCat(
                    "max_value must be a finite number > 0 (or 0: no cap), got ",
                    max_value_)));
  }

 protected:
  float max_value_ = 0.0f;
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
class EncodeOp : public CappedGridOp {
 public:
  using CappedGridOp::CappedGridOp;

  void Compute(OpKernelContext* ctx) override {
    EncodeArgs args{};
    OP_REQUIRES_OK(ctx, PrepareEncode(ctx, bits_, window_, &args));
    if (args.channels > 0) {
      OP_REQUIRES_OK(ctx, CheckCap(args.kc != nullptr, max_value_, slope_));
    }
    args.negative_slope = slope_;
    args.max_value = max_value_;
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
class DecodeReluOp : public CappedGridOp {
 public:
  using CappedGridOp::CappedGridOp;

  void Compute(OpKernelContext* ctx) override {
    DecodeArgs args{};
    TensorShape shape;
    OP_REQUIRES_OK(ctx, PrepareDecode(ctx, bits_, window_, 6, &shape, &args));
    if (args.channels > 0) {
      OP_REQUIRES_OK(ctx, CheckCap(args.kc != nullptr, max_value_, slope_));
    }
    args.negative_slope = slope_;
    args.max_value = max_value_;
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
    OP_REQUIRES(ctx, args.kc == nullptr || slope_ == 0.0f,
                absl::InvalidArgumentError(
                    "a capped ReLU (cap inputs) takes no negative_slope"));
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
