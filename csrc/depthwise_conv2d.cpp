// Depthwise 3x3 and 5x5 convolution (one filter per channel, padding K / 2,
// stride 1 or 2) of a contiguous NCHW float32 tensor, for dynprune.nn.Conv2dBN
// at eval.
//
// convert() leaves depthwise convs dense, and PyTorch's NCHW path for them is
// slow on CPU: inside a converted MobileNetV2 at batch 1 they took 43% of the
// time (5.7 of 13.4 ms: the model with them replaced by stored outputs ran in
// 7.7 ms). Per plane: a zero-padded copy (one buffer per run of planes on a
// thread, its zero border written once), then per output row and 16 columns
// the K x K taps as vector FMAs (stride 2: the even or odd columns picked out
// of two loads by a permute), bias first.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "gated_conv2d.h"
#include "output_pool.h"

namespace dynprune {
namespace {

// Columns a padded row holds past the image and its right padding: the last
// 16-column step reads up to 2 * 15 + 4 + 16 floats past its first column.
constexpr int64_t kSlack = 56;

// One plane: out = bias + the KxK taps over the zero-padded copy pad (rows of
// pw floats, image at row K/2, column K/2). AVX-512 only (the caller checks).
template <int K>
__attribute__((target("arch=x86-64-v4")))
void plane_kxk(const float* pad, int64_t pw, const float* w, float bias, int64_t stride,
               int64_t Ho, int64_t Wo, float* out) {
  const __m512i even =
      _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  __m512 wv[K * K];
  for (int t = 0; t < K * K; ++t) wv[t] = _mm512_set1_ps(w[t]);
  const __m512 b = _mm512_set1_ps(bias);
  for (int64_t oh = 0; oh < Ho; ++oh) {
    const float* r0 = pad + oh * stride * pw;
    float* o = out + oh * Wo;
    for (int64_t ow = 0; ow < Wo; ow += 16) {
      __m512 acc = b;
      for (int i = 0; i < K; ++i) {
        const float* p = r0 + i * pw + ow * stride;
        for (int j = 0; j < K; ++j) {
          __m512 v;
          if (stride == 1) {
            v = _mm512_loadu_ps(p + j);
          } else {  // column 2c + j of the step's 16 outputs c: even or odd floats of two loads
            const float* q = p + (j & ~1);
            v = _mm512_permutex2var_ps(_mm512_loadu_ps(q), (j & 1) ? odd : even,
                                       _mm512_loadu_ps(q + 16));
          }
          acc = _mm512_fmadd_ps(v, wv[K * i + j], acc);
        }
      }
      const int64_t n = std::min<int64_t>(16, Wo - ow);
      _mm512_mask_storeu_ps(o + ow, static_cast<__mmask16>(n == 16 ? 0xFFFFu : (1u << n) - 1),
                            acc);
    }
  }
}

}  // namespace

// dynprune.nn.Conv2dBN's entry: the convolution above where it applies (x a
// contiguous 4-D float32 CPU tensor with no gradient wanted, weight [C, 1, K,
// K] float32 with K 3 or 5 and C = x's channels = groups, bias [C] or None,
// stride 1 or 2, padding K / 2, dilation 1, AVX-512; in_idx None or int64
// [N, k] channel lists), else None for F.conv2d.
pybind11::object depthwise_or_none(const at::Tensor& x, const at::Tensor& weight,
                                   const c10::optional<at::Tensor>& bias, int64_t groups,
                                   std::vector<int64_t> stride, std::vector<int64_t> padding,
                                   std::vector<int64_t> dilation,
                                   const c10::optional<at::Tensor>& in_idx) {
  const bool grad = at::GradMode::is_enabled() &&
                    (x.requires_grad() || weight.requires_grad() ||
                     (bias && bias->requires_grad()));
  if (!has_avx512() || grad || x.dim() != 4 || x.scalar_type() != at::kFloat ||
      !x.device().is_cpu() || !x.is_contiguous() || weight.dim() != 4 ||
      weight.scalar_type() != at::kFloat || !weight.device().is_cpu() ||
      x.size(1) != groups || weight.size(0) != groups || weight.size(1) != 1 ||
      (weight.size(2) != 3 && weight.size(2) != 5) || weight.size(3) != weight.size(2) ||
      stride.size() != 2 || stride[0] != stride[1] || (stride[0] != 1 && stride[0] != 2) ||
      padding.size() != 2 || padding[0] != weight.size(2) / 2 || padding[1] != padding[0] ||
      dilation.size() != 2 || dilation[0] != 1 || dilation[1] != 1)
    return pybind11::none();
  if (bias && (bias->scalar_type() != at::kFloat || !bias->device().is_cpu() ||
               bias->numel() != groups))
    return pybind11::none();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), s = stride[0];
  const int64_t K = weight.size(2), P = K / 2;
  if (H < 1 || W < 1) return pybind11::none();  // (F.conv2d's errors and shapes)
  const int64_t Ho = out_size(H, K, s, P, 1), Wo = out_size(W, K, s, P, 1);
  // With in_idx (the kept channels a DynamicConv2d marked on x: every other
  // channel of x is exactly zero), a plane outside it is its bias alone.
  std::vector<uint8_t> read;  // empty: every plane is read
  if (in_idx) {
    read.assign(N * C, 0);
    const at::Tensor& ii = *in_idx;
    if (ii.scalar_type() != at::kLong || !ii.device().is_cpu() || ii.dim() != 2 ||
        ii.size(0) != N)
      return pybind11::none();
    const at::Tensor ic = ii.contiguous();
    const int64_t* ip = ic.data_ptr<int64_t>();
    for (int64_t n = 0; n < N; ++n)
      for (int64_t j = 0; j < ic.size(1); ++j) {
        const int64_t c = ip[n * ic.size(1) + j];
        if (c < 0 || c >= C) return pybind11::none();
        read[n * C + c] = 1;
      }
  }
  at::Tensor y = empty_output({N, C, Ho, Wo}, x.options());
  if (N * C == 0) return pybind11::cast(y);
  const at::Tensor wc = weight.contiguous();
  const at::Tensor bc = bias ? bias->contiguous() : at::Tensor();
  const float* xp = x.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  const float* bp = bias ? bc.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  // Padded rows: P + W + P columns plus the slack the last step reads; rows
  // P + H + P, plus one more that stride 2 may touch below the image.
  const int64_t pw = W + 2 * P + kSlack, ph = H + 2 * P + 1;
  // Planes in parallel; a grain of several planes keeps small maps on one thread.
  const int64_t grain = std::max<int64_t>(1, 16384 / (H * W));
  at::parallel_for(0, N * C, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> pad(ph * pw, 0.f);  // borders stay zero: only the image is rewritten
    for (int64_t p = begin; p < end; ++p) {
      const int64_t c = p % C;
      const float bias_c = bp ? bp[c] : 0.f;
      float* out = yp + p * Ho * Wo;
      if (!read.empty() && !read[p]) {
        std::fill_n(out, Ho * Wo, bias_c);
        continue;
      }
      const float* in = xp + p * H * W;
      for (int64_t r = 0; r < H; ++r) std::copy_n(in + r * W, W, pad.data() + (r + P) * pw + P);
      if (K == 3)
        plane_kxk<3>(pad.data(), pw, wp + c * 9, bias_c, s, Ho, Wo, out);
      else
        plane_kxk<5>(pad.data(), pw, wp + c * 25, bias_c, s, Ho, Wo, out);
    }
  });
  return pybind11::cast(y);
}

}  // namespace dynprune
