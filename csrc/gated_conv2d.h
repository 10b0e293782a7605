// dynprune::gated_conv2d, CPU (see gated_conv2d.cpp).
#pragma once

#include <torch/extension.h>

namespace dynprune {

at::Tensor gated_conv2d(const at::Tensor& x, const at::Tensor& weight,
                        const c10::optional<at::Tensor>& bias, const at::Tensor& out_idx,
                        const c10::optional<at::Tensor>& out_scale,
                        const c10::optional<at::Tensor>& in_idx, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation, bool relu);

}  // namespace dynprune
