// Launcher interface of the gated-linear-unit kernels (plain C++: shared by the .cu and the binding).
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace mjp::glu {

// The activation applied to the first half: SwiGLU, GeGLU with exact erf GELU, GeGLU with the tanh
// approximation.
enum class Activation : int { kSilu = 0, kGeluErf = 1, kGeluTanh = 2 };

// x is [rows, 2 * width] laid out [activated half; linear half] per row, contiguous.
struct Params {
  const void* x;
  const void* grad_out;  // backward only: [rows, width]
  void* out;             // forward: y [rows, width]; backward: grad_x [rows, 2 * width]
  int64_t rows;
  int64_t width;
  Activation activation;
  DType dtype;
  int device;
  void* stream;  // cudaStream_t
};

// y = act(a) * b. nullptr on success, else the CUDA error string.
const char* launch_forward(const Params& params);
// grad_x = [grad_y * b * act'(a); grad_y * act(a)], recomputing act from x.
const char* launch_backward(const Params& params);

}  // namespace mjp::glu
