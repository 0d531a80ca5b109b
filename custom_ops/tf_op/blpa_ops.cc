// Op registrations for the BLPA quantizer (kernels in blpa_kernels.cc).
//
// Semantics are those of keras_blpa/backend/tensorflow/quantizer.py; the Python wrappers live in
// keras_blpa/backend/tensorflow/kernels.py. The ops that produce an activation or a backward
// take `negative_slope` (the leaky ReLU's, >= 0 and finite; the default 0 is
// the ReLU, so graphs and saved models from before the attr stay valid).
// Per-channel tensors have shape [C], C being the last (channel) axis of the
// activations.
//
// The coded ops also take a capped ReLU's second grid edge (`cap_k`,
// `cap_flip`, and for the encode `cap_aligned`; quantizer.cap_params): [C]
// each for a ReLU capped at `max_value` (> 0, with negative_slope 0), or [0]
// each for no cap (max_value 0).

#include <cstdint>

#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace {

using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

// Merges the [C] shapes of inputs [first, last) and returns the common C.
absl::Status ChannelDim(InferenceContext* c, int first, int last,
                        DimensionHandle* channels) {
  *channels = c->UnknownDim();
  for (int i = first; i < last; ++i) {
    ShapeHandle s;
    TF_RETURN_IF_ERROR(c->WithRank(c->input(i), 1, &s));
    TF_RETURN_IF_ERROR(c->Merge(*channels, c->Dim(s, 0), channels));
  }
  return absl::OkStatus();
}

// Number of bytes that hold `elements` codes of `bits` bits.
DimensionHandle PackedBytes(InferenceContext* c, DimensionHandle elements,
                            int bits) {
  if (!c->ValueKnown(elements)) return c->UnknownDim();
  const int64_t n = c->Value(elements);
  return c->MakeDim(bits == 8 ? n : (n + 1) / 2);
}

// The optional cap inputs [first, last): each [C] (a capped ReLU) or [0].
absl::Status CapInputs(InferenceContext* c, int first, int last) {
  for (int i = first; i < last; ++i) {
    ShapeHandle s;
    TF_RETURN_IF_ERROR(c->WithRank(c->input(i), 1, &s));
  }
  return absl::OkStatus();
}

absl::Status GetBits(InferenceContext* c, int* bits) {
  TF_RETURN_IF_ERROR(c->GetAttr("bits", bits));
  if (*bits != 4 && *bits != 8) {
    return absl::InvalidArgumentError("bits must be 4 or 8");
  }
  return absl::OkStatus();
}

}  // namespace

REGISTER_OP("BlpaBnReluEncode")
    .Input("x: float")
    .Input("mean: float")
    .Input("inv_std: float")
    .Input("gamma: float")
    .Input("beta: float")
    .Input("lo: float")
    .Input("k: float")
    .Input("flip: float")
    .Input("aligned: float")
    .Input("cap_k: float")
    .Input("cap_flip: float")
    .Input("cap_aligned: float")
    .Output("a: float")
    .Output("packed: uint8")
    .Attr("bits: int")
    .Attr("window: float = 6.0")
    .Attr("negative_slope: float = 0.0")
    .Attr("max_value: float = 0.0")
    .SetShapeFn([](InferenceContext* c) -> absl::Status {
      int bits;
      TF_RETURN_IF_ERROR(GetBits(c, &bits));
      TF_RETURN_IF_ERROR(CapInputs(c, 9, 12));
      ShapeHandle x;
      TF_RETURN_IF_ERROR(c->WithRankAtLeast(c->input(0), 1, &x));
      DimensionHandle channels;
      TF_RETURN_IF_ERROR(ChannelDim(c, 1, 9, &channels));
      DimensionHandle last;
      TF_RETURN_IF_ERROR(c->Merge(c->Dim(x, -1), channels, &last));
      TF_RETURN_IF_ERROR(c->ReplaceDim(x, -1, last, &x));
      c->set_output(0, x);
      DimensionHandle elements = c->NumElements(x);
      c->set_output(1, c->Vector(PackedBytes(c, elements, bits)));
      return absl::OkStatus();
    })
    .Doc(R"doc(
Fused BN-normalize, ReLU and quantize (quantizer.bn_relu_encode).

xhat = (x - mean) * inv_std; y = xhat * gamma + beta;
a = y <= 0 ? (s == 0 ? 0 : y * s) : y with s = negative_slope (the leaky ReLU;
NaN passes, slope 0 is the ReLU, never -0.0);
packed = the codes of xhat on the grid (lo, k, flip, aligned), 4-bit codes two
per byte (element 2j in the low nibble), 8-bit codes one per byte. The codes
do not depend on negative_slope (the kink stays at y = 0).
With a cap (quantizer.bn_relu_encode_capped): a = min(max(y, 0), max_value)
(NaN passes), and each code is also clamped onto the side of the cap edge
that y >= max_value says.
)doc");

REGISTER_OP("BlpaDecode")
    .Input("packed: uint8")
    .Input("lo: float")
    .Input("k: float")
    .Input("flip: float")
    .Input("shape: Tshape")
    .Input("cap_k: float")
    .Input("cap_flip: float")
    .Output("xhat: float")
    .Output("mask: bool")
    .Attr("bits: int")
    .Attr("window: float = 6.0")
    .Attr("Tshape: {int32, int64} = DT_INT32")
    .SetShapeFn([](InferenceContext* c) -> absl::Status {
      int bits;
      TF_RETURN_IF_ERROR(GetBits(c, &bits));
      TF_RETURN_IF_ERROR(CapInputs(c, 5, 7));
      ShapeHandle unused;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 1, &unused));
      DimensionHandle channels;
      TF_RETURN_IF_ERROR(ChannelDim(c, 1, 4, &channels));
      ShapeHandle out;
      TF_RETURN_IF_ERROR(c->MakeShapeFromShapeTensor(4, &out));
      TF_RETURN_IF_ERROR(c->WithRankAtLeast(out, 1, &out));
      DimensionHandle last;
      TF_RETURN_IF_ERROR(c->Merge(c->Dim(out, -1), channels, &last));
      TF_RETURN_IF_ERROR(c->ReplaceDim(out, -1, last, &out));
      c->set_output(0, out);
      c->set_output(1, out);
      return absl::OkStatus();
    })
    .Doc(R"doc(
Rebuilds (xhat, mask) from packed codes (quantizer.decode).

xhat = (q + 0.5) * w + lo (the bin centre), mask = (q >= k) != (flip > 0.5).
With a cap, mask is 0 < y < max_value: also (q >= cap_k) == (cap_flip > 0.5).
)doc");

REGISTER_OP("BlpaDecodeRelu")
    .Input("packed: uint8")
    .Input("lo: float")
    .Input("k: float")
    .Input("flip: float")
    .Input("gamma: float")
    .Input("beta: float")
    .Input("shape: Tshape")
    .Input("cap_k: float")
    .Input("cap_flip: float")
    .Output("a: float")
    .Attr("bits: int")
    .Attr("window: float = 6.0")
    .Attr("Tshape: {int32, int64} = DT_INT32")
    .Attr("negative_slope: float = 0.0")
    .Attr("max_value: float = 0.0")
    .SetShapeFn([](InferenceContext* c) -> absl::Status {
      int bits;
      TF_RETURN_IF_ERROR(GetBits(c, &bits));
      TF_RETURN_IF_ERROR(CapInputs(c, 7, 9));
      ShapeHandle unused;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 1, &unused));
      DimensionHandle channels;
      TF_RETURN_IF_ERROR(ChannelDim(c, 1, 6, &channels));
      ShapeHandle out;
      TF_RETURN_IF_ERROR(c->MakeShapeFromShapeTensor(6, &out));
      TF_RETURN_IF_ERROR(c->WithRankAtLeast(out, 1, &out));
      DimensionHandle last;
      TF_RETURN_IF_ERROR(c->Merge(c->Dim(out, -1), channels, &last));
      TF_RETURN_IF_ERROR(c->ReplaceDim(out, -1, last, &out));
      c->set_output(0, out);
      return absl::OkStatus();
    })
    .Doc(R"doc(
Decode fused with the BN affine map and (leaky) ReLU: with y = xhat * gamma + beta,
where(mask, y, s == 0 ? 0 : y * s), s = negative_slope. With a cap
(quantizer.relu_from_decoded_capped): max_value where saturated, else
where(mask, min(y, max_value), 0).
)doc");

REGISTER_OP("BlpaDecodeBnBackward")
    .Input("g_a: float")
    .Input("packed: uint8")
    .Input("lo: float")
    .Input("k: float")
    .Input("flip: float")
    .Input("gamma: float")
    .Input("inv_std: float")
    .Input("cap_k: float")
    .Input("cap_flip: float")
    .Output("g_x: float")
    .Output("d_gamma: float")
    .Output("d_beta: float")
    .Attr("bits: int")
    .Attr("window: float = 6.0")
    .Attr("negative_slope: float = 0.0")
    .SetShapeFn([](InferenceContext* c) -> absl::Status {
      int bits;
      TF_RETURN_IF_ERROR(GetBits(c, &bits));
      TF_RETURN_IF_ERROR(CapInputs(c, 7, 9));
      ShapeHandle g_a;
      TF_RETURN_IF_ERROR(c->WithRankAtLeast(c->input(0), 1, &g_a));
      DimensionHandle channels;
      TF_RETURN_IF_ERROR(ChannelDim(c, 2, 7, &channels));
      DimensionHandle last;
      TF_RETURN_IF_ERROR(c->Merge(c->Dim(g_a, -1), channels, &last));
      TF_RETURN_IF_ERROR(c->ReplaceDim(g_a, -1, last, &g_a));
      ShapeHandle packed;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 1, &packed));
      DimensionHandle bytes;
      TF_RETURN_IF_ERROR(c->Merge(c->Dim(packed, 0),
                                  PackedBytes(c, c->NumElements(g_a), bits),
                                  &bytes));
      c->set_output(0, g_a);
      c->set_output(1, c->Vector(last));
      c->set_output(2, c->Vector(last));
      return absl::OkStatus();
    })
    .Doc(R"doc(
Fused decode and ReLU + batch-norm backward (quantizer.decode_bn_backward).

With xhat, mask decoded from `packed` (the codes of a tensor of g_a's shape,
channels last) and g_y = where(mask, g_a, s == 0 ? 0 : g_a * s) (s =
negative_slope, the leaky ReLU's slope), summed over all rows:
d_beta = sum(g_y), d_gamma = sum(g_y * xhat) and
g_x = (gamma * inv_std) * (g_y - d_beta / count - xhat * (d_gamma / count)),
count = number of rows. Neither xhat, the mask nor g_y is materialized. Sums
are accumulated in double, so they agree with TF's float reductions to float
rounding, not bit for bit. With a cap edge, mask is 0 < y < max_value.
)doc");

// ---- exact path (bits=None): the saved tensor is xhat itself ------------------

namespace {

// Shape of input 0 (rank >= 1) with its last axis merged with the [C] inputs
// [first, last).
absl::Status ChannelsLastLike(InferenceContext* c, int first, int last,
                              ShapeHandle* out) {
  TF_RETURN_IF_ERROR(c->WithRankAtLeast(c->input(0), 1, out));
  DimensionHandle channels;
  TF_RETURN_IF_ERROR(ChannelDim(c, first, last, &channels));
  DimensionHandle merged;
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(*out, -1), channels, &merged));
  return c->ReplaceDim(*out, -1, merged, out);
}

}  // namespace

REGISTER_OP("BlpaBnReluExact")
    .Input("x: float")
    .Input("mean: float")
    .Input("inv_std: float")
    .Input("gamma: float")
    .Input("beta: float")
    .Output("a: float")
    .Output("xhat: float")
    .Attr("negative_slope: float = 0.0")
    .SetShapeFn([](InferenceContext* c) -> absl::Status {
      ShapeHandle x;
      TF_RETURN_IF_ERROR(ChannelsLastLike(c, 1, 5, &x));
      c->set_output(0, x);
      c->set_output(1, x);
      return absl::OkStatus();
    })
    .Doc(R"doc(
Fused BN-normalize and ReLU that keeps the normalized input (bits=None).

xhat = (x - mean) * inv_std; a = y <= 0 ? (s == 0 ? 0 : y * s) : y with
y = xhat * gamma + beta and s = negative_slope (NaN passes). xhat takes x's
buffer when nothing else holds x.
)doc");

REGISTER_OP("BlpaReluExact")
    .Input("xhat: float")
    .Input("gamma: float")
    .Input("beta: float")
    .Output("a: float")
    .Attr("negative_slope: float = 0.0")
    .SetShapeFn([](InferenceContext* c) -> absl::Status {
      ShapeHandle x;
      TF_RETURN_IF_ERROR(ChannelsLastLike(c, 1, 3, &x));
      c->set_output(0, x);
      return absl::OkStatus();
    })
    .Doc(R"doc(
The (leaky) ReLU output rebuilt from xhat: where(y > 0, y, s == 0 ? 0 : y * s),
y = xhat * gamma + beta, s = negative_slope.
)doc");

REGISTER_OP("BlpaBnBackwardExact")
    .Input("g_a: float")
    .Input("xhat: float")
    .Input("gamma: float")
    .Input("beta: float")
    .Input("inv_std: float")
    .Output("g_x: float")
    .Output("d_gamma: float")
    .Output("d_beta: float")
    .Attr("negative_slope: float = 0.0")
    .SetShapeFn([](InferenceContext* c) -> absl::Status {
      ShapeHandle g_a;
      TF_RETURN_IF_ERROR(ChannelsLastLike(c, 2, 5, &g_a));
      TF_RETURN_IF_ERROR(c->Merge(g_a, c->input(1), &g_a));
      c->set_output(0, g_a);
      c->set_output(1, c->Vector(c->Dim(g_a, -1)));
      c->set_output(2, c->Vector(c->Dim(g_a, -1)));
      return absl::OkStatus();
    })
    .Doc(R"doc(
Fused ReLU + batch-norm backward from the exact xhat (bits=None).

With g_y = where(xhat * gamma + beta > 0, g_a, s == 0 ? 0 : g_a * s) (s =
negative_slope), summed over all rows:
d_beta = sum(g_y), d_gamma = sum(g_y * xhat) and
g_x = (gamma * inv_std) * (g_y - d_beta / count - xhat * (d_gamma / count)).
Sums in double (they agree with TF's float reductions to float rounding); g_x
takes g_a's buffer when nothing else holds g_a.
)doc");
