// Packed loads/stores and fp32 conversion. A Pack of N elements is one 16-byte transaction when
// N * sizeof(T) == 16 (the vector path) and a scalar access when N == 1 (the unaligned fallback).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

namespace mjp {

template <typename T>
constexpr int kVec = 16 / sizeof(T);  // elements per 16-byte vector: 4 fp32, 8 bf16/fp16

// The one place a run-time alignment test becomes a compile-time vector width: calls
// fn(std::integral_constant<int, N>{}) with N = kVec<T> when `vectorizable`, else N = 1.
template <typename T, typename Fn>
decltype(auto) with_vector_width(bool vectorizable, Fn&& fn) {
  if (vectorizable) return fn(std::integral_constant<int, kVec<T>>{});
  return fn(std::integral_constant<int, 1>{});
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// Loads N elements at p (aligned to the pack size) widened to fp32.
template <typename T, int N>
__device__ __forceinline__ void load_float(const T* __restrict__ p, float (&out)[N]) {
  const Pack<T, N> pack = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_float(pack.v[i]);
}

// Rounds N fp32 values once to T and stores them at p (aligned to the pack size).
template <typename T, int N>
__device__ __forceinline__ void store_float(T* __restrict__ p, const float (&in)[N]) {
  Pack<T, N> pack;
#pragma unroll
  for (int i = 0; i < N; ++i) pack.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<Pack<T, N>*>(p) = pack;
}

}  // namespace mjp
