// Max pooling of a contiguous NCHW float32 tensor, for dynprune.nn.MaxPool2d.
//
// PyTorch's NCHW CPU max-pool runs several times slower than its channels_last
// one, and the layout round trip to use that one costs two copies (ResNet-18's
// stem pool at batch 1: 3.75 ms NCHW, 0.93 ms through channels_last). Here,
// per output row: the max over the kernel's input rows, vectorised along the
// row, then the max over the kernel's columns. Padding never wins (as in
// PyTorch: it is -inf, not 0) and NaN propagates.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "gated_conv2d.h"
#include "output_pool.h"

namespace dynprune {
namespace {

// Slack after a padded row buffer: the vector column step reads up to 34
// floats past its last window's start (never stored).
constexpr int64_t kRowSlack = 40;

// a if it is larger or NaN, else b: PyTorch's NaN-propagating max.
inline float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

// PyTorch's NaN-propagating max (nan_max) on 16 lanes.
__attribute__((target("arch=x86-64-v4")))
inline __m512 nan_max16(__m512 a, __m512 b) {
  const __mmask16 take_a =
      _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ) | _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
  return _mm512_mask_blend_ps(take_a, b, a);
}

// The column step of a 3-wide, stride-2 window (ResNet's stem pool) in
// vectors: o[ow] = max(base[2ow], base[2ow + 1], base[2ow + 2]), the even and
// odd floats split out of two loads by permutes (GCC left the stride-2 loop
// scalar: the pool took 0.33 ms on ResNet-18's 64x112x112 stem output).
// base must be readable 34 floats past 2 * (Wo - 1) (kRowSlack).
__attribute__((target("arch=x86-64-v4")))
void cols_3s2_avx512(const float* base, int64_t Wo, float* o) {
  const __m512i even =
      _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  for (int64_t ow = 0; ow < Wo; ow += 16) {
    const float* p = base + 2 * ow;
    const __m512 a = _mm512_loadu_ps(p), b = _mm512_loadu_ps(p + 16);
    const __m512 c = _mm512_loadu_ps(p + 2), d = _mm512_loadu_ps(p + 18);
    __m512 r = _mm512_permutex2var_ps(a, even, b);
    r = nan_max16(_mm512_permutex2var_ps(a, odd, b), r);
    r = nan_max16(_mm512_permutex2var_ps(c, even, d), r);
    const int64_t n = std::min<int64_t>(16, Wo - ow);
    _mm512_mask_storeu_ps(o + ow, static_cast<__mmask16>(n == 16 ? 0xFFFFu : (1u << n) - 1), r);
  }
}

// rowmax: W + 2 * pw + kRowSlack floats; its pads stay -inf (set by the caller).
__attribute__((target_clones("arch=x86-64-v4", "default")))
void pool_plane(const float* in, int64_t H, int64_t W, int64_t kh, int64_t kw, int64_t sh,
                int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw, int64_t Ho,
                int64_t Wo, float* rowmax, float* out, bool vec_3s2) {
  float* rm = rowmax + pw;  // rm[-pw .. -1] and rm[W ..] are -inf padding
  for (int64_t oh = 0; oh < Ho; ++oh) {
    // Rows of this window inside the image (at least one: checked by the caller).
    const int64_t ih0 = oh * sh - ph;
    bool first = true;
    for (int64_t i = 0; i < kh; ++i) {
      const int64_t ih = ih0 + i * dh;
      if (ih < 0 || ih >= H) continue;
      const float* row = in + ih * W;
      if (first) {
        for (int64_t w = 0; w < W; ++w) rm[w] = row[w];
        first = false;
      } else {
        for (int64_t w = 0; w < W; ++w) rm[w] = nan_max(row[w], rm[w]);
      }
    }
    // Columns: branch-free over the padded row.
    float* o = out + oh * Wo;
    const float* base = rowmax;  // column ow * sw - pw + j * dw of rm
    if (vec_3s2) {
      cols_3s2_avx512(base, Wo, o);
      continue;
    }
    for (int64_t ow = 0; ow < Wo; ++ow) o[ow] = base[ow * sw];
    for (int64_t j = 1; j < kw; ++j) {
      const float* b = base + j * dw;
      if (sw == 1) {
        for (int64_t ow = 0; ow < Wo; ++ow) o[ow] = nan_max(b[ow], o[ow]);
      } else if (sw == 2) {
        for (int64_t ow = 0; ow < Wo; ++ow) o[ow] = nan_max(b[2 * ow], o[ow]);
      } else {
        for (int64_t ow = 0; ow < Wo; ++ow) o[ow] = nan_max(b[ow * sw], o[ow]);
      }
    }
  }
}

// The common 2x2 window with stride 2 (no padding, no dilation) over planes
// [p0, p1): output (p, oh, ow) is the max of a 2x2 square, with no row buffer
// and no per-row set-up, which dominate small maps (VGG's 4x4 and 2x2 pools:
// 16 or 4 outputs a plane).
__attribute__((target_clones("arch=x86-64-v4", "default")))
void pool2x2_planes(const float* in, int64_t p0, int64_t p1, int64_t H, int64_t W, int64_t Ho,
                    int64_t Wo, float* out) {
  for (int64_t p = p0; p < p1; ++p) {
    const float* plane = in + p * H * W;
    float* o = out + p * Ho * Wo;
    for (int64_t oh = 0; oh < Ho; ++oh, o += Wo) {
      const float* r0 = plane + 2 * oh * W;
      const float* r1 = r0 + W;
      for (int64_t ow = 0; ow < Wo; ++ow)
        o[ow] = nan_max(nan_max(r0[2 * ow], r0[2 * ow + 1]), nan_max(r1[2 * ow], r1[2 * ow + 1]));
    }
  }
}

}  // namespace

at::Tensor max_pool2d_nchw(const at::Tensor& x, std::vector<int64_t> kernel,
                           std::vector<int64_t> stride, std::vector<int64_t> padding,
                           std::vector<int64_t> dilation) {
  TORCH_CHECK_VALUE(x.dim() == 4 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
                    "max_pool2d_nchw expects a 4-D float32 CPU tensor, got ", x.dim(), "-D ",
                    x.scalar_type(), " on ", x.device());
  TORCH_CHECK_VALUE(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2 &&
                        dilation.size() == 2,
                    "kernel, stride, padding and dilation must have 2 elements each");
  const int64_t kh = kernel[0], kw = kernel[1], sh = stride[0], sw = stride[1];
  const int64_t ph = padding[0], pw = padding[1], dh = dilation[0], dw = dilation[1];
  TORCH_CHECK_VALUE(kh > 0 && kw > 0 && sh > 0 && sw > 0 && dh > 0 && dw > 0,
                    "kernel, stride and dilation must be positive");
  TORCH_CHECK_VALUE(ph >= 0 && pw >= 0 && 2 * ph <= kh && 2 * pw <= kw,
                    "padding must be non-negative and at most half the kernel size");
  const at::Tensor in = x.contiguous();
  const int64_t N = in.size(0), C = in.size(1), H = in.size(2), W = in.size(3);
  const int64_t Ho = out_size(H, kh, sh, ph, dh), Wo = out_size(W, kw, sw, pw, dw);
  TORCH_CHECK_VALUE(Ho > 0 && Wo > 0, "input ", H, "x", W, " is too small for the pooling window");
  at::Tensor y = empty_output({N, C, Ho, Wo}, in.options());
  const float* ip = in.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (kh == 2 && kw == 2 && sh == 2 && sw == 2 && ph == 0 && pw == 0 && dh == 1 && dw == 1) {
    // Planes in parallel only past ~64k input floats: below that, waking the
    // other thread costs more than it saves. Timed alone at batch 1, 2
    // threads: 7-16 us on VGG-16's five pools, against 19-32 us by the
    // general path. In the model (A/B, interleaved): 2-4% faster at batch
    // 16, unchanged at batch 1.
    const int64_t grain2 = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, H * W));
    at::parallel_for(0, N * C, grain2, [&](int64_t begin, int64_t end) {
      pool2x2_planes(ip, begin, end, H, W, Ho, Wo, yp);
    });
    return y;
  }
  const bool vec_3s2 = kw == 3 && sw == 2 && dw == 1 && has_avx512();
  // Planes in parallel; a grain of several planes keeps small maps on one thread.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, H * W));
  at::parallel_for(0, N * C, grain, [&](int64_t begin, int64_t end) {
    // The padded row reaches column (Wo - 1) * sw + (kw - 1) * dw - pw < W + pw.
    std::vector<float> rowmax(W + 2 * pw + kRowSlack, -INFINITY);
    for (int64_t p = begin; p < end; ++p)
      pool_plane(ip + p * H * W, H, W, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo, rowmax.data(),
                 yp + p * Ho * Wo, vec_3s2);
  });
  return y;
}

// dynprune.nn.MaxPool2d's entry: the pool above where it applies (a
// contiguous 4-D float32 CPU tensor, no gradient wanted, padding at most half
// the window), else None for the module's other routes. The module's
// arguments as nn.MaxPool2d holds them (ints or pairs; stride None or empty:
// the window). One native call in place of Python checks, which run cold
// after the stem conv at batch 1 (ResNet-18: ~30 us of the pool's ~150).
namespace {
bool as_pair(const pybind11::handle& v, std::vector<int64_t>& out) {
  if (PyLong_Check(v.ptr())) {
    const int64_t i = v.cast<int64_t>();
    out = {i, i};
    return true;
  }
  if (!PySequence_Check(v.ptr()) || PySequence_Size(v.ptr()) != 2) return false;
  out = v.cast<std::vector<int64_t>>();
  return true;
}
}  // namespace

pybind11::object max_pool2d_or_none(const at::Tensor& x, const pybind11::handle& kernel,
                                    const pybind11::handle& stride, const pybind11::handle& padding,
                                    const pybind11::handle& dilation) {
  if (x.dim() != 4 || x.scalar_type() != at::kFloat || !x.device().is_cpu() ||
      !x.is_contiguous() || (at::GradMode::is_enabled() && x.requires_grad()))
    return pybind11::none();
  std::vector<int64_t> k, s, p, d;
  const bool default_stride = stride.is_none() ||
                              (PySequence_Check(stride.ptr()) && PySequence_Size(stride.ptr()) == 0);
  if (!as_pair(kernel, k) || !(default_stride ? as_pair(kernel, s) : as_pair(stride, s)) ||
      !as_pair(padding, p) || !as_pair(dilation, d) || 2 * p[0] > k[0] || 2 * p[1] > k[1])
    return pybind11::none();
  return pybind11::cast(max_pool2d_nchw(x, k, s, p, d));
}

}  // namespace dynprune
