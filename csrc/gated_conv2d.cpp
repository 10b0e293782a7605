// CPU implementation of dynprune::gated_conv2d (contract: ARCHITECTURE.md).
//
// float32 runs the native kernel: per sample, only the kept output channels
// are computed, over only the non-zero (or given) input channels; the gate
// scale, bias and ReLU are applied in the epilogue; pruned output channels are
// written as exact zeros. Other dtypes run the dense reference formula in ATen
// (correct, not faster): see README "dtypes".
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>


#include "gated_conv2d.h"
#include "microkernel.h"

namespace dynprune {
namespace {

struct Geometry {
  int64_t N, Cin, H, W, Cout, kh, kw, Ho, Wo;
  int64_t sh, sw, ph, pw, dh, dw;
};

// ---------------------------------------------------------------- validation

void check_index_rows(const at::Tensor& idx, const char* name, int64_t N, int64_t limit) {
  TORCH_CHECK_TYPE(!at::isFloatingType(idx.scalar_type()) && idx.scalar_type() != at::kBool &&
                       at::isIntegralType(idx.scalar_type(), false),
                   name, " must be an integer tensor, got ", idx.scalar_type());
  TORCH_CHECK_VALUE(idx.dim() == 2 && idx.size(0) == N, name, " must have shape [N=", N,
                    ", k], got ", idx.sizes());
}

// Index values: in range and strictly increasing per row.
void check_index_values(const int64_t* row, int64_t k, const char* name, int64_t n, int64_t limit) {
  for (int64_t j = 0; j < k; ++j) {
    TORCH_CHECK_VALUE(row[j] >= 0 && row[j] < limit, name, "[", n, ", ", j, "] = ", row[j],
                      " is out of range [0, ", limit, ")");
    TORCH_CHECK_VALUE(j == 0 || row[j] > row[j - 1], name, "[", n,
                      "] must be sorted ascending without duplicates, got ", row[j - 1],
                      " then ", row[j]);
  }
}

Geometry check_inputs(const at::Tensor& x, const at::Tensor& weight,
                      const c10::optional<at::Tensor>& bias, const at::Tensor& out_idx,
                      const c10::optional<at::Tensor>& out_scale,
                      const c10::optional<at::Tensor>& in_idx, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK_VALUE(x.dim() == 4, "x must be 4-D [N, Cin, H, W], got ", x.dim(), "-D");
  TORCH_CHECK_VALUE(weight.dim() == 4, "weight must be 4-D [Cout, Cin, kh, kw], got ",
                    weight.dim(), "-D");
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "x must be floating point, got ",
                   x.scalar_type());
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), "dtype mismatch: x is ",
                   x.scalar_type(), " but weight is ", weight.scalar_type());
  TORCH_CHECK_VALUE(weight.size(1) == x.size(1), "channel mismatch: x has ", x.size(1),
                    " input channels but weight expects ", weight.size(1),
                    " (grouped convolutions are not supported)");
  TORCH_CHECK_VALUE(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
                    "stride, padding and dilation must have 2 elements each");
  for (int d = 0; d < 2; ++d) {
    TORCH_CHECK_VALUE(stride[d] > 0 && dilation[d] > 0 && padding[d] >= 0,
                      "stride and dilation must be positive and padding non-negative, got stride=",
                      stride, " padding=", padding, " dilation=", dilation);
  }
  Geometry g;
  g.N = x.size(0); g.Cin = x.size(1); g.H = x.size(2); g.W = x.size(3);
  g.Cout = weight.size(0); g.kh = weight.size(2); g.kw = weight.size(3);
  g.sh = stride[0]; g.sw = stride[1]; g.ph = padding[0]; g.pw = padding[1];
  g.dh = dilation[0]; g.dw = dilation[1];
  g.Ho = (g.H + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.Wo = (g.W + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  TORCH_CHECK_VALUE(g.H + 2 * g.ph >= g.dh * (g.kh - 1) + 1 &&
                        g.W + 2 * g.pw >= g.dw * (g.kw - 1) + 1,
                    "input ", g.H, "x", g.W, " with padding ", padding,
                    " is smaller than the dilated kernel");
  if (bias.has_value()) {
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), "dtype mismatch: x is ",
                     x.scalar_type(), " but bias is ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == g.Cout, "bias must have shape [",
                      g.Cout, "], got ", bias->sizes());
  }
  check_index_rows(out_idx, "out_idx", g.N, g.Cout);
  TORCH_CHECK_VALUE(out_idx.size(1) <= g.Cout, "out_idx lists ", out_idx.size(1),
                    " channels but only ", g.Cout, " exist");
  if (out_scale.has_value()) {
    TORCH_CHECK_TYPE(out_scale->scalar_type() == x.scalar_type(), "dtype mismatch: x is ",
                     x.scalar_type(), " but out_scale is ", out_scale->scalar_type());
    TORCH_CHECK_VALUE(out_scale->sizes() == out_idx.sizes(), "out_scale must have the shape of out_idx ",
                      out_idx.sizes(), ", got ", out_scale->sizes());
  }
  if (in_idx.has_value()) {
    check_index_rows(*in_idx, "in_idx", g.N, g.Cin);
    TORCH_CHECK_VALUE(in_idx->size(1) <= g.Cin, "in_idx lists ", in_idx->size(1),
                      " channels but only ", g.Cin, " exist");
  }
  for (const at::Tensor* t : {&weight, &out_idx}) {
    TORCH_CHECK_VALUE(t->device() == x.device(), "all tensors must be on ", x.device(),
                      ", got one on ", t->device());
  }
  for (const auto* t : {&bias, &out_scale, &in_idx}) {
    TORCH_CHECK_VALUE(!t->has_value() || (*t)->device() == x.device(),
                      "all tensors must be on ", x.device(), ", got one on ", (*t)->device());
  }
  return g;
}

// ---------------------------------------------------------------- wide grid
//
// The kept input channels of a sample are copied once into a zero-padded
// buffer, split into stride phases: phase (py, px) of channel i holds padded
// pixels (py + sh*a, px + sw*b). An output pixel (oh, ow) is computed at the
// "wide" position q = oh*Wph + ow, and tap (r, s) then reads buffer element
// q + tap_off[t] of the channel: consecutive q read consecutive floats, for
// any stride and dilation. Positions with ow >= Wo are junk and never stored.

struct Wide {
  int64_t phases, Hph, Wph, chan;  // chan: floats per channel (all phases)
  int64_t Q, qblocks, len_extra;   // wide positions, blocks, buffer slack
  std::vector<int64_t> tap_off;
};

Wide make_wide(const Geometry& g) {
  Wide w;
  const int64_t Hp = g.H + 2 * g.ph, Wp = g.W + 2 * g.pw;
  w.phases = g.sh * g.sw;
  w.Hph = (Hp + g.sh - 1) / g.sh;
  w.Wph = (Wp + g.sw - 1) / g.sw;
  w.chan = w.phases * w.Hph * w.Wph;
  w.Q = g.Ho * w.Wph;
  w.qblocks = (w.Q + kQBlock - 1) / kQBlock;
  int64_t max_off = 0;
  for (int64_t r = 0; r < g.kh; ++r) {
    for (int64_t s = 0; s < g.kw; ++s) {
      const int64_t a = r * g.dh, b = s * g.dw;
      const int64_t off = ((a % g.sh) * g.sw + b % g.sw) * w.Hph * w.Wph + (a / g.sh) * w.Wph + b / g.sw;
      w.tap_off.push_back(off);
      max_off = std::max(max_off, off);
    }
  }
  // Junk positions of the last block may read past the last channel.
  w.len_extra = std::max<int64_t>(0, w.qblocks * kQBlock + max_off - w.chan);
  return w;
}

// Copies channels in_ch of x_n into buf in the wide-grid layout (see above).
void fill_wide(const float* x_n, const Geometry& g, const Wide& w, const std::vector<int64_t>& in_ch,
               float* buf) {
  const int64_t plane = g.H * g.W;
  for (size_t i = 0; i < in_ch.size(); ++i) {
    const float* src = x_n + in_ch[i] * plane;
    for (int64_t py = 0; py < g.sh; ++py) {
      for (int64_t px = 0; px < g.sw; ++px) {
        float* dst = buf + i * w.chan + (py * g.sw + px) * w.Hph * w.Wph;
        // Columns b with 0 <= px + sw*b - pw < W come from x; the rest are padding.
        const int64_t c0 = px - g.pw;
        const int64_t b_lo = std::min(w.Wph, c0 >= 0 ? 0 : (-c0 + g.sw - 1) / g.sw);
        const int64_t b_hi = std::max(b_lo, std::min(w.Wph, g.W - 1 - c0 < 0 ? 0 : (g.W - 1 - c0) / g.sw + 1));
        for (int64_t a = 0; a < w.Hph; ++a, dst += w.Wph) {
          const int64_t ih = py + g.sh * a - g.ph;
          if (ih < 0 || ih >= g.H) {
            std::fill_n(dst, w.Wph, 0.f);
            continue;
          }
          const float* row = src + ih * g.W + c0;
          std::fill_n(dst, b_lo, 0.f);
          if (g.sw == 1) {
            std::copy(row + b_lo, row + b_hi, dst + b_lo);
          } else {
            for (int64_t b = b_lo; b < b_hi; ++b) dst[b] = row[b * g.sw];
          }
          std::fill(dst + b_hi, dst + w.Wph, 0.f);
        }
      }
    }
  }
  std::fill_n(buf + in_ch.size() * w.chan, w.len_extra, 0.f);
}

// ---------------------------------------------------------------- float32 kernel

struct SamplePlan {
  std::vector<int64_t> in_ch;   // kept input channels
  std::vector<int64_t> in_off;  // in_ch * taps (offsets into a weight row)
  at::Tensor buf;               // wide-grid copy of the kept input channels
};

// Input channels per reduction chunk: keeps the chunk's slice of the wide
// buffer in L1/L2 while every output-channel tile sweeps it.
int64_t channels_per_chunk(int64_t taps) { return std::max<int64_t>(1, 288 / taps); }

// One work item: wide block qb of a sample, kept output channels [j0, j1).
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void compute_block(const float* weight, const Geometry& g, const Wide& wd, const SamplePlan& sp,
                   const int64_t* out_ch, const float* scale, const float* bias_scaled,
                   int64_t j0, int64_t j1, int64_t qb, bool relu, float* y_n, float* cbuf) {
  const int64_t taps = g.kh * g.kw, kin = sp.in_ch.size(), row_len = g.Cin * taps;
  const int64_t q0 = qb * kQBlock;
  const int R = static_cast<int>((std::min<int64_t>(kQBlock, wd.Q - q0) + kLanes - 1) / kLanes);
  const float* xbuf = sp.buf.data_ptr<float>();
  const int64_t ci_chunk = channels_per_chunk(taps);

  if (kin == 0) std::fill_n(cbuf, (j1 - j0) * kQBlock, 0.f);
  for (int64_t c0 = 0; c0 < kin; c0 += ci_chunk) {
    const int64_t ci = std::min(ci_chunk, kin - c0);
    for (int64_t j = j0; j < j1; j += kJBlock) {
      const int J = static_cast<int>(std::min<int64_t>(kJBlock, j1 - j));
      const float* wrows[kJBlock];
      for (int u = 0; u < J; ++u) wrows[u] = weight + out_ch[j + u] * row_len;
      run_tile(J, R, xbuf + c0 * wd.chan + q0, wd.chan, ci, wd.tap_off.data(), taps, wrows,
               sp.in_off.data() + c0, cbuf + (j - j0) * kQBlock, c0 == 0);
    }
  }

  // Epilogue: act(scale * acc + scale * bias) for the valid (non-junk) positions.
  for (int64_t j = j0; j < j1; ++j) {
    const float* acc = cbuf + (j - j0) * kQBlock;
    float* out = y_n + out_ch[j] * g.Ho * g.Wo;
    const float sc = scale[j], sb = bias_scaled[j];
    for (int64_t q = q0; q < std::min(q0 + kQBlock, wd.Q);) {
      const int64_t oh = q / wd.Wph, ow = q % wd.Wph;
      const int64_t run = std::min(wd.Wph - ow, q0 + kQBlock - q);
      const int64_t valid = std::max<int64_t>(0, std::min(run, g.Wo - ow));
      const float* a = acc + (q - q0);
      float* o = out + oh * g.Wo + ow;
      if (relu) {
        for (int64_t l = 0; l < valid; ++l) {
          const float v = a[l] * sc + sb;
          o[l] = v < 0.f ? 0.f : v;  // keeps NaN, like torch.relu
        }
      } else {
        for (int64_t l = 0; l < valid; ++l) o[l] = a[l] * sc + sb;
      }
      q += run;
    }
  }
}

// Input channels of x_n that hold at least one non-zero value.
void find_active_channels(const float* x_n, int64_t C, int64_t plane, std::vector<int64_t>& out) {
  out.clear();
  for (int64_t c = 0; c < C; ++c) {
    const float* p = x_n + c * plane;
    for (int64_t e = 0; e < plane; ++e) {
      if (p[e] != 0.f) {  // NaN != 0 too: a NaN channel is kept, so NaN propagates
        out.push_back(c);
        break;
      }
    }
  }
}

void gated_conv2d_f32(const at::Tensor& x_in, const at::Tensor& weight_in,
                      const c10::optional<at::Tensor>& bias, const at::Tensor& out_idx_in,
                      const c10::optional<at::Tensor>& out_scale,
                      const c10::optional<at::Tensor>& in_idx, const Geometry& g, bool relu,
                      at::Tensor& y) {
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor out_idx = out_idx_in.to(at::kLong).contiguous();
  const int64_t N = g.N, k = out_idx.size(1), Qout = g.Ho * g.Wo, taps = g.kh * g.kw;
  const int64_t plane = g.H * g.W;
  const Wide wd = make_wide(g);

  at::Tensor in_idx_l;
  if (in_idx.has_value()) in_idx_l = in_idx->to(at::kLong).contiguous();

  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const int64_t* oi = out_idx.data_ptr<int64_t>();
  float* yp = y.data_ptr<float>();

  // Pass 1 (per sample): validate indices, find the input channels, build the
  // wide-grid input copy, zero the pruned output rows.
  std::vector<SamplePlan> plans(N);
  at::parallel_for(0, N, 1, [&](int64_t b, int64_t e) {
    std::vector<char> kept(g.Cout);
    for (int64_t n = b; n < e; ++n) {
      const int64_t* row = oi + n * k;
      check_index_values(row, k, "out_idx", n, g.Cout);
      SamplePlan& sp = plans[n];
      if (in_idx_l.defined()) {
        const int64_t kin = in_idx_l.size(1);
        const int64_t* irow = in_idx_l.data_ptr<int64_t>() + n * kin;
        check_index_values(irow, kin, "in_idx", n, g.Cin);
        sp.in_ch.assign(irow, irow + kin);
      } else {
        find_active_channels(xp + n * g.Cin * plane, g.Cin, plane, sp.in_ch);
      }
      sp.in_off.resize(sp.in_ch.size());
      for (size_t i = 0; i < sp.in_ch.size(); ++i) sp.in_off[i] = sp.in_ch[i] * taps;
      if (k > 0) {
        sp.buf = at::empty({static_cast<int64_t>(sp.in_ch.size()) * wd.chan + wd.len_extra + 1},
                           x.options());
        fill_wide(xp + n * g.Cin * plane, g, wd, sp.in_ch, sp.buf.data_ptr<float>());
      }
      std::fill(kept.begin(), kept.end(), 0);
      for (int64_t j = 0; j < k; ++j) kept[row[j]] = 1;
      for (int64_t c = 0; c < g.Cout; ++c)
        if (!kept[c]) std::fill_n(yp + (n * g.Cout + c) * Qout, Qout, 0.f);
    }
  });
  if (k == 0 || Qout == 0) return;

  // Per-sample epilogue constants (out_idx is validated above): scale and
  // scale * bias for each kept channel.
  const at::Tensor scale = out_scale.has_value() ? out_scale->contiguous()
                                                 : at::ones({N, k}, x.options());
  const at::Tensor bias_scaled = bias.has_value()
                                     ? (bias->contiguous().index({out_idx}) * scale).contiguous()
                                     : at::zeros({N, k}, x.options());

  // Pass 2: work items (sample, wide block, output-channel chunk). Small
  // batches split output channels too, so every thread has work.
  const int64_t threads = at::get_num_threads();
  const int64_t qblocks = wd.qblocks;
  const int64_t jblocks = (k + kJBlock - 1) / kJBlock;
  int64_t chunks = 1;
  if (N * qblocks < 4 * threads)
    chunks = std::min<int64_t>(jblocks, (4 * threads + N * qblocks - 1) / (N * qblocks));
  const int64_t chunk_len = ((jblocks + chunks - 1) / chunks) * kJBlock;
  chunks = (k + chunk_len - 1) / chunk_len;
  const int64_t items = N * qblocks * chunks;
  const float* sc = scale.data_ptr<float>();
  const float* bs = bias_scaled.data_ptr<float>();

  at::parallel_for(0, items, 1, [&](int64_t b, int64_t e) {
    // ATen's CPU allocator aligns to 64 bytes, as the tile's vector stores need.
    at::Tensor cbuf_t = at::empty({chunk_len * kQBlock}, x.options());
    float* cbuf = cbuf_t.data_ptr<float>();
    for (int64_t it = b; it < e; ++it) {
      const int64_t n = it / (qblocks * chunks);
      const int64_t qb = (it / chunks) % qblocks;
      const int64_t c = it % chunks;
      const int64_t j0 = c * chunk_len, j1 = std::min(k, j0 + chunk_len);
      compute_block(wp, g, wd, plans[n], oi + n * k, sc + n * k, bs + n * k, j0, j1, qb, relu,
                    yp + n * g.Cout * Qout, cbuf);
    }
  });
}

// ---------------------------------------------------------------- dense reference (other dtypes)

void gated_conv2d_dense(const at::Tensor& x, const at::Tensor& weight,
                        const c10::optional<at::Tensor>& bias, const at::Tensor& out_idx,
                        const c10::optional<at::Tensor>& out_scale,
                        const c10::optional<at::Tensor>& in_idx, const Geometry& g,
                        at::IntArrayRef stride, at::IntArrayRef padding,
                        at::IntArrayRef dilation, bool relu, at::Tensor& y) {
  const at::Tensor oi = out_idx.to(at::kLong);
  for (int64_t n = 0; n < g.N; ++n) {
    check_index_values(oi[n].contiguous().data_ptr<int64_t>(), oi.size(1), "out_idx", n, g.Cout);
  }
  at::Tensor xin = x;
  if (in_idx.has_value()) {
    const at::Tensor ii = in_idx->to(at::kLong);
    for (int64_t n = 0; n < g.N; ++n)
      check_index_values(ii[n].contiguous().data_ptr<int64_t>(), ii.size(1), "in_idx", n, g.Cin);
    at::Tensor in_mask = at::zeros({g.N, g.Cin}, x.options().dtype(at::kBool));
    in_mask.scatter_(1, ii, true);
    xin = x * in_mask.view({g.N, g.Cin, 1, 1}).to(x.scalar_type());
  }
  at::Tensor dense = at::conv2d(xin, weight, bias, stride, padding, dilation);
  at::Tensor full_scale = at::zeros({g.N, g.Cout}, x.options());
  full_scale.scatter_(1, oi, out_scale.has_value() ? *out_scale : at::ones(oi.sizes(), x.options()));
  at::Tensor kept = at::zeros({g.N, g.Cout}, x.options().dtype(at::kBool));
  kept.scatter_(1, oi, true);
  at::Tensor out = dense * full_scale.view({g.N, g.Cout, 1, 1});
  if (relu) out = at::relu(out);
  y.copy_(at::where(kept.view({g.N, g.Cout, 1, 1}), out, at::zeros({}, x.options())));
}

}  // namespace

// ---------------------------------------------------------------- registered ops

at::Tensor& gated_conv2d_out(const at::Tensor& x, const at::Tensor& weight,
                             const c10::optional<at::Tensor>& bias, const at::Tensor& out_idx,
                             const c10::optional<at::Tensor>& out_scale,
                             const c10::optional<at::Tensor>& in_idx, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, bool relu,
                             at::Tensor& out) {
  const Geometry g =
      check_inputs(x, weight, bias, out_idx, out_scale, in_idx, stride, padding, dilation);
  TORCH_CHECK_VALUE(out.sizes() == at::IntArrayRef({g.N, g.Cout, g.Ho, g.Wo}),
                    "out must have shape ", at::IntArrayRef({g.N, g.Cout, g.Ho, g.Wo}), ", got ",
                    out.sizes());
  TORCH_CHECK_TYPE(out.scalar_type() == x.scalar_type(), "dtype mismatch: x is ",
                   x.scalar_type(), " but out is ", out.scalar_type());
  if (g.N == 0) return out;
  if (x.scalar_type() == at::kFloat && out.is_contiguous()) {
    gated_conv2d_f32(x, weight, bias, out_idx, out_scale, in_idx, g, relu, out);
  } else if (x.scalar_type() == at::kFloat) {
    at::Tensor tmp = at::empty(out.sizes(), out.options());
    gated_conv2d_f32(x, weight, bias, out_idx, out_scale, in_idx, g, relu, tmp);
    out.copy_(tmp);
  } else {
    gated_conv2d_dense(x, weight, bias, out_idx, out_scale, in_idx, g, stride, padding, dilation,
                       relu, out);
  }
  return out;
}

at::Tensor gated_conv2d(const at::Tensor& x, const at::Tensor& weight,
                        const c10::optional<at::Tensor>& bias, const at::Tensor& out_idx,
                        const c10::optional<at::Tensor>& out_scale,
                        const c10::optional<at::Tensor>& in_idx, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation, bool relu) {
  const Geometry g =
      check_inputs(x, weight, bias, out_idx, out_scale, in_idx, stride, padding, dilation);
  at::Tensor out = at::empty({g.N, g.Cout, g.Ho, g.Wo}, x.options());
  return gated_conv2d_out(x, weight, bias, out_idx, out_scale, in_idx, stride, padding, dilation,
                          relu, out);
}

}  // namespace dynprune

// The schemas are defined in Python (dynprune/ops.py) before this library loads.
TORCH_LIBRARY_IMPL(dynprune, CPU, m) {
  m.impl("gated_conv2d", &dynprune::gated_conv2d);
  m.impl("gated_conv2d.out", &dynprune::gated_conv2d_out);
}

