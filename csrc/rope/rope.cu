// RoPE (rotate-half layout) on q and k in one launch, forward and backward.
//
// One thread owns one (token, 16-byte chunk of the first half of head_dim) item: it computes the
// chunk's cos/sin once from the token position and the inverse frequencies, then streams every q and
// k head of that token through them. Each element is read once and written once with 16-byte
// accesses, and the sincos cost is shared by all Hq + Hk heads.
#include <cuda_runtime.h>

#include "common/cuda_utils.cuh"
#include "common/rotary.cuh"
#include "common/vec.cuh"
#include "rope/rope.h"

namespace mjp::rope {
namespace {

template <typename T, int N>
__device__ __forceinline__ void rotate_heads(const Operand& op, int64_t token, int chunk_offset,
                                             int head_dim, const float (&cos_v)[N],
                                             const float (&sin_v)[N]) {
  const T* __restrict__ in = static_cast<const T*>(op.in) + token * op.stride_token + chunk_offset;
  T* __restrict__ out = static_cast<T*>(op.out) + token * op.heads * head_dim + chunk_offset;
  const int half = head_dim / 2;
#pragma unroll 4
  for (int h = 0; h < op.heads; ++h) {
    rotate_chunk<T, N, true>(in + h * op.stride_head, nullptr, out + static_cast<int64_t>(h) * head_dim,
                             half, cos_v, sin_v);
  }
}

template <typename T, int N>
__global__ void __launch_bounds__(kThreads) rope_kernel(const Params p) {
  const unsigned int chunks = p.head_dim / 2 / N;
  const unsigned int items = static_cast<unsigned int>(p.tokens) * chunks;
  const float sin_sign = p.inverse ? -1.f : 1.f;
  for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < items; i += gridDim.x * blockDim.x) {
    const unsigned int token = i / chunks;
    const int chunk_offset = static_cast<int>(i - token * chunks) * N;
    float cos_v[N], sin_v[N];
    chunk_angles<N>(p.positions[token], p.inv_freq + chunk_offset, sin_sign, cos_v, sin_v);
    rotate_heads<T, N>(p.q, token, chunk_offset, p.head_dim, cos_v, sin_v);
    rotate_heads<T, N>(p.k, token, chunk_offset, p.head_dim, cos_v, sin_v);
  }
}

// 16-byte accesses need every row start 16-byte aligned: base pointers and strides.
template <typename T>
bool vectorizable(const Params& p) {
  constexpr int n = kVec<T>;
  const bool shape_ok = (p.head_dim / 2) % n == 0;
  const bool q_ok = aligned16(p.q.in) && aligned16(p.q.out) && p.q.stride_token % n == 0 && p.q.stride_head % n == 0;
  const bool k_ok = aligned16(p.k.in) && aligned16(p.k.out) && p.k.stride_token % n == 0 && p.k.stride_head % n == 0;
  return shape_ok && q_ok && k_ok;
}

}  // namespace

const char* launch(const Params& p) {
  if (p.head_dim % 2 != 0) return "head_dim must be even";
  if (p.tokens * (p.head_dim / 2) >= (int64_t{1} << 31)) return "too many tokens for 32-bit indexing";
  if (p.tokens == 0) return nullptr;
  DeviceGuard guard(p.device);
  auto stream = static_cast<cudaStream_t>(p.stream);
  return dispatch_dtype(p.dtype, [&](auto tag) -> const char* {
    using T = typename decltype(tag)::type;
    if (vectorizable<T>(p)) {
      constexpr int n = kVec<T>;
      const int64_t items = p.tokens * (p.head_dim / 2 / n);
      rope_kernel<T, n><<<grid_blocks(items, p.device), kThreads, 0, stream>>>(p);
    } else {
      const int64_t items = p.tokens * (p.head_dim / 2);
      rope_kernel<T, 1><<<grid_blocks(items, p.device), kThreads, 0, stream>>>(p);
    }
    return launch_status();
  });
}

}  // namespace mjp::rope
