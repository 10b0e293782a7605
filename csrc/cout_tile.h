// Register tile of the output-channel-vector form of the gated convolution
// (float32, AVX-512), for small output maps.
//
// The pixel-vector tile (microkernel.h) puts 16 wide output positions in a
// register; on a 7x7 map that is 4 vectors for 49 pixels (23% junk lanes),
// and its weights are scalars broadcast one by one. Here a register holds 16
// kept output channels of one pixel instead: the weights are vectors, packed
// per sample (pack_chunk in cout_vector.cpp), the inputs are broadcast,
// and no lane is junk except the padding of the last 32 kept channels.
#pragma once

#include <cstdint>
#include <utility>

#include "microkernel.h"

namespace dynprune {

constexpr int kCoutTile = 32;    // kept output channels per tile: two registers
constexpr int kCoutPixels = 14;  // pixels per tile at most: 28 accumulators

struct CoutTileArgs {
  const float* const* xs;  // wide-grid (or 1x1 input) plane of each kept input
                           // channel of the chunk
  int64_t ci;              // input channels in the chunk
  const int64_t* tap_off;  // wide-grid offset of each tap
  int64_t taps;
  int64_t q0;        // wide position of the tile's first pixel
  int64_t row_step;  // wide positions between the tile's rows
  const float* wpk;  // packed weights of the chunk: [ci][taps][kCoutTile]
  float* acc;        // accumulators: pixel (r, p) at acc + r * acc_row + p * kCoutTile
  int64_t acc_row;
};

// acc[r][p][0:32] += sum over i < ci, t < taps of
//   wpk[i][t][0:32] * xs[i][q0 + r * row_step + p + tap_off[t]]
// first: start from zero. R rows of P consecutive pixels, R * P <= kCoutPixels.
template <int R, int P>
__attribute__((target("arch=x86-64-v4"))) void cout_tile(const CoutTileArgs& a, bool first) {
  v16 acc[R][P][2];
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p)
      for (int h = 0; h < 2; ++h)
        acc[r][p][h] = first ? v16{}
                             : *reinterpret_cast<const v16u*>(a.acc + r * a.acc_row + p * kCoutTile + h * kLanes);
  const float* w = a.wpk;
  for (int64_t i = 0; i < a.ci; ++i) {
    const float* xi = a.xs[i] + a.q0;
    for (int64_t t = 0; t < a.taps; ++t, w += kCoutTile) {
      const v16 w0 = *reinterpret_cast<const v16u*>(w);
      const v16 w1 = *reinterpret_cast<const v16u*>(w + kLanes);
      const float* xt = xi + a.tap_off[t];
      for (int r = 0; r < R; ++r) {
        const float* xr = xt + r * a.row_step;
        for (int p = 0; p < P; ++p) {
          const float s = xr[p];
          acc[r][p][0] += w0 * s;
          acc[r][p][1] += w1 * s;
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p)
      for (int h = 0; h < 2; ++h)
        *reinterpret_cast<v16u*>(a.acc + r * a.acc_row + p * kCoutTile + h * kLanes) = acc[r][p][h];
}

typedef void (*CoutTileFn)(const CoutTileArgs&, bool);

// cout_tile<R, P> for a runtime shape; R * P <= kCoutPixels.
template <int R, int P>
constexpr CoutTileFn cout_tile_entry() {
  if constexpr (R * P <= kCoutPixels) return &cout_tile<R, P>;
  else return nullptr;
}

template <int R, int... P>
constexpr void fill_cout_row(CoutTileFn* row, std::integer_sequence<int, P...>) {
  ((row[P + 1] = cout_tile_entry<R, P + 1>()), ...);
}

template <int... R>
constexpr void fill_cout_table(CoutTileFn (*table)[kCoutPixels + 1], std::integer_sequence<int, R...>) {
  ((fill_cout_row<R + 1>(table[R + 1], std::make_integer_sequence<int, kCoutPixels>{})), ...);
}

inline CoutTileFn cout_tile_fn(int R, int P) {
  static const auto table = [] {
    struct T { CoutTileFn f[kCoutPixels + 1][kCoutPixels + 1] = {}; } t;
    fill_cout_table(t.f, std::make_integer_sequence<int, kCoutPixels>{});
    return t;
  }();
  return table.f[R][P];
}

}  // namespace dynprune
