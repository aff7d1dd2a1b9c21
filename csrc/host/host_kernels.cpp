// The csrc/ kernels built for the host: the very .cu files the CUDA build compiles, with
// csrc/host/include/ standing in for the CUDA headers (cuda_host.h: intrinsics, bf16/fp16, and a
// launch that runs every block and thread of the grid on the calling CPU thread).
//
// Bound with plain pybind11 at the torch-free launcher interface (rope.h, glu.h, qkv_rope.h): Python
// passes tensors' data_ptr() and shapes, so the module builds without torch headers, like
// megatron_jp._helpers. tests/unit/test_kernels_on_host.py drives it against the torch references.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "glu/glu.cu"
#include "qkv_rope/qkv_rope.cu"
#include "rope/rope.cu"

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void check(const char* error, const char* op) {
  if (error != nullptr) throw std::runtime_error(std::string(op) + ": " + error);
}

mjp::DType dtype_of(int code) {
  if (code < 0 || code > 2) throw std::invalid_argument("dtype code must be 0 (fp32), 1 (bf16) or 2 (fp16)");
  return static_cast<mjp::DType>(code);
}

// One rope operand: (in, out, stride_token, stride_head, heads), strides in elements.
mjp::rope::Operand operand(const py::tuple& t) {
  return mjp::rope::Operand{ptr<const void>(t[0].cast<uintptr_t>()), ptr<void>(t[1].cast<uintptr_t>()),
                            t[2].cast<int64_t>(), t[3].cast<int64_t>(), t[4].cast<int>()};
}

void rope(const py::tuple& q, const py::tuple& k, uintptr_t positions, uintptr_t inv_freq, int64_t tokens,
          int head_dim, bool inverse, int dtype) {
  const mjp::rope::Params p{operand(q), operand(k), ptr<const int64_t>(positions), ptr<const float>(inv_freq),
                            tokens, head_dim, inverse, dtype_of(dtype), 0, nullptr};
  check(mjp::rope::launch(p), "rope");
}

mjp::glu::Params glu_params(uintptr_t x, uintptr_t grad_out, uintptr_t out, int64_t rows, int64_t width,
                            int activation, int dtype) {
  if (activation < 0 || activation > 2) throw std::invalid_argument("activation code must be 0, 1 or 2");
  return mjp::glu::Params{ptr<const void>(x), ptr<const void>(grad_out), ptr<void>(out), rows, width,
                          static_cast<mjp::glu::Activation>(activation), dtype_of(dtype), 0, nullptr};
}

// (batch, seq, q_heads, kv_heads, head_dim, token_major) and (positions, inv_freq) addresses.
mjp::qkv_rope::Shape shape_of(const py::tuple& s) {
  return mjp::qkv_rope::Shape{s[0].cast<int64_t>(), s[1].cast<int64_t>(), s[2].cast<int>(), s[3].cast<int>(),
                              s[4].cast<int>(), s[5].cast<bool>()};
}

mjp::qkv_rope::Rotary rotary_of(uintptr_t positions, uintptr_t inv_freq) {
  return mjp::qkv_rope::Rotary{ptr<const int64_t>(positions), ptr<const float>(inv_freq)};
}

void qkv_rope_forward(uintptr_t qkv, uintptr_t bias, uintptr_t q, uintptr_t k, uintptr_t v, const py::tuple& shape,
                      uintptr_t positions, uintptr_t inv_freq, int dtype) {
  const mjp::qkv_rope::ForwardParams p{ptr<const void>(qkv), ptr<const void>(bias), ptr<void>(q), ptr<void>(k),
                                       ptr<void>(v), shape_of(shape), rotary_of(positions, inv_freq),
                                       dtype_of(dtype), 0, nullptr};
  check(mjp::qkv_rope::launch_forward(p), "qkv_rope");
}

void qkv_rope_backward(uintptr_t grad_q, uintptr_t grad_k, uintptr_t grad_v, uintptr_t grad_qkv,
                       const py::tuple& shape, uintptr_t positions, uintptr_t inv_freq, int dtype) {
  const mjp::qkv_rope::BackwardParams p{ptr<const void>(grad_q), ptr<const void>(grad_k), ptr<const void>(grad_v),
                                        ptr<void>(grad_qkv), shape_of(shape), rotary_of(positions, inv_freq),
                                        dtype_of(dtype), 0, nullptr};
  check(mjp::qkv_rope::launch_backward(p), "qkv_rope_backward");
}

// The kernels' own fp32 -> T rounding (vec.cuh from_float) over n floats: checks the host stand-ins
// for __float2bfloat16_rn and __float2half_rn against torch's conversions.
void round_to(uintptr_t src, uintptr_t dst, int64_t n, int dtype) {
  mjp::dispatch_dtype(dtype_of(dtype), [&](auto tag) -> const char* {
    using T = typename decltype(tag)::type;
    for (int64_t i = 0; i < n; ++i) ptr<T>(dst)[i] = mjp::from_float<T>(ptr<const float>(src)[i]);
    return nullptr;
  });
}

}  // namespace

PYBIND11_MODULE(_host_kernels, m) {
  m.doc() = "The csrc/ CUDA kernels compiled for the host (a test vehicle; megatron_jp.ops never calls it).";
  m.def("rope", &rope, py::arg("q"), py::arg("k"), py::arg("positions"), py::arg("inv_freq"), py::arg("tokens"),
        py::arg("head_dim"), py::arg("inverse"), py::arg("dtype"));
  m.def("glu_forward", [](uintptr_t x, uintptr_t out, int64_t rows, int64_t width, int activation, int dtype) {
    check(mjp::glu::launch_forward(glu_params(x, 0, out, rows, width, activation, dtype)), "glu");
  });
  m.def("glu_backward", [](uintptr_t x, uintptr_t grad_out, uintptr_t out, int64_t rows, int64_t width,
                           int activation, int dtype) {
    check(mjp::glu::launch_backward(glu_params(x, grad_out, out, rows, width, activation, dtype)), "glu_backward");
  });
  m.def("qkv_rope_forward", &qkv_rope_forward);
  m.def("qkv_rope_backward", &qkv_rope_backward);
  m.def("round_to", &round_to, py::arg("src"), py::arg("dst"), py::arg("n"), py::arg("dtype"));
  m.def("last_launch", [] {
    const auto& r = mjp_host::last_launch;
    return py::make_tuple(r.blocks, r.threads, r.launches);
  }, "(blocks, threads per block, launches so far) of the last kernel launch");
  m.attr("SMS") = mjp_host::kSms;
}
