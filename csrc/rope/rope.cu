// RoPE (rotate-half layout) on q and k in one launch, forward and backward.
//
// A thread owns one (token, 16-byte chunk of the first half of head_dim, group of heads) item
// (common/rotary.cuh): it computes the chunk's cos/sin once from the token position and the inverse
// frequencies, then rotates that chunk of every q and k head of its group. Each element is read once
// and written once with 16-byte accesses.
#include <cuda_runtime.h>

#include "common/cuda_utils.cuh"
#include "common/rotary.cuh"
#include "common/vec.cuh"
#include "rope/rope.h"

namespace mjp::rope {
namespace {

template <typename T>
__device__ __forceinline__ HeadRun<T> run_of(const Operand& op, int64_t token, int chunk, int head_dim) {
  return HeadRun<T>{static_cast<const T*>(op.in) + token * op.stride_token + chunk, op.stride_head,
                    static_cast<T*>(op.out) + token * op.heads * head_dim + chunk, head_dim, nullptr,
                    op.heads, true};
}

template <typename T, int N>
__global__ void __launch_bounds__(kThreads, kRotaryMinBlocks) rope_kernel(const Params p, const ItemSpace space) {
  const float sin_sign = p.inverse ? -1.f : 1.f;
  const unsigned int items = static_cast<unsigned int>(space.items);
  for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < items; i += gridDim.x * blockDim.x) {
    const Item it = space.item(i, N);
    float cos_v[N], sin_v[N];
    chunk_angles<N>(p.positions[it.token], p.inv_freq + it.chunk, sin_sign, cos_v, sin_v);
    const HeadRun<T> runs[2] = {run_of<T>(p.q, it.token, it.chunk, p.head_dim),
                                run_of<T>(p.k, it.token, it.chunk, p.head_dim)};
    move_heads<T, N, 2>(runs, it.head_begin, it.head_end, p.head_dim / 2, cos_v, sin_v);
  }
}

// 16-byte accesses need every row start 16-byte aligned: base pointers and strides.
template <typename T>
bool vectorizable(const Params& p) {
  constexpr int n = kVec<T>;
  auto ok = [](const Operand& op) {
    return aligned16(op.in) && aligned16(op.out) && op.stride_token % n == 0 && op.stride_head % n == 0;
  };
  return (p.head_dim / 2) % n == 0 && ok(p.q) && ok(p.k);
}

template <typename T, int N>
const char* launch_with(const Params& p, cudaStream_t stream) {
  const int64_t target = kWavesPerLaunch * resident_threads_of(rope_kernel<T, N>, p.device);
  const ItemSpace space = item_space(p.tokens, p.head_dim / 2 / N, p.q.heads + p.k.heads, target);
  const int64_t items = space.items;
  if (items >= (int64_t{1} << 31)) return "too many tokens for 32-bit indexing";
  MJP_LAUNCH(grid_blocks(items, p.device), stream, rope_kernel<T, N>)(p, space);
  return launch_status();
}

}  // namespace

const char* launch(const Params& p) {
  if (p.head_dim % 2 != 0) return "head_dim must be even";
  if (p.tokens == 0 || p.q.heads + p.k.heads == 0) return nullptr;
  DeviceGuard guard(p.device);
  auto stream = static_cast<cudaStream_t>(p.stream);
  return dispatch_dtype(p.dtype, [&](auto tag) -> const char* {
    using T = typename decltype(tag)::type;
    return with_vector_width<T>(vectorizable<T>(p), [&](auto n_tag) {
      return launch_with<T, decltype(n_tag)::value>(p, stream);
    });
  });
}

}  // namespace mjp::rope
