// Rotate-half RoPE on one 16-byte chunk of a head: elements [c, c+N) of the first half pair with
// [c + D/2, c + D/2 + N) of the second half. Shared by the rope and qkv_rope kernels.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

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

// cos and sin of position * inv_freq[i] for the N frequencies of this chunk. The angle is the same
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

// out = x * cos + rotate_half(x) * sin on one chunk pair; `bias` (nullable) is added first, as the
// reference adds the projection bias before rotating. src/dst point at the chunk in the first half.
template <typename T, int N, bool kRotate>
__device__ __forceinline__ void rotate_chunk(const T* __restrict__ src, const T* __restrict__ bias,
                                             T* __restrict__ dst, int half, const float (&cos_v)[N],
                                             const float (&sin_v)[N]) {
  float x1[N], x2[N];
  load_float<T, N>(src, x1);
  load_float<T, N>(src + half, x2);
  if (bias != nullptr) {
    float b1[N], b2[N];
    load_float<T, N>(bias, b1);
    load_float<T, N>(bias + half, b2);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      x1[i] += b1[i];
      x2[i] += b2[i];
    }
  }
  if (kRotate) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const float y1 = x1[i] * cos_v[i] - x2[i] * sin_v[i];
      const float y2 = x2[i] * cos_v[i] + x1[i] * sin_v[i];
      x1[i] = y1;
      x2[i] = y2;
    }
  }
  store_float<T, N>(dst, x1);
  store_float<T, N>(dst + half, x2);
}

}  // namespace mjp
