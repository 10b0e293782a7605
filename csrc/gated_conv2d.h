// Shared declarations of the CPU ops (see gated_conv2d.cpp, sparse_f32.cpp,
// dynamic_conv2d.cpp).
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cstdint>

namespace dynprune {

// AVX-512 paths: on CPUs that have it (F, BW, VL, DQ), unless
// DYNPRUNE_DISABLE_AVX512=1 forces the portable ones (tests use it).
bool has_avx512();

// Convolution geometry, resolved and validated once per call.
struct Geometry {
  int64_t N, Cin, H, W, Cout, kh, kw, Ho, Wo;
  int64_t sh, sw, ph, pw, dh, dw;
};

// Shape/dtype/device checks of gated_conv2d's arguments (ValueError/TypeError).
Geometry check_inputs(const at::Tensor& x, const at::Tensor& weight,
                      const c10::optional<at::Tensor>& bias, const at::Tensor* out_idx,
                      const c10::optional<at::Tensor>& out_scale,
                      const c10::optional<at::Tensor>& in_idx, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation);

// Output size of a convolution or pool along one dimension; 0 where the
// dilated kernel does not fit the padded input (C++ division would round a
// negative span up to an output of 1).
inline int64_t out_size(int64_t size, int64_t k, int64_t stride, int64_t pad, int64_t dil) {
  const int64_t span = size + 2 * pad - dil * (k - 1) - 1;
  return span < 0 ? 0 : span / stride + 1;
}

// Outputs [lo, hi) of n whose input position c0 + o * step lies in [0, size):
// the others read padding.
struct ColRange {
  int64_t lo, hi;
};
inline ColRange valid_columns(int64_t c0, int64_t step, int64_t size, int64_t n) {
  const int64_t lo = std::min(n, c0 >= 0 ? 0 : (-c0 + step - 1) / step);
  const int64_t hi = std::max(lo, std::min(n, c0 >= size ? 0 : (size - 1 - c0) / step + 1));
  return {lo, hi};
}

// An index tensor as contiguous int64, without a dispatcher call when it
// already is one (the common case: ~0.5 us saved per call).
inline at::Tensor as_long(const at::Tensor& idx) {
  if (idx.scalar_type() == at::kLong && idx.is_contiguous()) return idx;
  return idx.to(at::kLong).contiguous();
}

// Index values of each row: in [0, limit) and strictly increasing.
void check_index_values(const at::Tensor& idx, const char* name, int64_t limit);

// The gate of dynamic_conv2d: saliency = relu(gate_weight @ mean_hw(x) + gate_bias),
// computed in float64 and rounded once, so every backend ranks alike.
struct Gate {
  at::Tensor weight, bias, priority;  // [Cout, Cin], [Cout], [Cout]
  int64_t k;
  // Optional (EvalPlan caches them; undefined otherwise): the weight
  // transposed, float32 [Cin, Cout] contiguous, and a bool [Cin] that is true
  // where that row of it is all finite. With them the float32 kernel's gates
  // of one sample read only the rows of that sample's non-zero inputs.
  at::Tensor weight_t, finite_rows;
};
void check_gate(const at::Tensor& x, const Gate& gate);

// What the float32 kernel writes for each kept value:
//   act(scale * (conv + bias) + res)
// (the product rounded before the add, as the unfused ops round it), and for
// each pruned value act(res); without a residual, act(scale * (conv + bias))
// and exact zeros. res points at one sample's [Cout, Ho, Wo] block of a
// contiguous tensor shaped like the output, or is null.
struct Epilogue {
  bool relu;
  const float* res;
};

// The float32 sparse kernel. With `gate`, out_idx/out_scale are outputs
// (already allocated [N, k]); without, they are validated inputs (out_scale
// may be undefined: scale 1). in_idx undefined: non-zero channels are found.
// residual: undefined, or a contiguous float32 tensor shaped like y, added
// before the ReLU (see Epilogue; the caller checks it).
void sparse_conv2d_f32(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                       const Gate* gate, at::Tensor& out_idx, at::Tensor& out_scale,
                       const at::Tensor& in_idx, const Geometry& g, bool relu, at::Tensor& y,
                       const at::Tensor& residual = at::Tensor());

at::Tensor gated_conv2d(const at::Tensor& x, const at::Tensor& weight,
                        const c10::optional<at::Tensor>& bias, const at::Tensor& out_idx,
                        const c10::optional<at::Tensor>& out_scale,
                        const c10::optional<at::Tensor>& in_idx, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation, bool relu);

// Max pool of a contiguous NCHW float32 CPU tensor (max_pool2d.cpp); bound
// for dynprune.nn.MaxPool2d, no autograd.
at::Tensor max_pool2d_nchw(const at::Tensor& x, std::vector<int64_t> kernel,
                           std::vector<int64_t> stride, std::vector<int64_t> padding,
                           std::vector<int64_t> dilation);
// The same where it applies, else None (see max_pool2d.cpp).
pybind11::object max_pool2d_or_none(const at::Tensor& x, const pybind11::handle& kernel,
                                    const pybind11::handle& stride, const pybind11::handle& padding,
                                    const pybind11::handle& dilation);

// A network's head at small batch (head_ops.cpp), for dynprune.nn's
// AdaptiveAvgPool2d (output 1x1) and Linear; no autograd.
at::Tensor global_avg_pool2d_nchw(const at::Tensor& x);
at::Tensor linear_small_batch(const at::Tensor& x, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias);
// The same where they apply, else nullopt (see head_ops.cpp).
c10::optional<at::Tensor> head_avg_pool(const at::Tensor& x);
c10::optional<at::Tensor> head_linear(const at::Tensor& x, const at::Tensor& weight,
                                      const c10::optional<at::Tensor>& bias, int64_t max_batch);

// A depthwise 3x3 or 5x5 convolution (padding K / 2, stride 1 or 2) where it applies,
// else None (see depthwise_conv2d.cpp), for dynprune.nn's Conv2dBN at eval.
pybind11::object depthwise_or_none(const at::Tensor& x, const at::Tensor& weight,
                                   const c10::optional<at::Tensor>& bias, int64_t groups,
                                   std::vector<int64_t> stride, std::vector<int64_t> padding,
                                   std::vector<int64_t> dilation,
                                   const c10::optional<at::Tensor>& in_idx);

}  // namespace dynprune
