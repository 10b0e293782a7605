// A CNN's head at small batch: the global average pool and the classifier
// (dynprune.nn.AdaptiveAvgPool2d and dynprune.nn.Linear, without autograd).
//
// Why not ATen's: inside a network at batch 1 these run once a forward, after
// the convs have streamed tens of MB of weights through the caches, and
// ATen's generic paths (TensorIterator reductions, MKL's gemv on one thread)
// come back cold each time. ResNet-18 at batch 1, times inside the network
// (forward hooks): the pool 101-112 us with ATen, 21 us here; the 512 -> 1000
// classifier 253-267 us with F.linear, 91 us here (its 2 MB weight read by
// all threads, which MKL's gemv does not do at batch 1).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <omp.h>

#include <algorithm>

#include "gated_conv2d.h"

namespace dynprune {
namespace {

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));

// out[r] = w[r] . x for R rows of length n, 16 lanes at a time (the lanes'
// partial sums are added at the end, as a blocked GEMM would).
template <int R>
__attribute__((target("arch=x86-64-v4")))
void dot_rows_avx512(const float* w, int64_t n, const float* x, float* out) {
  v16 acc[R] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const v16 xv = *reinterpret_cast<const v16u*>(x + i);
    for (int r = 0; r < R; ++r) acc[r] += *reinterpret_cast<const v16u*>(w + r * n + i) * xv;
  }
  for (int r = 0; r < R; ++r) {
    float s = 0.f;
    for (int l = 0; l < 16; ++l) s += acc[r][l];
    for (int64_t t = i; t < n; ++t) s += w[r * n + t] * x[t];
    out[r] = s;
  }
}

void dot_rows_generic(const float* w, int64_t rows, int64_t n, const float* x, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    float s = 0.f;
    for (int64_t t = 0; t < n; ++t) s += w[r * n + t] * x[t];
    out[r] = s;
  }
}

// Rows [r0, r1) of y[s] = W x[s] + b for samples s < N; each block of rows
// is read once for all samples.
void linear_rows(const float* w, const float* b, const float* x, int64_t N, int64_t I,
                 int64_t O, int64_t r0, int64_t r1, float* y) {
  constexpr int64_t kRows = 4;  // rows per step: each input vector serves 4 rows
  const bool avx512 = has_avx512();
  float out[kRows];
  for (int64_t r = r0; r < r1; r += kRows) {
    const int64_t R = std::min(kRows, r1 - r);
    for (int64_t s = 0; s < N; ++s) {
      const float* xs = x + s * I;
      if (!avx512) {
        dot_rows_generic(w + r * I, R, I, xs, out);
      } else if (R == kRows) {
        dot_rows_avx512<kRows>(w + r * I, I, xs, out);
      } else {
        for (int64_t u = 0; u < R; ++u) dot_rows_avx512<1>(w + (r + u) * I, I, xs, out + u);
      }
      for (int64_t u = 0; u < R; ++u) y[s * O + r + u] = out[u] + (b ? b[r + u] : 0.f);
    }
  }
}

// The pool of a 4-D float32 CPU tensor with a non-empty map (checked by the
// callers below).
at::Tensor avg_pool_checked(const at::Tensor& x_in) {
  const at::Tensor x = x_in.contiguous();
  const int64_t planes = x.size(0) * x.size(1), P = x.size(2) * x.size(3);
  at::Tensor y = at::empty({x.size(0), x.size(1), 1, 1}, x.options());
  const float* p = x.data_ptr<float>();
  float* q = y.data_ptr<float>();
  // Sums in float64, rounded once: at least as close to the exact mean as
  // ATen's float32 cascade. Four partial sums: one chain of dependent adds
  // made the 512x7x7 head latency-bound.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / P);
  at::parallel_for(0, planes, grain, [&](int64_t a, int64_t e) {
    for (int64_t t = a; t < e; ++t) {
      const float* r = p + t * P;
      double s[4] = {0.0, 0.0, 0.0, 0.0};
      int64_t i = 0;
      for (; i + 4 <= P; i += 4)
        for (int u = 0; u < 4; ++u) s[u] += r[i + u];
      for (; i < P; ++i) s[0] += r[i];
      q[t] = static_cast<float>(((s[0] + s[1]) + (s[2] + s[3])) / static_cast<double>(P));
    }
  });
  return y;
}

// x @ w.T + b for float32 CPU tensors of matching shapes (b may be undefined;
// checked by the callers below).
at::Tensor linear_checked(const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& b_in) {
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
  const at::Tensor b = b_in.defined() ? b_in.contiguous() : b_in;
  const int64_t N = x.size(0), I = x.size(1), O = w.size(0);
  at::Tensor y = at::empty({N, O}, x.options());
  if (N == 0 || O == 0) return y;
  const float* wp = w.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Each thread reads a contiguous share of the weight's rows, once for all
  // samples; below 64k multiply-adds one thread does it all.
  const int64_t T = at::in_parallel_region() || N * I * O < (int64_t{1} << 16)
                        ? 1 : at::get_num_threads();
#pragma omp parallel num_threads(T)
  {
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t per = (O + nt - 1) / nt;
    const int64_t r0 = std::min(O, t * per), r1 = std::min(O, r0 + per);
    linear_rows(wp, bp, xp, N, I, O, r0, r1, yp);
  }
  return y;
}

}  // namespace

at::Tensor global_avg_pool2d_nchw(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 4, "global_avg_pool2d_nchw expects a 4-D input, got ", x.dim(),
                    "-D");
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, "global_avg_pool2d_nchw expects float32, got ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(x.device().is_cpu(), "global_avg_pool2d_nchw runs on CPU tensors");
  TORCH_CHECK_VALUE(x.size(2) * x.size(3) > 0, "global_avg_pool2d_nchw: empty spatial size");
  return avg_pool_checked(x);
}

at::Tensor linear_small_batch(const at::Tensor& x, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(x.dim() == 2, "linear_small_batch expects a 2-D input, got ", x.dim(), "-D");
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == x.size(1),
                    "linear_small_batch: weight must be [out, ", x.size(1), "], got ",
                    weight.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
                   "linear_small_batch expects float32 input and weight");
  TORCH_CHECK_VALUE(x.device().is_cpu() && weight.device().is_cpu(),
                    "linear_small_batch runs on CPU tensors");
  const at::Tensor b = bias.has_value() ? *bias : at::Tensor();
  TORCH_CHECK_VALUE(!b.defined() || (b.dim() == 1 && b.size(0) == weight.size(0) &&
                                     b.scalar_type() == at::kFloat && b.device().is_cpu()),
                    "linear_small_batch: bias must be float32 [", weight.size(0), "]");
  return linear_checked(x, weight, b);
}

// The modules' entry points: the op where it applies (float32 CPU tensors of
// the right rank, no gradient wanted, a small batch for the classifier), else
// None for the module to run PyTorch's (which also reports bad input). One
// native call in place of the Python checks, which at batch 1 run cold after
// the convs (~50 us of the classifier's ~100 inside ResNet-18).
namespace {
bool wants_grad(std::initializer_list<const at::Tensor*> ts) {
  if (!at::GradMode::is_enabled()) return false;
  for (const at::Tensor* t : ts)
    if (t->defined() && t->requires_grad()) return true;
  return false;
}
bool float32_cpu(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat && t.device().is_cpu();
}
}  // namespace

c10::optional<at::Tensor> head_avg_pool(const at::Tensor& x) {
  if (x.dim() != 4 || !float32_cpu(x) || x.size(2) * x.size(3) == 0 || wants_grad({&x}))
    return c10::nullopt;
  return avg_pool_checked(x);
}

c10::optional<at::Tensor> head_linear(const at::Tensor& x, const at::Tensor& weight,
                                      const c10::optional<at::Tensor>& bias, int64_t max_batch) {
  const at::Tensor b = bias.has_value() ? *bias : at::Tensor();
  if (x.dim() != 2 || x.size(0) > max_batch || weight.dim() != 2 ||
      weight.size(1) != x.size(1) || !float32_cpu(x) || !float32_cpu(weight) ||
      (b.defined() && (!float32_cpu(b) || b.dim() != 1 || b.size(0) != weight.size(0))) ||
      wants_grad({&x, &weight, &b}))
    return c10::nullopt;
  return linear_checked(x, weight, b);
}

}  // namespace dynprune
