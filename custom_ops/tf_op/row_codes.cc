// CPU ops for the transformer units' codes (keras_blpa/transformer/codes.py),
// each one pass over its tensor where the pure-TF path runs a graph op per
// step (min, max, subtract, divide, round, clip, cast, shift, sum...).
// Wrappers: keras_blpa/backend/tensorflow/row_kernels.py; the results are
// bit for bit those of the pure-TF path:
//
//   BlpaRowEncode:   v [rows, features] or [rows, groups, features] ->
//                    codes `clip(round((v - lo) / scale), 0, 2**bits - 1)`
//                    with lo = min, scale = (max - min) * (1 / (2**bits - 1)) (1 when
//                    the row is constant), per row (and group); 8 bits: uint8
//                    [rows, columns], 4 bits: uint32 words along the rows
//                    (`quantizer.pack_words`); columns = groups * features.
//   BlpaRowDecode:   `lo + code * scale`, float [rows, columns].
//   BlpaBinsPacked:  `sum(x > edge)` of x [rows, features] in `bits`-bit words.
//   BlpaBinsScale:   `g * levels[code]` from those words.
//
// Words pack `32 / bits` consecutive rows: word [w, c] holds the code of row
// w * k + j at bits [j * bits, (j + 1) * bits). Rounding is half to even
// (like tf.round), and the library is built with
// -ffp-contract=off, so no product is fused into an add.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/framework/tensor.h"

namespace blpa_rows {
namespace {

using ::tensorflow::DEVICE_CPU;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

// Word rows of `rows` codes at `bits` (8 bits: one uint8 per code, no words).
int64_t WordRows(int64_t rows, int bits) {
  const int64_t k = 32 / bits;
  return bits == 8 ? rows : (rows + k - 1) / k;
}

DimensionHandle WordRowsDim(InferenceContext* c, DimensionHandle rows, int bits) {
  if (!c->ValueKnown(rows)) return c->UnknownDim();
  return c->MakeDim(WordRows(c->Value(rows), bits));
}

// Minimum and maximum of x[0, n), n >= 1 (in SSE lanes where there are: the
// order of a min or max does not change it).
void RowRange(const float* x, int64_t n, float* low, float* high) {
  float lo = x[0], hi = x[0];
  int64_t f = 0;
#if defined(__SSE2__)
  if (n >= 4) {
    __m128 lo4 = _mm_loadu_ps(x), hi4 = lo4;
    for (f = 4; f + 4 <= n; f += 4) {
      const __m128 v = _mm_loadu_ps(x + f);
      lo4 = _mm_min_ps(lo4, v);
      hi4 = _mm_max_ps(hi4, v);
    }
    float l[4], h[4];
    _mm_storeu_ps(l, lo4);
    _mm_storeu_ps(h, hi4);
    for (int i = 0; i < 4; ++i) {
      lo = l[i] < lo ? l[i] : lo;
      hi = h[i] > hi ? h[i] : hi;
    }
  }
#endif
  for (; f < n; ++f) {
    lo = x[f] < lo ? x[f] : lo;
    hi = x[f] > hi ? x[f] : hi;
  }
  *low = lo;
  *high = hi;
}

// Round half to even (tf.round) of 0 <= d < 2**23, the codes' range: adding
// 2**23 leaves no fraction bits, so the float add rounds to nearest even; an
// inline add that vectorizes, unlike std::nearbyint.
inline float RoundHalfEven(float d) {
  constexpr float kShift = 8388608.0f;
  return (d + kShift) - kShift;
}

// The codes of one row (group): a function of its own, so that the uint8
// stores cannot alias its bounds and the loop vectorizes.
void EncodeRow(const float* x, int64_t n, float low, float scale, float top,
               uint8_t* out) {
  for (int64_t f = 0; f < n; ++f) {
    const float q = RoundHalfEven((x[f] - low) / scale);
    out[f] = static_cast<uint8_t>(static_cast<int32_t>(q < top ? q : top));
  }
}

// Runs fn(first, last) over word rows [0, units) on TF's intra-op pool.
template <typename Fn>
void ForWordRows(OpKernelContext* ctx, int64_t units, int64_t cost, Fn fn) {
  ctx->device()->tensorflow_cpu_worker_threads()->workers->ParallelFor(
      units, cost, [&fn](int64_t first, int64_t last) { fn(first, last); });
}

}  // namespace
}  // namespace blpa_rows

REGISTER_OP("BlpaRowEncode")
    .Input("v: float")
    .Output("words: words_type")
    .Output("lo: float")
    .Output("scale: float")
    .Attr("bits: int")
    .Attr("words_type: {uint8, uint32}")
    .SetShapeFn([](blpa_rows::InferenceContext* c) {
      int bits;
      TF_RETURN_IF_ERROR(c->GetAttr("bits", &bits));
      blpa_rows::ShapeHandle v;
      TF_RETURN_IF_ERROR(c->WithRankAtLeast(c->input(0), 2, &v));
      TF_RETURN_IF_ERROR(c->WithRankAtMost(v, 3, &v));
      blpa_rows::DimensionHandle columns = c->Dim(v, 1);
      if (c->Rank(v) == 3) {
        TF_RETURN_IF_ERROR(c->Multiply(c->Dim(v, 1), c->Dim(v, 2), &columns));
      }
      c->set_output(0, c->Matrix(blpa_rows::WordRowsDim(c, c->Dim(v, 0), bits), columns));
      blpa_rows::ShapeHandle per_row;
      TF_RETURN_IF_ERROR(c->Subshape(v, 0, -1, &per_row));
      c->set_output(1, per_row);
      c->set_output(2, per_row);
      return absl::OkStatus();
    });

REGISTER_OP("BlpaRowDecode")
    .Input("words: words_type")
    .Input("lo: float")
    .Input("scale: float")
    .Output("v: float")
    .Attr("bits: int")
    .Attr("words_type: {uint8, uint32}")
    .SetShapeFn([](blpa_rows::InferenceContext* c) {
      blpa_rows::ShapeHandle words, lo;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &words));
      TF_RETURN_IF_ERROR(c->WithRankAtLeast(c->input(1), 1, &lo));
      c->set_output(0, c->Matrix(c->Dim(lo, 0), c->Dim(words, 1)));
      return absl::OkStatus();
    });

REGISTER_OP("BlpaBinsPacked")
    .Input("x: float")
    .Output("words: uint32")
    .Attr("edges: list(float)")
    .Attr("bits: int")
    .SetShapeFn([](blpa_rows::InferenceContext* c) {
      int bits;
      TF_RETURN_IF_ERROR(c->GetAttr("bits", &bits));
      blpa_rows::ShapeHandle x;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &x));
      c->set_output(0, c->Matrix(blpa_rows::WordRowsDim(c, c->Dim(x, 0), bits), c->Dim(x, 1)));
      return absl::OkStatus();
    });

REGISTER_OP("BlpaBinsScale")
    .Input("g: float")
    .Input("words: uint32")
    .Output("scaled: float")
    .Attr("levels: list(float)")
    .Attr("bits: int")
    .SetShapeFn([](blpa_rows::InferenceContext* c) {
      blpa_rows::ShapeHandle g;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &g));
      c->set_output(0, g);
      return absl::OkStatus();
    });

namespace blpa_rows {
namespace {

class RowEncodeOp : public OpKernel {
 public:
  explicit RowEncodeOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("bits", &bits_));
    OP_REQUIRES(ctx, bits_ == 4 || bits_ == 8,
                absl::InvalidArgumentError("bits must be 4 or 8"));
    tensorflow::DataType type;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("words_type", &type));
    OP_REQUIRES(ctx, (type == tensorflow::DT_UINT8) == (bits_ == 8),
                absl::InvalidArgumentError("words_type is uint8 at 8 bits, else uint32"));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& v = ctx->input(0);
    OP_REQUIRES(ctx, v.dims() == 2 || v.dims() == 3,
                absl::InvalidArgumentError("v must be [rows, features] or "
                                           "[rows, groups, features]"));
    const int64_t rows = v.dim_size(0);
    const int64_t features = v.dim_size(v.dims() - 1);
    const int64_t groups = v.dims() == 3 ? v.dim_size(1) : 1;
    const int64_t columns = groups * features;
    TensorShape per_row({rows});
    if (v.dims() == 3) per_row.AddDim(groups);
    Tensor *words = nullptr, *lo = nullptr, *scale = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            0, TensorShape({WordRows(rows, bits_), columns}), &words));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, per_row, &lo));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, per_row, &scale));
    const float* in = v.flat<float>().data();
    float* lo_out = lo->flat<float>().data();
    float* scale_out = scale->flat<float>().data();
    const float top = static_cast<float>((1 << bits_) - 1);
    // `span / top` as every compiled graph runs it (TF's graph optimizer, XLA):
    // times the float32 reciprocal of the constant. Eager TF divides, which
    // can differ in the last bit of the scale.
    const float inv_top = 1.0f / top;
    const int bits = bits_;
    const int64_t k = bits == 8 ? 1 : 32 / bits;
    uint8_t* bytes = bits == 8 ? words->flat<uint8_t>().data() : nullptr;
    uint32_t* packed = bits == 8 ? nullptr : words->flat<uint32_t>().data();
    ForWordRows(ctx, WordRows(rows, bits), k * columns * 8, [=](int64_t first, int64_t last) {
      std::vector<uint8_t> code(columns);
      for (int64_t w = first; w < last; ++w) {
        if (packed) std::fill(packed + w * columns, packed + (w + 1) * columns, 0u);
        for (int64_t j = 0; j < k && w * k + j < rows; ++j) {
          const int64_t r = w * k + j;
          uint8_t* out = bytes ? bytes + r * columns : code.data();
          for (int64_t gi = 0; gi < groups; ++gi) {
            const float* x = in + r * columns + gi * features;
            float low, high;
            RowRange(x, features, &low, &high);
            const float span = high - low;
            const float s = span > 0.0f ? span * inv_top : 1.0f;
            lo_out[r * groups + gi] = low;
            scale_out[r * groups + gi] = s;
            EncodeRow(x, features, low, s, top, out + gi * features);
          }
          if (packed) {
            uint32_t* word = packed + w * columns;
            const int shift = static_cast<int>(j) * bits;
            for (int64_t c = 0; c < columns; ++c) {
              word[c] |= static_cast<uint32_t>(code[c]) << shift;
            }
          }
        }
      }
    });
  }

 private:
  int bits_;
};

class RowDecodeOp : public OpKernel {
 public:
  explicit RowDecodeOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("bits", &bits_));
    OP_REQUIRES(ctx, bits_ == 4 || bits_ == 8,
                absl::InvalidArgumentError("bits must be 4 or 8"));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& words = ctx->input(0);
    const Tensor& lo = ctx->input(1);
    const Tensor& scale = ctx->input(2);
    OP_REQUIRES(ctx, words.dims() == 2 && (lo.dims() == 1 || lo.dims() == 2) &&
                         lo.shape() == scale.shape(),
                absl::InvalidArgumentError("words must be a matrix; lo and scale "
                                           "[rows] or [rows, groups], alike"));
    const int64_t rows = lo.dim_size(0);
    const int64_t groups = lo.dims() == 2 ? lo.dim_size(1) : 1;
    const int64_t columns = words.dim_size(1);
    OP_REQUIRES(ctx, groups > 0 && columns % groups == 0 &&
                         words.dim_size(0) == WordRows(rows, bits_),
                absl::InvalidArgumentError(absl::StrCat(
                    "words ", words.shape().DebugString(), " do not hold ", rows,
                    " rows of ", groups, " groups at ", bits_, " bits")));
    const int64_t features = columns / groups;
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({rows, columns}), &out));
    float* v = out->flat<float>().data();
    const float* lo_in = lo.flat<float>().data();
    const float* scale_in = scale.flat<float>().data();
    const int bits = bits_;
    const int64_t k = bits == 8 ? 1 : 32 / bits;
    const uint32_t mask = (1u << bits) - 1u;
    const uint8_t* bytes = bits == 8 ? words.flat<uint8_t>().data() : nullptr;
    const uint32_t* packed = bits == 8 ? nullptr : words.flat<uint32_t>().data();
    ForWordRows(ctx, WordRows(rows, bits), k * columns * 3, [=](int64_t first, int64_t last) {
      for (int64_t w = first; w < last; ++w) {
        for (int64_t j = 0; j < k && w * k + j < rows; ++j) {
          const int64_t r = w * k + j;
          const int shift = static_cast<int>(j) * bits;
          for (int64_t gi = 0; gi < groups; ++gi) {
            const float low = lo_in[r * groups + gi];
            const float s = scale_in[r * groups + gi];
            float* o = v + r * columns + gi * features;
            const int64_t c0 = gi * features;
            if (bytes) {
              const uint8_t* b = bytes + r * columns + c0;
              for (int64_t f = 0; f < features; ++f) {
                const float product = static_cast<float>(b[f]) * s;
                o[f] = low + product;
              }
            } else {
              const uint32_t* word = packed + w * columns + c0;
              for (int64_t f = 0; f < features; ++f) {
                const float product = static_cast<float>((word[f] >> shift) & mask) * s;
                o[f] = low + product;
              }
            }
          }
        }
      }
    });
  }

 private:
  int bits_;
};

// The bins' shared attrs: bits (1 to 8, words of 32 / bits codes) and the
// list attr (`edges` or `levels`).
absl::Status ReadBins(OpKernelConstruction* ctx, const char* list, int* bits,
                      std::vector<float>* values) {
  TF_RETURN_IF_ERROR(ctx->GetAttr("bits", bits));
  if (*bits < 1 || *bits > 8) {
    return absl::InvalidArgumentError(absl::StrCat("bits must be 1 to 8, got ", *bits));
  }
  return ctx->GetAttr(list, values);
}

// `sum(x[c] > edge)` of one row, shifted into its words: a block of columns
// at a time, an edge at a time, so that each pass over the block vectorizes
// (a loop over the edges inside the column loop did not: 2 ms for 768 x 1024
// floats at 7 edges on one thread). The same counts.
void BinRow(const float* x, int64_t n, const float* edges, int num_edges, int shift,
            uint32_t* word) {
  constexpr int64_t kBlock = 256;
  uint32_t count[kBlock];
  for (int64_t first = 0; first < n; first += kBlock) {
    const int64_t m = std::min(kBlock, n - first);
    const float* v = x + first;
    for (int64_t c = 0; c < m; ++c) count[c] = 0u;
    for (int e = 0; e < num_edges; ++e) {
      const float edge = edges[e];
      for (int64_t c = 0; c < m; ++c) count[c] += v[c] > edge ? 1u : 0u;
    }
    for (int64_t c = 0; c < m; ++c) word[first + c] |= count[c] << shift;
  }
}

class BinsPackedOp : public OpKernel {
 public:
  explicit BinsPackedOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadBins(ctx, "edges", &bits_, &edges_));
    OP_REQUIRES(ctx, edges_.size() < (size_t{1} << bits_),
                absl::InvalidArgumentError("more edges than `bits` codes"));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    OP_REQUIRES(ctx, x.dims() == 2, absl::InvalidArgumentError("x must be a matrix"));
    const int64_t rows = x.dim_size(0);
    const int64_t columns = x.dim_size(1);
    const int bits = bits_;
    const int64_t k = 32 / bits;
    Tensor* words = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            0, TensorShape({(rows + k - 1) / k, columns}), &words));
    const float* in = x.flat<float>().data();
    uint32_t* packed = words->flat<uint32_t>().data();
    const std::vector<float>& edges = edges_;
    ForWordRows(ctx, (rows + k - 1) / k, k * columns * (2 + edges.size()),
                [=](int64_t first, int64_t last) {
      for (int64_t w = first; w < last; ++w) {
        uint32_t* word = packed + w * columns;
        std::fill(word, word + columns, 0u);
        for (int64_t j = 0; j < k && w * k + j < rows; ++j) {
          BinRow(in + (w * k + j) * columns, columns, edges.data(),
                 static_cast<int>(edges.size()), static_cast<int>(j) * bits, word);
        }
      }
    });
  }

 private:
  int bits_;
  std::vector<float> edges_;
};

class BinsScaleOp : public OpKernel {
 public:
  explicit BinsScaleOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadBins(ctx, "levels", &bits_, &levels_));
    OP_REQUIRES(ctx, !levels_.empty() && levels_.size() <= (size_t{1} << bits_),
                absl::InvalidArgumentError("levels must hold 1 to 2**bits values"));
    levels_.resize(size_t{1} << bits_, levels_.back());  // codes are < len(levels)
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& g = ctx->input(0);
    const Tensor& words = ctx->input(1);
    const int bits = bits_;
    const int64_t k = 32 / bits;
    OP_REQUIRES(ctx, g.dims() == 2 && words.dims() == 2 &&
                         words.dim_size(1) == g.dim_size(1) &&
                         words.dim_size(0) == (g.dim_size(0) + k - 1) / k,
                absl::InvalidArgumentError(absl::StrCat(
                    "words ", words.shape().DebugString(), " do not hold the codes of g ",
                    g.shape().DebugString(), " at ", bits, " bits")));
    const int64_t rows = g.dim_size(0);
    const int64_t columns = g.dim_size(1);
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0}, 0, g.shape(), &out));
    const float* in = g.flat<float>().data();
    float* scaled = out->flat<float>().data();
    const uint32_t* packed = words.flat<uint32_t>().data();
    const uint32_t mask = (1u << bits) - 1u;
    const float* levels = levels_.data();
    ForWordRows(ctx, (rows + k - 1) / k, k * columns * 3, [=](int64_t first, int64_t last) {
      for (int64_t w = first; w < last; ++w) {
        const uint32_t* word = packed + w * columns;
        for (int64_t j = 0; j < k && w * k + j < rows; ++j) {
          const int64_t offset = (w * k + j) * columns;
          const int shift = static_cast<int>(j) * bits;
          for (int64_t c = 0; c < columns; ++c) {
            scaled[offset + c] = in[offset + c] * levels[(word[c] >> shift) & mask];
          }
        }
      }
    });
  }

 private:
  int bits_;
  std::vector<float> levels_;
};

REGISTER_KERNEL_BUILDER(Name("BlpaRowEncode").Device(DEVICE_CPU), RowEncodeOp);
REGISTER_KERNEL_BUILDER(Name("BlpaRowDecode").Device(DEVICE_CPU), RowDecodeOp);
REGISTER_KERNEL_BUILDER(Name("BlpaBinsPacked").Device(DEVICE_CPU), BinsPackedOp);
REGISTER_KERNEL_BUILDER(Name("BlpaBinsScale").Device(DEVICE_CPU), BinsScaleOp);

}  // namespace
}  // namespace blpa_rows
