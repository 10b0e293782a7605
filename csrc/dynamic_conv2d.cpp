// CPU implementation of dynprune::channel_gate and dynprune::dynamic_conv2d:
// the gate and the gated convolution of one DynamicConv2d layer in a single
// native call, so an eval forward costs one dispatch.
//
//   saliency = relu(gate_weight @ mean_hw(x) + gate_bias)     [N, Cout], float64, rounded once
//   out_idx  = top-k channels by (saliency desc, priority desc, index asc), sorted ascending
//   out_scale = saliency[out_idx]
//   y        = gated_conv2d(x, weight, bias, out_idx, out_scale, in_idx, ...)
// Input channels outside in_idx are treated as zero by the gate and the conv.
//
// The Python reference (dynprune/ops.py) defines the same computation.
#include <torch/extension.h>

#include "gated_conv2d.h"
#include "output_pool.h"

#include <array>
#include <memory>
#include <mutex>

namespace dynprune {

void check_gate(const at::Tensor& x, const Gate& gate) {
  TORCH_CHECK_VALUE(x.dim() == 4, "x must be 4-D [N, Cin, H, W], got ", x.dim(), "-D");
  TORCH_CHECK_VALUE(gate.weight.dim() == 2 && gate.weight.size(1) == x.size(1),
                    "gate_weight must have shape [Cout, ", x.size(1), "], got ",
                    gate.weight.sizes());
  const int64_t C = gate.weight.size(0);
  TORCH_CHECK_VALUE(gate.bias.dim() == 1 && gate.bias.size(0) == C && gate.priority.dim() == 1 &&
                        gate.priority.size(0) == C,
                    "gate_bias and priority must have shape [", C, "]");
  TORCH_CHECK_VALUE(gate.k >= 1 && gate.k <= C, "k must be in [1, ", C, "], got ", gate.k);
  for (const at::Tensor* t : {&gate.weight, &gate.bias, &gate.priority}) {
    TORCH_CHECK_TYPE(t->scalar_type() == x.scalar_type(), "dtype mismatch: x is ",
                     x.scalar_type(), " but a gate tensor is ", t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == x.device(), "all tensors must be on ", x.device(),
                      ", got one on ", t->device());
  }
}

std::tuple<at::Tensor, at::Tensor> channel_gate(const at::Tensor& x, const at::Tensor& gate_weight,
                                                const at::Tensor& gate_bias,
                                                const at::Tensor& priority, int64_t k) {
  check_gate(x, Gate{gate_weight, gate_bias, priority, k});
  const at::Tensor mean = x.mean({2, 3}, false, at::kDouble);
  const at::Tensor sal =
      at::relu(at::linear(mean, gate_weight.to(at::kDouble), gate_bias.to(at::kDouble)))
          .to(x.scalar_type());
  // Rank by (saliency desc, priority desc, index asc) with two stable sorts,
  // exactly as dynprune.ops.select_channels does.
  const at::Tensor order = std::get<1>(at::sort(priority, true, 0, true));
  const at::Tensor ranked = std::get<1>(at::sort(sal.index_select(1, order), true, 1, true));
  const at::Tensor idx =
      std::get<0>(at::sort(order.index({ranked.narrow(1, 0, k)}), false, 1, false));
  return {idx, sal.gather(1, idx)};
}

// dynamic_conv2d, or with `residual` (defined) act(gated conv + residual) by
// the float32 kernel's epilogue (see Epilogue): nullopt where that does not
// apply (not float32, a batch of 0, a residual not shaped like the output).
c10::optional<std::tuple<at::Tensor, at::Tensor, at::Tensor>> dynamic_conv2d_impl(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& gate_weight, const at::Tensor& gate_bias, const at::Tensor& priority,
    int64_t k, const c10::optional<at::Tensor>& in_idx, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, bool relu, const at::Tensor& residual,
    const at::Tensor& gate_weight_t = at::Tensor(), const at::Tensor& finite_rows = at::Tensor()) {
  const Gate gate{gate_weight, gate_bias, priority, k, gate_weight_t, finite_rows};
  check_gate(x, gate);
  const Geometry g =
      check_inputs(x, weight, bias, nullptr, c10::nullopt, in_idx, stride, padding, dilation);
  TORCH_CHECK_VALUE(gate_weight.size(0) == g.Cout, "gate_weight has ", gate_weight.size(0),
                    " rows but weight has ", g.Cout, " output channels");
  if (residual.defined() &&
      (x.scalar_type() != at::kFloat || g.N == 0 || residual.scalar_type() != at::kFloat ||
       !residual.device().is_cpu() || !residual.is_contiguous() ||
       residual.sizes() != at::IntArrayRef({g.N, g.Cout, g.Ho, g.Wo})))
    return c10::nullopt;
  if (x.scalar_type() != at::kFloat || g.N == 0) {
    at::Tensor xg = x;  // channels outside in_idx are zero for the gate too
    if (in_idx.has_value()) {
      check_index_values(*in_idx, "in_idx", g.Cin);
      at::Tensor mask = at::zeros({g.N, g.Cin}, x.options().dtype(at::kBool));
      mask.scatter_(1, in_idx->to(at::kLong), true);
      xg = at::where(mask.view({g.N, g.Cin, 1, 1}), x, at::zeros({}, x.options()));
    }
    auto [idx, scale] = channel_gate(xg, gate_weight, gate_bias, priority, k);
    at::Tensor y = gated_conv2d(x, weight, bias, idx, scale, in_idx, stride, padding, dilation, relu);
    return std::make_tuple(y, idx, scale);
  }
  if (in_idx.has_value()) check_index_values(*in_idx, "in_idx", g.Cin);
  at::Tensor idx = at::empty({g.N, k}, x.options().dtype(at::kLong));
  at::Tensor scale = at::empty({g.N, k}, x.options());
  at::Tensor y = empty_output({g.N, g.Cout, g.Ho, g.Wo}, x.options());
  sparse_conv2d_f32(x, weight, bias.has_value() ? *bias : at::Tensor(), &gate, idx, scale,
                    in_idx.has_value() ? *in_idx : at::Tensor(), g, relu, y, residual);
  return std::make_tuple(y, idx, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dynamic_conv2d(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& gate_weight, const at::Tensor& gate_bias, const at::Tensor& priority,
    int64_t k, const c10::optional<at::Tensor>& in_idx, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, bool relu) {
  return *dynamic_conv2d_impl(x, weight, bias, gate_weight, gate_bias, priority, k, in_idx, stride,
                              padding, dilation, relu, at::Tensor());
}

}  // namespace dynprune

TORCH_LIBRARY_IMPL(dynprune, CPU, m) {
  m.impl("channel_gate", &dynprune::channel_gate);
  m.impl("dynamic_conv2d", &dynprune::dynamic_conv2d);
}

namespace dynprune {

// Taps [t0, t1) of one dimension of a kernel that read the input at some
// output position; the others read only zero padding, for every output (a
// 3x3 kernel with padding 1 on a 1x1 map: only the centre tap).
struct LiveTaps {
  int64_t t0, t1;
};
LiveTaps live_taps(int64_t size, int64_t k, int64_t stride, int64_t pad, int64_t dil, int64_t out) {
  LiveTaps r{k, 0};
  for (int64_t t = 0; t < k; ++t) {
    const ColRange o = valid_columns(t * dil - pad, stride, size, out);
    if (o.lo < o.hi) {
      r.t0 = std::min(r.t0, t);
      r.t1 = t + 1;
    }
  }
  return r;
}

// One eval-mode DynamicConv2d bound once: its (BN-folded) weight, bias, gate
// and geometry. DynamicConv2d calls run() on CPU when no gradient is recorded:
// a pybind11 call with two arguments instead of torch.ops' twelve, which costs
// ~8 us of argument boxing a layer (measured on a 16-channel layer; ResNet-20
// has 19 such layers). Same function as dynamic_conv2d, minus out_scale.
struct EvalPlan {
  at::Tensor weight;
  c10::optional<at::Tensor> bias;
  at::Tensor gate_weight, gate_bias, priority;
  int64_t k;
  std::vector<int64_t> stride, padding, dilation;
  bool relu;
  // Tensors the bound weight/bias were computed from (a folded BatchNorm's
  // inputs) and their version counters then: stale() when any has changed.
  std::vector<at::Tensor> watched;
  std::vector<int64_t> seen;

  // Python objects the plan was built from: dict[key] was expected then (the
  // same object, or an equal value for configuration entries; a missing key
  // reads as None). Checked by holds() on every call, in place of the
  // layer's Python-side cache key (~7 us a layer inside a network). `dict`
  // may be a weak reference to an object, meaning that object's __dict__:
  // the layer's own, which holds the plan (a strong reference would make a
  // cycle the garbage collector cannot see through this C++ object).
  struct Guard {
    pybind11::object dict, key, expected;
    bool identity;
  };
  std::vector<Guard> guards;

  // Tensors made from `src` (a cut or transposed weight), kept while the key
  // they were made for holds: two entries of the caller's, src's data
  // pointer and version counter, and the same storage. The storage is held,
  // so its address cannot go to another tensor meanwhile (`.data =` swaps
  // storage without a version bump; a reused address would match the key).
  // Not for inference tensors, which have no version counter.
  struct CachedCopy {
    std::mutex mutex;
    std::array<int64_t, 4> key{-1, -1, -1, -1};
    c10::Storage source;
    std::array<at::Tensor, 2> copies;

    template <typename Make>
    std::array<at::Tensor, 2> get(const at::Tensor& src, int64_t a, int64_t b, Make make) {
      const std::array<int64_t, 4> want{a, b, reinterpret_cast<int64_t>(src.data_ptr()),
                                        static_cast<int64_t>(src._version())};
      std::lock_guard<std::mutex> lock(mutex);
      if (key != want || !source.is_alias_of(src.storage())) {
        copies = make();
        source = src.storage();
        key = want;
      }
      return copies;
    }
  };
  // The weight without the taps that read only padding at the last input
  // size (see cropped_call; key: H, W).
  std::shared_ptr<CachedCopy> crop = std::make_shared<CachedCopy>();
  // The gate weight transposed, [Cin, Cout], and which of its rows are all
  // finite (Gate::weight_t): gates of one sample then read only their
  // non-zero inputs' rows. A second copy of each gate weight, kept for the
  // plan's lifetime.
  std::shared_ptr<CachedCopy> gate_t = std::make_shared<CachedCopy>();

  std::pair<at::Tensor, at::Tensor> transposed_gate() const {
    if (gate_weight.scalar_type() != at::kFloat || !gate_weight.device().is_cpu() ||
        gate_weight.dim() != 2)
      return {};  // not the float32 kernel's: the op reports what is wrong
    // An inference tensor has no version counter, so a copy could go stale
    // unseen (load_state_dict under inference_mode): the kernel reads the
    // weight itself (gate_rows).
    if (gate_weight.is_inference()) return {};
    const auto made = gate_t->get(gate_weight, 0, 0, [&] {
      return std::array<at::Tensor, 2>{gate_weight.t().contiguous(),
                                       gate_weight.isfinite().all(0).contiguous()};
    });
    return {made[0], made[1]};
  }

  // An inference tensor (no version counter) among them counts as changed:
  // DynamicConv2d builds no plan then.
  bool stale() const {
    for (size_t i = 0; i < watched.size(); ++i)
      if (watched[i].is_inference() || watched[i]._version() != seen[i]) return true;
    return false;
  }

  // True while every guard still holds and no watched tensor changed in place.
  bool holds() const {
    if (stale()) return false;
    PyObject* resolved_ref = nullptr;  // the last weak reference resolved, and its __dict__
    pybind11::object resolved;
    for (const Guard& g : guards) {
      PyObject* dict = g.dict.ptr();
      if (PyWeakref_Check(dict)) {
        if (dict != resolved_ref) {
          PyObject* obj = PyWeakref_GetObject(dict);  // borrowed; None once dead
          if (obj == Py_None) return false;
          resolved = pybind11::reinterpret_steal<pybind11::object>(
              PyObject_GenericGetDict(obj, nullptr));
          if (!resolved) {
            PyErr_Clear();
            return false;
          }
          resolved_ref = dict;
        }
        dict = resolved.ptr();
      }
      PyObject* item = PyDict_GetItemWithError(dict, g.key.ptr());
      if (item == nullptr) {
        if (PyErr_Occurred()) PyErr_Clear();
        item = Py_None;
      }
      if (g.identity) {
        if (item != g.expected.ptr()) return false;
        continue;
      }
      const int equal = PyObject_RichCompareBool(item, g.expected.ptr(), Py_EQ);
      if (equal != 1) {
        if (equal < 0) PyErr_Clear();
        return false;
      }
    }
    return true;
  }

  std::tuple<at::Tensor, at::Tensor> run(const at::Tensor& x,
                                         const c10::optional<at::Tensor>& in_idx) const {
    return *call(x, in_idx, relu, at::Tensor());
  }

  // act(this layer's output + residual), with act the ReLU when `relu_after`,
  // in the kernel's epilogue: one pass over the output instead of an add and
  // a ReLU after it (see Epilogue). Only for a plan without its own ReLU;
  // None where the float32 kernel does not take the residual (the caller
  // then runs the layer and the ops after it).
  pybind11::object run_residual(const at::Tensor& x, const c10::optional<at::Tensor>& in_idx,
                                const at::Tensor& residual, bool relu_after) const {
    TORCH_CHECK_VALUE(!relu, "run_residual: this plan applies its own ReLU before the add");
    auto out = call(x, in_idx, relu_after, residual);
    if (!out) return pybind11::none();
    return pybind11::cast(std::get<0>(*out));
  }

  // run()'s work with the activation `act` and an optional residual (see
  // Epilogue); nullopt where the kernel does not take that residual.
  c10::optional<std::tuple<at::Tensor, at::Tensor>> call(
      const at::Tensor& x, const c10::optional<at::Tensor>& in_idx, bool act,
      const at::Tensor& residual) const {
    TORCH_CHECK_VALUE(x.device().is_cpu(), "EvalPlan runs on CPU tensors, got ", x.device());
    // DynamicConv2d's own input checks (it skips them on this path), same errors.
    TORCH_CHECK_VALUE(x.dim() == 4, "DynamicConv2d expects a 4-D input [N, C, H, W] ",
                      "(or an unbatched 3-D [C, H, W]), got ", x.dim(), "-D");
    TORCH_CHECK_VALUE(x.size(1) == weight.size(1), "DynamicConv2d expects ", weight.size(1),
                      " input channels, got ", x.size(1));
    TORCH_CHECK_TYPE(x.scalar_type() == weight.scalar_type(), "dtype mismatch: input is ",
                     x.scalar_type(), " but DynamicConv2d weights are ", weight.scalar_type());
    const auto [gate_weight_t, finite_rows] = transposed_gate();
    if (auto out = cropped_call(x, in_idx, act, residual, gate_weight_t, finite_rows)) return *out;
    auto out = dynamic_conv2d_impl(x, weight, bias, gate_weight, gate_bias, priority, k, in_idx,
                                   stride, padding, dilation, act, residual, gate_weight_t,
                                   finite_rows);
    if (!out) return c10::nullopt;
    return std::make_tuple(std::get<0>(*out), std::get<1>(*out));
  }

  // Small maps: a kernel row or column whose taps read only zero padding at
  // every output position is cut off (the weight copy is cached per input
  // size), so the kernel does not multiply those zeros: 3x3 on a 1x1 map
  // becomes 1x1. Same outputs. Only where the padding stays symmetric and
  // the output size is unchanged; nullopt otherwise. A/B, old/new time:
  // 512x1x1 3x3 2.03 (batch 1) and 2.98 (batch 16); 256->512 3x3 stride 2
  // from 2x2 to 1x1 (2x2 taps left) 1.41 and 1.40; 512x7x7, 48x10x10 (no
  // cut) 1.01 and 1.00.
  c10::optional<std::tuple<at::Tensor, at::Tensor>> cropped_call(
      const at::Tensor& x, const c10::optional<at::Tensor>& in_idx, bool act,
      const at::Tensor& residual, const at::Tensor& gate_weight_t,
      const at::Tensor& finite_rows) const {
    if (x.scalar_type() != at::kFloat || stride.size() != 2 || padding.size() != 2 ||
        dilation.size() != 2)
      return c10::nullopt;
    for (int d = 0; d < 2; ++d)  // bad geometry: the op reports it
      if (stride[d] <= 0 || dilation[d] <= 0 || padding[d] < 0) return c10::nullopt;
    const int64_t H = x.size(2), W = x.size(3), kh = weight.size(2), kw = weight.size(3);
    const int64_t Ho = out_size(H, kh, stride[0], padding[0], dilation[0]);
    const int64_t Wo = out_size(W, kw, stride[1], padding[1], dilation[1]);
    if (Ho <= 0 || Wo <= 0) return c10::nullopt;  // the op reports the error
    const LiveTaps th = live_taps(H, kh, stride[0], padding[0], dilation[0], Ho);
    const LiveTaps tw = live_taps(W, kw, stride[1], padding[1], dilation[1], Wo);
    if (th.t0 >= th.t1 || tw.t0 >= tw.t1 || (th.t1 - th.t0 == kh && tw.t1 - tw.t0 == kw))
      return c10::nullopt;
    const std::vector<int64_t> pad{padding[0] - th.t0 * dilation[0],
                                   padding[1] - tw.t0 * dilation[1]};
    const int64_t kh2 = th.t1 - th.t0, kw2 = tw.t1 - tw.t0;
    if (pad[0] < 0 || pad[1] < 0 || out_size(H, kh2, stride[0], pad[0], dilation[0]) != Ho ||
        out_size(W, kw2, stride[1], pad[1], dilation[1]) != Wo)
      return c10::nullopt;
    auto cut_taps = [&] {
      return std::array<at::Tensor, 2>{
          weight.slice(2, th.t0, th.t1).slice(3, tw.t0, tw.t1).contiguous(), at::Tensor()};
    };
    // No version counter on an inference tensor: cut afresh each call.
    const at::Tensor cut =
        weight.is_inference() ? cut_taps()[0] : crop->get(weight, H, W, cut_taps)[0];
    auto out = dynamic_conv2d_impl(x, cut, bias, gate_weight, gate_bias, priority, k, in_idx,
                                   stride, pad, dilation, act, residual, gate_weight_t,
                                   finite_rows);
    if (!out) return c10::nullopt;  // a residual it does not take: so does call()
    return std::make_tuple(std::get<0>(*out), std::get<1>(*out));
  }
};

}  // namespace dynprune

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dynprune native CPU kernels (registered as torch.ops.dynprune.*)";
  pybind11::class_<dynprune::EvalPlan>(m, "EvalPlan")
      .def(pybind11::init([](at::Tensor weight, c10::optional<at::Tensor> bias,
                             at::Tensor gate_weight, at::Tensor gate_bias, at::Tensor priority,
                             int64_t k, std::vector<int64_t> stride, std::vector<int64_t> padding,
                             std::vector<int64_t> dilation, bool relu,
                             std::vector<at::Tensor> watched, pybind11::list guards) {
             std::vector<int64_t> seen;
             for (const at::Tensor& t : watched)
               seen.push_back(t.is_inference() ? -1 : static_cast<int64_t>(t._version()));
             std::vector<dynprune::EvalPlan::Guard> checks;
             for (const pybind11::handle item : guards) {
               const auto entry = item.cast<pybind11::tuple>();
               if (entry.size() != 4 ||
                   !(PyDict_Check(entry[0].ptr()) || PyWeakref_CheckRef(entry[0].ptr())))
                 throw pybind11::value_error(
                     "a guard is (dict or weakref, key, expected, by_identity)");
               checks.push_back({pybind11::reinterpret_borrow<pybind11::object>(entry[0]),
                                 pybind11::reinterpret_borrow<pybind11::object>(entry[1]),
                                 pybind11::reinterpret_borrow<pybind11::object>(entry[2]),
                                 entry[3].cast<bool>()});
             }
             return dynprune::EvalPlan{weight, bias, gate_weight, gate_bias, priority, k,
                                       stride, padding, dilation, relu, watched, seen, checks};
           }),
           pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("gate_weight"),
           pybind11::arg("gate_bias"), pybind11::arg("priority"), pybind11::arg("k"),
           pybind11::arg("stride"), pybind11::arg("padding"), pybind11::arg("dilation"),
           pybind11::arg("relu"), pybind11::arg("watched"),
           pybind11::arg("guards") = pybind11::list())
      .def("stale", &dynprune::EvalPlan::stale,
           "True when a watched tensor changed in place since the plan was built")
      .def("holds", &dynprune::EvalPlan::holds,
           "True while every guard (dict, key, expected, by_identity) still holds and no "
           "watched tensor changed in place")
      .def("run", &dynprune::EvalPlan::run, pybind11::arg("x"), pybind11::arg("in_idx"),
           "(y, out_idx) of dynamic_conv2d for x (CPU), with in_idx or None")
      .def("run_residual", &dynprune::EvalPlan::run_residual, pybind11::arg("x"),
           pybind11::arg("in_idx"), pybind11::arg("residual"), pybind11::arg("relu"),
           "act(y + residual) for x (CPU), act the ReLU when relu, y as run() computes it; "
           "None where the float32 kernel does not take this residual");
  m.def("release_idle_outputs", &dynprune::release_idle_outputs,
        "Frees the memory of freed outputs kept for reuse; returns its bytes");
  m.def("idle_output_bytes", &dynprune::idle_output_bytes,
        "Bytes of freed outputs kept for reuse");
  m.def("max_pool2d_nchw", &dynprune::max_pool2d_nchw, pybind11::arg("x"), pybind11::arg("kernel"),
        pybind11::arg("stride"), pybind11::arg("padding"), pybind11::arg("dilation"),
        "Max pool of a 4-D float32 CPU tensor in NCHW (no indices, floor mode); no autograd");
  m.def("global_avg_pool2d_nchw", &dynprune::global_avg_pool2d_nchw, pybind11::arg("x"),
        "Mean over H and W of a 4-D float32 CPU tensor, as [N, C, 1, 1]; no autograd");
  m.def("linear_small_batch", &dynprune::linear_small_batch, pybind11::arg("x"),
        pybind11::arg("weight"), pybind11::arg("bias") = pybind11::none(),
        "x @ weight.T + bias for a 2-D float32 CPU x, rows split over the threads; no autograd");
  m.def("max_pool2d_or_none", &dynprune::max_pool2d_or_none, pybind11::arg("x"),
        pybind11::arg("kernel"), pybind11::arg("stride"), pybind11::arg("padding"),
        pybind11::arg("dilation"),
        "max_pool2d_nchw for a contiguous float32 CPU x without autograd, else None");
  m.def("head_avg_pool", &dynprune::head_avg_pool, pybind11::arg("x"),
        "global_avg_pool2d_nchw(x) for a 4-D float32 CPU x without autograd, else None");
  m.def("head_linear", &dynprune::head_linear, pybind11::arg("x"), pybind11::arg("weight"),
        pybind11::arg("bias"), pybind11::arg("max_batch"),
        "linear_small_batch for a float32 CPU batch of at most max_batch rows without "
        "autograd, else None");
  m.def("depthwise_or_none", &dynprune::depthwise_or_none, pybind11::arg("x"),
        pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("groups"),
        pybind11::arg("stride"), pybind11::arg("padding"), pybind11::arg("dilation"),
        pybind11::arg("in_idx") = pybind11::none(),
        "Depthwise 3x3 or 5x5 conv (padding K / 2, stride 1 or 2) of a contiguous float32 CPU x "
        "without autograd, else None");
}
