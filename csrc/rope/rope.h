// Launcher interface of the rope kernels (plain C++: included by the .cu and by the torch binding).
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace mjp::rope {

// One input of the launch, viewed as [tokens, heads, head_dim] with unit stride on head_dim; the
// output is written contiguous [tokens, heads, head_dim].
struct Operand {
  const void* in;
  void* out;
  int64_t stride_token;  // elements between consecutive tokens of `in`
  int64_t stride_head;   // elements between consecutive heads of `in`
  int heads;
};

struct Params {
  Operand q, k;
  const int64_t* positions;  // [tokens]
  const float* inv_freq;     // [head_dim / 2]
  int64_t tokens;
  int head_dim;
  bool inverse;  // rotate by -angle: the backward pass
  DType dtype;
  int device;
  void* stream;  // cudaStream_t
};

// Rotates q and k in one launch. nullptr on success, else the CUDA error string.
const char* launch(const Params& params);

}  // namespace mjp::rope
