// Launcher interface of the fused QKV split + bias + RoPE kernels (plain C++: shared by the .cu and
// the binding).
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace mjp::qkv_rope {

// The fused projection output is [batch, seq, (q_heads + 2 * kv_heads) * head_dim], laid out
// [all q heads; all k heads; all v heads]; q is [batch, q_heads, seq, head_dim], k and v are
// [batch, kv_heads, seq, head_dim] (head-major, what SDPA and flex_attention take), or, token-major,
// [batch * seq, heads, head_dim] (what varlen_attn takes). All contiguous.
struct Shape {
  int64_t batch;
  int64_t seq;
  int q_heads;
  int kv_heads;
  int head_dim;
  bool token_major;
};

struct Rotary {
  const int64_t* positions;  // [batch, seq]; nullptr: no rotation (learned absolute positions)
  const float* inv_freq;     // [head_dim / 2]
};

// qkv (+ bias) -> rotated q, rotated k, v.
struct ForwardParams {
  const void* qkv;
  const void* bias;  // [(q_heads + 2 * kv_heads) * head_dim] or nullptr
  void* q;
  void* k;
  void* v;
  Shape shape;
  Rotary rotary;
  DType dtype;
  int device;
  void* stream;  // cudaStream_t
};

// grad_q, grad_k, grad_v -> grad_qkv, rotating q and k gradients back by minus the angle.
struct BackwardParams {
  const void* grad_q;
  const void* grad_k;
  const void* grad_v;
  void* grad_qkv;
  Shape shape;
  Rotary rotary;
  DType dtype;
  int device;
  void* stream;  // cudaStream_t
};

// nullptr on success, else the CUDA error string.
const char* launch_forward(const ForwardParams& params);
const char* launch_backward(const BackwardParams& params);

}  // namespace mjp::qkv_rope
