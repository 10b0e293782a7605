// Channel-vectorised inner loop of the gated convolution, for small maps.
//
// The pixel tile of microkernel.h puts 16 output pixels in a vector; on a 7x7
// map that wastes a quarter of the lanes, on 2x2 three quarters. Here the 16
// lanes are 16 kept output channels of one sample instead, and pixels sit in
// registers: a tile is up to 4 vectors (64 kept output channels) x 6 pixels.
//
// The weights of a block of 64 kept output channels are first packed for the
// sample, [kept input channel][tap][64], with AVX-512 gathers from the
// original rows: only kept (output, input) pairs are read, and each packed
// value then serves every pixel of the map. Lanes past the last kept channel
// hold zero weights and are never stored.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "microkernel.h"

namespace dynprune {

constexpr int kCBlock = 4 * kLanes;  // kept output channels per packed block
constexpr int kPTile = 6;            // output pixels per register tile

// pack[(i * taps + t) * kCBlock + v] = weight[rows[v] + in_off[i] + t] for
// v < m, 0 for m <= v < kCBlock. rows[v]: element offset of a kept output
// channel's row (must fit int32: checked by the caller).
__attribute__((target("arch=x86-64-v4"))) inline void pack_weights(
    const float* weight, const int32_t* rows, int m, const int64_t* in_off, int64_t kin,
    int64_t taps, float* pack) {
  __m512i idx[4];
  __mmask16 live[4];
  for (int b = 0; b < 4; ++b) {
    const int lo = b * kLanes;
    const int n = m - lo < 0 ? 0 : (m - lo > kLanes ? kLanes : m - lo);
    live[b] = static_cast<__mmask16>((1u << n) - 1u);
    idx[b] = _mm512_maskz_loadu_epi32(live[b], rows + (lo < m ? lo : 0));
  }
  for (int64_t i = 0; i < kin; ++i) {
    for (int64_t t = 0; t < taps; ++t) {
      const float* base = weight + in_off[i] + t;
      float* dst = pack + (i * taps + t) * kCBlock;
      for (int b = 0; b < 4; ++b) {
        const __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live[b], idx[b], base, 4);
        _mm512_store_ps(dst + b * kLanes, v);
      }
    }
  }
}

// acc[p][v] = sum over i < kin, t < taps of pack[i, t, v*16:(v+1)*16] * xs[i][q[p] + tap_off[t]]
// for P pixels at wide positions q[p], V vectors of channels. Results go to
// out[p * kCBlock + v * 16 + lane].
template <int V, int P>
__attribute__((target("arch=x86-64-v4"), always_inline)) inline void channel_tile(
    const float* pack, const float* const* xs, int64_t kin, const int64_t* tap_off, int64_t taps,
    const int64_t* q, float* out) {
  v16 acc[P][V];
  for (int p = 0; p < P; ++p)
    for (int v = 0; v < V; ++v) acc[p][v] = v16{};
  const float* w = pack;
  for (int64_t i = 0; i < kin; ++i) {
    const float* xp[P];
    for (int p = 0; p < P; ++p) xp[p] = xs[i] + q[p];
    for (int64_t t = 0; t < taps; ++t, w += kCBlock) {
      v16 wv[V];
      for (int v = 0; v < V; ++v) wv[v] = *reinterpret_cast<const v16*>(w + v * kLanes);
      const int64_t off = tap_off[t];
      for (int p = 0; p < P; ++p) {
        const float s = xp[p][off];
        for (int v = 0; v < V; ++v) acc[p][v] += wv[v] * s;
      }
    }
  }
  for (int p = 0; p < P; ++p)
    for (int v = 0; v < V; ++v) *reinterpret_cast<v16*>(out + p * kCBlock + v * kLanes) = acc[p][v];
}

template <int V>
__attribute__((target("arch=x86-64-v4"), always_inline)) inline void channel_tile_p(
    int P, const float* pack, const float* const* xs, int64_t kin, const int64_t* tap_off,
    int64_t taps, const int64_t* q, float* out) {
  switch (P) {
    case 6: channel_tile<V, 6>(pack, xs, kin, tap_off, taps, q, out); break;
    case 5: channel_tile<V, 5>(pack, xs, kin, tap_off, taps, q, out); break;
    case 4: channel_tile<V, 4>(pack, xs, kin, tap_off, taps, q, out); break;
    case 3: channel_tile<V, 3>(pack, xs, kin, tap_off, taps, q, out); break;
    case 2: channel_tile<V, 2>(pack, xs, kin, tap_off, taps, q, out); break;
    default: channel_tile<V, 1>(pack, xs, kin, tap_off, taps, q, out); break;
  }
}

// Runtime (V, P) -> compile-time tile. V in [1, 4], P in [1, kPTile].
__attribute__((target("arch=x86-64-v4"))) inline void run_channel_tile(
    int V, int P, const float* pack, const float* const* xs, int64_t kin, const int64_t* tap_off,
    int64_t taps, const int64_t* q, float* out) {
  switch (V) {
    case 4: channel_tile_p<4>(P, pack, xs, kin, tap_off, taps, q, out); break;
    case 3: channel_tile_p<3>(P, pack, xs, kin, tap_off, taps, q, out); break;
    case 2: channel_tile_p<2>(P, pack, xs, kin, tap_off, taps, q, out); break;
    default: channel_tile_p<1>(P, pack, xs, kin, tap_off, taps, q, out); break;
  }
}

}  // namespace dynprune
