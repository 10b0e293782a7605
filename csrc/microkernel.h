// Register-blocked inner loop of the gated convolution (float32).
//
// Per sample the convolution is a GEMM  Y[k, Q] = W[k, K] * X[K, Q]  with
// k = kept output channels, K = kept input channels x taps, Q = output pixels.
// Neither operand is copied per output channel:
//  * X is read straight from a zero-padded, stride-phase-split copy of the kept
//    input channels ("wide grid", see sparse_f32.cpp): for every tap, 16
//    consecutive wide output positions read 16 consecutive floats.
//  * W is read through row pointers into the original [Cout, Cin, kh, kw]
//    weight (kept output channels) and per-row offsets (kept input channels),
//    or, where enough pixel blocks reuse it, from a per-sample packed copy of
//    the kept weights (pack_weights in sparse_f32.cpp).
// So no multiply-add ever touches a pruned channel.
//
// GCC vector extensions: the same source compiles to AVX-512 (one register per
// v16) or to narrower SIMD; gated_conv2d.cpp builds clones and picks at run time.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace dynprune {

// The register tiles below are inlined into AVX-512 code only (block_avx512).
#define DYNPRUNE_TILE_FN static inline __attribute__((always_inline, target("arch=x86-64-v4")))

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));

constexpr int kLanes = 16;
constexpr int kQBlock = 4 * kLanes;  // wide output positions per work item
constexpr int kJBlock = 6;           // output channels per register tile

// Input channels per reduction chunk: keeps the chunk's slice of the wide
// buffer, and the weights every output-channel tile reads for it, in L1
// while the tiles sweep it. 16 channels for 3x3 (A/B, interleaved, 4 runs:
// 128x28x28 at batch 16 went from 1.28-1.37x the static conv to 1.26-1.28x;
// 32 channels before; 8 was slower on 14x14 and 7x7).
constexpr int64_t kChunkTaps = 144;
inline int64_t channels_per_chunk(int64_t taps) { return kChunkTaps / taps > 1 ? kChunkTaps / taps : 1; }

// Row-pointer weights are prefetched this many kept input channels ahead, into
// the next chunk too. A/B interleaved with the dense conv and masking, as the
// bench runs (so the weights are out of cache, as after other layers),
// dyn/static with 2 ahead within the chunk vs 8 ahead: 512x7x7 at batch 16
// 1.97-2.00 -> 1.84, batch 1 0.94-0.95 -> 0.90-0.92, 512x4x4 batch 1
// 1.20 -> 1.09, 512x2x2 1.08 -> 1.03, 64x56x56 batch 1 0.93 -> 0.90 (12 ahead:
// within 3% of 8). Without the dense calls in between it made no difference.
constexpr int64_t kRowPrefetch = 8;

// The epilogue of one output value (the pixel form's finish_block; the
// output-channel form's finish_lanes computes the same in vectors):
// act(scale * (conv + bias)), the op contract's order; ReLU keeps NaN, like
// torch.relu.
static inline __attribute__((always_inline)) float finish_value(float conv, float bias,
                                                                float scale, bool relu) {
  const float v = (conv + bias) * scale;
  return relu && v < 0.f ? 0.f : v;
}

// The same plus a residual value before the activation. The empty asm makes
// the product a rounded float first: -ffp-contract=fast would otherwise fuse
// it with the add into one FMA, rounding differently from the unfused ops.
static inline __attribute__((always_inline)) float rounded(float v) {
  asm("" : "+v"(v));
  return v;
}
__attribute__((target("arch=x86-64-v4"))) static inline __attribute__((always_inline)) __m512
rounded(__m512 v) {
  asm("" : "+v"(v));
  return v;
}
static inline __attribute__((always_inline)) float finish_value(float conv, float bias,
                                                                float scale, bool relu,
                                                                const float* res) {
  if (res == nullptr) return finish_value(conv, bias, scale, relu);
  const float v = rounded((conv + bias) * scale) + *res;
  return relu && v < 0.f ? 0.f : v;
}

// One register tile's operands. Weights come either through row pointers into
// the original weight (wrows[j] + in_off[i] + t) or packed for this tile
// (wpk[(i*taps + t)*J + j], see pack_weights in sparse_f32.cpp).
struct TileArgs {
  const float* const* xs;  // wide-grid (or 1x1 input) plane of each kept input
                           // channel of the chunk
  int64_t q0, ci;          // first wide position; input channels in the chunk
  const int64_t* tap_off;  // wide-grid offset of each tap
  int64_t taps;
  int64_t row_step;        // 3x3 taps only: tap (r, s) at r * row_step + s * col_step
  int64_t col_step;
  const float* const* wrows;  // row-pointer weights ...
  const int64_t* in_off;
  const float* wpk;           // ... or packed ones
  float* cbuf;                // accumulators, row stride kQBlock
  int64_t ci_left;            // kept input channels from the chunk's first to the last
                              // (0: no row prefetch)
  const float* xtail;         // tail tiles: per input channel of the chunk, its taps
                              // at the tail pixel (16 floats, zero past taps)
  uint16_t tap_mask;          // (1 << taps) - 1
  int64_t tail_lane;          // the tail pixel's accumulator in each cbuf row
};

// acc[J][R*16] (in cbuf) += sum over i < ci, t < taps of
//   weight(j, i, t) * xs[i][q0 + tap_off[t] + 0:R*16]
// first: start from zero. kPacked picks the weight source; k3x3 unrolls the
// nine taps of a 3x3 kernel whose offsets are r * row_step + s * col_step
// (stride 1, or tap copies), which leaves no address arithmetic between the
// FMAs. kTail (row pointers only) also computes the block's tail pixel, with
// its taps in the lanes: per input channel one masked load of each row's taps
// times the pixel's tap inputs (xtail), summed into cbuf[j][tail_lane] at the
// end.
// (7x7: 3 vectors and the tail, 28 FMAs per row and channel instead of 36;
// a one-pixel map: R = 0, the tail alone, 1 FMA instead of 9.)
template <int J, int R, bool kPacked, bool k3x3, bool kTail = false>
DYNPRUNE_TILE_FN void tile(const TileArgs& a, bool first) {
  float* __restrict cbuf = a.cbuf;
  v16 acc[J][R > 0 ? R : 1];  // R = 0: a map of one pixel, the tail alone
  v16 tacc[kTail ? J : 1];
  if (kTail)
    for (int j = 0; j < J; ++j) tacc[j] = v16{};
  for (int j = 0; j < J; ++j)
    for (int r = 0; r < R; ++r)
      acc[j][r] = first ? v16{} : *reinterpret_cast<const v16u*>(cbuf + j * kQBlock + r * kLanes);

  const float* wpk = a.wpk;
  for (int64_t i = 0; i < a.ci; ++i) {
    const float* w[J];
    if (!kPacked) {
      for (int j = 0; j < J; ++j) w[j] = a.wrows[j] + a.in_off[i];
      // Tail tiles go without: on the AMD host their prefetches made 512x7x7
      // 1.2-1.3x slower (256x7x7 1.25x at batch 16), ResNet-18 1.035x.
      if (!kTail && i + kRowPrefetch < a.ci_left) {  // rows are read sparsely: help the prefetcher
        // Both ends of each run: a 3x3 run (36 bytes) straddles two lines
        // about half the time. A/B on session 12's AMD host (each timed call
        // after a dense conv), start only/both time: 512x4x4 and 512x7x7 at
        // batch 1 1.03-1.04, batch 16 (512x7x7, 256x8x8) 1.00, 64x56x56 at
        // batch 1 0.99. (On session 6's Xeon: within +-3%.)
        for (int j = 0; j < J; ++j) {
          const float* run = a.wrows[j] + a.in_off[i + kRowPrefetch];
          __builtin_prefetch(run);
          __builtin_prefetch(run + a.taps - 1);
        }
      }
    }
    auto weight = [&](int j, int64_t t) { return kPacked ? wpk[t * J + j] : w[j][t]; };
    auto step = [&](const float* xp, int64_t t) {
      v16 xv[R > 0 ? R : 1];
      for (int r = 0; r < R; ++r) xv[r] = *reinterpret_cast<const v16u*>(xp + r * kLanes);
      for (int j = 0; j < J; ++j) {
        const float s = weight(j, t);
        for (int r = 0; r < R; ++r) acc[j][r] += xv[r] * s;
      }
    };
    const float* xi = a.xs[i] + a.q0;
    if (k3x3) {
#pragma GCC unroll 3
      for (int r = 0; r < 3; ++r) {
        const float* xr = xi + r * a.row_step;
#pragma GCC unroll 3
        for (int c = 0; c < 3; ++c) step(xr + c * a.col_step, r * 3 + c);
      }
    } else {
      // Not unrolled: 24 accumulators + 4 inputs leave no registers for a
      // second tap in flight.
      for (int64_t t = 0; t < a.taps; ++t) step(xi + a.tap_off[t], t);
    }
    if (kTail) {
      // The tail pixel: its taps in the lanes, one FMA per row and channel.
      const v16 xt = *reinterpret_cast<const v16u*>(a.xtail + i * kLanes);
      for (int j = 0; j < J; ++j)
        tacc[j] += reinterpret_cast<v16>(_mm512_maskz_loadu_ps(a.tap_mask, w[j])) * xt;
    }
    if (kPacked) wpk += a.taps * J;
  }
  if (kTail) {
    for (int j = 0; j < J; ++j) {
      const float sum = _mm512_reduce_add_ps(reinterpret_cast<__m512>(tacc[j]));
      float& slot = cbuf[j * kQBlock + a.tail_lane];
      slot = first ? sum : slot + sum;
    }
  }

  for (int j = 0; j < J; ++j)
    for (int r = 0; r < R; ++r)
      *reinterpret_cast<v16u*>(cbuf + j * kQBlock + r * kLanes) = acc[j][r];
}

// The tail pixel of a 1x1 kernel (Wide::tail, sparse_f32.cpp). A weight row
// is contiguous over input channels, so the pixel is a dot product over
// windows of 16 channels: window w starts at channel win_c[w], its kept
// channels are the bits of win_mask[w], and x[16w + l] is channel
// win_c[w] + l's input at the pixel. Masked lanes are neither loaded nor
// computed: no multiply-add touches an input channel that is not kept. A
// 512-channel row costs at most 32 FMAs where a fourth vector of pixels cost
// one FMA per kept input (256 at keep 0.5); session 13's gathers of the kept
// weights cost more than they saved. Writes out[j * kQBlock].
template <int J>
DYNPRUNE_TILE_FN void tail_dot(const float* const* wrows, const int64_t* win_c,
                               const uint16_t* win_mask, const float* x, int64_t windows,
                               float* out) {
  __m512 acc[J];
  for (int j = 0; j < J; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t w = 0; w < windows; ++w) {
    const __mmask16 m = win_mask[w];
    const __m512 xv = _mm512_loadu_ps(x + w * kLanes);
    for (int j = 0; j < J; ++j)
      acc[j] = _mm512_mask3_fmadd_ps(_mm512_maskz_loadu_ps(m, wrows[j] + win_c[w]), xv, acc[j], m);
  }
  for (int j = 0; j < J; ++j) out[j * kQBlock] = _mm512_reduce_add_ps(acc[j]);
}

DYNPRUNE_TILE_FN void run_tail_dot(int J, const float* const* wrows, const int64_t* win_c,
                                   const uint16_t* win_mask, const float* x, int64_t windows,
                                   float* out) {
  switch (J) {
    case 8: tail_dot<8>(wrows, win_c, win_mask, x, windows, out); break;
    case 7: tail_dot<7>(wrows, win_c, win_mask, x, windows, out); break;
    case 6: tail_dot<6>(wrows, win_c, win_mask, x, windows, out); break;
    case 5: tail_dot<5>(wrows, win_c, win_mask, x, windows, out); break;
    case 4: tail_dot<4>(wrows, win_c, win_mask, x, windows, out); break;
    case 3: tail_dot<3>(wrows, win_c, win_mask, x, windows, out); break;
    case 2: tail_dot<2>(wrows, win_c, win_mask, x, windows, out); break;
    default: tail_dot<1>(wrows, win_c, win_mask, x, windows, out); break;
  }
}

// Runtime (J, R) -> compile-time tile; J in [1, kJBlock], R in [1, 4] (R = 0
// only for tail tiles, below).
template <int R, bool kPacked, bool k3x3, bool kTail = false>
DYNPRUNE_TILE_FN void tile_j(int J, const TileArgs& a, bool first) {
  switch (J) {
    case 6: tile<6, R, kPacked, k3x3, kTail>(a, first); break;
    case 5: tile<5, R, kPacked, k3x3, kTail>(a, first); break;
    case 4: tile<4, R, kPacked, k3x3, kTail>(a, first); break;
    case 3: tile<3, R, kPacked, k3x3, kTail>(a, first); break;
    case 2: tile<2, R, kPacked, k3x3, kTail>(a, first); break;
    default: tile<1, R, kPacked, k3x3, kTail>(a, first); break;
  }
}

template <bool kPacked, bool k3x3>
DYNPRUNE_TILE_FN void tile_jr(int J, int R, const TileArgs& a, bool first) {
  switch (R) {
    case 4: tile_j<4, kPacked, k3x3>(J, a, first); break;
    case 3: tile_j<3, kPacked, k3x3>(J, a, first); break;
    case 2: tile_j<2, kPacked, k3x3>(J, a, first); break;
    default: tile_j<1, kPacked, k3x3>(J, a, first); break;
  }
}

// 1x1 tiles ahead of tail_dot: R in [0, 3] vectors, J in [1, kJBlockTail1x1].
constexpr int kJBlockTail1x1 = 8;
template <int R>
DYNPRUNE_TILE_FN void tile_1x1_j(int J, const TileArgs& a, bool first) {
  switch (J) {
    case 8: tile<8, R, false, false>(a, first); break;
    case 7: tile<7, R, false, false>(a, first); break;
    default: tile_j<R, false, false>(J, a, first); break;
  }
}

DYNPRUNE_TILE_FN void run_1x1_tail_tile(int J, int R, const TileArgs& a, bool first) {
  switch (R) {
    case 3: tile_1x1_j<3>(J, a, first); break;
    case 2: tile_1x1_j<2>(J, a, first); break;
    case 1: tile_1x1_j<1>(J, a, first); break;
    default: break;  // a map of one pixel: tail_dot alone
  }
}

// Row-pointer tiles whose block ends with a tail pixel (see has_tail in
// sparse_f32.cpp): R vectors of pixels, then the tail. R in [1, 3] (R = 0:
// tail_only_tile).
template <bool k3x3>
DYNPRUNE_TILE_FN void tail_tile_jr(int J, int R, const TileArgs& a, bool first) {
  switch (R) {
    case 3: tile_j<3, false, k3x3, true>(J, a, first); break;
    case 2: tile_j<2, false, k3x3, true>(J, a, first); break;
    default: tile_j<1, false, k3x3, true>(J, a, first); break;
  }
}

// A one-pixel block: the tail alone (R = 0). Not inlined: block_avx512
// holds every other tile inlined, and this one stays out of its code.
template <bool k3x3>
static __attribute__((noinline, target("arch=x86-64-v4"))) void tail_only_tile(
    int J, const TileArgs& a, bool first) {
  tile_j<0, false, k3x3, true>(J, a, first);
}

DYNPRUNE_TILE_FN void run_tail_tile(int J, int R, const TileArgs& a, bool is3x3,
                                    bool first) {
  if (R == 0) {
    if (is3x3) tail_only_tile<true>(J, a, first);
    else tail_only_tile<false>(J, a, first);
  } else if (is3x3) {
    tail_tile_jr<true>(J, R, a, first);
  } else {
    tail_tile_jr<false>(J, R, a, first);
  }
}

DYNPRUNE_TILE_FN void run_tile(int J, int R, const TileArgs& a, bool packed, bool is3x3,
                               bool first) {
  if (packed) {
    if (is3x3) tile_jr<true, true>(J, R, a, first);
    else tile_jr<true, false>(J, R, a, first);
  } else {
    if (is3x3) tile_jr<false, true>(J, R, a, first);
    else tile_jr<false, false>(J, R, a, first);
  }
}

}  // namespace dynprune
