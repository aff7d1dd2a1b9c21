// SwiGLU / GeGLU (erf and tanh) forward and backward on the fused fc1 output.
//
// One thread owns one 16-byte chunk of a row's output: the forward reads the matching chunks of the
// activated and the linear half and writes one chunk of y; the backward reads those two and the chunk
// of grad_y and writes both chunks of grad_x. Math is fp32 with one rounding per output, and the
// backward recomputes the activation from x instead of saving it.
#include <cuda_runtime.h>

#include <type_traits>

#include "common/cuda_utils.cuh"
#include "common/vec.cuh"
#include "glu/glu.h"

namespace mjp::glu {
namespace {

// tanhf becomes tanh.approx (relative error ~2^-11) under --use_fast_math, too coarse for fp32
// parity with torch. This form keeps the absolute error near 1e-7 with or without it; |u| >= 9
// rounds tanh to +-1 in fp32, and the clamp keeps exp finite.
__device__ __forceinline__ float tanh_accurate(float u) {
  const float e = __expf(2.f * fminf(fabsf(u), 9.f));
  return copysignf(1.f - 2.f / (e + 1.f), u);
}

template <Activation A>
struct Act;

// The formulas torch uses (aten/src/ATen/native/cuda/ActivationGeluKernel.cu, silu in
// ActivationSiluKernel.cu), evaluated in fp32.
template <>
struct Act<Activation::kSilu> {
  static __device__ __forceinline__ float value(float a) { return a / (1.f + expf(-a)); }
  static __device__ __forceinline__ void value_grad(float a, float& v, float& g) {
    const float s = 1.f / (1.f + expf(-a));
    v = a * s;
    g = s * (1.f + a * (1.f - s));
  }
};

template <>
struct Act<Activation::kGeluErf> {
  static constexpr float kAlpha = 0.70710678118654752f;   // 1/sqrt(2)
  static constexpr float kBeta = 0.39894228040143268f;    // 1/sqrt(2*pi)
  static __device__ __forceinline__ float value(float a) { return a * 0.5f * (1.f + erff(a * kAlpha)); }
  static __device__ __forceinline__ void value_grad(float a, float& v, float& g) {
    const float cdf = 0.5f * (1.f + erff(a * kAlpha));
    v = a * cdf;
    g = cdf + a * expf(-0.5f * a * a) * kBeta;
  }
};

template <>
struct Act<Activation::kGeluTanh> {
  static constexpr float kBeta = 0.79788456080286536f;  // sqrt(2/pi)
  static constexpr float kKappa = 0.044715f;
  static __device__ __forceinline__ float value(float a) {
    return 0.5f * a * (1.f + tanh_accurate(kBeta * (a + kKappa * a * a * a)));
  }
  static __device__ __forceinline__ void value_grad(float a, float& v, float& g) {
    const float a2 = a * a;
    const float t = tanh_accurate(kBeta * (a + kKappa * a2 * a));
    v = 0.5f * a * (1.f + t);
    g = 0.5f * (1.f + t) + 0.5f * a * (1.f - t * t) * kBeta * (1.f + 3.f * kKappa * a2);
  }
};

template <typename T, int N, Activation A>
__global__ void __launch_bounds__(kThreads) glu_forward_kernel(const Params p) {
  const unsigned int chunks = static_cast<unsigned int>(p.width / N);
  const unsigned int items = static_cast<unsigned int>(p.rows) * chunks;
  for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < items; i += gridDim.x * blockDim.x) {
    const int64_t row = i / chunks;
    const int64_t col = (i - row * chunks) * N;
    const T* a_ptr = static_cast<const T*>(p.x) + row * 2 * p.width + col;
    float a[N], b[N], y[N];
    load_float<T, N>(a_ptr, a);
    load_float<T, N>(a_ptr + p.width, b);
#pragma unroll
    for (int j = 0; j < N; ++j) y[j] = Act<A>::value(a[j]) * b[j];
    store_float<T, N>(static_cast<T*>(p.out) + row * p.width + col, y);
  }
}

template <typename T, int N, Activation A>
__global__ void __launch_bounds__(kThreads) glu_backward_kernel(const Params p) {
  const unsigned int chunks = static_cast<unsigned int>(p.width / N);
  const unsigned int items = static_cast<unsigned int>(p.rows) * chunks;
  for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < items; i += gridDim.x * blockDim.x) {
    const int64_t row = i / chunks;
    const int64_t col = (i - row * chunks) * N;
    const int64_t x_offset = row * 2 * p.width + col;
    float a[N], b[N], dy[N], da[N], db[N];
    load_float<T, N>(static_cast<const T*>(p.x) + x_offset, a);
    load_float<T, N>(static_cast<const T*>(p.x) + x_offset + p.width, b);
    load_float<T, N>(static_cast<const T*>(p.grad_out) + row * p.width + col, dy);
#pragma unroll
    for (int j = 0; j < N; ++j) {
      float v, g;
      Act<A>::value_grad(a[j], v, g);
      da[j] = dy[j] * b[j] * g;
      db[j] = dy[j] * v;
    }
    store_float<T, N>(static_cast<T*>(p.out) + x_offset, da);
    store_float<T, N>(static_cast<T*>(p.out) + x_offset + p.width, db);
  }
}

template <typename T>
bool vectorizable(const Params& p) {
  const bool ptrs = aligned16(p.x) && aligned16(p.out) && (p.grad_out == nullptr || aligned16(p.grad_out));
  return ptrs && p.width % kVec<T> == 0;
}

// Instantiates the kernel for the dtype, the vector width and the activation, then launches it.
template <bool kBackward>
const char* launch_glu(const Params& p) {
  if (p.rows * p.width >= (int64_t{1} << 31)) return "too many elements for 32-bit indexing";
  if (p.rows == 0 || p.width == 0) return nullptr;
  DeviceGuard guard(p.device);
  auto stream = static_cast<cudaStream_t>(p.stream);
  return dispatch_dtype(p.dtype, [&](auto tag) -> const char* {
    using T = typename decltype(tag)::type;
    const bool vec = vectorizable<T>(p);
    const unsigned int blocks = grid_blocks(p.rows * p.width / (vec ? kVec<T> : 1), p.device);
    auto run = [&](auto n_tag, auto act_tag) {
      constexpr int n = decltype(n_tag)::value;
      constexpr Activation act = decltype(act_tag)::value;
      if constexpr (kBackward) {
        MJP_LAUNCH(blocks, stream, glu_backward_kernel<T, n, act>)(p);
      } else {
        MJP_LAUNCH(blocks, stream, glu_forward_kernel<T, n, act>)(p);
      }
    };
    auto with_activation = [&](auto n_tag) {
      switch (p.activation) {
        case Activation::kSilu: run(n_tag, std::integral_constant<Activation, Activation::kSilu>{}); break;
        case Activation::kGeluErf: run(n_tag, std::integral_constant<Activation, Activation::kGeluErf>{}); break;
        case Activation::kGeluTanh: run(n_tag, std::integral_constant<Activation, Activation::kGeluTanh>{}); break;
      }
    };
    with_vector_width<T>(vec, with_activation);
    return launch_status();
  });
}

}  // namespace

const char* launch_forward(const Params& params) { return launch_glu<false>(params); }
const char* launch_backward(const Params& params) { return launch_glu<true>(params); }

}  // namespace mjp::glu
