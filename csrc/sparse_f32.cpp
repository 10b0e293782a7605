// The float32 sparse convolution behind gated_conv2d and dynamic_conv2d.
//
// One OpenMP region per call, in phases separated by the implicit barriers of
// `omp for`:
//   A1  per (sample, input channel): channel mean (for the gate, in float64),
//       whether the channel holds any non-zero value, and, if the kernel
//       reads it, its copy into the wide grid (1x1 convs read most planes in
//       place; batches that compute the gate first copy after it)
//   A2  per block of 3 gate rows: saliency (gate_rows), for all samples or
//       for one sample at a time
//   A3  per sample: top-k selection, kept input channels, epilogue constants
//   A4  per (sample, output channel): zeros in the pruned output rows
//   B   the register-tiled GEMM over work items (see microkernel.h)
// Nothing in the region throws: all validation happens before it.
#include <immintrin.h>
#include <omp.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <numeric>
#include <vector>

#include "gated_conv2d.h"
#include "cout_vector.h"
#include "microkernel.h"

namespace dynprune {

bool has_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                          std::getenv("DYNPRUNE_DISABLE_AVX512") == nullptr;
  return yes;
}

namespace {

// ---------------------------------------------------------------- wide grid
//
// The kept input channels of a sample are copied once into a zero-padded
// buffer, split into stride phases: phase (py, px) of channel i holds padded
// pixels (py + sh*a, px + sw*b). Output pixel (oh, ow) is computed at "wide"
// position q = oh*Wph + ow, and tap (r, s) then reads element q + tap_off[t]
// of the channel: consecutive q read consecutive floats for any stride and
// dilation. Positions with ow >= Wo are junk and never stored. Small maps
// use one of two other layouts instead, whose wide positions are the output
// pixels (no junk): column-shifted copies (use_shifted) or one copy per tap
// (use_tap_copies).

struct Wide {
  int64_t Hph, Wph, chan;         // phase plane size; floats per channel (all phases)
  std::vector<char> phase_used;   // phases some tap reads (1x1 stride 2 reads one of 4)
  int64_t Q, qblocks, len_extra;  // wide positions, blocks, buffer slack
  std::vector<int64_t> tap_off;
  bool sep3x3;                    // 3x3 taps at r * row_step + s * col_step (stride 1,
                                  // or tap copies at any stride)
  int64_t row_step, col_step;
  bool shifted;                   // the column-shifted layout below
  bool tap_copies;                // the tap-copy layout below (small outputs that the
                                  // shifted one does not take: strided, unpadded)
  bool tail;                      // last pixel by the tail (tail_fits: shifted or tap
                                  // copies with taps <= 16, or 1x1 kernels)
  std::vector<uint16_t> shift_masks;  // shifted: per copy s, per 16 pixels of the
                                      // plane, the lanes whose source column exists
  std::vector<int32_t> tap_src;       // tap copies: per vector of the copies, the
  std::vector<uint16_t> tap_masks;    // plane offset of each lane and the lanes that
                                      // have one (the rest are padding: 0)
};

// A single-block map of 16m + 1 wide positions (7x7: 49) leaves its last
// pixel to a "tail" (microkernel.h): m vectors instead of m + 1. q: the
// map's wide positions. m = 0 too: a one-pixel output (a 1x1 map, or 2x2 at
// stride 2) is the tail alone, where one vector would fill 1 lane of 16.
// A/B, old/new time: 512->512 1x1 on 1x1 1.69 (batch 16) and 1.47 (batch 1),
// 3x3 on 1x1 2.01 and 1.38, 256->256 1x1 stride 2 on 2x2 1.43 (batch 16).
bool tail_fits(int64_t q, int64_t taps) {
  return q <= kQBlock && q % kLanes == 1 && taps <= kLanes;
}
bool has_tail(const Geometry& g) { return tail_fits(g.Ho * g.W, g.kh * g.kw); }

// 16-lane vectors the register tiles sweep over q wide positions (blocks of
// kQBlock, the last one partial).
int64_t tile_vectors(int64_t q) {
  return q / kQBlock * (kQBlock / kLanes) + (q % kQBlock + kLanes - 1) / kLanes;
}

// Small stride-1 maps whose width the padding keeps (Wo == W) use a
// "shifted" layout instead: per channel, kw copies of the rows (zero rows
// above and below), copy s holding column ow + s*dw - pw at column ow. Wide
// positions are then the output pixels themselves (q = oh*W + ow, no junk
// columns), and tap (r, s) reads copy s at q + r*dh*W: a 4x4 map fills 16 of
// 16 lanes instead of 16 of 32, an 8x8 map 64 of 64 instead of 64 of 80.
// Used where it saves at least 10% of the vectors (counting the tail pixel,
// which 7x7 maps need it for) and the map fits one block, or (multi_block)
// with any number of blocks. A/B, old/new time:
// 512x4x4 1.17-1.22 (batch 1), 1.11-1.18 (batch 16); 256x8x8 1.20 and
// 1.12-1.18; VGG-16 at batch 1 1.06-1.07, batch 16 1.07. Larger maps measured
// slower at batch 16 (128x16x16 0.89, 96x20x20 0.92, 64x32x32 5x5 0.72: the
// copies' footprint, and 16x16 lost the output-channel form), though 1.04-1.05
// faster at batch 1. (Session 13 revisits multi-block maps: make_wide's
// caller.)
bool use_shifted(const Geometry& g, bool tail_ok, bool multi_block) {
  if (g.sh != 1 || g.sw != 1 || g.kw < 2 || g.Wo != g.W) return false;
  const int64_t Wp = g.W + 2 * g.pw;
  const int64_t q = g.Ho * g.W;
  const int64_t tight = tile_vectors(q) - (tail_ok && has_tail(g) ? 1 : 0);
  const int64_t padded = tile_vectors(g.Ho * Wp);
  return (q <= kQBlock || multi_block) && tight * 10 <= padded * 9;
}

// Outputs of at most one block that the shifted layout does not cover
// (stride 2, or a width the padding does not keep) can take a "tap-copy"
// layout: per kept channel and tap, the Ho x Wo inputs that tap reads, as one
// run of floats. Wide positions are the output pixels (no junk columns),
// tap t reads its copy at t * run, and 3x3 kernels keep the unrolled tile
// (row_step = 3 runs, col_step = 1 run). A 4x4 output from 7x7 at stride 2
// fills 16 of 16 lanes instead of 16 of 32; 7x7 from 14x14 takes 3 vectors
// and the tail instead of 4. Used for kernels of 2-9 taps, where it saves at
// least 10% of the vectors (the copies hold taps x the output per channel,
// the padded phases about 4x the output; larger kernels are not measured).
// A/B, old/new time: 512->512 3x3 stride 2 on 7x7 1.52-1.61
// (batch 16), 1.30-1.32 (batch 1); 256->512 on 14x14 1.07-1.15 and
// 1.08-1.11, with every input kept and keep 0.637 (ResNet-18's layer4.0.conv1)
// 1.13-1.14 and 1.11; 512->512 on 14x14 1.045 (batch 1); small layers
// (32->64 on 16x16, 128->256 on 14x14, 64->128 on 8x8 at batch 1) 0.97-1.02;
// ResNet-20 and ResNet-56 at batch 1 0.985-1.00, ResNet-18 1.00-1.03.
bool use_tap_copies(const Geometry& g, bool tail_ok) {
  const int64_t taps = g.kh * g.kw, q = g.Ho * g.Wo;
  if (taps < 2 || taps > 9 || q > kQBlock || q == 0) return false;
  if (g.H * g.W > INT32_MAX) return false;  // the gathers' offsets are int32
  const int64_t Wph = (g.W + 2 * g.pw + g.sw - 1) / g.sw;
  const int64_t tight = tile_vectors(q) - (tail_ok && tail_fits(q, taps) ? 1 : 0);
  return tight * 10 <= tile_vectors(g.Ho * Wph) * 9;
}

Wide make_wide(const Geometry& g, bool tail_ok, bool multi_block) {
  Wide w;
  w.shifted = use_shifted(g, tail_ok, multi_block);
  w.tap_copies = !w.shifted && use_tap_copies(g, tail_ok);
  w.tail = false;
  if (w.tap_copies) {
    const int64_t taps = g.kh * g.kw;
    w.Hph = g.Ho;
    w.Wph = g.Wo;  // wide position q = oh * Wo + ow: every one valid
    w.Q = g.Ho * g.Wo;
    w.qblocks = 1;
    const int64_t run = (w.Q + kLanes - 1) / kLanes * kLanes;  // a copy, padded to vectors
    w.chan = taps * run;
    for (int64_t t = 0; t < taps; ++t) w.tap_off.push_back(t * run);
    w.row_step = g.kw * run;
    w.col_step = run;
    w.sep3x3 = g.kh == 3 && g.kw == 3;
    w.tail = tail_ok && tail_fits(w.Q, taps);
    w.phase_used.assign(1, 1);
    w.len_extra = 1;
    // Where each float of the copies reads the plane (fill_tap_copies): copy
    // t = (r, s) holds, at oh * Wo + ow, the pixel tap t reads for output
    // (oh, ow); floats without one (padding, or past Ho * Wo) stay 0.
    w.tap_src.assign(w.chan, 0);
    w.tap_masks.assign(w.chan / kLanes, 0);
    for (int64_t r = 0; r < g.kh; ++r)
      for (int64_t s = 0; s < g.kw; ++s)
        for (int64_t oh = 0; oh < g.Ho; ++oh) {
          const int64_t ih = oh * g.sh + r * g.dh - g.ph;
          if (ih < 0 || ih >= g.H) continue;
          for (int64_t ow = 0; ow < g.Wo; ++ow) {
            const int64_t iw = ow * g.sw + s * g.dw - g.pw;
            if (iw < 0 || iw >= g.W) continue;
            const int64_t e = (r * g.kw + s) * run + oh * g.Wo + ow;
            w.tap_src[e] = static_cast<int32_t>(ih * g.W + iw);
            w.tap_masks[e / kLanes] |= static_cast<uint16_t>(1u << (e % kLanes));
          }
        }
    return w;
  }
  if (w.shifted) {
    w.tail = tail_ok && has_tail(g);
    w.Hph = g.H + 2 * g.ph;
    w.Wph = g.W;
    w.chan = g.kw * w.Hph * w.Wph;
    w.Q = g.Ho * w.Wph;
    w.qblocks = (w.Q + kQBlock - 1) / kQBlock;
    w.phase_used.assign(1, 1);
    int64_t max_off = 0;
    for (int64_t r = 0; r < g.kh; ++r)
      for (int64_t s = 0; s < g.kw; ++s) {
        w.tap_off.push_back(s * w.Hph * w.Wph + r * g.dh * w.Wph);
        max_off = std::max(max_off, w.tap_off.back());
      }
    w.row_step = g.dh * w.Wph;
    w.col_step = w.Hph * w.Wph;
    w.sep3x3 = g.kh == 3 && g.kw == 3;
    w.len_extra = std::max<int64_t>(0, w.qblocks * kQBlock + max_off - w.chan) + 1;
    // Per copy s, per 16 floats of the copy (zero rows included), the lanes
    // whose source pixel exists.
    const int64_t len = w.Hph * w.Wph, vecs = (len + kLanes - 1) / kLanes, top = g.ph * g.W;
    w.shift_masks.assign(g.kw * vecs, 0);
    for (int64_t s = 0; s < g.kw; ++s) {
      const int64_t c0 = s * g.dw - g.pw;
      for (int64_t q = top; q < top + g.H * g.W; ++q) {
        const int64_t col = (q - top) % g.W + c0;
        if (col >= 0 && col < g.W)
          w.shift_masks[s * vecs + q / kLanes] |= static_cast<uint16_t>(1u << (q % kLanes));
      }
    }
    return w;
  }
  const int64_t Hp = g.H + 2 * g.ph, Wp = g.W + 2 * g.pw;
  w.Hph = (Hp + g.sh - 1) / g.sh;
  w.Wph = (Wp + g.sw - 1) / g.sw;
  w.chan = g.sh * g.sw * w.Hph * w.Wph;
  w.Q = g.Ho * w.Wph;
  w.qblocks = (w.Q + kQBlock - 1) / kQBlock;
  int64_t max_off = 0;
  w.phase_used.assign(g.sh * g.sw, 0);
  for (int64_t r = 0; r < g.kh; ++r) {
    for (int64_t s = 0; s < g.kw; ++s) {
      const int64_t a = r * g.dh, b = s * g.dw;
      const int64_t phase = (a % g.sh) * g.sw + b % g.sw;
      w.phase_used[phase] = 1;
      const int64_t off = phase * w.Hph * w.Wph + (a / g.sh) * w.Wph + b / g.sw;
      w.tap_off.push_back(off);
      max_off = std::max(max_off, off);
    }
  }
  w.row_step = g.dh * w.Wph;
  w.col_step = g.dw;
  w.sep3x3 = g.kh == 3 && g.kw == 3 && g.sh == 1 && g.sw == 1;
  // 1x1 kernels take the tail on this grid too (tail_dot in microkernel.h):
  // 7x7 outputs, stride 1 or 2. A/B, old/new time: 512x7x7 1x1 1.12 (batch
  // 1), 1.08 (batch 16); 256->512 stride 2 at 14x14 1.07 and 1.075.
  w.tail = tail_ok && g.kh * g.kw == 1 && tail_fits(w.Q, 1);
  // Junk positions of the last block may read past the last channel.
  w.len_extra = std::max<int64_t>(0, w.qblocks * kQBlock + max_off - w.chan) + 1;
  return w;
}

// Copies one H x W input plane into its wide-grid slot (w.chan floats).
// Inline loops, not memset/memmove calls per row (GCC would emit them): the
// pads are a pixel or two wide, and short rows dominate small layers.
__attribute__((target_clones("arch=x86-64-v4", "default"), optimize("no-tree-loop-distribute-patterns")))
void fill_wide_channel(const float* src, const Geometry& g, const Wide& w, float* dst) {
  for (int64_t py = 0; py < g.sh; ++py) {
    for (int64_t px = 0; px < g.sw; ++px) {
      if (!w.phase_used[py * g.sw + px]) continue;
      float* d = dst + (py * g.sw + px) * w.Hph * w.Wph;
      // Columns b with 0 <= px + sw*b - pw < W come from x; the rest are padding.
      const int64_t c0 = px - g.pw;
      const auto [b_lo, b_hi] = valid_columns(c0, g.sw, g.W, w.Wph);
      for (int64_t a = 0; a < w.Hph; ++a, d += w.Wph) {
        const int64_t ih = py + g.sh * a - g.ph;
        if (ih < 0 || ih >= g.H) {
          for (int64_t b = 0; b < w.Wph; ++b) d[b] = 0.f;
          continue;
        }
        const float* row = src + ih * g.W + c0;
        for (int64_t b = 0; b < b_lo; ++b) d[b] = 0.f;
        if (g.sw == 1) {
          for (int64_t b = b_lo; b < b_hi; ++b) d[b] = row[b];
        } else {
          for (int64_t b = b_lo; b < b_hi; ++b) d[b] = row[b * g.sw];
        }
        for (int64_t b = b_hi; b < w.Wph; ++b) d[b] = 0.f;
      }
    }
  }
}

// Copies one H x W input plane into its shifted-layout slot (see use_shifted).
__attribute__((target_clones("arch=x86-64-v4", "default"),
               optimize("no-tree-loop-distribute-patterns")))
void fill_shifted_channel(const float* src, const Geometry& g, const Wide& w, float* dst) {
  for (int64_t s = 0; s < g.kw; ++s) {
    const int64_t c0 = s * g.dw - g.pw;  // input column of output column 0
    const auto [b_lo, b_hi] = valid_columns(c0, 1, g.W, g.W);
    float* d = dst + s * w.Hph * w.Wph;
    for (int64_t a = 0; a < w.Hph; ++a, d += w.Wph) {
      const int64_t ih = a - g.ph;
      if (ih < 0 || ih >= g.H) {
        for (int64_t b = 0; b < g.W; ++b) d[b] = 0.f;
        continue;
      }
      const float* row = src + ih * g.W + c0;
      for (int64_t b = 0; b < b_lo; ++b) d[b] = 0.f;
      for (int64_t b = b_lo; b < b_hi; ++b) d[b] = row[b];
      for (int64_t b = b_hi; b < g.W; ++b) d[b] = 0.f;
    }
  }
}

// Copies one H x W input plane into its tap-copy slot (see use_tap_copies),
// from the offsets and lane masks make_wide lists.
void fill_tap_copies(const float* src, const Wide& w, float* dst) {
  for (int64_t e = 0; e < w.chan; ++e)
    dst[e] = (w.tap_masks[e / kLanes] >> (e % kLanes)) & 1 ? src[w.tap_src[e]] : 0.f;
}

// fill_tap_copies in vectors: one masked gather per 16 floats of the copies
// (at most 9 x 64 floats),
// with the plane two channels on prefetched: the gathers otherwise wait on
// its lines (the batch-wide gate pass ran between the scan and this copy).
// A/B, old/new time (scalar copies): 512->512 3x3 stride 2 on 7x7 1.48
// (batch 1), 1.11 (batch 16); 256->512 on 14x14 1.04 and 1.03; ResNet-18
// at batch 1 1.00. (The gathers alone: 1.34, 1.02; the prefetch then
// 1.01 and 1.06.)
__attribute__((target("arch=x86-64-v4")))
void fill_tap_copies_avx512(const float* src, const Geometry& g, const Wide& w, float* dst) {
  const int64_t vecs = w.chan / kLanes, plane = g.H * g.W;
  for (int64_t e = 0; e < plane; e += kLanes) __builtin_prefetch(src + 2 * plane + e);
  for (int64_t v = 0; v < vecs; ++v) {
    const __m512i idx = _mm512_loadu_si512(w.tap_src.data() + v * kLanes);
    _mm512_storeu_ps(dst + v * kLanes,
                     _mm512_mask_i32gather_ps(_mm512_setzero_ps(), w.tap_masks[v], idx, src, 4));
  }
}

// fill_shifted_channel in vectors: each copy's rows are contiguous, so copy s
// (zero rows included) is the flat plane read at offset s*dw - pw - ph*W,
// masked where the source pixel does not exist (masked lanes never fault):
// one masked load and one store per 16 floats.
__attribute__((target("arch=x86-64-v4")))
void fill_shifted_avx512(const float* src, const Geometry& g, const Wide& w, float* dst) {
  const int64_t len = w.Hph * w.Wph, vecs = (len + kLanes - 1) / kLanes;
  const float* base = src - g.ph * g.W;
  for (int64_t s = 0; s < g.kw; ++s) {
    const float* from = base + s * g.dw - g.pw;
    float* d = dst + s * len;
    const uint16_t* masks = w.shift_masks.data() + s * vecs;
    for (int64_t v = 0; v < vecs; ++v) {
      const int64_t q = v * kLanes, m = std::min<int64_t>(kLanes, len - q);
      const __mmask16 store = static_cast<__mmask16>(m == kLanes ? 0xFFFFu : (1u << m) - 1);
      _mm512_mask_storeu_ps(d + q, store, _mm512_maskz_loadu_ps(masks[v], from + q));
    }
  }
}

// d[b] = row[b] for b in [lo, hi), 0 for the other b < n, in masked vectors
// of 16. row[b] is read only for b in [lo, hi) (masked lanes never fault),
// so row may point before the plane.
__attribute__((target("arch=x86-64-v4")))
inline void copy_row_avx512(const float* row, int64_t lo, int64_t hi, int64_t n, float* d) {
  for (int64_t b0 = 0; b0 < n; b0 += kLanes) {
    const int64_t m = std::min<int64_t>(kLanes, n - b0);
    const int64_t l = std::clamp<int64_t>(lo - b0, 0, m), h = std::clamp<int64_t>(hi - b0, 0, m);
    const auto bits = [](int64_t c) { return c >= kLanes ? 0xFFFFu : (1u << c) - 1; };
    const __mmask16 load = static_cast<__mmask16>(bits(h) & ~bits(l));
    _mm512_mask_storeu_ps(d + b0, static_cast<__mmask16>(bits(m)),
                          _mm512_maskz_loadu_ps(load, row + b0));
  }
}

// fill_wide_channel for stride 1 (one phase: the zero-padded plane) on
// AVX-512: a masked load and a masked store per row, where the scalar loops
// around 7- to 56-float runs took ~300 cycles for a 7x7 plane. A/B, old/new
// time, interleaved: 512x7x7 and 256x14x14 1.02 (batch 16), 16x32x32 1.04
// and 512x2x2 1.02 (batch 1). (The same for the shifted layout's copies was
// 0.96-0.975 on 512x4x4 at batch 1: its rows are 4 floats; kept scalar.)
__attribute__((target("arch=x86-64-v4")))
void fill_wide_s1_avx512(const float* src, const Geometry& g, const Wide& w, float* dst) {
  for (int64_t a = 0; a < w.Hph; ++a) {
    const int64_t ih = a - g.ph;
    if (ih < 0 || ih >= g.H) {  // a padding row: nothing read
      copy_row_avx512(src, 0, 0, w.Wph, dst + a * w.Wph);
      continue;
    }
    copy_row_avx512(src + ih * g.W - g.pw, g.pw, g.pw + g.W, w.Wph, dst + a * w.Wph);
  }
}

// copy_row_avx512 at column stride 2: d[b] = row[2b] for b in [lo, hi), 0 for
// the other b < n. The 32 floats under 16 lanes come in two masked loads
// (even positions only: row[2b] is read only for b in [lo, hi)), and one
// permute keeps the even ones.
__attribute__((target("arch=x86-64-v4")))
inline void copy_row_s2_avx512(const float* row, int64_t lo, int64_t hi, int64_t n, float* d) {
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  for (int64_t b0 = 0; b0 < n; b0 += kLanes) {
    const int64_t m = std::min<int64_t>(kLanes, n - b0);
    const int64_t l = std::clamp<int64_t>(lo - b0, 0, m), h = std::clamp<int64_t>(hi - b0, 0, m);
    const auto bits = [](int64_t c) { return c >= kLanes ? 0xFFFFu : (1u << c) - 1; };
    const uint32_t keep = bits(h) & ~bits(l);
    const __mmask16 first = static_cast<__mmask16>(_pdep_u32(keep & 0xFFu, 0x5555u));
    const __mmask16 second = static_cast<__mmask16>(_pdep_u32(keep >> 8, 0x5555u));
    const __m512 a = _mm512_maskz_loadu_ps(first, row + 2 * b0);
    const __m512 b = _mm512_maskz_loadu_ps(second, row + 2 * b0 + kLanes);
    _mm512_mask_storeu_ps(d + b0, static_cast<__mmask16>(bits(m)),
                          _mm512_permutex2var_ps(a, even, b));
  }
}

// fill_wide_channel for column stride 2 (1x1 and 3x3 stride-2 layers) on
// AVX-512: GCC leaves the scalar loop's stride-2 reads unvectorised. A/B,
// old/new time: 64->128 1x1 stride 2 on 56x56 1.04 (batch 1), 1.02 (batch
// 16); 128->256 3x3 stride 2 on 28x28 1.02 and 1.02; ResNet-18 1.00.
__attribute__((target("arch=x86-64-v4")))
void fill_wide_s2_avx512(const float* src, const Geometry& g, const Wide& w, float* dst) {
  for (int64_t py = 0; py < g.sh; ++py)
    for (int64_t px = 0; px < 2; ++px) {
      if (!w.phase_used[py * 2 + px]) continue;
      float* d = dst + (py * 2 + px) * w.Hph * w.Wph;
      const int64_t c0 = px - g.pw;
      const auto [lo, hi] = valid_columns(c0, 2, g.W, w.Wph);
      for (int64_t a = 0; a < w.Hph; ++a, d += w.Wph) {
        const int64_t ih = py + g.sh * a - g.ph;
        if (ih < 0 || ih >= g.H) copy_row_avx512(src, 0, 0, w.Wph, d);  // a padding row
        else copy_row_s2_avx512(src + ih * g.W + c0, lo, hi, w.Wph, d);
      }
    }
}

// ---------------------------------------------------------------- per-sample plan

struct SamplePlan {
  std::vector<int64_t> in_ch;       // kept input channels
  std::vector<int64_t> in_off;      // in_ch * taps: offsets into a weight row
  std::vector<const float*> xs;     // wide-grid (or 1x1 input) plane of each kept input channel
  std::vector<char> out_kept;       // [Cout]
  std::vector<float> bias_kept;     // [k] bias of each kept channel
  std::vector<float> xtail;         // tail maps (Wide::tail): per kept input channel, its
                                    // taps at the tail pixel, 16 floats (zero past taps);
                                    // 1x1 kernels: per window of tail_c, 16 channels'
                                    // inputs at the tail pixel (zero where not kept);
                                    // empty where this sample skips the tail
  std::vector<int64_t> tail_c;      // 1x1 tail windows: first channel (tail_dot) ...
  std::vector<uint16_t> tail_mask;  // ... and its kept channels
};

// Top-k of one saliency row by (saliency desc, priority desc, index asc),
// sorted ascending. NaN ranks above every number (as in torch.sort), in the
// saliency and in the priority alike, so the reference picks the same channels.
// Each channel gets an integer key that orders like that (nth_element on
// integers is several times faster than a partial sort with float compares).

// Order-preserving uint32 of a float: NaN largest, -0 equal to +0. Without
// branches: about half of a ReLU'd saliency row is zero.
inline uint32_t rank_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  u = u == 0x80000000u ? 0u : u;
  const uint32_t r = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return f != f ? 0xFFFFFFFFu : r;
}

// keys: 2 * C scratch slots (the keys in channel order, and a copy for
// nth_element). nth_element runs on the bare keys (8-byte integers, one
// compare); the index tie-break is applied after: every channel above the k-th
// key is kept, and of those equal to it the lowest indices fill the rest. One
// pass in channel order then lists the picks sorted, without branches where
// every tie is kept (the usual case: priorities differ). 512 channels, keep
// half: 1.2 us a row, 4.8-6.1 us with branches in the keys and the last pass.
void select_row(const float* sal, const float* prio, int64_t C, int64_t k, uint64_t* keys,
                int64_t* idx_out) {
  uint64_t* by_channel = keys + C;
  for (int64_t c = 0; c < C; ++c)
    by_channel[c] = keys[c] = (uint64_t{rank_bits(sal[c])} << 32) | rank_bits(prio[c]);
  std::nth_element(keys, keys + (k - 1), keys + C, std::greater<uint64_t>());
  const uint64_t kth = keys[k - 1];
  int64_t above = 0;
  for (int64_t j = 0; j < k - 1; ++j) above += keys[j] > kth;
  int64_t ties_left = k - above;  // channels with key == kth to keep, lowest index first
  int64_t ties = 0;
  for (int64_t c = 0; c < C; ++c) ties += by_channel[c] == kth;
  int64_t j = 0;
  if (ties == ties_left) {
    for (int64_t c = 0; c < C; ++c) {
      idx_out[j] = c;  // idx_out has k slots, and j < k until the last pick
      j += by_channel[c] >= kth;
      if (j == k) break;
    }
    return;
  }
  for (int64_t c = 0; c < C; ++c) {
    const uint64_t kc = by_channel[c];
    if (kc > kth || (kc == kth && ties_left-- > 0)) idx_out[j++] = c;
  }
}

// Schedule thresholds for batches smaller than the thread count. Set-up on
// the calling thread below ~128 KB of input; a GEMM under ~300k multiply-adds
// (~4 us) runs there too. A/B timed on ResNet-20 at batch 1, 2 threads: no
// slower than the all-parallel schedule, and fewer hand-offs between cores.
constexpr int64_t kSerialSetupFloats = 32768;
constexpr int64_t kMinParallelMacs = 300000;
// A gate of at least this many multiply-adds (its weight: 256 KB) runs on all
// threads even when the rest of the set-up does not: it reads the whole gate
// weight, ~50 us for 512x512. A/B at batch 1, keep 0.5, dyn/static: 512x4x4
// 1.25 -> 1.14, 512x2x2 1.04 -> 0.91, 256x8x8 1.01 -> 0.93, 512x7x7 0.88 -> 0.82.
constexpr int64_t kParallelGateMacs = 65536;


// A sample packs its kept weights (pack_weights) when at least this many
// wide blocks reuse them. A/B at batch 16, keep 0.5, interleaved: packed over
// rows/static 1.18-1.34 vs 1.31-1.52 on 64x56x56 (51 blocks), 1.22 vs
// 1.27-1.33 on 128x28x28 (14), 1.23 vs 1.29 on 64x32x32 (17); equal at 5
// blocks (128x16x16); slower at 4 (256x14x14: 1.55-1.65 vs 1.44-1.54) and
// at 1 (512x7x7: 2.6-3.1 vs 1.7-1.95), where the copy is not paid back.
// (Packing each tile's chunk on the fly into an L1 buffer was slower still,
// at both batch sizes: 512x7x7 at batch 16 2.6x static vs 1.9x, 256x14x14 at
// batch 1 1.35x vs 1.04x. The gather is latency-bound; the row-pointer tile
// hides the same scattered reads behind its FMAs.)
constexpr int64_t kPackMinBlocks = 6;
constexpr int64_t kPanelBlocks = 4;
constexpr int64_t kUnitChannels = 8 * kJBlock;  // a split sample's units (below)
constexpr int64_t kSplitMinMacs = int64_t{8} << 20;

// The valid (non-junk) runs of wide block q0: one per output row it touches,
// lane[r] in the block, len[r] values, dst[r] in the output plane.
struct BlockRuns {
  int32_t lane[kQBlock], len[kQBlock];
  int64_t dst[kQBlock];
  int n = 0;
};

static inline __attribute__((always_inline)) void find_runs(const Geometry& g, const Wide& wd,
                                                           int64_t q0, BlockRuns& runs) {
  runs.n = 0;
  for (int64_t q = q0; q < std::min(q0 + kQBlock, wd.Q);) {
    const int64_t oh = q / wd.Wph, ow = q % wd.Wph;
    const int64_t run = std::min(wd.Wph - ow, q0 + kQBlock - q);
    const int64_t valid = std::min(run, g.Wo - ow);
    if (valid > 0) {
      runs.lane[runs.n] = static_cast<int32_t>(q - q0);
      runs.len[runs.n] = static_cast<int32_t>(valid);
      runs.dst[runs.n++] = oh * g.Wo + ow;
    }
    q += run;
  }
}

// Epilogue: y = act(scale * (acc + bias) [+ res]) at the valid positions of
// block q0, for kept channels [j0, j1); accumulators of channel j at
// cbuf + (j - j0) * kQBlock.
void finish_block(const Geometry& g, const Wide& wd, const SamplePlan& sp, const int64_t* out_ch,
                  const float* scale, int64_t j0, int64_t j1, int64_t q0, Epilogue ep, float* y_n,
                  const float* cbuf) {
  BlockRuns runs;
  find_runs(g, wd, q0, runs);
  const bool relu = ep.relu;
  for (int64_t j = j0; j < j1; ++j) {
    const float* acc = cbuf + (j - j0) * kQBlock;
    float* out = y_n + out_ch[j] * g.Ho * g.Wo;
    const float* res = ep.res ? ep.res + out_ch[j] * g.Ho * g.Wo : nullptr;
    const float sc = scale[j], bj = sp.bias_kept[j];
    for (int r = 0; r < runs.n; ++r) {
      const float* a = acc + runs.lane[r];
      float* o = out + runs.dst[r];
      if (res) {
        const float* rs = res + runs.dst[r];
        for (int l = 0; l < runs.len[r]; ++l) o[l] = finish_value(a[l], bj, sc, relu, rs + l);
      } else if (relu) {  // two loops: the test stays out of the inner one
        for (int l = 0; l < runs.len[r]; ++l) o[l] = finish_value(a[l], bj, sc, true);
      } else {
        for (int l = 0; l < runs.len[r]; ++l) o[l] = finish_value(a[l], bj, sc, false);
      }
    }
  }
}

// finish_block in masked vectors of 16: the scalar loops ran 7 values a row
// on 7x7 maps, with a branch per value under ReLU. finish_value's formula
// and order; v < 0 is false for NaN, so ReLU keeps NaN as torch.relu does.
// A/B, old/new time, interleaved: ResNet-20 at batch 1 1.06-1.075 (its
// ReLU'd 32- and 16-wide rows), ResNet-18 1.01, VGG-16 1.01; layers without
// ReLU 0.985-1.04.
__attribute__((target("arch=x86-64-v4")))
void finish_block_avx512(const Geometry& g, const Wide& wd, const SamplePlan& sp,
                         const int64_t* out_ch, const float* scale, int64_t j0, int64_t j1,
                         int64_t q0, Epilogue ep, float* y_n, const float* cbuf) {
  BlockRuns runs;
  find_runs(g, wd, q0, runs);
  const __m512 zero = _mm512_setzero_ps();
  const bool relu = ep.relu;
  for (int64_t j = j0; j < j1; ++j) {
    const float* acc = cbuf + (j - j0) * kQBlock;
    float* out = y_n + out_ch[j] * g.Ho * g.Wo;
    const float* res = ep.res ? ep.res + out_ch[j] * g.Ho * g.Wo : nullptr;
    const __m512 sc = _mm512_set1_ps(scale[j]), bj = _mm512_set1_ps(sp.bias_kept[j]);
    for (int r = 0; r < runs.n; ++r) {
      for (int l = 0; l < runs.len[r]; l += kLanes) {
        const int m = std::min(kLanes, runs.len[r] - l);
        const __mmask16 mask = static_cast<__mmask16>(m == kLanes ? 0xFFFFu : (1u << m) - 1);
        __m512 v = _mm512_maskz_loadu_ps(mask, acc + runs.lane[r] + l);
        v = _mm512_mul_ps(_mm512_add_ps(v, bj), sc);
        if (res) v = _mm512_add_ps(rounded(v), _mm512_maskz_loadu_ps(mask, res + runs.dst[r] + l));
        if (relu) v = _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(v, zero, _CMP_LT_OQ), zero);
        _mm512_mask_storeu_ps(out + runs.dst[r] + l, mask, v);
      }
    }
  }
}

// A sample's kept weights, packed per register tile of kJBlock kept output
// channels j0..j0+J: weight (j0 + u, kept input i, tap t) at
// dst[j0*kin*taps + (i*taps + t)*J + u], the layout tile<..., kPacked> reads;
// input chunk c0 of a tile starts at + c0*taps*J. Each tile then streams one
// contiguous run per chunk instead of J rows of scattered taps*4-byte pieces.
void pack_weights(const float* weight, const Geometry& g, const SamplePlan& sp,
                  const int64_t* out_ch, int64_t k, float* dst) {
  const int64_t taps = g.kh * g.kw, kin = sp.in_ch.size(), row_len = g.Cin * taps;
  for (int64_t j0 = 0; j0 < k; j0 += kJBlock) {
    const int64_t J = std::min<int64_t>(kJBlock, k - j0);
    const float* rows[kJBlock];
    for (int64_t u = 0; u < J; ++u) rows[u] = weight + out_ch[j0 + u] * row_len;
    float* d = dst + j0 * kin * taps;
    for (int64_t i = 0; i < kin; ++i, d += taps * J) {  // J rows at a time: writes stay in L1
      for (int64_t u = 0; u < J; ++u) {
        const float* src = rows[u] + sp.in_off[i];
        for (int64_t t = 0; t < taps; ++t) d[t * J + u] = src[t];
      }
    }
  }
}

// A 3x3 stride-1 conv with padding 1 on a 2x2 map: every (output pixel p,
// input pixel q) pair has exactly one tap, t = (qh - ph + 1) * 3 + (qw - pw + 1).
// So lanes hold the 16 (p, q) pairs: per (kept output channel, kept input
// channel), one load of the channel's 9 taps, one permute to the 16 pairs and
// one FMA with the input's 4 pixels repeated, where the pixel form does 9
// broadcasts and 9 FMAs for 4 useful lanes of 16. Then y[p] = sum over q.
bool is_conv3x3_on_2x2(const Geometry& g) {
  return g.kh == 3 && g.kw == 3 && g.sh == 1 && g.sw == 1 && g.dh == 1 && g.dw == 1 &&
         g.ph == 1 && g.pw == 1 && g.H == 2 && g.W == 2;
}

__attribute__((target("arch=x86-64-v4")))
void pairs_2x2_avx512(const float* weight, const Geometry& g, const SamplePlan& sp,
                      const int64_t* out_ch, const float* scale, int64_t j0, int64_t j1,
                      Epilogue ep, float* y_n) {
  constexpr int kRows = 8;  // output channels per register tile
  const int64_t kin = sp.in_ch.size(), row_len = g.Cin * 9;
  // Lane p*4 + q: the tap of (p, q), and input pixel q in the wide grid
  // (4x4 padded rows: pixel (qh, qw) at (qh + 1) * 4 + qw + 1).
  alignas(64) static const int32_t tap_of[16] = {4, 5, 7, 8, 3, 4, 6, 7, 1, 2, 4, 5, 0, 1, 3, 4};
  alignas(64) static const int32_t pix_of[16] = {5, 6, 9, 10, 5, 6, 9, 10,
                                                  5, 6, 9, 10, 5, 6, 9, 10};
  const __m512i tidx = _mm512_load_si512(tap_of), pidx = _mm512_load_si512(pix_of);
  for (int64_t j = j0; j < j1; j += kRows) {
    const int J = static_cast<int>(std::min<int64_t>(kRows, j1 - j));
    const float* rows[kRows];
    for (int u = 0; u < kRows; ++u) rows[u] = weight + out_ch[j + std::min(u, J - 1)] * row_len;
    __m512 acc[kRows];
    for (int u = 0; u < kRows; ++u) acc[u] = _mm512_setzero_ps();
    for (int64_t i = 0; i < kin; ++i) {
      const __m512 x = _mm512_permutexvar_ps(pidx, _mm512_loadu_ps(sp.xs[i]));
      const int64_t off = sp.in_off[i];
      if (i + kRowPrefetch < kin)
        for (int u = 0; u < J; ++u) __builtin_prefetch(rows[u] + sp.in_off[i + kRowPrefetch]);
      for (int u = 0; u < kRows; ++u) {  // rows past J repeat the last one, unused
        const __m512 w = _mm512_maskz_loadu_ps(0x1FF, rows[u] + off);
        acc[u] = _mm512_fmadd_ps(_mm512_permutexvar_ps(tidx, w), x, acc[u]);
      }
    }
    for (int u = 0; u < J; ++u) {
      alignas(64) float lanes[16];
      _mm512_store_ps(lanes, acc[u]);
      float* out = y_n + out_ch[j + u] * 4;
      const float* res = ep.res ? ep.res + out_ch[j + u] * 4 : nullptr;
      const float sc = scale[j + u], bj = sp.bias_kept[j + u];
      for (int p = 0; p < 4; ++p) {
        const float* l = lanes + 4 * p;
        const float conv = (l[0] + l[1]) + (l[2] + l[3]);
        out[p] = finish_value(conv, bj, sc, ep.relu, res ? res + p : nullptr);
      }
    }
  }
}

// Wide blocks b in [qb0, qb0 + nb) of one sample, kept channels [j0, j1):
//   cbuf[b - qb0][j - j0][0:kQBlock] = sum over kept inputs i, taps t of
//   weight[out_ch[j], in_ch[i], t] * wide_i[b*kQBlock + tap_off[t] + ...],
// then the epilogue. Weights from wpack (pack_weights) when given, else rows. AVX-512 register tiles (microkernel.h), compiled for that target only.
__attribute__((target("arch=x86-64-v4")))
void block_avx512(const float* weight, const float* wpack, bool unroll3x3, const Geometry& g,
                  const Wide& wd, const SamplePlan& sp, const int64_t* out_ch, const float* scale,
                  int64_t j0, int64_t j1, int64_t qb0, int64_t nb, Epilogue ep, float* y_n,
                  float* cbuf) {
  const int64_t taps = g.kh * g.kw, kin = sp.in_ch.size(), row_len = g.Cin * taps;
  const int64_t slab = (j1 - j0) * kQBlock;  // accumulators of one block
  // Chunks keep a tile's weights in L1 across the blocks of a panel. A map of
  // one block has no panel, so there each tile streams its weight rows start
  // to end in one chunk (the input slices come from L2 instead). A/B on the
  // AMD host, old/new time: 512x7x7 1.06 (batch 16) and 1.075 (batch 1),
  // 512x4x4 1.065 and 1.06, 256x8x8 1.05 and 1.02, 256x7x7 1.02 (batch 16),
  // VGG-16 1.035 (batch 16) and 1.025 (batch 1). (On session 10's Xeon the
  // same change was 0.83-0.97 at batch 16; on session 26's Xeon chunks of
  // 16/32/64 channels instead were 0.81/0.91/0.95 on 512x7x7 at batch 16.)
  // (1x1 tail maps too: chunks of 64 channels, whose inputs stay in L1,
  // measured 0.96-0.99 on 512x7x7 1x1 and 256->512 stride 2.)
  const int64_t ci_chunk = wd.Q <= kQBlock ? std::max<int64_t>(kin, 1) : channels_per_chunk(taps);
  if (kin == 0) std::fill_n(cbuf, nb * slab, 0.f);
  TileArgs a;
  a.tap_off = wd.tap_off.data();
  a.taps = taps;
  a.row_step = wd.row_step;
  a.col_step = wd.col_step;
  const bool tail = wd.tail && !wpack && !sp.xtail.empty();
  const bool tail_1x1 = tail && taps == 1;  // tail_dot after the vectors
  const int64_t q_tail = wd.Q - 1;
  a.tap_mask = static_cast<uint16_t>((1u << taps) - 1);
  a.tail_lane = q_tail % kQBlock;
  for (int64_t c0 = 0; c0 < kin; c0 += ci_chunk) {
    a.xs = sp.xs.data() + c0;
    a.xtail = tail ? sp.xtail.data() + c0 * kLanes : nullptr;
    a.ci = std::min(ci_chunk, kin - c0);
    a.in_off = sp.in_off.data() + c0;
    // 1x1 kernels skip the row prefetch: their runs are single floats, mostly
    // in the line just read, so it costs load slots for nothing. A/B, old/new
    // time: 512x7x7 1x1 1.08-1.09 (batch 16), 1.13 (batch 1); 256x14x14
    // 1.07-1.28; 256->1024 at 14x14 1.10-1.39; 64->256 at 56x56 1.00.
    a.ci_left = taps == 1 ? 0 : kin - c0;
    // 1x1 tail tiles hold 3 vectors, not 4: 8 rows of them fit the registers.
    // A/B, old/new time (6 rows -> 8): 512x7x7 1x1 1.08 (batch 1), 1.105
    // (batch 16); 256->512 stride 2 at 14x14 1.03 and 1.08. (9 rows:
    // 1.015-1.026 more, within the noise; 8 kept.)
    const int64_t jstep = tail_1x1 ? kJBlockTail1x1 : kJBlock;
    for (int64_t j = j0; j < j1; j += jstep) {
      const int J = static_cast<int>(std::min<int64_t>(jstep, j1 - j));
      const float* wrows[kJBlockTail1x1];
      for (int u = 0; u < J; ++u) wrows[u] = weight + out_ch[j + u] * row_len;
      a.wrows = wrows;
      a.wpk = wpack ? wpack + (j * kin + c0 * J) * taps : nullptr;
      // The blocks of the panel in turn: this tile's weights stay in L1.
      for (int64_t b = 0; b < nb; ++b) {
        a.q0 = (qb0 + b) * kQBlock;
        a.cbuf = cbuf + b * slab + (j - j0) * kQBlock;
        const int64_t nq = std::min<int64_t>(kQBlock, wd.Q - a.q0) - (tail ? 1 : 0);
        const int R = static_cast<int>((nq + kLanes - 1) / kLanes);
        if (tail_1x1) {  // one chunk (wd.Q <= kQBlock): the dot once, after it
          run_1x1_tail_tile(J, R, a, c0 == 0);
          run_tail_dot(J, wrows, sp.tail_c.data(), sp.tail_mask.data(), sp.xtail.data(),
                       sp.tail_c.size(), a.cbuf + a.tail_lane);
        } else if (tail) {
          run_tail_tile(J, R, a, wd.sep3x3, c0 == 0);
        } else {
          run_tile(J, R, a, wpack != nullptr, unroll3x3, c0 == 0);
        }
      }
    }
  }
  for (int64_t b = 0; b < nb; ++b)
    finish_block_avx512(g, wd, sp, out_ch, scale, j0, j1, (qb0 + b) * kQBlock, ep, y_n,
                        cbuf + b * slab);
}

// The same sums with plain loops, for CPUs without AVX-512 (correct, slower).
void block_generic(const float* weight, const Geometry& g, const Wide& wd,
                   const SamplePlan& sp, const int64_t* out_ch, const float* scale,
                   int64_t j0, int64_t j1, int64_t q0, Epilogue ep, float* y_n, float* cbuf) {
  const int64_t taps = g.kh * g.kw, kin = sp.in_ch.size(), row_len = g.Cin * taps;
  const int64_t nq = std::min<int64_t>(kQBlock, wd.Q - q0);
  for (int64_t j = j0; j < j1; ++j) {
    float* acc = cbuf + (j - j0) * kQBlock;
    std::fill_n(acc, kQBlock, 0.f);  // also the kin == 0 case
    const float* w = weight + out_ch[j] * row_len;
    for (int64_t i = 0; i < kin; ++i) {
      for (int64_t t = 0; t < taps; ++t) {
        const float wv = w[sp.in_off[i] + t];
        const float* x = sp.xs[i] + q0 + wd.tap_off[t];
        for (int64_t q = 0; q < nq; ++q) acc[q] += wv * x[q];
      }
    }
  }
  finish_block(g, wd, sp, out_ch, scale, j0, j1, q0, ep, y_n, cbuf);
}

// Wide blocks [qb0, qb0 + nb) of one sample, kept output channels j in [j0, j1);
// cbuf holds nb * (j1 - j0) * kQBlock floats.
void compute_blocks(const float* weight, const float* wpack, bool unroll3x3, const Geometry& g,
                    const Wide& wd, const SamplePlan& sp, const int64_t* out_ch, const float* scale,
                    int64_t j0, int64_t j1, int64_t qb0, int64_t nb, Epilogue ep, float* y_n,
                    float* cbuf) {
  // A/B old/new: 512x2x2 1.19-1.45 (batch 1), 1.70-2.15 (batch 16); VGG-16
  // 1.06 (batch 1), 1.20 (batch 16). Its pixel table assumes the padded 4x4
  // wide grid (use_shifted never picks 2x2 maps: no vector to save).
  if (has_avx512() && !wpack && is_conv3x3_on_2x2(g) && !wd.shifted && !wd.tap_copies) {
    pairs_2x2_avx512(weight, g, sp, out_ch, scale, j0, j1, ep, y_n);
    return;
  }
  if (has_avx512()) {
    block_avx512(weight, wpack, unroll3x3, g, wd, sp, out_ch, scale, j0, j1, qb0, nb, ep, y_n, cbuf);
    return;
  }
  for (int64_t b = 0; b < nb; ++b)
    block_generic(weight, g, wd, sp, out_ch, scale, j0, j1, (qb0 + b) * kQBlock, ep, y_n, cbuf);
}

typedef double v8d __attribute__((vector_size(64)));
typedef float v8f __attribute__((vector_size(32)));
typedef float v8fu __attribute__((vector_size(32), aligned(4)));
typedef double v8du __attribute__((vector_size(64), aligned(8)));
typedef int v16i __attribute__((vector_size(64)));
typedef double v16d __attribute__((vector_size(128)));

// 16 floats to two float64 vectors. Converted as one v16 -> v16d, GCC 12
// emits one vcvtps2pd per half; converting each v8f half on its own, it
// splits each into two 128-bit conversions and a lane insert (port 5).
// Used by the scan and both gates; A/B on the Xeon, old/new time: 512x7x7 1x1
// 1.014 (batch 16), 1.031 (batch 1), 512->2048 1x1 1.029 (batch 1), 512x7x7
// 3x3 1.021 (batch 16), 64x56x56 1.009.
static inline __attribute__((always_inline)) void widen(v16 v, v8d& lo, v8d& hi) {
  const v16d d = __builtin_convertvector(v, v16d);
  lo = __builtin_shufflevector(d, d, 0, 1, 2, 3, 4, 5, 6, 7);
  hi = __builtin_shufflevector(d, d, 8, 9, 10, 11, 12, 13, 14, 15);
}

// Sum (float64) and "any non-zero" of one plane; NaN counts as non-zero, so a
// NaN channel is kept and NaN propagates.
// Prefetch distance of the scan, in floats (2 KB). The scan is the first read
// of the input; planes span several 4 KB pages, at whose edges the hardware
// prefetcher stops. A/B, interleaved: 64x56x56 at batch 16 went from 1.27-1.37x
// the static conv to 1.19-1.29x (256 to 2048 floats alike), 128x28x28 from
// 1.15-1.18x to 1.12-1.14x; no change on 7x7..32x32 maps.
constexpr int64_t kScanPrefetch = 512;
__attribute__((target_clones("arch=x86-64-v4", "default")))
void scan_plane(const float* p, int64_t n, double* sum, bool* nonzero) {
  v8d s0 = v8d{}, s1 = v8d{};
  v16i nz = v16i{};
  const v16 zero = v16{};
  int64_t e = 0;
  for (; e + kLanes <= n; e += kLanes) {
    __builtin_prefetch(p + e + kScanPrefetch);  // never faults, even past the end
    const v16 v = *reinterpret_cast<const v16u*>(p + e);
    v8d lo, hi;
    widen(v, lo, hi);
    s0 += lo;
    s1 += hi;
    nz |= (v != zero);
  }
  double s = 0;
  bool any = false;
  for (int l = 0; l < 8; ++l) s += s0[l] + s1[l];
  for (int l = 0; l < kLanes; ++l) any |= nz[l] != 0;
  for (; e < n; ++e) {
    s += p[e];
    any |= p[e] != 0.f;
  }
  *sum = s;
  *nonzero = any;
}

// The gate, sal[n * Cout + c] = relu(gw[c] . means[n] + gb[c]) in float64,
// rounded once, is computed by gate_rows below. gate_tile: the dot products of
// R rows x S samples into out[s * ldo + r] (no bias, no relu). Each gate weight
// is read and converted to float64 once for S samples; a per-sample dot
// product did both once a sample, bound by the conversions (port 5).
template <int R, int S>
static inline __attribute__((always_inline)) void gate_tile(const float* gw, const double* means,
                                                            int64_t Cin, double* out, int64_t ldo,
                                                            bool prefetch) {
  v8d acc[R][S] = {};
  int64_t i = 0;
  for (; i + 16 <= Cin; i += 16) {  // as two steps of 8 (below), in the same order
    // The next tile's rows (gate_rows walks them in order; only the last
    // tile's reach past the weight, and prefetches never fault). ab_env
    // old/new at batch 16: 512->2048 1x1 on 7x7 1.04-1.07, 2048->512 1.02,
    // 512x7x7 1x1 1.015-1.044, 512x7x7 1.005-1.034, 512x4x4 1.032,
    // 256x14x14 1.002; ResNet-18 1.046 (10 rounds). Two tiles ahead: no better.
    // Only the first tile of a row block's samples: the others find them cached.
    if (prefetch)
      for (int r = 0; r < R; ++r) __builtin_prefetch(gw + (r + R) * Cin + i);
    v8d w[R][2];
    for (int r = 0; r < R; ++r)
      widen(*reinterpret_cast<const v16u*>(gw + r * Cin + i), w[r][0], w[r][1]);
    for (int h = 0; h < 2; ++h)
      for (int s = 0; s < S; ++s) {
        const v8d m = *reinterpret_cast<const v8du*>(means + s * Cin + i + 8 * h);
        for (int r = 0; r < R; ++r) acc[r][s] += w[r][h] * m;
      }
  }
  for (; i + 8 <= Cin; i += 8) {
    v8d w[R];
    for (int r = 0; r < R; ++r)
      w[r] = __builtin_convertvector(*reinterpret_cast<const v8fu*>(gw + r * Cin + i), v8d);
    for (int s = 0; s < S; ++s) {
      const v8d m = *reinterpret_cast<const v8du*>(means + s * Cin + i);
      for (int r = 0; r < R; ++r) acc[r][s] += w[r] * m;
    }
  }
  for (int r = 0; r < R; ++r)
    for (int s = 0; s < S; ++s) {
      double v = 0;
      for (int l = 0; l < 8; ++l) v += acc[r][s][l];
      for (int64_t t = i; t < Cin; ++t)
        v += static_cast<double>(gw[r * Cin + t]) * means[s * Cin + t];
      out[s * ldo + r] = v;
    }
}

template <int R>
static inline __attribute__((always_inline)) void gate_rows_r(const float* gw, const double* means,
                                                              int64_t N, int64_t Cin, double* out,
                                                              int64_t ldo, bool prefetch) {
  if (N == 8) return gate_tile<R, 8>(gw, means, Cin, out, ldo, prefetch);  // N <= 8
  int64_t n = 0;  // else 4 + 2 + 1; the first prefetches the next rows
  if (N - n >= 4) {
    gate_tile<R, 4>(gw, means + n * Cin, Cin, out + n * ldo, ldo, prefetch && n == 0);
    n += 4;
  }
  if (N - n >= 2) {
    gate_tile<R, 2>(gw, means + n * Cin, Cin, out + n * ldo, ldo, prefetch && n == 0);
    n += 2;
  }
  if (N - n >= 1)
    gate_tile<R, 1>(gw, means + n * Cin, Cin, out + n * ldo, ldo, prefetch && n == 0);
}

// Rows [c0, c1) of the gate for samples [0, N) (see gate_tile), into
// sal[n * Cout + c], rounded to float32 once.
constexpr int64_t kGateRows = 3;
__attribute__((target_clones("arch=x86-64-v4", "default")))
void gate_rows(const float* gw, const float* gb, const double* means, int64_t N, int64_t Cin,
               int64_t Cout, int64_t c0, int64_t c1, float* sal) {
  double out[8 * kGateRows];
  for (int64_t c = c0; c < c1; c += kGateRows) {
    const int64_t R = std::min(kGateRows, c1 - c);
    for (int64_t n0 = 0; n0 < N; n0 += 8) {
      const int64_t S = std::min<int64_t>(8, N - n0);
      const double* m = means + n0 * Cin;
      if (R == 3) gate_rows_r<3>(gw + c * Cin, m, S, Cin, out, kGateRows, n0 == 0);
      else if (R == 2) gate_rows_r<2>(gw + c * Cin, m, S, Cin, out, kGateRows, n0 == 0);
      else gate_rows_r<1>(gw + c * Cin, m, S, Cin, out, kGateRows, n0 == 0);
      for (int64_t s = 0; s < S; ++s)
        for (int64_t r = 0; r < R; ++r) {
          const double v = out[s * kGateRows + r] + gb[c + r];
          sal[(n0 + s) * Cout + c + r] = static_cast<float>(v < 0.0 ? 0.0 : v);  // keeps NaN
        }
    }
  }
}

// The gate of one sample from the transposed gate weight wt [Cin, Cout]:
// columns [c0, c1) of sal = relu(wt^T means + gb), float64 sums rounded once.
// Reads only the rows of channels whose mean is not zero (pruned inputs have
// none), plus rows holding a non-finite weight (inf * 0 is NaN, as in the
// reference): at keep 0.5 half the bytes of the [Cout, Cin] weight, which
// gate_rows reads whole. Each row segment is contiguous; four rows at a time
// per accumulator load and store. `acc`: c1 - c0 doubles of scratch.
__attribute__((target_clones("arch=x86-64-v4", "default")))
void gate_columns(const float* wt, const bool* finite_rows, const float* gb, const double* means,
                  int64_t Cin, int64_t Cout, int64_t c0, int64_t c1, int64_t* rows, double* acc,
                  float* sal) {
  int64_t nrows = 0;
  for (int64_t i = 0; i < Cin; ++i) {
    rows[nrows] = i;
    nrows += means[i] != 0.0 || !finite_rows[i];
  }
  const int64_t n = c1 - c0;
  std::fill_n(acc, n, 0.0);
  int64_t r = 0;
  for (; r + 4 <= nrows; r += 4) {
    const float* w[4];
    double m[4];
    // The rows are scattered (non-zero inputs only): each step prefetches the
    // line of the rows four on. ab_env old/new at batch 1: 512x7x7 1x1
    // 1.04-1.06, 2048->512 1x1 1.07, 512->2048 1.01-1.02, 512x7x7 1.01,
    // 256x14x14 1.01; VGG-16 1.033, ResNet-18 1.008; per-sample gates at
    // batch 16 (64x56x56, 128x28x28) 0.99-1.00. (8 or 16 rows on: 0.97-1.04.)
    const float* pf[4];
    for (int j = 0; j < 4; ++j) {
      w[j] = wt + rows[r + j] * Cout + c0;
      m[j] = means[rows[r + j]];
      pf[j] = r + 4 + j < nrows ? wt + rows[r + 4 + j] * Cout + c0 : w[j];
    }
    int64_t c = 0;
    for (; c + 16 <= n; c += 16) {
      v8d a0 = *reinterpret_cast<const v8du*>(acc + c);
      v8d a1 = *reinterpret_cast<const v8du*>(acc + c + 8);
      for (int j = 0; j < 4; ++j) __builtin_prefetch(pf[j] + c);
      for (int j = 0; j < 4; ++j) {
        v8d lo, hi;
        widen(*reinterpret_cast<const v16u*>(w[j] + c), lo, hi);
        a0 += lo * m[j];
        a1 += hi * m[j];
      }
      *reinterpret_cast<v8du*>(acc + c) = a0;
      *reinterpret_cast<v8du*>(acc + c + 8) = a1;
    }
    for (; c + 8 <= n; c += 8) {
      v8d a = *reinterpret_cast<const v8du*>(acc + c);
      for (int j = 0; j < 4; ++j)
        a += __builtin_convertvector(*reinterpret_cast<const v8fu*>(w[j] + c), v8d) * m[j];
      *reinterpret_cast<v8du*>(acc + c) = a;
    }
    for (; c < n; ++c)
      for (int j = 0; j < 4; ++j) acc[c] += static_cast<double>(w[j][c]) * m[j];
  }
  for (; r < nrows; ++r) {
    const float* w = wt + rows[r] * Cout + c0;
    const double m = means[rows[r]];
    for (int64_t c = 0; c < n; ++c) acc[c] += static_cast<double>(w[c]) * m;
  }
  for (int64_t c = 0; c < n; ++c) {
    const double v = acc[c] + gb[c0 + c];
    sal[c0 + c] = static_cast<float>(v < 0.0 ? 0.0 : v);  // keeps NaN
  }
}

// A pruned row of a conv with a residual: y = act(0 + res), the sum the
// unfused ops compute (0 + -0.0 is +0.0).
__attribute__((target_clones("arch=x86-64-v4", "default")))
void residual_row(const float* res, int64_t n, bool relu, float* y) {
  if (relu) {
    for (int64_t i = 0; i < n; ++i) {
      const float v = 0.f + res[i];
      y[i] = v < 0.f ? 0.f : v;  // keeps NaN, as torch.relu does
    }
  } else {
    for (int64_t i = 0; i < n; ++i) y[i] = 0.f + res[i];
  }
}

// Zeros n floats at p with streaming stores over the whole 64-byte lines.
// The caller fences (zeros_done) before other threads may read them.
__attribute__((target("arch=x86-64-v4"))) void zero_streaming(float* p, int64_t n) {
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(p + i) & 63) != 0; ++i) p[i] = 0.f;
  const __m512 z = _mm512_setzero_ps();
  for (; i + kLanes <= n; i += kLanes) _mm512_stream_ps(p + i, z);
  for (; i < n; ++i) p[i] = 0.f;
}

// Loads a word of every cache line in [p, end): brings a slice of a weight
// into this core's cache ahead of its use. The loads are independent (an OR,
// not a chain of float adds), and the empty asm keeps the compiler from
// dropping them.
void warm_lines(const float* p, const float* end) {
  constexpr int64_t kLineFloats = 64 / sizeof(float);
  uint32_t any = 0;
  for (int64_t i = 0; i < end - p; i += kLineFloats) {
    uint32_t u;
    std::memcpy(&u, p + i, sizeof u);
    any |= u;
  }
  asm volatile("" : : "r"(any));
}

// Whether a plane holds a non-zero (NaN counts). Zero channels must be read
// whole, so the test runs on 64 floats at a time and exits between groups.
__attribute__((target_clones("arch=x86-64-v4", "default")))
bool any_nonzero(const float* p, int64_t n) {
  const v16 zero = v16{};
  int64_t e = 0;
  for (; e + 4 * kLanes <= n; e += 4 * kLanes) {
    __builtin_prefetch(p + e + kScanPrefetch);
    v16i nz = v16i{};
    for (int r = 0; r < 4; ++r) nz |= (*reinterpret_cast<const v16u*>(p + e + r * kLanes) != zero);
    for (int l = 0; l < kLanes; ++l)
      if (nz[l]) return true;
  }
  for (; e < n; ++e)
    if (p[e] != 0.f) return true;
  return false;
}

// Per-thread scratch reused across calls (grow-only): a layer at batch 1
// otherwise spends a good part of its time in malloc/free, and a fresh wide
// buffer costs an mmap and page faults. One per calling thread, so calls from
// different threads never share it.
struct Workspace {
  std::vector<float> wide;
  std::vector<double> means;
  std::vector<char> listed;
  std::vector<float> sal;
  std::vector<SamplePlan> plans;
  std::vector<std::vector<float>> cbufs;    // per worker: accumulators of one item
  std::vector<std::vector<uint64_t>> orders;  // per worker: top-k keys
  std::vector<std::vector<float>> packs;    // per worker: one sample's packed weights
  std::vector<float> ones;
  std::vector<int64_t> shares;  // first item of each thread's share of B
  std::vector<std::vector<int64_t>> gate_in;  // per worker: rows gate_columns reads
  std::vector<std::vector<double>> gate_acc;  // per worker: its float64 sums
};

Workspace& workspace() {
  thread_local Workspace ws;
  return ws;
}

template <typename T>
T* grow(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

// The first 64-byte boundary in p (reserve 64 bytes more).
template <typename T>
T* align64(T* p) {
  return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t{63});
}

}  // namespace

void sparse_conv2d_f32(const at::Tensor& x_in, const at::Tensor& weight_in,
                       const at::Tensor& bias_in, const Gate* gate, at::Tensor& out_idx,
                       at::Tensor& out_scale, const at::Tensor& in_idx_in, const Geometry& g,
                       bool relu, at::Tensor& y, const at::Tensor& residual) {
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor bias = bias_in.defined() ? bias_in.contiguous() : bias_in;
  const at::Tensor in_idx = in_idx_in.defined() ? as_long(in_idx_in) : in_idx_in;
  const int64_t N = g.N, Cin = g.Cin, Cout = g.Cout, k = out_idx.size(1);
  const int64_t plane = g.H * g.W, Qout = g.Ho * g.Wo, taps = g.kh * g.kw;
  const int64_t T = at::in_parallel_region() ? 1 : at::get_num_threads();
  // Batches of at least a sample per thread run each sample start to end on
  // one thread: no barriers, and its copies stay in that core's cache.
  const bool per_sample = N >= T && (N % T == 0 || N >= 4 * T);
  const Wide wd = [&] {
    const Wide padded = make_wide(g, has_avx512(), false);
    // Such samples use the shifted layout on maps of several blocks too
    // (three copies of each plane at most), unless the output-channel form
    // would run the padded grid. A/B at batch 16, old/new time: 160x12x12
    // 1.13 (dyn/static 1.44 -> 1.27), 96x20x20 1.06, 48x10x10 1.045,
    // ResNet-56 1.046, ResNet-20 1.02; against the output-channel form
    // 256x9x9 0.98 and VGG-16 0.99, with 5x5 taps (64x32x32) 0.97; at batch
    // 1 48x10x10 0.85, 96x20x20 0.93 (three copies per plane, on one thread).
    const bool cout_padded = has_avx512() &&
        cout_vector_pays(g, k, static_cast<double>(Qout) / (padded.qblocks * kQBlock));
    if (!per_sample || g.kw > 3 || cout_padded || padded.shifted || padded.tap_copies)
      return padded;
    return make_wide(g, has_avx512(), true);
  }();

  at::Tensor gw, gb, prio;
  if (gate) {
    gw = gate->weight.contiguous();
    gb = gate->bias.contiguous();
    prio = gate->priority.contiguous();
  }
  const bool need_sum = gate != nullptr, need_scan = !in_idx.defined();
  // Everything the parallel region touches is allocated here, in the reused
  // workspace: an exception (bad_alloc) inside an OpenMP region would
  // terminate the process.
  Workspace& ws = workspace();
  // 64-byte aligned: the gate's tiles load 8 doubles at a time from 8 rows of
  // it, and unaligned ones split across cache lines (gate_rows alone on
  // 16x512 means: 11.3 -> 17.6 G multiply-adds/s).
  double* means = need_sum ? align64(grow(ws.means, N * Cin + 8)) : nullptr;
  char* listed = grow(ws.listed, N * Cin);  // input channel read by the kernel
  std::fill_n(listed, N * Cin, 0);
  if (in_idx.defined()) {
    const int64_t kin = in_idx.size(1);
    const int64_t* p = in_idx.data_ptr<int64_t>();
    for (int64_t n = 0; n < N; ++n)
      for (int64_t i = 0; i < kin; ++i) listed[n * Cin + p[n * kin + i]] = 1;
  }
  float* sal = gate ? grow(ws.sal, N * Cout) : nullptr;
  if (static_cast<int64_t>(ws.plans.size()) < N) ws.plans.resize(N);
  SamplePlan* plans = ws.plans.data();

  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  int64_t* oi = out_idx.data_ptr<int64_t>();
  float* os = out_scale.defined() ? out_scale.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const float* rp = residual.defined() ? residual.data_ptr<float>() : nullptr;
  auto epi = [&](int64_t n) { return Epilogue{relu, rp ? rp + n * Cout * Qout : nullptr}; };

  // Work items of phase B: (sample, wide block, part of the kept channels).
  // Small batches split each sample's kept channels so every thread has work.
  // (A channel-major order, an item = an output-channel range for all
  // samples so its weight slice stays in L2, measured 10-40% slower at batch
  // 16 on ResNet-18 layers: it re-reads each sample's input per range.)
  // (Windows of output channels inside each thread's samples, 0.5-2 MB of
  // weight rows each, measured no faster on 2x2..56x56 maps at batch 16: the
  // kernel is not bound by streaming weights from L3.)
  // (Session 22 again, for maps of 1-2 blocks and weights of 1 MB or more:
  // items of 32-256 output channels over all samples, batch-wide input slots.
  // Old/new time at batch 16: 512x4x4 0.84-0.91, 512x7x7 0.86, 512x7x7 1x1
  // 0.75, 512x2x2 0.97-1.18. On 512x4x4 the static conv does its 9.4M
  // 16-lane FMAs in 1.25-1.35 ms, 3.5-3.8 G a second per core, near a Zen 4
  // core's peak; here each kept weight feeds one vector per sample, and the
  // tiles reach about two thirds of that rate: such layers stay 1.7-2x static.)
  // Wide-grid slot of input channel (n, c): wide + (n * Cin + c) * wd.chan;
  // where samples run whole, each thread reuses its own Cin slots for each of
  // its samples instead, so the copies write lines still in its cache.
  // A/B at batch 16 against batch-wide slots (6 MB for 512x7x7), old/new
  // time: 512x7x7 1.025, 256x14x14 1.016, 64x56x56 1.023, 512x4x4 1.017,
  // VGG-16 1.02; 1x1 layers (read in place) 0.995-1.006.
  const int64_t slots = (per_sample ? T : N) * Cin;
  float* wide = k > 0 ? grow(ws.wide, slots * wd.chan + wd.len_extra) : nullptr;
  if (wide) std::fill_n(wide + slots * wd.chan, wd.len_extra, 0.f);
  auto slot = [&](int64_t t, int64_t worker) {
    return wide + (per_sample ? worker * Cin + t % Cin : t) * wd.chan;
  };
  const int64_t qblocks = wd.qblocks;
  const int64_t jblocks = (k + kJBlock - 1) / kJBlock;
  int64_t parts = 1;
  // At least 4 items a thread; 16 on maps of one block with kernels of
  // several taps, whose few large channel parts split unevenly: 512x7x7 at
  // keep 0.5 had 7 parts of 36 channels and one of 4, shares of 144 and 112.
  // A/B at batch 1, old/new time: 512x7x7 1.055-1.06 (keep 0.25 1.08, 0.75
  // 1.00), 512x4x4 1.06, 256->512 at stride 2 on 14x14 1.04-1.06, 512->512
  // at stride 2 on 7x7 1.04; ResNet-18, VGG-16, ResNet-20 0.994-1.001. (16
  // on every map: ResNet-20 0.97-0.98, its small layers paying the items;
  // 1x1 tail maps tile 8 channels, not 6: 0.98.)
  const int64_t want = (qblocks == 1 && taps > 1 ? 16 : 4) * T;
  if (N * qblocks < want) parts = std::min(jblocks, (want + N * qblocks - 1) / (N * qblocks));
  parts = std::max<int64_t>(parts, 1);
  const int64_t part_len = std::max<int64_t>(1, (jblocks + parts - 1) / parts) * kJBlock;
  parts = std::max<int64_t>(1, (k + part_len - 1) / part_len);
  const int64_t pixel_items = N * qblocks * parts;
  const int64_t cbuf_len = part_len * kQBlock;  // accumulators of one item

  // The phases as per-index steps, shared by the schedules below.
  auto scan_sum = [&](int64_t t) {  // A1 without the wide copy
    const float* p = xp + t * plane;
    if (!need_scan && !listed[t]) {  // outside in_idx: treated as zero, never read
      if (need_sum) means[t] = 0.0;
      return;
    }
    if (need_sum) {
      double s;
      bool nz;
      scan_plane(p, plane, &s, &nz);
      means[t] = s / static_cast<double>(plane);
      if (need_scan) listed[t] = nz;
    } else if (need_scan) {
      listed[t] = any_nonzero(p, plane);
    }
  };
  // A 1x1 stride-1 conv without padding reads its input planes in place: the
  // wide grid would hold the same floats. Not the last plane(s), whose junk
  // positions would read past the end of x; those are copied as usual. (A/B,
  // old/new time: 512x7x7 1x1 1.02-1.15 at batch 16, 1.23-1.30 at batch 1;
  // 256x14x14 1.13 and 1.34-1.45; 64->256 at 56x56 1.03 and 1.08.) y never
  // shares memory with x here: gated_conv2d_out routes such an out through a
  // temporary.
  const bool plain_1x1 = g.kh == 1 && g.kw == 1 && g.sh == 1 && g.sw == 1 && g.ph == 0 && g.pw == 0;
  auto in_place = [&](int64_t t) {
    return plain_1x1 && t * plane + wd.qblocks * kQBlock <= N * Cin * plane;
  };
  const bool vec_fill = has_avx512();
  auto fill = [&](int64_t t, int64_t worker) {  // A1's wide copy of a channel the kernel reads
    if (!wide || !listed[t] || in_place(t)) return;
    const float* src = xp + t * plane;
    float* dst = slot(t, worker);
    if (wd.tap_copies && vec_fill) {
      fill_tap_copies_avx512(src, g, wd, dst);
    } else if (wd.tap_copies) {
      fill_tap_copies(src, wd, dst);
    } else if (wd.shifted && vec_fill) {
      fill_shifted_avx512(src, g, wd, dst);
    } else if (wd.shifted) {
      fill_shifted_channel(src, g, wd, dst);
    } else if (vec_fill && g.sh == 1 && g.sw == 1) {
      fill_wide_s1_avx512(src, g, wd, dst);
    } else if (vec_fill && g.sw == 2) {
      fill_wide_s2_avx512(src, g, wd, dst);
    } else {
      fill_wide_channel(src, g, wd, dst);
    }
  };
  auto scan = [&](int64_t t, int64_t worker) {  // A1: one (sample, input channel)
    scan_sum(t);
    fill(t, worker);
  };
  const float* gwp = gate ? gw.data_ptr<float>() : nullptr;
  const float* gbp = gate ? gb.data_ptr<float>() : nullptr;
  auto plan_sample = [&](int64_t n, uint64_t* order, int64_t worker) {  // A3
    SamplePlan& sp = plans[n];
    int64_t* idx = oi + n * k;
    if (gate) {
      select_row(sal + n * Cout, prio.data_ptr<float>(), Cout, k, order, idx);
      for (int64_t j = 0; j < k; ++j) os[n * k + j] = sal[n * Cout + idx[j]];
    }
    // The kept input channels, without a branch per channel (about half are
    // zero, at random). With select_row's branch-free passes, A/B old/new:
    // 512x7x7 1x1 1.03 (batch 16), ResNet-18 1.02 (batch 1), 3x3 layers 1.00.
    sp.in_ch.resize(Cin);
    int64_t kin = 0;
    for (int64_t c = 0; c < Cin; ++c) {
      sp.in_ch[kin] = c;
      kin += listed[n * Cin + c] != 0;
    }
    sp.in_ch.resize(kin);
    sp.xs.resize(wide ? kin : 0);
    if (wide)
      for (int64_t i = 0; i < kin; ++i) {
        const int64_t t = n * Cin + sp.in_ch[i];
        sp.xs[i] = in_place(t) ? xp + t * plane : slot(t, worker);
      }
    sp.in_off.resize(sp.in_ch.size());
    for (size_t i = 0; i < sp.in_ch.size(); ++i) sp.in_off[i] = sp.in_ch[i] * taps;
    // The tail pixel's taps of each kept input channel (copied above), once a
    // sample rather than once a work item: batch 1 splits a sample's kept
    // output channels into up to 8 items. A/B old/new at batch 1: 256x7x7
    // 1.05-1.06, 512x7x7 1.006-1.011, ResNet-18 1.00.
    const bool tail_taps = wide && wd.tail && taps > 1, tail_1x1 = wide && wd.tail && taps == 1;
    sp.xtail.resize(tail_taps ? kin * kLanes : 0);
    if (tail_taps)
      for (int64_t i = 0; i < kin; ++i) {
        const float* xi = sp.xs[i] + (wd.Q - 1);
        for (int64_t t = 0; t < kLanes; ++t)
          sp.xtail[i * kLanes + t] = t < taps ? xi[wd.tap_off[t]] : 0.f;
      }
    // 1x1 kernels: the tail pixel by windows of 16 channels holding a kept
    // one (tail_dot), where those cost fewer FMAs than the fourth vector of
    // pixels they save (kin a row); each window reads its row lines too.
    // Within the reserved capacity: no allocation here. Branch-free: a branch
    // per new window mispredicted on random channels and stalled each load of
    // a plane's last pixel in turn (perf: 62% of this lambda on 2048->512 at
    // 7x7; A/B old/new time at batch 16 1.020 there, 512x7x7 1.005).
    sp.tail_c.clear();
    sp.tail_mask.clear();
    if (tail_1x1) {
      const int64_t most = Cin / kLanes + 1;  // windows at most (the reserved capacity)
      sp.tail_c.resize(most);
      sp.tail_mask.assign(most, 0);
      sp.xtail.assign(most * kLanes, 0.f);
      int64_t w = -1, prev = -1;
      for (int64_t i = 0; i < kin; ++i) {
        const int64_t c = sp.in_ch[i] / kLanes;
        w += c != prev;
        prev = c;
        sp.tail_c[w] = c * kLanes;
        sp.tail_mask[w] |= static_cast<uint16_t>(1u << (sp.in_ch[i] - c * kLanes));
        sp.xtail[w * kLanes + sp.in_ch[i] - c * kLanes] = sp.xs[i][wd.Q - 1 + wd.tap_off[0]];
      }
      sp.tail_c.resize(w + 1);
      sp.tail_mask.resize(w + 1);
      sp.xtail.resize((w + 1) * kLanes);
      if (2 * static_cast<int64_t>(sp.tail_c.size()) + 8 > kin) {  // does not pay
        sp.tail_c.clear();
        sp.xtail.clear();
      }
    }
    sp.out_kept.assign(Cout, 0);
    sp.bias_kept.resize(k);
    for (int64_t j = 0; j < k; ++j) {
      sp.out_kept[idx[j]] = 1;
      sp.bias_kept[j] = bp ? bp[idx[j]] : 0.f;
    }
  };
  // Zero rows of outputs larger than the L2s are written with streaming
  // stores: no line is read for ownership, and the zeros do not evict data
  // (the next layer of a network skips those channels). One fence per batch
  // of rows (a fence per row cost 0.93-0.99 on 14x14 maps). A/B old/new
  // time: 64->256 1x1 on 56x56 1.07-1.20 (batch 1) and 1.12 (batch 16),
  // 128->512 on 28x28 1.06 and 14x14 layers 1.01-1.04 (batch 16); ResNet-18
  // and VGG-16 0.998-1.03. Streaming also 7x7 rows (a few whole lines
  // each): 0.92 on 512->2048 at batch 16. Small outputs are read back from
  // the caches (ResNet-20, whose residual adds read every channel: 0.987 at
  // batch 1 when its 4 KB rows streamed).
  const bool stream_zeros = has_avx512() && Qout >= 128 && N * Cout * Qout >= (int64_t{1} << 19);
  auto zero_span = [&](int64_t off, int64_t len) {  // A4: pruned rows' outputs, y[off:off+len]
    if (rp) return residual_row(rp + off, len, relu, yp + off);  // act(0 + res)
    if (stream_zeros) zero_streaming(yp + off, len);
    else std::fill_n(yp + off, len, 0.f);
  };
  auto zero_row = [&](int64_t t) {  // exact zeros in a pruned output row
    if (!plans[t / Cout].out_kept[t % Cout]) zero_span(t * Qout, Qout);
  };
  // A sample's pruned rows, each run of adjacent ones in one call: no division
  // per row, and fewer calls on small maps (ab_env old/new at batch 16:
  // 512x7x7 1x1 1.012, 512->2048 1x1 1.015, 512x7x7 1.013, 64x56x56 0.997).
  auto zero_rows = [&](int64_t n) {
    const char* kept = plans[n].out_kept.data();
    for (int64_t c = 0; c < Cout;) {
      if (kept[c]) {
        ++c;
        continue;
      }
      int64_t e = c + 1;
      while (e < Cout && !kept[e]) ++e;
      zero_span((n * Cout + c) * Qout, (e - c) * Qout);
      c = e;
    }
  };
  auto zeros_done = [&] {  // orders the streaming stores before what follows
    if (stream_zeros) _mm_sfence();
  };
  const bool compute = k > 0 && Qout > 0;
  // Small inputs run the set-up phases (A1-A4) on the calling thread: cheaper
  // than the barriers between them.
  const bool serial_setup = !per_sample && N * Cin * plane <= kSerialSetupFloats;
  // Gates of one sample at a time read the transposed weight where the caller
  // gave it (gate_columns: only the rows of the sample's non-zero inputs;
  // EvalPlan caches it). At batch 1 the gate took 40-60% of the call on small
  // maps (512->2048 1x1 on 7x7: ~300 of 500 us, the conv ~170). A/B at batch
  // 1 on session 23's Xeon, old/new time: 512->2048 1x1 7x7 1.53, 512x7x7 1x1 1.17, 3x3 1.07,
  // 512x4x4 1.14, 256x14x14 1.02, 512x1x1 1x1 1.62, 512x2x2 1x1 1.33,
  // 256->512 stride 2 from 2x2 1.19; VGG-16 1.03, ResNet-18 1.01; batch 16
  // per-sample gates (128x28x28, 64x56x56, 256->64 1x1 56x56) 0.995-1.02.
  // The batch's gate tiles stay where they ran: per-sample gates there
  // measured 0.94-0.97 on 512x7x7/4x4 and 0.975-1.036 on 14x14 layers.
  const bool by_columns = gate && gate->weight_t.defined();
  // Samples run whole on one thread still compute the gate for the whole batch
  // first, where it outweighs reading the input twice (gate_rows: one float64
  // conversion of each gate weight per 8 samples, not per sample). A/B at
  // batch 16, old/new time: 512x7x7 1x1 1.21, 3x3 1.07; 256x14x14 1x1 1.16;
  // 128x28x28 1.01; but 64->128 at 56x56 1x1 stride 2 0.96-0.97 and
  // 32x64x64 0.98, whose planes are 25-130 times the gate's rows.
  // Session 22 moved the line from planes of 8x the gate's rows to 1x: in
  // between, reading each sample's input once (the wide copy or a 1x1 conv's
  // in-place reads right after the scan) wins. A/B, old/new time: 512->128
  // 1x1 on 28x28 1.17-1.175, 128->256 at stride 2 on 28x28 1.03-1.035,
  // 96x20x20 1.03, 128x28x28 1.025, 128x16x16 1.02, 128->512 1x1 1.02;
  // ResNet-18 1.007, ResNet-20 1.004, VGG-16 0.98-1.01 (all at batch 16).
  // (Per-sample gates everywhere: 256x14x14 0.99, 64x8x8 1.00.)
  const bool batch_gate = per_sample && gate && Cout >= plane;
  const int64_t row_blocks = (Cout + kGateRows - 1) / kGateRows;
  auto gate_block = [&](int64_t n0, int64_t n1, int64_t b) {  // A2: block b, samples [n0, n1)
    gate_rows(gwp, gbp, means + n0 * Cin, n1 - n0, Cin, Cout, b * kGateRows,
              std::min(Cout, (b + 1) * kGateRows), sal + n0 * Cout);
  };
  if (by_columns) {
    TORCH_CHECK(gate->weight_t.scalar_type() == at::kFloat && gate->weight_t.is_contiguous() &&
                    gate->weight_t.sizes() == at::IntArrayRef({Cin, Cout}) &&
                    gate->finite_rows.scalar_type() == at::kBool &&
                    gate->finite_rows.is_contiguous() && gate->finite_rows.numel() == Cin,
                "internal: the transposed gate weight does not match the gate");
    if (static_cast<int64_t>(ws.gate_in.size()) < T) ws.gate_in.resize(T);
    if (static_cast<int64_t>(ws.gate_acc.size()) < T) ws.gate_acc.resize(T);
    for (int64_t t = 0; t < T; ++t) {
      grow(ws.gate_in[t], Cin);
      grow(ws.gate_acc[t], Cout);
    }
  }
  const float* gwt = by_columns ? gate->weight_t.data_ptr<float>() : nullptr;
  const bool* finite_rows = by_columns ? gate->finite_rows.data_ptr<bool>() : nullptr;
  // Columns [Cout * part / parts, ...) of sample n's gate, rounded to 8, by `worker`.
  auto gate_share = [&](int64_t n, int64_t part, int64_t parts, int64_t worker) {
    auto edge = [&](int64_t p) { return p == parts ? Cout : (Cout * p / parts) / 8 * 8; };
    const int64_t c0 = edge(part), c1 = edge(part + 1);
    if (c0 < c1)
      gate_columns(gwt, finite_rows, gbp, means + n * Cin, Cin, Cout, c0, c1,
                   ws.gate_in[worker].data(), ws.gate_acc[worker].data(), sal + n * Cout);
  };

  for (int64_t n = 0; n < N; ++n) {
    plans[n].in_ch.reserve(Cin);
    plans[n].xs.reserve(Cin);
    plans[n].in_off.reserve(Cin);
    plans[n].out_kept.reserve(Cout);
    plans[n].bias_kept.reserve(k);
    if (wd.tail) plans[n].xtail.reserve(taps == 1 ? Cin + kLanes : Cin * kLanes);
    if (wd.tail && taps == 1) {
      plans[n].tail_c.reserve(Cin / kLanes + 1);
      plans[n].tail_mask.reserve(Cin / kLanes + 1);
    }
  }
  // Samples run whole on one thread put output channels, not pixels, in the
  // vector lanes where that fills more of them: small maps (cout_vector.cpp).
  // Smaller batches do the same with an item per (sample, 32 kept channels)
  // where those split evenly over the threads: VGG-16's 128-channel layers at
  // keep 0.7 (3 items on 2 threads) took 175 us, the pixel form 122 us.
  const bool cout_form = compute && has_avx512() &&
                         cout_vector_pays(g, k, static_cast<double>(Qout) / (qblocks * kQBlock));
  const bool cout_vec = per_sample && cout_form;
  const int64_t tiles = cout_tiles(k);
  const bool cout_items = !per_sample && cout_form && (N * tiles % T == 0 || N * tiles >= 4 * T);
  const int64_t items = cout_items ? N * tiles : pixel_items;
  // Samples run whole on one thread pack their kept weights once when enough
  // blocks reuse them (see kPackMinBlocks).
  const bool pack = per_sample && compute && has_avx512() && qblocks >= kPackMinBlocks && !cout_vec;
  // Such a sample sweeps its blocks in panels of kPanelBlocks, each register
  // tile's weights reused across the panel from L1 (A/B at batch 16, panels
  // of 4 vs 1: 1-4% faster on six ResNet-18/VGG-16 layers).
  const int64_t panel = per_sample ? kPanelBlocks : 1;
  // The unrolled 3x3 tile (microkernel.h) wherever the taps allow it. It
  // measured 2-7% faster on 256x14x14 and 512x7x7 at batch 1 and 0-5% with
  // packed weights at batch 16, but 1-9% slower with row-pointer weights at
  // batch 16 (an earlier session), so those kept the tap loop until session 14
  // re-measured them on the shifted layout and single-chunk maps (A/B,
  // old/new time, batch 16): 512x4x4 1.15-1.18 (1.20 at keep 0.7), 256x8x8
  // 1.03-1.05, 160x12x12 1.06-1.08, 48x10x10 1.08, 384x13x13 1.03, VGG-16
  // 1.066, ResNet-20 1.02. (perf on 512x4x4: the tap loop kept its six row
  // pointers in vector registers, a vmovq before each broadcast FMA.)
  const bool unroll3x3 = wd.sep3x3;
  const int64_t cbuf_floats = !compute ? 0
                              : cout_vec ? cout_acc_floats(g, k)
                              : cout_items ? cout_acc_floats(g, 1)  // one tile
                              : per_sample ? panel * k * kQBlock : cbuf_len;
  if (static_cast<int64_t>(ws.cbufs.size()) < T) ws.cbufs.resize(T);
  if (static_cast<int64_t>(ws.orders.size()) < T) ws.orders.resize(T);
  if (static_cast<int64_t>(ws.packs.size()) < T) ws.packs.resize(T);
  for (int64_t t = 0; t < T; ++t) {
    if (pack) grow(ws.packs[t], k * Cin * taps);
    if (cout_vec || cout_items) grow(ws.packs[t], cout_pack_floats(g, k));
    grow(ws.cbufs[t], cbuf_floats);
    grow(ws.orders[t], gate ? 2 * Cout : 0);
  }
  float* ones = os ? nullptr : grow(ws.ones, k);  // scale 1 when none is given
  if (ones) std::fill_n(ones, k, 1.f);
  const float* no_scale = ones;
  auto cout_sample = [&](int64_t n) {
    const SamplePlan& sp = plans[n];
    return CoutSample{sp.xs.data(), sp.in_off.data(), static_cast<int64_t>(sp.in_ch.size()),
                      oi + n * k, os ? os + n * k : no_scale, sp.bias_kept.data(), k,
                      wd.tap_off.data(), wd.Wph};
  };
  // B's static shares where samples do not run whole: each thread a
  // contiguous run of items (neighbours share input lines) of about equal
  // work, kept channels x vectors of wide positions, not equal counts. The
  // last block of a map and the last channel part are short: 160x12x12 at
  // batch 1 (3 blocks x 3 parts) split 5/4 items gave one thread twice the
  // other's work. A/B, old/new time, batch 1: 160x12x12 1.15, 128->512 1x1
  // on 28x28 1.08, batch 3 160x12x12 1.035; ResNet-18/VGG-16 layers and
  // models, ResNet-20 0.99-1.01.
  struct PixelItem {
    int64_t n, qb, j0, j1;  // sample, wide block, kept channels [j0, j1)
  };
  auto pixel_item = [&](int64_t it) {  // qb varies fastest, then the part
    const int64_t part = (it / qblocks) % parts, j0 = part * part_len;
    return PixelItem{it / (qblocks * parts), it % qblocks, j0, std::min(k, j0 + part_len)};
  };
  int64_t* share_start = grow(ws.shares, T + 1);
  share_start[0] = 0;
  for (int64_t t = 1; t <= T; ++t) share_start[t] = items;
  if (!per_sample && compute && T > 1) {
    auto cost = [&](int64_t it) -> int64_t {
      if (cout_items) return cout_tile_channels(k, it % tiles);
      const PixelItem p = pixel_item(it);
      const int64_t nq = std::min<int64_t>(kQBlock, wd.Q - p.qb * kQBlock);
      return (p.j1 - p.j0) * ((nq + kLanes - 1) / kLanes);
    };
    int64_t total = 0;
    for (int64_t it = 0; it < items; ++it) total += cost(it);
    // Item it joins share t where its middle lies in [t, t + 1) * total / T.
    int64_t done = 0, t = 1;
    for (int64_t it = 0; it < items && t < T; ++it) {
      const int64_t c = cost(it);
      while (t < T && (2 * done + c) * T >= 2 * t * total) share_start[t++] = it;
      done += c;
    }
  }
  auto item = [&](int64_t it, int64_t worker) {  // B: one work item
    float* cbuf = ws.cbufs[worker].data();
    if (cout_items) {
      const int64_t n = it / tiles, v = it % tiles;
      cout_vector_tiles(wp, g, cout_sample(n), v, v + 1, epi(n), yp + n * Cout * Qout,
                        ws.packs[worker].data(), cbuf);
      return;
    }
    const PixelItem p = pixel_item(it);
    compute_blocks(wp, nullptr, unroll3x3, g, wd, plans[p.n], oi + p.n * k,
                   os ? os + p.n * k : no_scale, p.j0, p.j1, p.qb, 1, epi(p.n),
                   yp + p.n * Cout * Qout, cbuf);
  };

  // A thread's share of B (the static schedule), or the items by omp for
  // where the region has fewer threads than planned.
  auto run_shares = [&] {
    const int worker = omp_get_thread_num();
    if (omp_get_num_threads() == T) {
      for (int64_t it = share_start[worker]; it < share_start[worker + 1]; ++it) item(it, worker);
      return;
    }
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items; ++it) item(it, omp_get_thread_num());
  };

  if (serial_setup) {
    const bool gate_threads = T > 1 && N * Cout * Cin >= kParallelGateMacs;
    if (gate && by_columns && N == 1 && gate_threads) {
      // The scan split too: old/new time (Xeon) 1.02-1.055 on 512x7x7 (1x1 and
      // 3x3), 512x4x4, 512x2x2 1x1 and 512->2048 1x1 at batch 1.
#pragma omp parallel num_threads(T)
      {
#pragma omp for schedule(static)
        for (int64_t t = 0; t < Cin; ++t) scan(t, omp_get_thread_num());
        gate_share(0, omp_get_thread_num(), omp_get_num_threads(), omp_get_thread_num());
      }
    } else if (gate && by_columns && N == 1) {
      for (int64_t t = 0; t < Cin; ++t) scan(t, 0);
      gate_share(0, 0, 1, 0);
    } else if (gate && gate_threads) {
      // (Batch 1, or a few samples on small maps.) The other threads would
      // idle while this one scans: each loads its share of the gate rows
      // into its cache meanwhile (the weight is out of cache after other
      // layers), and takes 3 shares to this thread's 1, which reads its rows
      // from memory. A/B at batch 1, old/new time:
      // 512x7x7 1.057-1.065, 512x4x4 1.063-1.105, 512x7x7 1x1 1.014-1.074,
      // ResNet-18 1.012 (both reductions); 2 shares each 1.04-1.08, 4 shares
      // 0.95-1.12, 8 or all of them 0.90-1.03.
      const int64_t own = row_blocks / (3 * (T - 1) + 1);
#pragma omp parallel num_threads(T)
      {
        const int64_t tid = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t per = nt > 1 ? (row_blocks - own + nt - 2) / (nt - 1) : 0;
        int64_t lo = 0, hi = row_blocks;
        if (nt > 1) {
          lo = tid == 0 ? 0 : std::min(row_blocks, own + (tid - 1) * per);
          hi = tid == 0 ? own : std::min(row_blocks, lo + per);
        }
        if (tid == 0) {
          for (int64_t t = 0; t < N * Cin; ++t) scan(t, 0);
        } else {
          warm_lines(gwp + std::min(Cout, lo * kGateRows) * Cin,
                     gwp + std::min(Cout, hi * kGateRows) * Cin);
        }
#pragma omp barrier
        for (int64_t b = lo; b < hi; ++b) gate_block(0, N, b);
      }
    } else {
      for (int64_t t = 0; t < N * Cin; ++t) scan(t, 0);
      if (gate)
        for (int64_t b = 0; b < row_blocks; ++b) gate_block(0, N, b);
    }
    for (int64_t n = 0; n < N; ++n) plan_sample(n, ws.orders[0].data(), 0);
    // A GEMM too small to pay for waking the other threads runs here too.
    int64_t macs = 0;
    for (int64_t n = 0; n < N; ++n)
      macs += k * static_cast<int64_t>(plans[n].in_ch.size()) * taps * wd.Q;
    if (!compute || T == 1 || macs < kMinParallelMacs) {
      for (int64_t t = 0; t < N * Cout; ++t) zero_row(t);
      zeros_done();
      if (compute)
        for (int64_t it = 0; it < items; ++it) item(it, 0);
      return;
    }
    // Else the pruned rows' zeros are split over the threads too, before
    // their GEMM shares (disjoint rows: no barrier). A/B at batch 1 (Xeon),
    // old/new time: 512->2048 1x1 on 7x7 1.076, 512x7x7 1x1 1.038, 3x3 1.023, 512x4x4
    // 1.021, 2048->512 1.008; VGG-16 1.013, ResNet-18 1.009.
#pragma omp parallel num_threads(T)
    {
#pragma omp for schedule(static) nowait
      for (int64_t t = 0; t < N * Cout; ++t) zero_row(t);
      zeros_done();
      run_shares();
    }
    return;
  }

  // Samples run whole on a thread, handed out in order to whichever thread is
  // free (one core of a shared host is often slower). A/B at batch 16,
  // interleaved, 8 pairs: dyn/static 1.13-1.77 vs 1.16-2.02 with fixed
  // halves, never worse. (The batch-1 items keep their fixed shares: dynamic
  // there was 6-15% slower on 16x32x32..128x28x28, whose items share data
  // with their neighbours.)
  // The last T samples handed out are split into units (a panel of blocks x
  // kUnitChannels kept channels, or one output-channel tile) that any thread
  // out of samples helps with: else one thread idled while another finished
  // its last sample (timers on 512x7x7 at batch 16: 2-5% of each thread's
  // time). Only samples of >= kSplitMinMacs (channels x kept channels x taps x
  // pixels, at most): a helper first reads the sample's wide grid from the
  // other core's cache. ab_env old/new time at batch 16: 512x7x7
  // 1.00-1.036, 256x14x14 1.001-1.024, 64x56x56 1.013-1.05, 384x13x13
  // 1.024-1.033, 160x12x12 1.021, 256->64 1x1 on 56x56 1.024, ResNet-18 1.08
  // (30 rounds); split on every map, ResNet-20 lost 1.8% (16x32x32 1.2%).
  const bool split = per_sample && compute && k * Cin * taps * Qout >= kSplitMinMacs;
  const int64_t panels = (qblocks + panel - 1) / panel;
  const int64_t unit_chunks = (k + kUnitChannels - 1) / kUnitChannels;
  const int64_t units = cout_vec ? tiles : panels * unit_chunks;
  const int64_t first_split = N - T;  // split sample n: slot n - first_split
  struct alignas(64) SplitSlot {  // a line each: threads take units of different samples
    std::atomic<int64_t> next_unit{0};
    std::atomic<int> ready{0};        // set by the owner once its set-up is done
    const float* packed = nullptr;    // the owner's packed weights (or none)
  };
  std::unique_ptr<SplitSlot[]> split_slots(split ? new SplitSlot[T] : nullptr);
  std::atomic<int64_t> next_sample{0};
  // Units [u0, u1) of sample n; [0, units) is the whole sample in its usual order.
  auto run_units = [&](int64_t n, int64_t u0, int64_t u1, const float* wpack, float* cbuf,
                       int64_t worker) {
    float* y_n = yp + n * Cout * Qout;
    if (cout_vec)
      return cout_vector_tiles(wp, g, cout_sample(n), u0, u1, epi(n), y_n,
                               ws.packs[worker].data(), cbuf);
    const float* scale = os ? os + n * k : no_scale;
    if (u0 == 0 && u1 == units) {  // whole panels: each tile's weights reused across a panel
      for (int64_t qb = 0; qb < qblocks; qb += panel)
        compute_blocks(wp, wpack, unroll3x3, g, wd, plans[n], oi + n * k, scale, 0, k, qb,
                       std::min(panel, qblocks - qb), epi(n), y_n, cbuf);
      return;
    }
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t qb = (u / unit_chunks) * panel, j0 = (u % unit_chunks) * kUnitChannels;
      compute_blocks(wp, wpack, unroll3x3, g, wd, plans[n], oi + n * k, scale, j0,
                     std::min(k, j0 + kUnitChannels), qb, std::min(panel, qblocks - qb), epi(n),
                     y_n, cbuf);
    }
  };
  // Takes units of split sample n until none is left. All units of a sample
  // are taken before its owner takes another sample, and helpers start only
  // once every sample is taken: the owner's wide grid and packed weights
  // stay put while anyone reads them.
  auto take_units = [&](int64_t n, float* cbuf, int64_t worker) {
    SplitSlot& slot = split_slots[n - first_split];
    for (int64_t u; (u = slot.next_unit.fetch_add(1, std::memory_order_relaxed)) < units;)
      run_units(n, u, u + 1, slot.packed, cbuf, worker);
  };

#pragma omp parallel num_threads(T)
  {
    const int worker = omp_get_thread_num();
    float* cbuf = ws.cbufs[worker].data();
    uint64_t* order = ws.orders[worker].data();
    if (per_sample) {
      if (batch_gate) {
#pragma omp for schedule(static)
        for (int64_t t = 0; t < N * Cin; ++t) scan_sum(t);
#pragma omp for schedule(static)
        for (int64_t b = 0; b < row_blocks; ++b) gate_block(0, N, b);
      }
      for (int64_t n; (n = next_sample.fetch_add(1, std::memory_order_relaxed)) < N;) {
        if (batch_gate) {
          for (int64_t c = 0; c < Cin; ++c) fill(n * Cin + c, worker);
        } else {
          for (int64_t c = 0; c < Cin; ++c) scan(n * Cin + c, worker);
          if (gate && by_columns)
            gate_share(n, 0, 1, worker);
          else if (gate)
            for (int64_t b = 0; b < row_blocks; ++b) gate_block(n, n + 1, b);
        }
        plan_sample(n, order, worker);
        zero_rows(n);
        zeros_done();
        if (!compute) continue;
        float* wpack = nullptr;
        if (pack) {
          wpack = ws.packs[worker].data();
          pack_weights(wp, g, plans[n], oi + n * k, k, wpack);
        }
        if (split && n >= first_split) {
          split_slots[n - first_split].packed = wpack;
          split_slots[n - first_split].ready.store(1, std::memory_order_release);
          take_units(n, cbuf, worker);
        } else {
          run_units(n, 0, units, wpack, cbuf, worker);
        }
      }
      for (int64_t n = first_split; split && n < N; ++n) {  // out of samples: help
        while (!split_slots[n - first_split].ready.load(std::memory_order_acquire)) _mm_pause();
        take_units(n, cbuf, worker);
      }
    } else {
      // A1, A2: channel sums, detection, wide copies; saliency.
#pragma omp for schedule(static)
      for (int64_t t = 0; t < N * Cin; ++t) scan(t, worker);
      if (gate && by_columns && N == 1) {
        gate_share(0, worker, omp_get_num_threads(), worker);
#pragma omp barrier
      } else if (gate) {
#pragma omp for schedule(static)
        for (int64_t b = 0; b < row_blocks; ++b) gate_block(0, N, b);
      }
      // A3, A4: per sample plans; zeros in pruned rows.
#pragma omp for schedule(static)
      for (int64_t n = 0; n < N; ++n) plan_sample(n, order, worker);
#pragma omp for schedule(static) nowait
      for (int64_t t = 0; t < N * Cout; ++t) zero_row(t);
      zeros_done();
#pragma omp barrier
      // B: the GEMM. Blocks vary in cost (the last one is short): qb varies
      // fastest, so each thread's contiguous share holds whole (sample, part) rows.
      if (compute) run_shares();
    }
  }
}

}  // namespace dynprune
