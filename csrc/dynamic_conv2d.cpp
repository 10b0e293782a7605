// CPU implementation of dynprune::dynamic_conv2d: the channel gate and the
// gated convolution of one DynamicConv2d layer in a single native call, so an
// eval forward costs one dispatch instead of a dozen small Python-level ops.
//
//   saliency = relu(gate_weight @ mean_hw(x) + gate_bias)          [N, Cout]
//   out_idx  = top-k channels by (saliency desc, priority desc, index asc),
//              sorted ascending;  out_scale = saliency[out_idx]
//   y        = gated_conv2d(x, weight, bias, out_idx, out_scale, in_idx, ...)
//
// The Python reference (dynprune/ops.py) defines the same ranking.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "gated_conv2d.h"

namespace dynprune {
namespace {

// Top-k of one saliency row; NaN ranks first (as in torch.sort), so it reaches
// the output instead of being silently dropped.
template <typename scalar_t>
void select_row(const scalar_t* sal, const scalar_t* prio, int64_t C, int64_t k,
                std::vector<int64_t>& order, int64_t* idx_out) {
  auto key = [&](int64_t c) {
    const double v = static_cast<double>(sal[c]);
    return std::isnan(v) ? INFINITY : v;
  };
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int64_t a, int64_t b) {
    const double ka = key(a), kb = key(b);
    if (ka != kb) return ka > kb;
    if (prio[a] != prio[b]) return prio[a] > prio[b];
    return a < b;
  });
  std::sort(order.begin(), order.begin() + k);
  std::copy(order.begin(), order.begin() + k, idx_out);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> channel_gate(const at::Tensor& x, const at::Tensor& gate_weight,
                                                const at::Tensor& gate_bias,
                                                const at::Tensor& priority, int64_t k) {
  TORCH_CHECK_VALUE(x.dim() == 4, "x must be 4-D [N, Cin, H, W], got ", x.dim(), "-D");
  TORCH_CHECK_VALUE(gate_weight.dim() == 2 && gate_weight.size(1) == x.size(1),
                    "gate_weight must have shape [Cout, ", x.size(1), "], got ", gate_weight.sizes());
  const int64_t C = gate_weight.size(0);
  TORCH_CHECK_VALUE(gate_bias.dim() == 1 && gate_bias.size(0) == C && priority.dim() == 1 &&
                        priority.size(0) == C,
                    "gate_bias and priority must have shape [", C, "]");
  TORCH_CHECK_VALUE(k >= 1 && k <= C, "k must be in [1, ", C, "], got ", k);
  for (const at::Tensor* t : {&gate_weight, &gate_bias, &priority}) {
    TORCH_CHECK_TYPE(t->scalar_type() == x.scalar_type(), "dtype mismatch: x is ",
                     x.scalar_type(), " but a gate tensor is ", t->scalar_type());
  }
  const int64_t N = x.size(0);
  const at::Tensor sal = at::relu(at::linear(x.mean({2, 3}), gate_weight, gate_bias)).contiguous();
  const at::Tensor prio = priority.contiguous();
  at::Tensor idx = at::empty({N, k}, x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_gate", [&] {
    const scalar_t* s = sal.data_ptr<scalar_t>();
    const scalar_t* p = prio.data_ptr<scalar_t>();
    int64_t* out = idx.data_ptr<int64_t>();
    at::parallel_for(0, N, 16, [&](int64_t b, int64_t e) {
      std::vector<int64_t> order(C);
      for (int64_t n = b; n < e; ++n) select_row(s + n * C, p, C, k, order, out + n * k);
    });
  });
  return {idx, sal.gather(1, idx)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dynamic_conv2d(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& gate_weight, const at::Tensor& gate_bias, const at::Tensor& priority,
    int64_t k, const c10::optional<at::Tensor>& in_idx, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, bool relu) {
  auto [idx, scale] = channel_gate(x, gate_weight, gate_bias, priority, k);
  at::Tensor y = gated_conv2d(x, weight, bias, idx, scale, in_idx, stride, padding, dilation, relu);
  return {y, idx, scale};
}

}  // namespace dynprune

TORCH_LIBRARY_IMPL(dynprune, CPU, m) {
  m.impl("channel_gate", &dynprune::channel_gate);
  m.impl("dynamic_conv2d", &dynprune::dynamic_conv2d);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dynprune native CPU kernels (registered as torch.ops.dynprune.*)";
}
