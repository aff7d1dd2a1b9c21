// Checks shared by the pybind11 bindings (host C++ only: includes nothing but <torch/extension.h>).
//
// Every binding validates dtypes, shapes and devices with TORCH_CHECK before it hands raw pointers
// to a torch-free launcher, so a misuse raises a Python error instead of a bad launch. Dtypes and
// shapes are checked before devices, which lets the CPU tests reach every message.
#pragma once

#include <torch/extension.h>

#include <initializer_list>
#include <utility>

#include "common/dtype.h"

namespace mjp {

inline DType kernel_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: break;
  }
  TORCH_CHECK(false, name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  return DType::kFloat32;  // unreachable: TORCH_CHECK(false) throws
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* name,
                             const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " is ", t.scalar_type(), " but ", ref_name,
              " is ", ref.scalar_type());
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* name) {
  TORCH_CHECK(t.sizes() == expected, name, " must have shape ", expected, ", got ", t.sizes());
}

inline void check_positions(const at::Tensor& positions, at::IntArrayRef expected_shape) {
  const auto type = positions.scalar_type();
  TORCH_CHECK(at::isIntegralType(type, /*includeBool=*/false), "positions must be an integer tensor, got ", type);
  check_shape(positions, expected_shape, "positions");
}

// inverse frequencies theta^(-2i/d) computed by the Python reference, so angles match it bit for bit.
inline void check_inv_freq(const at::Tensor& inv_freq, int64_t head_dim) {
  TORCH_CHECK(inv_freq.scalar_type() == at::kFloat, "inv_freq must be float32, got ", inv_freq.scalar_type());
  check_shape(inv_freq, {head_dim / 2}, "inv_freq");
  TORCH_CHECK(inv_freq.is_contiguous(), "inv_freq must be contiguous");
}

// The first tensor must be on a CUDA device and every other one on the same device.
inline void check_devices(std::initializer_list<std::pair<const at::Tensor*, const char*>> tensors) {
  const auto& [first, first_name] = *tensors.begin();
  TORCH_CHECK(first->is_cuda(), first_name, " must be a CUDA tensor, got one on ", first->device());
  for (const auto& [t, name] : tensors) {
    TORCH_CHECK(t->device() == first->device(), name, " is on ", t->device(), " but ", first_name,
                " is on ", first->device());
  }
}

inline void* as_stream(int64_t stream) { return reinterpret_cast<void*>(stream); }

// A launcher returns nullptr on success, else a static message from the CUDA runtime.
inline void check_launch(const char* error, const char* op) {
  TORCH_CHECK(error == nullptr, op, ": kernel launch failed: ", error == nullptr ? "" : error);
}

}  // namespace mjp
