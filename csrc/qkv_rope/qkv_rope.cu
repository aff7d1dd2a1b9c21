// Fused QKV split + bias + RoPE: the projection output [B, S, (Hq + 2 Hk) * D] becomes q [B, Hq, S, D],
// k and v [B, Hk, S, D] (or token-major [B * S, H, D], varlen_attn's layout) in one read and one write
// (and the backward, which gathers the three gradients back into one [B, S, (Hq + 2 Hk) * D] tensor).
//
// A thread owns one (token, 16-byte chunk of the first half of D, group of heads) item
// (common/rotary.cuh): it computes the chunk's cos/sin once and moves that chunk pair of every head of
// its group, rotating q and k heads and copying v heads. Reads of a token row and writes to the
// per-head [S, D] planes are both 16-byte accesses, and consecutive threads touch consecutive tokens
// of one plane, so the writes coalesce.
#include <cuda_runtime.h>

#include <initializer_list>
#include <type_traits>

#include "common/cuda_utils.cuh"
#include "common/rotary.cuh"
#include "common/vec.cuh"
#include "qkv_rope/qkv_rope.h"

namespace mjp::qkv_rope {
namespace {

// Where (token, chunk) sits in the fused row and in the three q, k, v tensors.
struct Place {
  int64_t row;                  // element offset of the chunk in qkv[b, s, :]
  int64_t q_plane, kv_plane;    // element offsets of the chunk in head 0 of q and of k/v
  int64_t plane;                // stride between heads in q, k, v: S * D head-major, D token-major
  int k_col, v_col;             // first k and first v column of the fused row
};

__device__ __forceinline__ Place place_of(const Shape& s, int64_t token, int chunk) {
  const int width = (s.q_heads + 2 * s.kv_heads) * s.head_dim;
  const int k_col = s.q_heads * s.head_dim, v_col = (s.q_heads + s.kv_heads) * s.head_dim;
  if (s.token_major) {  // q[token, h, :]: a token's heads side by side
    return Place{token * width + chunk, token * s.q_heads * s.head_dim + chunk,
                 token * s.kv_heads * s.head_dim + chunk, s.head_dim, k_col, v_col};
  }
  // 32-bit division: the launcher keeps every index below 2^31
  const int64_t b = static_cast<unsigned int>(token) / static_cast<unsigned int>(s.seq), pos = token - b * s.seq;
  return Place{token * width + chunk, (b * s.q_heads * s.seq + pos) * s.head_dim + chunk,
               (b * s.kv_heads * s.seq + pos) * s.head_dim + chunk, s.seq * s.head_dim, k_col, v_col};
}

template <int N>
__device__ __forceinline__ void angles_if_needed(const Rotary& rotary, const Item& it, int rotating_heads,
                                                 float sin_sign, float (&cos_v)[N], float (&sin_v)[N]) {
  // a group of v heads only, or no rotary at all: nothing to rotate, skip the sincos
  if (rotary.positions != nullptr && it.head_begin < rotating_heads) {
    chunk_angles<N>(rotary.positions[it.token], rotary.inv_freq + it.chunk, sin_sign, cos_v, sin_v);
  }
}

template <typename T, int N>
__global__ void __launch_bounds__(kThreads, kRotaryMinBlocks)
    qkv_rope_forward_kernel(const ForwardParams p, const ItemSpace space) {
  const Shape& s = p.shape;
  const bool rotate = p.rotary.positions != nullptr;
  const unsigned int items = static_cast<unsigned int>(space.items);
  for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < items; i += gridDim.x * blockDim.x) {
    const Item it = space.item(i, N);
    float cos_v[N], sin_v[N];
    angles_if_needed<N>(p.rotary, it, s.q_heads + s.kv_heads, 1.f, cos_v, sin_v);
    const Place at = place_of(s, it.token, it.chunk);
    const T* src = static_cast<const T*>(p.qkv) + at.row;
    const T* bias = p.bias == nullptr ? nullptr : static_cast<const T*>(p.bias) + it.chunk;
    const HeadRun<T> runs[3] = {
        {src, s.head_dim, static_cast<T*>(p.q) + at.q_plane, at.plane, bias, s.q_heads, rotate},
        {src + at.k_col, s.head_dim, static_cast<T*>(p.k) + at.kv_plane, at.plane,
         bias == nullptr ? nullptr : bias + at.k_col, s.kv_heads, rotate},
        {src + at.v_col, s.head_dim, static_cast<T*>(p.v) + at.kv_plane, at.plane,
         bias == nullptr ? nullptr : bias + at.v_col, s.kv_heads, false},
    };
    move_heads<T, N, 3>(runs, it.head_begin, it.head_end, s.head_dim / 2, cos_v, sin_v);
  }
}

template <typename T, int N>
__global__ void __launch_bounds__(kThreads, kRotaryMinBlocks)
    qkv_rope_backward_kernel(const BackwardParams p, const ItemSpace space) {
  const Shape& s = p.shape;
  const bool rotate = p.rotary.positions != nullptr;
  const unsigned int items = static_cast<unsigned int>(space.items);
  for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < items; i += gridDim.x * blockDim.x) {
    const Item it = space.item(i, N);
    float cos_v[N], sin_v[N];
    angles_if_needed<N>(p.rotary, it, s.q_heads + s.kv_heads, -1.f, cos_v, sin_v);
    const Place at = place_of(s, it.token, it.chunk);
    T* dst = static_cast<T*>(p.grad_qkv) + at.row;
    const HeadRun<T> runs[3] = {
        {static_cast<const T*>(p.grad_q) + at.q_plane, at.plane, dst, s.head_dim, nullptr, s.q_heads, rotate},
        {static_cast<const T*>(p.grad_k) + at.kv_plane, at.plane, dst + at.k_col, s.head_dim, nullptr,
         s.kv_heads, rotate},
        {static_cast<const T*>(p.grad_v) + at.kv_plane, at.plane, dst + at.v_col, s.head_dim, nullptr,
         s.kv_heads, false},
    };
    move_heads<T, N, 3>(runs, it.head_begin, it.head_end, s.head_dim / 2, cos_v, sin_v);
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

// Instantiates `kernel` for the dtype and the vector width, sizes the item space and launches it.
template <template <typename, int> class Kernel, typename Params>
const char* launch_kernel(const Params& p, std::initializer_list<const void*> pointers) {
  const Shape& s = p.shape;
  if (s.head_dim % 2 != 0) return "head_dim must be even";
  const int64_t tokens = s.batch * s.seq;
  if (tokens == 0) return nullptr;
  DeviceGuard guard(p.device);
  auto stream = static_cast<cudaStream_t>(p.stream);
  return dispatch_dtype(p.dtype, [&](auto tag) -> const char* {
    using T = typename decltype(tag)::type;
    auto launch = [&](auto n_tag) -> const char* {
      constexpr int n = decltype(n_tag)::value;
      const int64_t target = kWavesPerLaunch * Kernel<T, n>::resident_threads(p.device);
      const ItemSpace space = item_space(tokens, s.head_dim / 2 / n, s.q_heads + 2 * s.kv_heads, target);
      const int64_t items = space.items;
      if (items >= (int64_t{1} << 31)) return "too many tokens for 32-bit indexing";
      Kernel<T, n>::launch(grid_blocks(items, p.device), stream, p, space);
      return launch_status();
    };
    return with_vector_width<T>(vectorizable<T>(s.head_dim, pointers), launch);
  });
}

template <typename T, int N>
struct Forward {
  static void launch(unsigned int blocks, cudaStream_t stream, const ForwardParams& p, const ItemSpace& space) {
    MJP_LAUNCH(blocks, stream, qkv_rope_forward_kernel<T, N>)(p, space);
  }
  static int64_t resident_threads(int device) { return resident_threads_of(qkv_rope_forward_kernel<T, N>, device); }
};

template <typename T, int N>
struct Backward {
  static void launch(unsigned int blocks, cudaStream_t stream, const BackwardParams& p, const ItemSpace& space) {
    MJP_LAUNCH(blocks, stream, qkv_rope_backward_kernel<T, N>)(p, space);
  }
  static int64_t resident_threads(int device) { return resident_threads_of(qkv_rope_backward_kernel<T, N>, device); }
};

}  // namespace

const char* launch_forward(const ForwardParams& p) {
  return launch_kernel<Forward>(p, {p.qkv, p.bias, p.q, p.k, p.v});
}

const char* launch_backward(const BackwardParams& p) {
  return launch_kernel<Backward>(p, {p.grad_q, p.grad_k, p.grad_v, p.grad_qkv});
}

}  // namespace mjp::qkv_rope
