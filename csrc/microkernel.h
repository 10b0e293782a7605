// Register-blocked inner loop of the gated convolution (float32).
//
// Per sample the convolution is a GEMM  Y[k, Q] = W[k, K] * X[K, Q]  with
// k = kept output channels, K = kept input channels x taps, Q = output pixels.
// Neither operand is copied per output channel:
//  * X is read straight from a zero-padded, stride-phase-split copy of the kept
//    input channels ("wide grid", see gated_conv2d.cpp): for every tap, 16
//    consecutive wide output positions read 16 consecutive floats.
//  * W is read through row pointers into the original [Cout, Cin, kh, kw]
//    weight (kept output channels) and per-row offsets (kept input channels).
// So no multiply-add ever touches a pruned channel, and no weight is gathered.
//
// GCC vector extensions: the same source compiles to AVX-512 (one register per
// v16) or to narrower SIMD; gated_conv2d.cpp builds clones and picks at run time.
#pragma once

#include <cstdint>

namespace dynprune {

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));

constexpr int kLanes = 16;
constexpr int kQBlock = 4 * kLanes;  // wide output positions per work item
constexpr int kJBlock = 6;           // output channels per register tile

// acc[J][R*16] (in `cbuf`, row stride kQBlock) += sum over i < ci, t < taps of
//   w[j][in_off[i] + t] * xs[i][q0 + tap_off[t] + 0:R*16]
// xs[i]: the wide-grid plane of kept input channel i. first: start from zero.
template <int J, int R>
static inline __attribute__((always_inline)) void tile(
    const float* const* xs, int64_t q0, int64_t ci, const int64_t* tap_off, int64_t taps,
    const float* const* wrows, const int64_t* in_off, float* __restrict cbuf, bool first) {
  v16 acc[J][R];
  for (int j = 0; j < J; ++j)
    for (int r = 0; r < R; ++r)
      acc[j][r] = first ? v16{} : *reinterpret_cast<const v16u*>(cbuf + j * kQBlock + r * kLanes);

  for (int64_t i = 0; i < ci; ++i) {
    const float* w[J];
    for (int j = 0; j < J; ++j) w[j] = wrows[j] + in_off[i];
    if (i + 2 < ci) {  // weights of a later channel: rows are read sparsely, so help the prefetcher
      for (int j = 0; j < J; ++j) __builtin_prefetch(wrows[j] + in_off[i + 2]);
    }
    const float* xi = xs[i] + q0;
    // Not unrolled: 24 accumulators + 4 inputs leave no registers for a
    // second tap in flight, and unrolling measured no faster (register moves).
    for (int64_t t = 0; t < taps; ++t) {
      const float* xp = xi + tap_off[t];
      v16 xv[R];
      for (int r = 0; r < R; ++r) xv[r] = *reinterpret_cast<const v16u*>(xp + r * kLanes);
      for (int j = 0; j < J; ++j) {
        const float s = w[j][t];
        for (int r = 0; r < R; ++r) acc[j][r] += xv[r] * s;
      }
    }
  }

  for (int j = 0; j < J; ++j)
    for (int r = 0; r < R; ++r)
      *reinterpret_cast<v16u*>(cbuf + j * kQBlock + r * kLanes) = acc[j][r];
}

// The same sums with the weights packed for this tile: wpk[(i*taps + t)*J + j]
// (see pack_weights in sparse_f32.cpp). One contiguous stream per tile instead
// of J scattered rows, so the broadcasts hit L1 and the prefetcher keeps up.
template <int J, int R>
static inline __attribute__((always_inline)) void tile_packed(
    const float* const* xs, int64_t q0, int64_t ci, const int64_t* tap_off, int64_t taps,
    const float* __restrict wpk, float* __restrict cbuf, bool first) {
  v16 acc[J][R];
  for (int j = 0; j < J; ++j)
    for (int r = 0; r < R; ++r)
      acc[j][r] = first ? v16{} : *reinterpret_cast<const v16u*>(cbuf + j * kQBlock + r * kLanes);

  for (int64_t i = 0; i < ci; ++i) {
    const float* xi = xs[i] + q0;
    for (int64_t t = 0; t < taps; ++t, wpk += J) {
      const float* xp = xi + tap_off[t];
      v16 xv[R];
      for (int r = 0; r < R; ++r) xv[r] = *reinterpret_cast<const v16u*>(xp + r * kLanes);
      for (int j = 0; j < J; ++j) {
        const float s = wpk[j];
        for (int r = 0; r < R; ++r) acc[j][r] += xv[r] * s;
      }
    }
  }

  for (int j = 0; j < J; ++j)
    for (int r = 0; r < R; ++r)
      *reinterpret_cast<v16u*>(cbuf + j * kQBlock + r * kLanes) = acc[j][r];
}

template <int R>
static inline __attribute__((always_inline)) void tile_packed_j(
    int J, const float* const* xs, int64_t q0, int64_t ci, const int64_t* tap_off, int64_t taps,
    const float* wpk, float* cbuf, bool first) {
  switch (J) {
    case 6: tile_packed<6, R>(xs, q0, ci, tap_off, taps, wpk, cbuf, first); break;
    case 5: tile_packed<5, R>(xs, q0, ci, tap_off, taps, wpk, cbuf, first); break;
    case 4: tile_packed<4, R>(xs, q0, ci, tap_off, taps, wpk, cbuf, first); break;
    case 3: tile_packed<3, R>(xs, q0, ci, tap_off, taps, wpk, cbuf, first); break;
    case 2: tile_packed<2, R>(xs, q0, ci, tap_off, taps, wpk, cbuf, first); break;
    default: tile_packed<1, R>(xs, q0, ci, tap_off, taps, wpk, cbuf, first); break;
  }
}

static inline __attribute__((always_inline)) void run_tile_packed(
    int J, int R, const float* const* xs, int64_t q0, int64_t ci, const int64_t* tap_off,
    int64_t taps, const float* wpk, float* cbuf, bool first) {
  switch (R) {
    case 4: tile_packed_j<4>(J, xs, q0, ci, tap_off, taps, wpk, cbuf, first); break;
    case 3: tile_packed_j<3>(J, xs, q0, ci, tap_off, taps, wpk, cbuf, first); break;
    case 2: tile_packed_j<2>(J, xs, q0, ci, tap_off, taps, wpk, cbuf, first); break;
    default: tile_packed_j<1>(J, xs, q0, ci, tap_off, taps, wpk, cbuf, first); break;
  }
}

// J in [1, kJBlock], R in [1, 4].
template <int R>
static inline __attribute__((always_inline)) void tile_j(
    int J, const float* const* xs, int64_t q0, int64_t ci, const int64_t* tap_off, int64_t taps,
    const float* const* wrows, const int64_t* in_off, float* cbuf, bool first) {
  switch (J) {
    case 6: tile<6, R>(xs, q0, ci, tap_off, taps, wrows, in_off, cbuf, first); break;
    case 5: tile<5, R>(xs, q0, ci, tap_off, taps, wrows, in_off, cbuf, first); break;
    case 4: tile<4, R>(xs, q0, ci, tap_off, taps, wrows, in_off, cbuf, first); break;
    case 3: tile<3, R>(xs, q0, ci, tap_off, taps, wrows, in_off, cbuf, first); break;
    case 2: tile<2, R>(xs, q0, ci, tap_off, taps, wrows, in_off, cbuf, first); break;
    default: tile<1, R>(xs, q0, ci, tap_off, taps, wrows, in_off, cbuf, first); break;
  }
}

// Runtime (J, R) -> compile-time tile.
static inline __attribute__((always_inline)) void run_tile(
    int J, int R, const float* const* xs, int64_t q0, int64_t ci, const int64_t* tap_off,
    int64_t taps, const float* const* wrows, const int64_t* in_off, float* cbuf, bool first) {
  switch (R) {
    case 4: tile_j<4>(J, xs, q0, ci, tap_off, taps, wrows, in_off, cbuf, first); break;
    case 3: tile_j<3>(J, xs, q0, ci, tap_off, taps, wrows, in_off, cbuf, first); break;
    case 2: tile_j<2>(J, xs, q0, ci, tap_off, taps, wrows, in_off, cbuf, first); break;
    default: tile_j<1>(J, xs, q0, ci, tap_off, taps, wrows, in_off, cbuf, first); break;
  }
}

}  // namespace dynprune
