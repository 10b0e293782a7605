// Output-channel-vector form of the float32 sparse convolution (AVX-512).
//
// The pixel-vector tile (microkernel.h) wastes lanes on small maps: a 14x14
// map fills 196 of its 256 lanes, a 9x9 map 81 of 128. Here a register holds
// 16 kept output channels of one pixel (cout_tile.h), so every lane is a kept
// channel but in the last 32. The price is a per-sample copy of the kept
// weights into that layout (pack_chunk), paid once per sample and amortised
// over its pixels: it is the reason this form only runs where
// cout_vector_pays says so.
#include "cout_vector.h"

#include <immintrin.h>

#include <algorithm>

#include "cout_tile.h"
#include "microkernel.h"

namespace dynprune {
namespace {

// The packing prefetches the weight rows of the kept input channel this many
// ahead (also across chunks). A/B, interleaved with the dense conv and masking
// as the bench does, dyn/static without vs with: 256x14x14 at batch 16
// 1.43 -> 1.32 and 1.33 -> 1.27, 256x9x9 1.72 -> 1.58, 128x16x16 1.17 -> 1.05;
// at batch 1 256x14x14 0.96 -> 0.80 and 0.94 -> 0.84, 128x28x28 0.88 -> 0.80.
// (8 ahead: within 3% of 4.) The rows are out of cache after other layers ran.
constexpr int64_t kPackPrefetch = 4;

int64_t padded_k(int64_t k) { return (k + kCoutTile - 1) / kCoutTile * kCoutTile; }

// In-register transpose of 16 rows of 16 floats: r[u][t] -> r[t][u]. Four
// rounds of 16 shuffles (ps pairs, pd pairs, then 128-bit lanes twice).
__attribute__((target("arch=x86-64-v4"))) inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {  // t[2i] = a0 b0 a1 b1 per 128-bit lane; t[2i+1] = a2 b2 a3 b3
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // r[4i+k]: element 4l+k of rows 4i..4i+3 in lane l
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int k = 0; k < 4; ++k) {  // gather lane l of the four row groups: element k + 4l
    const __m512 u0 = _mm512_shuffle_f32x4(r[k], r[4 + k], 0x88);
    const __m512 u1 = _mm512_shuffle_f32x4(r[k], r[4 + k], 0xdd);
    const __m512 u2 = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0x88);
    const __m512 u3 = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0xdd);
    t[k] = _mm512_shuffle_f32x4(u0, u2, 0x88);
    t[k + 8] = _mm512_shuffle_f32x4(u0, u2, 0xdd);
    t[k + 4] = _mm512_shuffle_f32x4(u1, u3, 0x88);
    t[k + 12] = _mm512_shuffle_f32x4(u1, u3, 0xdd);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// 1x1 kernels: the 32 rows' weights of kept inputs [i0, i1), one 16-channel
// window at a time: whole-line row loads and a transpose per 16 rows, then the
// kept channels' vectors stored (a gather per kept channel waited on 16
// scattered lines; these loads stream along each row). Returns dst past them.
__attribute__((target("arch=x86-64-v4")))
float* pack_windows_1x1(const float* weight, int64_t Cin, const CoutSample& s,
                        const int32_t* rows, __mmask16 m0, __mmask16 m1, int64_t i0, int64_t i1,
                        float* dst) {
  alignas(64) float block[2][kLanes][kLanes];
  for (int64_t i = i0; i < i1;) {
    const int64_t c0 = s.in_off[i] / kLanes * kLanes;
    const __mmask16 cols =
        Cin - c0 >= kLanes ? 0xFFFF : static_cast<__mmask16>((1u << (Cin - c0)) - 1);
    for (int h = 0; h < 2; ++h) {
      const __mmask16 m = h ? m1 : m0;
      __m512 r[kLanes];
      for (int u = 0; u < kLanes; ++u)
        r[u] = _mm512_maskz_loadu_ps((m >> u) & 1 ? cols : 0, weight + rows[h * kLanes + u] + c0);
      transpose16(r);  // r[c]: the 16 rows' weights of input channel c0 + c
      for (int c = 0; c < kLanes; ++c) _mm512_store_ps(block[h][c], r[c]);
    }
    for (; i < i1 && s.in_off[i] < c0 + kLanes; ++i, dst += kCoutTile) {
      _mm512_storeu_ps(dst, _mm512_load_ps(block[0][s.in_off[i] - c0]));
      _mm512_storeu_ps(dst + kLanes, _mm512_load_ps(block[1][s.in_off[i] - c0]));
    }
  }
  return dst;
}

// Kept inputs [i0, i1) of a sample's weights for channel tiles [v0, v1), in
// the tile's layout: weight (out_ch[v*32 + u], in_ch[i], t) at
// dst[(((v - v0)*(i1 - i0) + i - i0)*taps + t)*32 + u], zero for u past k.
// Per 16 rows and input channel: 16 loads of the channel's taps and a
// transpose (3x3), or one gather per tap (other kernels).
__attribute__((target("arch=x86-64-v4")))
void pack_chunk(const float* weight, const Geometry& g, const CoutSample& s, int64_t v0,
                int64_t v1, int64_t i0, int64_t i1, float* dst) {
  const int64_t taps = g.kh * g.kw, row_len = g.Cin * taps;
  // 3x3 (up to 16 taps): masked row loads and a transpose. A/B, interleaved
  // with the dense conv, gathers/this: 256x14x14 at batch 16 1.076 and 1.045,
  // 128x16x16 1.02 and 1.01, 128x28x28 and batch 1 within +-1.5%. 1x1
  // kernels transpose 16-channel windows instead (pack_windows_1x1). A/B,
  // interleaved with the dense conv, old/new time: 1024->256 on 14x14 1.21 at
  // batch 16 (dyn/static 1.71 -> 1.42) and 1.20 at batch 1; 256->1024 1.02;
  // software prefetch of the next windows on top: 0.97-0.98. Other tap counts
  // keep the gathers.
  const bool use_transpose = taps >= 9 && taps <= kLanes;
  for (int64_t v = v0; v < v1; ++v) {
    int32_t rows[kCoutTile];  // int32 offsets: cout_vector_pays bounds the weight size
    for (int u = 0; u < kCoutTile; ++u) {
      const int64_t j = v * kCoutTile + u;
      rows[u] = static_cast<int32_t>(j < s.k ? s.out_ch[j] * row_len : 0);
    }
    const int64_t left = s.k - v * kCoutTile;
    const __mmask16 m0 = left >= kLanes ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
    const __mmask16 m1 = left >= kCoutTile ? 0xFFFF
                         : left <= kLanes  ? 0
                                           : static_cast<__mmask16>((1u << (left - kLanes)) - 1);
    if (taps == 1) {
      dst = pack_windows_1x1(weight, g.Cin, s, rows, m0, m1, i0, i1, dst);
      continue;
    }
    const __m512i r0 = _mm512_loadu_si512(rows), r1 = _mm512_loadu_si512(rows + kLanes);
    for (int64_t i = i0; i < i1; ++i) {
      const float* base = weight + s.in_off[i];
      if (i + kPackPrefetch < s.kin) {  // 32 rows' lines per channel: fetch them early
        const float* ahead = weight + s.in_off[i + kPackPrefetch];
        for (int u = 0; u < kCoutTile; ++u)
          _mm_prefetch(reinterpret_cast<const char*>(ahead + rows[u]), _MM_HINT_T0);
      }
      if (use_transpose) {
        // Each row's taps of channel i are contiguous: 16 masked row loads and
        // a transpose per 16 channels, instead of one gather per tap.
        const __mmask16 tapmask = static_cast<__mmask16>((1u << taps) - 1);
        for (int h = 0; h < 2; ++h) {
          const __mmask16 m = h ? m1 : m0;
          __m512 r[kLanes];
          for (int u = 0; u < kLanes; ++u)
            r[u] = _mm512_maskz_loadu_ps((m >> u) & 1 ? tapmask : 0, base + rows[h * kLanes + u]);
          transpose16(r);
          for (int64_t t = 0; t < taps; ++t) _mm512_storeu_ps(dst + t * kCoutTile + h * kLanes, r[t]);
        }
        dst += taps * kCoutTile;
        continue;
      }
      for (int64_t t = 0; t < taps; ++t, dst += kCoutTile) {
        _mm512_storeu_ps(dst, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m0, r0, base + t, 4));
        _mm512_storeu_ps(dst + kLanes,
                         _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m1, r1, base + t, 4));
      }
    }
  }
}

// acc[v - v0][pixel][0:32] (+)= the sums over kept inputs [i0, i1), for
// channel tiles v in [v0, v1), in tiles of up to kCoutPixels pixels.
__attribute__((target("arch=x86-64-v4")))
void sum_chunk(const float* wpack, const Geometry& g, const CoutSample& s, int64_t v0,
               int64_t v1, int64_t i0, int64_t i1, bool first, float* acc) {
  const int64_t taps = g.kh * g.kw, plane = g.Ho * g.Wo;
  // Tiles: R rows of P pixels, a row split into near-equal segments.
  const int64_t segments = (g.Wo + kCoutPixels - 1) / kCoutPixels;
  const int64_t P = (g.Wo + segments - 1) / segments;
  const int64_t R = std::max<int64_t>(1, std::min<int64_t>(g.Ho, kCoutPixels / P));
  CoutTileArgs a;
  a.xs = s.xs + i0;
  a.ci = i1 - i0;
  a.tap_off = s.tap_off;
  a.taps = taps;
  a.row_step = s.Wph;
  a.acc_row = g.Wo * kCoutTile;
  for (int64_t v = v0; v < v1; ++v) {
    a.wpk = wpack + (v - v0) * (i1 - i0) * taps * kCoutTile;
    float* acc_v = acc + (v - v0) * plane * kCoutTile;
    for (int64_t oh = 0; oh < g.Ho; oh += R) {
      const int r = static_cast<int>(std::min(R, g.Ho - oh));
      for (int64_t ow = 0; ow < g.Wo; ow += P) {
        const int p = static_cast<int>(std::min(P, g.Wo - ow));
        a.q0 = oh * s.Wph + ow;
        a.acc = acc_v + (oh * g.Wo + ow) * kCoutTile;
        cout_tile_fn(r, p)(a, first);
      }
    }
  }
}

// Epilogue of 16 kept channels j..j+15 (fewer at the end of the kept list):
// the accumulators of pixel q are 16 consecutive floats at src + q*32. Per 16
// pixels: the epilogue on 16 vectors (one per pixel, a channel per lane), a
// transpose, and 16 row stores. Branch-free: the scalar loop this replaced
// (finish_value per value, reading every 32nd float) spent 22% of a 256x14x14
// batch-16 call with ReLU in mispredicted sign branches (perf). A/B against one
// scatter per pixel (the first vector form), scatter/this time: 1.02-1.08 on
// 256x14x14, 128x28x28 and 128x16x16 at batch 16 and 1, with and without ReLU.
__attribute__((target("arch=x86-64-v4")))
void finish_lanes(const CoutSample& s, int64_t j, int64_t plane, Epilogue ep, const float* src,
                  float* y_n) {
  // With a residual, the ReLU comes after the add, on the transposed rows.
  const bool relu_lanes = ep.relu && ep.res == nullptr;
  const int64_t left = std::min<int64_t>(kLanes, s.k - j);
  const __mmask16 m = static_cast<__mmask16>((1u << left) - 1);
  const __m512 bias = _mm512_maskz_loadu_ps(m, s.bias + j);
  const __m512 scale = _mm512_maskz_loadu_ps(m, s.scale + j);
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t q0 = 0; q0 < plane; q0 += kLanes) {
    const int n = static_cast<int>(std::min<int64_t>(kLanes, plane - q0));
    __m512 r[kLanes];
    for (int p = 0; p < kLanes; ++p) {
      // finish_value's formula: act(scale * (conv + bias)); v < 0 is false
      // for NaN, so ReLU keeps NaN as torch.relu does. Pixels past the plane
      // are never stored.
      __m512 v = p < n ? _mm512_loadu_ps(src + (q0 + p) * kCoutTile) : zero;
      v = _mm512_mul_ps(_mm512_add_ps(v, bias), scale);
      if (relu_lanes) v = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, zero, _CMP_LT_OQ), v, zero);
      r[p] = v;
    }
    transpose16(r);  // r[u]: channel j + u at pixels q0..q0+15
    const __mmask16 mq = static_cast<__mmask16>((1u << n) - 1);
    for (int u = 0; u < left; ++u) {
      __m512 v = r[u];
      if (ep.res) {
        const float* res = ep.res + s.out_ch[j + u] * plane + q0;
        v = _mm512_add_ps(rounded(v), _mm512_maskz_loadu_ps(mq, res));
        if (ep.relu) v = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, zero, _CMP_LT_OQ), v, zero);
      }
      _mm512_mask_storeu_ps(y_n + s.out_ch[j + u] * plane + q0, mq, v);
    }
  }
}

}  // namespace

bool cout_vector_pays(const Geometry& g, int64_t k, double pixel_fill) {
  // Gather offsets are int32.
  if (g.Cout * g.Cin * g.kh * g.kw >= (int64_t{1} << 31) || k == 0) return false;
  // Where the pixel form leaves over 10% of its lanes idle, the map has 81
  // pixels or more to pay for the packing, and kept channels fill 90% of the
  // channel lanes. A/B (interleaved, keep 0.5), dyn/static, pixel form vs this:
  //   batch 16, faster: 256x14x14 1.41 vs 1.32, 128x16x16 1.37 vs 1.26,
  //     256x9x9 1.65 vs 1.54, 128x28x28 1.21 vs 1.18 (0.98 vs 0.90 at keep 0.75);
  //   batch 1, faster: 256x14x14 1.02 vs 0.90, 128x28x28 0.94 vs 0.87,
  //     128x16x16 1.04 vs 0.84, 256x9x9 1.03 vs 0.86;
  //   equal: 256x8x8 1.75 vs 1.74 (batch 16), 0.95 vs 0.92 (batch 1), and
  //     slower in VGG-16 at batch 1 (268 vs 256 us a layer), hence 81 pixels;
  //   slower: 512x7x7 1.71 vs 1.86 and 512x4x4 2.85 vs 3.04 at batch 16 (the
  //     packing outweighs 49 or 16 pixels of FMAs; still 2.05 vs 2.20 and
  //     3.15 vs 3.19 with the transposed packing, session 6), 64x56x56 1.10
  //     vs 1.17 and 64x32x32 1.14 vs 1.18 (the pixel form fills 96% and 94%
  //     of its lanes there), k = 16 (0.99 vs 1.53).
  const int64_t plane = g.Ho * g.Wo;
  return plane >= 81 && pixel_fill < 0.9 && 10 * k >= 9 * padded_k(k);
}

int64_t cout_pack_floats(const Geometry& g, int64_t k) {
  return padded_k(k) * channels_per_chunk(g.kh * g.kw) * g.kh * g.kw;
}

int64_t cout_acc_floats(const Geometry& g, int64_t k) { return padded_k(k) * g.Ho * g.Wo; }

int64_t cout_tiles(int64_t k) { return padded_k(k) / kCoutTile; }

int64_t cout_tile_channels(int64_t k, int64_t v) {
  return std::min<int64_t>(k - v * kCoutTile, kCoutTile);
}

void cout_vector_tiles(const float* weight, const Geometry& g, const CoutSample& s, int64_t v0,
                       int64_t v1, Epilogue ep, float* y_n, float* pack, float* acc) {
  const int64_t plane = g.Ho * g.Wo, chunk = channels_per_chunk(g.kh * g.kw);
  if (s.kin == 0) std::fill_n(acc, (v1 - v0) * kCoutTile * plane, 0.f);
  for (int64_t i0 = 0; i0 < s.kin; i0 += chunk) {
    const int64_t i1 = std::min(s.kin, i0 + chunk);
    pack_chunk(weight, g, s, v0, v1, i0, i1, pack);
    sum_chunk(pack, g, s, v0, v1, i0, i1, i0 == 0, acc);
  }
  for (int64_t v = v0; v < v1; ++v)
    for (int64_t j = v * kCoutTile; j < std::min(s.k, (v + 1) * kCoutTile); j += kLanes)
      finish_lanes(s, j, plane, ep, acc + (v - v0) * plane * kCoutTile + j % kCoutTile, y_n);
}

}  // namespace dynprune
