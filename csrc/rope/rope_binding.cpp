// Python binding of the rope kernels: validates, views q and k as [tokens, heads, head_dim] rows and
// calls the torch-free launcher on the caller's stream.
#include "common/binding.h"
#include "rope/rope.h"

namespace mjp::rope {
namespace {

at::IntArrayRef leading_shape(const at::Tensor& x) { return x.sizes().slice(0, x.dim() - 2); }

int64_t leading_numel(const at::Tensor& x) {
  int64_t n = 1;
  for (int64_t size : leading_shape(x)) n *= size;
  return n;
}

// x as [tokens, heads, head_dim] with unit stride on head_dim: a view when the leading dims collapse
// into one (e.g. q split off a fused projection), else a contiguous copy.
at::Tensor as_rows(const at::Tensor& x) {
  at::Tensor rows = x.reshape({leading_numel(x), x.size(-2), x.size(-1)});
  return rows.stride(2) == 1 ? rows : rows.contiguous();
}

Operand operand(const at::Tensor& rows, at::Tensor& out) {
  return Operand{rows.data_ptr(), out.data_ptr(), rows.stride(0), rows.stride(1),
                 static_cast<int>(rows.size(1))};
}

void check_shapes(const at::Tensor& q, const at::Tensor& k) {
  kernel_dtype(q, "q");
  check_same_dtype(k, q, "k", "q");
  TORCH_CHECK(q.dim() >= 3, "q must be [..., heads, head_dim] with at least one leading dim, got ", q.sizes());
  TORCH_CHECK(k.dim() == q.dim() && leading_shape(k) == leading_shape(q), "k must have q's leading dims ",
              leading_shape(q), ", got ", k.sizes());
  TORCH_CHECK(k.size(-1) == q.size(-1), "q and k must share head_dim, got ", q.size(-1), " and ", k.size(-1));
  TORCH_CHECK(q.size(-1) > 0 && q.size(-1) % 2 == 0, "head_dim must be even and positive, got ", q.size(-1));
}

// Rotates q [..., Hq, D] and k [..., Hk, D] by positions [...] (inverse=true: by minus the angle).
std::tuple<at::Tensor, at::Tensor> rope(const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& positions, const at::Tensor& inv_freq,
                                        bool inverse, int64_t stream) {
  check_shapes(q, k);
  const int64_t head_dim = q.size(-1);
  check_positions(positions, leading_shape(q));
  check_inv_freq(inv_freq, head_dim);
  check_devices({{&q, "q"}, {&k, "k"}, {&positions, "positions"}, {&inv_freq, "inv_freq"}});
  const at::Tensor pos = positions.to(at::kLong).contiguous();
  const at::Tensor q_rows = as_rows(q), k_rows = as_rows(k);
  at::Tensor q_out = at::empty(q.sizes(), q.options());
  at::Tensor k_out = at::empty(k.sizes(), k.options());
  const Params params{operand(q_rows, q_out), operand(k_rows, k_out), pos.data_ptr<int64_t>(),
                      inv_freq.data_ptr<float>(), q_rows.size(0), static_cast<int>(head_dim), inverse,
                      kernel_dtype(q, "q"), static_cast<int>(q.get_device()), as_stream(stream)};
  check_launch(launch(params), "rope");
  return {q_out, k_out};
}

}  // namespace
}  // namespace mjp::rope

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "RoPE (rotate-half) on q and k in one launch; megatron_jp.ops.rope is the Python entry.";
  m.def("rope", &mjp::rope::rope, "rotate q and k by their positions (inverse: the backward pass)",
        py::arg("q"), py::arg("k"), py::arg("positions"), py::arg("inv_freq"), py::arg("inverse"),
        py::arg("stream"));
}
