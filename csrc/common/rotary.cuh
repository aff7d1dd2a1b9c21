// Rotate-half RoPE on 16-byte chunks of heads, shared by the rope and qkv_rope kernels.
//
// Work item = (token, chunk of N elements in the first half of head_dim, group of heads). The item's
// cos/sin come from the token position once, then every head of the group moves its chunk pair
// (elements [c, c+N) and [c+D/2, c+D/2+N)) from src to dst, rotated or copied. Heads are split into
// groups only as far as needed to give the device enough threads; the rest of the reuse stays.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_utils.cuh"
#include "common/vec.cuh"

namespace mjp {

// sin and cos of an fp32 angle, independent of --use_fast_math (which turns sincosf into the
// hardware approximation, wrong by ~1e-2 at the angles of position 8192). Cody-Waite reduction to
// [-pi, pi] with 2*pi split in two floats, then __sincosf, whose absolute error there is < 2^-21.
// Total absolute error < 1e-6 for |angle| < 2^20 (positions up to a million at inv_freq <= 1).
__device__ __forceinline__ void sincos_reduced(float angle, float* s, float* c) {
  constexpr float kInv2Pi = 0.159154943091895336f;
  constexpr float k2PiHi = 6.28318548202514648f;      // float(2*pi)
  constexpr float k2PiLo = -1.74845560007448924e-07f;  // 2*pi - float(2*pi)
  const float turns = rintf(angle * kInv2Pi);
  float r = fmaf(-turns, k2PiHi, angle);
  r = fmaf(-turns, k2PiLo, r);
  __sincosf(r, s, c);
}

// cos and sin of position * inv_freq[i] for the N frequencies of one chunk. The angle is the same
// rounded fp32 product the reference computes (positions.float() * inv_freq), so both rotate by the
// same angle; `sin_sign` = -1 rotates backwards (the backward pass of a rotation is its inverse).
template <int N>
__device__ __forceinline__ void chunk_angles(int64_t position, const float* __restrict__ inv_freq,
                                             float sin_sign, float (&cos_out)[N], float (&sin_out)[N]) {
  const float pos = static_cast<float>(position);
#pragma unroll
  for (int i = 0; i < N; ++i) {
    float s, c;
    sincos_reduced(__fmul_rn(pos, __ldg(inv_freq + i)), &s, &c);
    cos_out[i] = c;
    sin_out[i] = sin_sign * s;
  }
}

// A run of `heads` heads of one token, already offset to the item's chunk: head h reads
// src + h * src_stride and writes dst + h * dst_stride (strides in elements).
template <typename T>
struct HeadRun {
  const T* src;
  int64_t src_stride;
  T* dst;
  int64_t dst_stride;
  const T* bias;  // nullptr, or the bias of head 0 of the run (stride head_dim), added before rotating
  int heads;
  bool rotate;
};

// [lo; hi] (+ bias) as fp32, from the raw packs of one head. The bias stays packed until each
// element is widened, to spare registers.
template <typename T, int N>
__device__ __forceinline__ void widen_pair(const Pack<T, N>& lo_pack, const Pack<T, N>& hi_pack, const T* bias,
                                           int half, float (&lo)[N], float (&hi)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
    lo[i] = to_float(lo_pack.v[i]);
    hi[i] = to_float(hi_pack.v[i]);
  }
  if (bias != nullptr) {
    const Pack<T, N> b_lo = *reinterpret_cast<const Pack<T, N>*>(bias);
    const Pack<T, N> b_hi = *reinterpret_cast<const Pack<T, N>*>(bias + half);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      lo[i] += to_float(b_lo.v[i]);
      hi[i] += to_float(b_hi.v[i]);
    }
  }
}

// [lo; hi] * cos + rotate_half([lo; hi]) * sin, with rotate_half([lo; hi]) = [-hi; lo].
template <int N>
__device__ __forceinline__ void rotate_pair(float (&lo)[N], float (&hi)[N], const float (&cos_v)[N],
                                            const float (&sin_v)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const float new_lo = lo[i] * cos_v[i] - hi[i] * sin_v[i];
    hi[i] = hi[i] * cos_v[i] + lo[i] * sin_v[i];
    lo[i] = new_lo;
  }
}

// Heads [first, last) of a run. The raw 16-byte loads of up to kBatch heads are issued before any
// store, so each thread keeps 2 * kBatch loads in flight (the compiler cannot move loads above stores
// through pointers that may alias); holding them packed, not widened, halves their registers.
template <typename T, int N>
__device__ __forceinline__ void move_run(const HeadRun<T>& run, int first, int last, int half,
                                         const float (&cos_v)[N], const float (&sin_v)[N]) {
  constexpr int kBatch = 4;
  for (int h0 = first; h0 < last; h0 += kBatch) {
    Pack<T, N> lo_pack[kBatch], hi_pack[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      if (h0 + u < last) {
        const T* src = run.src + (h0 + u) * run.src_stride;
        lo_pack[u] = *reinterpret_cast<const Pack<T, N>*>(src);
        hi_pack[u] = *reinterpret_cast<const Pack<T, N>*>(src + half);
      }
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      if (h0 + u < last) {
        float lo[N], hi[N];
        const T* bias = run.bias == nullptr ? nullptr : run.bias + (h0 + u) * 2 * half;
        widen_pair<T, N>(lo_pack[u], hi_pack[u], bias, half, lo, hi);
        if (run.rotate) rotate_pair<N>(lo, hi, cos_v, sin_v);
        T* dst = run.dst + (h0 + u) * run.dst_stride;
        store_float<T, N>(dst, lo);
        store_float<T, N>(dst + half, hi);
      }
    }
  }
}

// Heads [begin, end) of the runs laid end to end (q heads, then k heads, then v heads).
template <typename T, int N, int R>
__device__ __forceinline__ void move_heads(const HeadRun<T> (&runs)[R], int begin, int end, int half,
                                           const float (&cos_v)[N], const float (&sin_v)[N]) {
  int offset = 0;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int first = max(begin - offset, 0), last = min(end - offset, runs[r].heads);
    if (first < last) move_run<T, N>(runs[r], first, last, half, cos_v, sin_v);
    offset += runs[r].heads;
  }
}

// Which (chunk, token, head group) item i is; chunks vary fastest so a warp reads and writes
// consecutive 16-byte pieces of consecutive tokens.
struct Item {
  int64_t token;
  int chunk;  // element offset of the chunk in the first half of head_dim
  int head_begin;
  int head_end;
};

struct ItemSpace {
  unsigned int chunks;  // per token: (head_dim / 2) / N
  unsigned int tokens;
  int heads_per_item;
  int total_heads;
  int64_t items;  // chunks * tokens * head groups

  __device__ __forceinline__ Item item(unsigned int i, int n) const {
    const unsigned int rest = i / chunks;
    const unsigned int group = rest / tokens;
    const int begin = static_cast<int>(group) * heads_per_item;
    return Item{rest - group * tokens, static_cast<int>(i - rest * chunks) * n, begin,
                min(begin + heads_per_item, total_heads)};
  }
};

// Splits heads into groups until the launch has `target_items` items (a few waves of resident
// threads, so the last wave's tail is short): each group recomputes the item's cos/sin, so the fewer
// groups, the more heads share it.
inline ItemSpace item_space(int64_t tokens, int chunks, int total_heads, int64_t target_items) {
  const int64_t base = tokens * chunks;
  const int64_t wanted = (target_items + base - 1) / (base > 0 ? base : 1);
  const int groups = static_cast<int>(wanted < total_heads ? (wanted > 1 ? wanted : 1) : total_heads);
  const int per_item = (total_heads + groups - 1) / groups;
  const int64_t items = base * ((total_heads + per_item - 1) / per_item);
  return ItemSpace{static_cast<unsigned int>(chunks), static_cast<unsigned int>(tokens), per_item, total_heads,
                   items};
}

// The rotary kernels hold a chunk's cos/sin and a batch of raw loads in registers; capping them at
// 128 registers (two 256-thread blocks per SM) costs at most a few bytes of spill and keeps 8 loads
// of 16 bytes in flight per thread, plenty to cover HBM latency.
constexpr int kRotaryMinBlocks = 2;
constexpr int kWavesPerLaunch = 4;

}  // namespace mjp
