// Python binding of the GLU kernels: validates, allocates the output and calls the torch-free
// launchers on the caller's stream.
#include <string>

#include "common/binding.h"
#include "glu/glu.h"

namespace mjp::glu {
namespace {

Activation activation_of(const std::string& name) {
  if (name == "swiglu") return Activation::kSilu;
  if (name == "geglu") return Activation::kGeluErf;
  if (name == "geglu_tanh") return Activation::kGeluTanh;
  TORCH_CHECK(false, "unknown GLU activation '", name, "'; expected swiglu, geglu or geglu_tanh");
  return Activation::kSilu;  // unreachable: TORCH_CHECK(false) throws
}

// x [..., 2F] -> F, the width of one half.
int64_t half_width(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) % 2 == 0, "x must be [..., 2 * ffn] with an even last dim, got ",
              x.sizes());
  return x.size(-1) / 2;
}

Params params_for(const at::Tensor& x, const at::Tensor& grad_out, at::Tensor& out, const std::string& act,
                  int64_t stream) {
  const int64_t width = half_width(x);
  const int64_t rows = width == 0 ? 0 : x.numel() / (2 * width);
  return Params{x.data_ptr(), grad_out.defined() ? grad_out.data_ptr() : nullptr, out.data_ptr(), rows, width,
                activation_of(act), kernel_dtype(x, "x"), static_cast<int>(x.get_device()), as_stream(stream)};
}

// y = act(a) * b for x = [a; b] on the last dim.
at::Tensor forward(const at::Tensor& x, const std::string& activation, int64_t stream) {
  kernel_dtype(x, "x");
  activation_of(activation);
  const int64_t width = half_width(x);
  check_devices({{&x, "x"}});
  const at::Tensor xc = x.contiguous();
  std::vector<int64_t> out_shape = x.sizes().vec();
  out_shape.back() = width;
  at::Tensor y = at::empty(out_shape, x.options());
  check_launch(launch_forward(params_for(xc, at::Tensor(), y, activation, stream)), "glu");
  return y;
}

// grad_x = [grad_y * b * act'(a); grad_y * act(a)].
at::Tensor backward(const at::Tensor& grad_y, const at::Tensor& x, const std::string& activation, int64_t stream) {
  kernel_dtype(x, "x");
  check_same_dtype(grad_y, x, "grad_y", "x");
  activation_of(activation);
  std::vector<int64_t> y_shape = x.sizes().vec();
  y_shape.back() = half_width(x);
  check_shape(grad_y, y_shape, "grad_y");
  check_devices({{&x, "x"}, {&grad_y, "grad_y"}});
  const at::Tensor xc = x.contiguous(), gc = grad_y.contiguous();
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  check_launch(launch_backward(params_for(xc, gc, grad_x, activation, stream)), "glu_backward");
  return grad_x;
}

}  // namespace
}  // namespace mjp::glu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "SwiGLU / GeGLU on a fused fc1 output; megatron_jp.ops.glu is the Python entry.";
  m.def("forward", &mjp::glu::forward, "y = act(a) * b with x = [a; b]", py::arg("x"), py::arg("activation"),
        py::arg("stream"));
  m.def("backward", &mjp::glu::backward, "grad_x from grad_y and x", py::arg("grad_y"), py::arg("x"),
        py::arg("activation"), py::arg("stream"));
}
