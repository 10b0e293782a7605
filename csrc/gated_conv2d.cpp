// CPU implementation of dynprune::gated_conv2d (contract: ARCHITECTURE.md).
//
// float32 runs the native kernel: per sample, only the kept output channels
// are computed, over only the non-zero (or given) input channels; the gate
// scale, bias and ReLU are applied in the epilogue; pruned output channels are
// written as exact zeros. Other dtypes run the dense reference formula in ATen
// (correct, not faster): see README "dtypes".
#include <ATen/MemoryOverlap.h>
#include <torch/extension.h>

#include <algorithm>
#include <vector>

#include "gated_conv2d.h"
#include "output_pool.h"

namespace dynprune {

// ---------------------------------------------------------------- validation

void check_index_values(const at::Tensor& idx_in, const char* name, int64_t limit) {
  const at::Tensor idx = as_long(idx_in);
  const int64_t N = idx.size(0), k = idx.size(1);
  const int64_t* p = idx.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    const int64_t* row = p + n * k;
    for (int64_t j = 0; j < k; ++j) {
      TORCH_CHECK_VALUE(row[j] >= 0 && row[j] < limit, name, "[", n, ", ", j, "] = ", row[j],
                        " is out of range [0, ", limit, ")");
      TORCH_CHECK_VALUE(j == 0 || row[j] > row[j - 1], name, "[", n,
                        "] must be sorted ascending without duplicates, got ", row[j - 1],
                        " then ", row[j]);
    }
  }
}

namespace {

void check_index_rows(const at::Tensor& idx, const char* name, int64_t N, int64_t limit) {
  TORCH_CHECK_TYPE(!at::isFloatingType(idx.scalar_type()) && idx.scalar_type() != at::kBool &&
                       at::isIntegralType(idx.scalar_type(), false),
                   name, " must be an integer tensor, got ", idx.scalar_type());
  TORCH_CHECK_VALUE(idx.dim() == 2 && idx.size(0) == N, name, " must have shape [N=", N,
                    ", k], got ", idx.sizes());
}

}  // namespace

Geometry check_inputs(const at::Tensor& x, const at::Tensor& weight,
                      const c10::optional<at::Tensor>& bias, const at::Tensor* out_idx_p,
                      const c10::optional<at::Tensor>& out_scale,
                      const c10::optional<at::Tensor>& in_idx, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK_VALUE(x.dim() == 4, "x must be 4-D [N, Cin, H, W], got ", x.dim(), "-D");
  TORCH_CHECK_VALUE(weight.dim() == 4, "weight must be 4-D [Cout, Cin, kh, kw], got ",
                    weight.dim(), "-D");
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "x must be floating point, got ",
                   x.scalar_type());
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), "dtype mismatch: x is ",
                   x.scalar_type(), " but weight is ", weight.scalar_type());
  TORCH_CHECK_VALUE(weight.size(1) == x.size(1), "channel mismatch: x has ", x.size(1),
                    " input channels but weight expects ", weight.size(1),
                    " (grouped convolutions are not supported)");
  TORCH_CHECK_VALUE(weight.size(2) >= 1 && weight.size(3) >= 1,
                    "kernel size must be positive, got ", weight.sizes().slice(2));
  // What F.conv2d (the reference) refuses too: every backend fails alike.
  TORCH_CHECK_VALUE(weight.size(0) >= 1 && weight.size(1) >= 1,
                    "weight must have at least one output and one input channel, got ",
                    weight.sizes().slice(0, 2));
  TORCH_CHECK_VALUE(x.size(2) >= 1 && x.size(3) >= 1, "x must have a non-empty spatial size, got ",
                    x.size(2), "x", x.size(3));
  TORCH_CHECK_VALUE(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
                    "stride, padding and dilation must have 2 elements each");
  for (int d = 0; d < 2; ++d) {
    TORCH_CHECK_VALUE(stride[d] > 0 && dilation[d] > 0 && padding[d] >= 0,
                      "stride and dilation must be positive and padding non-negative, got stride=",
                      stride, " padding=", padding, " dilation=", dilation);
  }
  Geometry g;
  g.N = x.size(0); g.Cin = x.size(1); g.H = x.size(2); g.W = x.size(3);
  g.Cout = weight.size(0); g.kh = weight.size(2); g.kw = weight.size(3);
  g.sh = stride[0]; g.sw = stride[1]; g.ph = padding[0]; g.pw = padding[1];
  g.dh = dilation[0]; g.dw = dilation[1];
  g.Ho = out_size(g.H, g.kh, g.sh, g.ph, g.dh);
  g.Wo = out_size(g.W, g.kw, g.sw, g.pw, g.dw);
  TORCH_CHECK_VALUE(g.H + 2 * g.ph >= g.dh * (g.kh - 1) + 1 &&
                        g.W + 2 * g.pw >= g.dw * (g.kw - 1) + 1,
                    "input ", g.H, "x", g.W, " with padding ", padding,
                    " is smaller than the dilated kernel");
  if (bias.has_value()) {
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), "dtype mismatch: x is ",
                     x.scalar_type(), " but bias is ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == g.Cout, "bias must have shape [",
                      g.Cout, "], got ", bias->sizes());
  }
  if (out_idx_p != nullptr) {
    const at::Tensor& out_idx = *out_idx_p;
    check_index_rows(out_idx, "out_idx", g.N, g.Cout);
    TORCH_CHECK_VALUE(out_idx.size(1) <= g.Cout, "out_idx lists ", out_idx.size(1),
                      " channels but only ", g.Cout, " exist");
    TORCH_CHECK_VALUE(out_idx.device() == x.device(), "all tensors must be on ", x.device(),
                      ", got one on ", out_idx.device());
  }
  if (out_scale.has_value()) {
    const at::Tensor& out_idx = *out_idx_p;
    TORCH_CHECK_TYPE(out_scale->scalar_type() == x.scalar_type(), "dtype mismatch: x is ",
                     x.scalar_type(), " but out_scale is ", out_scale->scalar_type());
    TORCH_CHECK_VALUE(out_scale->sizes() == out_idx.sizes(), "out_scale must have the shape of out_idx ",
                      out_idx.sizes(), ", got ", out_scale->sizes());
  }
  if (in_idx.has_value()) {
    check_index_rows(*in_idx, "in_idx", g.N, g.Cin);
    TORCH_CHECK_VALUE(in_idx->size(1) <= g.Cin, "in_idx lists ", in_idx->size(1),
                      " channels but only ", g.Cin, " exist");
  }
  TORCH_CHECK_VALUE(weight.device() == x.device(), "all tensors must be on ", x.device(),
                    ", got one on ", weight.device());
  for (const auto* t : {&bias, &out_scale, &in_idx}) {
    TORCH_CHECK_VALUE(!t->has_value() || (*t)->device() == x.device(),
                      "all tensors must be on ", x.device(), ", got one on ", (*t)->device());
  }
  return g;
}

// ---------------------------------------------------------------- dense reference (other dtypes)

namespace {

void gated_conv2d_dense(const at::Tensor& x, const at::Tensor& weight,
                        const c10::optional<at::Tensor>& bias, const at::Tensor& out_idx,
                        const c10::optional<at::Tensor>& out_scale,
                        const c10::optional<at::Tensor>& in_idx, const Geometry& g,
                        at::IntArrayRef stride, at::IntArrayRef padding,
                        at::IntArrayRef dilation, bool relu, at::Tensor& y) {
  const at::Tensor oi = out_idx.to(at::kLong);
  at::Tensor xin = x;
  if (in_idx.has_value()) {
    const at::Tensor ii = in_idx->to(at::kLong);
    at::Tensor in_mask = at::zeros({g.N, g.Cin}, x.options().dtype(at::kBool));
    in_mask.scatter_(1, ii, true);  // where(), not a multiply: NaN outside in_idx is zero too
    xin = at::where(in_mask.view({g.N, g.Cin, 1, 1}), x, at::zeros({}, x.options()));
  }
  at::Tensor dense = at::conv2d(xin, weight, bias, stride, padding, dilation);
  at::Tensor full_scale = at::zeros({g.N, g.Cout}, x.options());
  full_scale.scatter_(1, oi, out_scale.has_value() ? *out_scale : at::ones(oi.sizes(), x.options()));
  at::Tensor kept = at::zeros({g.N, g.Cout}, x.options().dtype(at::kBool));
  kept.scatter_(1, oi, true);
  at::Tensor out = dense * full_scale.view({g.N, g.Cout, 1, 1});
  if (relu) out = at::relu(out);
  y.copy_(at::where(kept.view({g.N, g.Cout, 1, 1}), out, at::zeros({}, x.options())));
}

}  // namespace

// ---------------------------------------------------------------- registered ops

at::Tensor& gated_conv2d_out(const at::Tensor& x, const at::Tensor& weight,
                             const c10::optional<at::Tensor>& bias, const at::Tensor& out_idx,
                             const c10::optional<at::Tensor>& out_scale,
                             const c10::optional<at::Tensor>& in_idx, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, bool relu,
                             at::Tensor& out) {
  const Geometry g =
      check_inputs(x, weight, bias, &out_idx, out_scale, in_idx, stride, padding, dilation);
  TORCH_CHECK_VALUE(out.sizes() == at::IntArrayRef({g.N, g.Cout, g.Ho, g.Wo}),
                    "out must have shape ", at::IntArrayRef({g.N, g.Cout, g.Ho, g.Wo}), ", got ",
                    out.sizes());
  TORCH_CHECK_TYPE(out.scalar_type() == x.scalar_type(), "dtype mismatch: x is ",
                   x.scalar_type(), " but out is ", out.scalar_type());
  check_index_values(out_idx, "out_idx", g.Cout);
  if (in_idx.has_value()) check_index_values(*in_idx, "in_idx", g.Cin);
  if (g.N == 0) return out;
  if (x.scalar_type() != at::kFloat) {
    gated_conv2d_dense(x, weight, bias, out_idx, out_scale, in_idx, g, stride, padding, dilation,
                       relu, out);
    return out;
  }
  at::Tensor idx = as_long(out_idx);
  at::Tensor scale = out_scale.has_value() ? out_scale->contiguous() : at::Tensor();
  const at::Tensor b = bias.has_value() ? *bias : at::Tensor();
  const at::Tensor ii = in_idx.has_value() ? *in_idx : at::Tensor();
  // The kernel writes out while it still reads its inputs (a 1x1 conv reads x
  // in place), so out is written directly only when it shares no memory with
  // them; else through a temporary, like a non-contiguous out.
  auto shares_memory = [&](const at::Tensor& t) {
    return t.defined() && at::get_overlap_status(out, t) != at::MemOverlapStatus::No;
  };
  if (out.is_contiguous() && !shares_memory(x) && !shares_memory(weight) && !shares_memory(b) &&
      !shares_memory(scale)) {
    sparse_conv2d_f32(x, weight, b, nullptr, idx, scale, ii, g, relu, out);
  } else {
    at::Tensor tmp = at::empty(out.sizes(), out.options());
    sparse_conv2d_f32(x, weight, b, nullptr, idx, scale, ii, g, relu, tmp);
    out.copy_(tmp);
  }
  return out;
}

at::Tensor gated_conv2d(const at::Tensor& x, const at::Tensor& weight,
                        const c10::optional<at::Tensor>& bias, const at::Tensor& out_idx,
                        const c10::optional<at::Tensor>& out_scale,
                        const c10::optional<at::Tensor>& in_idx, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation, bool relu) {
  const Geometry g =
      check_inputs(x, weight, bias, &out_idx, out_scale, in_idx, stride, padding, dilation);
  at::Tensor out = empty_output({g.N, g.Cout, g.Ho, g.Wo}, x.options());
  return gated_conv2d_out(x, weight, bias, out_idx, out_scale, in_idx, stride, padding, dilation,
                          relu, out);
}

}  // namespace dynprune

// The schemas are defined in Python (dynprune/ops.py) before this library loads.
TORCH_LIBRARY_IMPL(dynprune, CPU, m) {
  m.impl("gated_conv2d", &dynprune::gated_conv2d);
  m.impl("gated_conv2d.out", &dynprune::gated_conv2d_out);
}
