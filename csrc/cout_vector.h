// Output-channel-vector form of the float32 sparse convolution (AVX-512), for
// batches of a sample per thread on small output maps: see cout_vector.cpp.
#pragma once

#include <cstdint>

#include "gated_conv2d.h"

namespace dynprune {

// One sample's operands. xs[i] is the wide-grid plane (sparse_f32.cpp) of kept
// input channel i; output pixel (oh, ow), tap t reads xs[i][oh*Wph + ow + tap_off[t]].
struct CoutSample {
  const float* const* xs;
  const int64_t* in_off;  // kept input channel * taps: offset into a weight row
  int64_t kin;
  const int64_t* out_ch;  // kept output channels, and per kept channel:
  const float* scale;     //   gate scale
  const float* bias;      //   bias
  int64_t k;
  const int64_t* tap_off;
  int64_t Wph;
};

// Whether the output-channel-vector form should run this layer, given the
// share of useful lanes in the pixel-vector form (pixel_fill, in (0, 1]).
bool cout_vector_pays(const Geometry& g, int64_t k, double pixel_fill);

// Tiles of 32 kept output channels: ceil(k / 32).
int64_t cout_tiles(int64_t k);

// Kept output channels in tile v (32, or fewer in the last one).
int64_t cout_tile_channels(int64_t k, int64_t v);

// Scratch per worker, in floats, for all tiles of a sample: packed weights,
// accumulators (fewer tiles need proportionally less).
int64_t cout_pack_floats(const Geometry& g, int64_t k);
int64_t cout_acc_floats(const Geometry& g, int64_t k);

// y_n[out_ch[j]] = act(scale[j] * (conv + bias[j]) [+ res]) (see Epilogue)
// for the kept channels j of tiles [v0, v1) of one sample (j in
// [32*v0, 32*v1) and < k); the pruned channels are left alone. Requires
// AVX-512.
void cout_vector_tiles(const float* weight, const Geometry& g, const CoutSample& s, int64_t v0,
                       int64_t v1, Epilogue ep, float* y_n, float* pack, float* acc);

}  // namespace dynprune
