// Python binding of the fused QKV split + bias + RoPE kernels: validates, allocates q, k, v (or the
// gradient of qkv) and calls the torch-free launchers on the caller's stream.
#include "common/binding.h"
#include "qkv_rope/qkv_rope.h"

namespace mjp::qkv_rope {
namespace {

struct Heads {
  int64_t q, kv, dim;
};

Shape shape_of(int64_t batch, int64_t seq, const Heads& h, bool token_major) {
  return Shape{batch, seq, static_cast<int>(h.q), static_cast<int>(h.kv), static_cast<int>(h.dim), token_major};
}

// q, k or v of `heads` heads: [B, heads, S, D], or token-major [B, S, heads, D] (varlen_attn's layout).
std::vector<int64_t> attention_shape(int64_t batch, int64_t seq, int64_t heads, int64_t dim, bool token_major) {
  if (token_major) return {batch, seq, heads, dim};
  return {batch, heads, seq, dim};
}

void check_heads(const Heads& h) {
  TORCH_CHECK(h.q > 0 && h.kv > 0, "n_heads and n_kv_heads must be positive, got ", h.q, " and ", h.kv);
  TORCH_CHECK(h.dim > 0 && h.dim % 2 == 0, "head_dim must be even and positive, got ", h.dim);
}

// positions and inv_freq come together: both given (rotate q and k) or both absent (no rotation).
Rotary check_rotary(const std::optional<at::Tensor>& positions, const std::optional<at::Tensor>& inv_freq,
                    int64_t batch, int64_t seq, int64_t head_dim) {
  TORCH_CHECK(positions.has_value() == inv_freq.has_value(),
              "positions and inv_freq must be given together (rotary) or both be None");
  if (!positions.has_value()) return Rotary{nullptr, nullptr};
  check_positions(*positions, {batch, seq});
  check_inv_freq(*inv_freq, head_dim);
  return Rotary{nullptr, inv_freq->data_ptr<float>()};
}

void check_rotary_devices(const std::optional<at::Tensor>& positions, const std::optional<at::Tensor>& inv_freq,
                          const at::Tensor& ref, const char* ref_name) {
  if (positions.has_value()) check_devices({{&ref, ref_name}, {&*positions, "positions"}, {&*inv_freq, "inv_freq"}});
}

// qkv [B, S, (Hq + 2 Hk) D] (+ bias) -> q [B, Hq, S, D], k and v [B, Hk, S, D] (token-major: [B, S, H, D]),
// contiguous.
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& qkv, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& positions,
    const std::optional<at::Tensor>& inv_freq, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim,
    bool token_major, int64_t stream) {
  const Heads h{n_heads, n_kv_heads, head_dim};
  check_heads(h);
  const DType dtype = kernel_dtype(qkv, "qkv");
  const int64_t width = (h.q + 2 * h.kv) * h.dim;
  TORCH_CHECK(qkv.dim() == 3 && qkv.size(2) == width, "qkv must be [batch, seq, (n_heads + 2 * n_kv_heads) * ",
              "head_dim] = [B, S, ", width, "], got ", qkv.sizes());
  const int64_t B = qkv.size(0), S = qkv.size(1);
  if (bias.has_value()) {
    check_same_dtype(*bias, qkv, "bias", "qkv");
    check_shape(*bias, {width}, "bias");
  }
  Rotary rotary = check_rotary(positions, inv_freq, B, S, head_dim);
  check_devices({{&qkv, "qkv"}});
  if (bias.has_value()) check_devices({{&qkv, "qkv"}, {&*bias, "bias"}});
  check_rotary_devices(positions, inv_freq, qkv, "qkv");
  const at::Tensor x = qkv.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor pos = positions.has_value() ? positions->to(at::kLong).contiguous() : at::Tensor();
  if (pos.defined()) rotary.positions = pos.data_ptr<int64_t>();
  at::Tensor q = at::empty(attention_shape(B, S, h.q, h.dim, token_major), qkv.options());
  at::Tensor k = at::empty(attention_shape(B, S, h.kv, h.dim, token_major), qkv.options());
  at::Tensor v = at::empty(attention_shape(B, S, h.kv, h.dim, token_major), qkv.options());
  const ForwardParams params{x.data_ptr(), b.defined() ? b.data_ptr() : nullptr, q.data_ptr(), k.data_ptr(),
                             v.data_ptr(), shape_of(B, S, h, token_major), rotary, dtype, static_cast<int>(qkv.get_device()),
                             as_stream(stream)};
  check_launch(launch_forward(params), "qkv_rope");
  return {q, k, v};
}

// grad_q [B, Hq, S, D], grad_k and grad_v [B, Hk, S, D] (token-major: [B, S, H, D]) -> grad_qkv
// [B, S, (Hq + 2 Hk) D].
at::Tensor backward(const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& grad_v,
                    const std::optional<at::Tensor>& positions, const std::optional<at::Tensor>& inv_freq,
                    bool token_major, int64_t stream) {
  const DType dtype = kernel_dtype(grad_q, "grad_q");
  check_same_dtype(grad_k, grad_q, "grad_k", "grad_q");
  check_same_dtype(grad_v, grad_q, "grad_v", "grad_q");
  const char* layout = token_major ? "[batch, seq, heads, head_dim]" : "[batch, heads, seq, head_dim]";
  TORCH_CHECK(grad_q.dim() == 4, "grad_q must be ", layout, ", got ", grad_q.sizes());
  TORCH_CHECK(grad_k.dim() == 4, "grad_k must be ", layout, ", got ", grad_k.sizes());
  const int seq_dim = token_major ? 1 : 2, head_dim_index = token_major ? 2 : 1;
  const int64_t B = grad_q.size(0), S = grad_q.size(seq_dim);
  const Heads h{grad_q.size(head_dim_index), grad_k.size(head_dim_index), grad_q.size(3)};
  check_heads(h);
  check_shape(grad_k, attention_shape(B, S, h.kv, h.dim, token_major), "grad_k");
  check_shape(grad_v, attention_shape(B, S, h.kv, h.dim, token_major), "grad_v");
  Rotary rotary = check_rotary(positions, inv_freq, B, S, h.dim);
  check_devices({{&grad_q, "grad_q"}, {&grad_k, "grad_k"}, {&grad_v, "grad_v"}});
  check_rotary_devices(positions, inv_freq, grad_q, "grad_q");
  const at::Tensor gq = grad_q.contiguous(), gk = grad_k.contiguous(), gv = grad_v.contiguous();
  const at::Tensor pos = positions.has_value() ? positions->to(at::kLong).contiguous() : at::Tensor();
  if (pos.defined()) rotary.positions = pos.data_ptr<int64_t>();
  at::Tensor grad_qkv = at::empty({B, S, (h.q + 2 * h.kv) * h.dim}, grad_q.options());
  const BackwardParams params{gq.data_ptr(), gk.data_ptr(), gv.data_ptr(), grad_qkv.data_ptr(),
                              shape_of(B, S, h, token_major), rotary, dtype, static_cast<int>(grad_q.get_device()),
                              as_stream(stream)};
  check_launch(launch_backward(params), "qkv_rope_backward");
  return grad_qkv;
}

}  // namespace
}  // namespace mjp::qkv_rope

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused QKV split + bias + RoPE; megatron_jp.ops.qkv_rope is the Python entry.";
  m.def("forward", &mjp::qkv_rope::forward, "qkv (+ bias) -> q, k, v in attention layout, q and k rotated",
        py::arg("qkv"), py::arg("bias"), py::arg("positions"), py::arg("inv_freq"), py::arg("n_heads"),
        py::arg("n_kv_heads"), py::arg("head_dim"), py::arg("token_major"), py::arg("stream"));
  m.def("backward", &mjp::qkv_rope::backward, "grad q, k, v -> grad qkv (q and k rotated back)",
        py::arg("grad_q"), py::arg("grad_k"), py::arg("grad_v"), py::arg("positions"), py::arg("inv_freq"),
        py::arg("token_major"), py::arg("stream"));
}
