// Fused QKV split + bias + RoPE: the projection output [B, S, (Hq + 2 Hk) * D] becomes q [B, Hq, S, D],
// k and v [B, Hk, S, D] in one read and one write (and the backward, which scatters the three
// gradients back into one [B, S, (Hq + 2 Hk) * D] tensor).
//
// One thread owns one (token, 16-byte chunk of the first half of D) item: it computes the chunk's
// cos/sin once and moves that chunk pair of every head of the token, rotating q and k heads, copying
// v heads. Reads of a token row and writes to the per-head [S, D] planes are both 16-byte accesses,
// and consecutive threads touch consecutive tokens of one plane, so the writes coalesce.
#include <cuda_runtime.h>

#include <initializer_list>

#include "common/cuda_utils.cuh"
#include "common/rotary.cuh"
#include "common/vec.cuh"
#include "qkv_rope/qkv_rope.h"

namespace mjp::qkv_rope {
namespace {

// `heads` heads of one token: head h reads src + h * src_stride and writes dst + h * dst_stride
// (strides in elements; one side is the token row, the other the per-head planes).
template <typename T>
struct HeadRun {
  const T* src;
  int64_t src_stride;
  T* dst;
  int64_t dst_stride;
  const T* bias;  // nullptr or the bias of head 0 of this run (stride head_dim)
  int heads;
};

template <typename T, int N, bool kRotate>
__device__ __forceinline__ void move_heads(const HeadRun<T>& run, int head_dim, const float (&cos_v)[N],
                                           const float (&sin_v)[N]) {
  const int half = head_dim / 2;
#pragma unroll 4
  for (int h = 0; h < run.heads; ++h) {
    const T* bias = run.bias == nullptr ? nullptr : run.bias + h * head_dim;
    rotate_chunk<T, N, kRotate>(run.src + h * run.src_stride, bias, run.dst + h * run.dst_stride, half,
                                cos_v, sin_v);
  }
}

// Rotates the q and k runs (when positions are given) and copies the v run.
template <typename T, int N>
__device__ __forceinline__ void move_token(const HeadRun<T> (&runs)[3], const Rotary& rotary,
                                           int64_t token, int chunk_offset, int head_dim, float sin_sign) {
  float cos_v[N], sin_v[N];
  if (rotary.positions != nullptr) {
    chunk_angles<N>(rotary.positions[token], rotary.inv_freq + chunk_offset, sin_sign, cos_v, sin_v);
    move_heads<T, N, true>(runs[0], head_dim, cos_v, sin_v);
    move_heads<T, N, true>(runs[1], head_dim, cos_v, sin_v);
  } else {
    move_heads<T, N, false>(runs[0], head_dim, cos_v, sin_v);
    move_heads<T, N, false>(runs[1], head_dim, cos_v, sin_v);
  }
  move_heads<T, N, false>(runs[2], head_dim, cos_v, sin_v);
}

// Element offset of (b, h = 0, s, chunk) in a [B, H, S, D] plane tensor.
__device__ __forceinline__ int64_t plane_offset(const Shape& s, int64_t b, int64_t pos, int heads, int chunk) {
  return (b * heads * s.seq + pos) * s.head_dim + chunk;
}

template <typename T, int N>
__global__ void __launch_bounds__(kThreads) qkv_rope_forward_kernel(const ForwardParams p) {
  const Shape& s = p.shape;
  const int row = (s.q_heads + 2 * s.kv_heads) * s.head_dim;
  const int64_t plane = s.seq * s.head_dim;  // stride between heads in q, k, v
  const unsigned int chunks = s.head_dim / 2 / N;
  const unsigned int items = static_cast<unsigned int>(s.batch * s.seq) * chunks;
  for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < items; i += gridDim.x * blockDim.x) {
    const int64_t token = i / chunks;
    const int chunk = static_cast<int>(i - token * chunks) * N;
    const int64_t b = token / s.seq, pos = token - b * s.seq;
    const T* src = static_cast<const T*>(p.qkv) + token * row + chunk;
    const T* bias = p.bias == nullptr ? nullptr : static_cast<const T*>(p.bias) + chunk;
    const int k_col = s.q_heads * s.head_dim, v_col = (s.q_heads + s.kv_heads) * s.head_dim;
    const HeadRun<T> runs[3] = {
        {src, s.head_dim, static_cast<T*>(p.q) + plane_offset(s, b, pos, s.q_heads, chunk), plane,
         bias, s.q_heads},
        {src + k_col, s.head_dim, static_cast<T*>(p.k) + plane_offset(s, b, pos, s.kv_heads, chunk), plane,
         bias == nullptr ? nullptr : bias + k_col, s.kv_heads},
        {src + v_col, s.head_dim, static_cast<T*>(p.v) + plane_offset(s, b, pos, s.kv_heads, chunk), plane,
         bias == nullptr ? nullptr : bias + v_col, s.kv_heads},
    };
    move_token<T, N>(runs, p.rotary, token, chunk, s.head_dim, 1.f);
  }
}

template <typename T, int N>
__global__ void __launch_bounds__(kThreads) qkv_rope_backward_kernel(const BackwardParams p) {
  const Shape& s = p.shape;
  const int row = (s.q_heads + 2 * s.kv_heads) * s.head_dim;
  const int64_t plane = s.seq * s.head_dim;
  const unsigned int chunks = s.head_dim / 2 / N;
  const unsigned int items = static_cast<unsigned int>(s.batch * s.seq) * chunks;
  for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < items; i += gridDim.x * blockDim.x) {
    const int64_t token = i / chunks;
    const int chunk = static_cast<int>(i - token * chunks) * N;
    const int64_t b = token / s.seq, pos = token - b * s.seq;
    T* dst = static_cast<T*>(p.grad_qkv) + token * row + chunk;
    const int k_col = s.q_heads * s.head_dim, v_col = (s.q_heads + s.kv_heads) * s.head_dim;
    const HeadRun<T> runs[3] = {
        {static_cast<const T*>(p.grad_q) + plane_offset(s, b, pos, s.q_heads, chunk), plane, dst,
         s.head_dim, nullptr, s.q_heads},
        {static_cast<const T*>(p.grad_k) + plane_offset(s, b, pos, s.kv_heads, chunk), plane, dst + k_col,
         s.head_dim, nullptr, s.kv_heads},
        {static_cast<const T*>(p.grad_v) + plane_offset(s, b, pos, s.kv_heads, chunk), plane, dst + v_col,
         s.head_dim, nullptr, s.kv_heads},
    };
    move_token<T, N>(runs, p.rotary, token, chunk, s.head_dim, -1.f);
  }
}

// Every row and plane starts at a multiple of head_dim / 2 elements, so 16-byte accesses need only
// aligned base pointers and head_dim / 2 a multiple of the vector width.
template <typename T>
bool vectorizable(int head_dim, std::initializer_list<const void*> pointers) {
  for (const void* ptr : pointers) {
    if (ptr != nullptr && !aligned16(ptr)) return false;
  }
  return (head_dim / 2) % kVec<T> == 0;
}

const char* check_shape(const Shape& s) {
  if (s.head_dim % 2 != 0) return "head_dim must be even";
  if (s.batch * s.seq * (s.head_dim / 2) >= (int64_t{1} << 31)) return "too many tokens for 32-bit indexing";
  return nullptr;
}

}  // namespace

const char* launch_forward(const ForwardParams& p) {
  if (const char* error = check_shape(p.shape)) return error;
  const int64_t tokens = p.shape.batch * p.shape.seq;
  if (tokens == 0) return nullptr;
  DeviceGuard guard(p.device);
  auto stream = static_cast<cudaStream_t>(p.stream);
  return dispatch_dtype(p.dtype, [&](auto tag) -> const char* {
    using T = typename decltype(tag)::type;
    if (vectorizable<T>(p.shape.head_dim, {p.qkv, p.bias, p.q, p.k, p.v})) {
      constexpr int n = kVec<T>;
      const unsigned int blocks = grid_blocks(tokens * (p.shape.head_dim / 2 / n), p.device);
      qkv_rope_forward_kernel<T, n><<<blocks, kThreads, 0, stream>>>(p);
    } else {
      const unsigned int blocks = grid_blocks(tokens * (p.shape.head_dim / 2), p.device);
      qkv_rope_forward_kernel<T, 1><<<blocks, kThreads, 0, stream>>>(p);
    }
    return launch_status();
  });
}

const char* launch_backward(const BackwardParams& p) {
  if (const char* error = check_shape(p.shape)) return error;
  const int64_t tokens = p.shape.batch * p.shape.seq;
  if (tokens == 0) return nullptr;
  DeviceGuard guard(p.device);
  auto stream = static_cast<cudaStream_t>(p.stream);
  return dispatch_dtype(p.dtype, [&](auto tag) -> const char* {
    using T = typename decltype(tag)::type;
    if (vectorizable<T>(p.shape.head_dim, {p.grad_q, p.grad_k, p.grad_v, p.grad_qkv})) {
      constexpr int n = kVec<T>;
      const unsigned int blocks = grid_blocks(tokens * (p.shape.head_dim / 2 / n), p.device);
      qkv_rope_backward_kernel<T, n><<<blocks, kThreads, 0, stream>>>(p);
    } else {
      const unsigned int blocks = grid_blocks(tokens * (p.shape.head_dim / 2), p.device);
      qkv_rope_backward_kernel<T, 1><<<blocks, kThreads, 0, stream>>>(p);
    }
    return launch_status();
  });
}

}  // namespace mjp::qkv_rope
