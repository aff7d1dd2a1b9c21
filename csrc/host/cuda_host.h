// Host stand-ins for the CUDA runtime and device intrinsics the csrc/ kernels use, so the same
// .cu kernel bodies compile with the host C++ compiler and run on the CPU (csrc/host/host_kernels.cpp,
// tests/unit/test_kernels_on_host.py). Reached through include/cuda_*.h, which the host build puts
// ahead of any toolkit on the include path; nothing here is seen by nvcc.
//
// A launch runs the grid block by block and, in each block, thread by thread, each thread's
// grid-stride loop to its end. The kernels have no shared memory, no barriers and no inter-thread
// communication, so this order computes what any device schedule computes.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#define MJP_HOST_BUILD 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
};

// The built-in index variables: set by the launcher before it runs each thread.
inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

// ---- intrinsics ---------------------------------------------------------------------------------

template <typename T>
inline T __ldg(const T* p) { return *p; }

// Round-to-nearest multiply, never contracted into an fma (what __fmul_rn promises on the device).
inline float __fmul_rn(float a, float b) {
  volatile float product = a * b;
  return product;
}

inline float __expf(float x) { return std::exp(x); }

namespace mjp_host {

// CUDA Math API, intrinsic functions: __sincosf's maximum absolute error is 2^-21.41 for x in
// [-pi, pi]. The host stand-in errs by exactly that much (sin up, cos down), so the tests prove their
// tolerances against the device's worst case rather than against libm's near-exact values.
constexpr float kSincosError = 3.6122e-7f;  // 2^-21.41
// The kernels reduce angles to [-pi, pi] first; the turn count's two roundings can leave the result
// past pi by up to |angle| * 2^-23, at most 2^-9 for |angle| <= 2^14 (positions below 16384 at
// inv_freq <= 1). The bound is taken to hold over that sliver too; past it the stand-in returns NaN,
// so an argument the reduction failed to bring into range fails every test that reaches it.
constexpr float kSincosDomain = 3.14159265f + 0.001953125f;

}  // namespace mjp_host

inline void __sincosf(float x, float* s, float* c) {
  if (!(std::fabs(x) <= mjp_host::kSincosDomain)) {
    *s = *c = NAN;
    return;
  }
  *s = std::sin(x) + mjp_host::kSincosError;
  *c = std::cos(x) - mjp_host::kSincosError;
}

// ---- bf16 and fp16 ------------------------------------------------------------------------------

struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 x) {
  const uint32_t wide = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &wide, sizeof f);
  return f;
}

// Round to nearest even, NaN kept quiet (what __float2bfloat16_rn and torch's conversion do).
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if (std::isnan(f)) return __nv_bfloat16{static_cast<uint16_t>((u >> 16) | 0x40)};
  u += 0x7fff + ((u >> 16) & 1);
  return __nv_bfloat16{static_cast<uint16_t>(u >> 16)};
}

// IEEE half as raw bits, converted with integer arithmetic (no dependence on _Float16 support).
struct __half {
  uint16_t bits;
};

inline float __half2float(__half x) {
  const uint32_t sign = static_cast<uint32_t>(x.bits & 0x8000u) << 16;
  const uint32_t exponent = (x.bits >> 10) & 0x1fu, mantissa = x.bits & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in fp32
    const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -magnitude : magnitude;
  }
  const uint32_t wide = sign | (exponent == 0x1f ? 0x7f800000u | (mantissa << 13)
                                                 : ((exponent + 112) << 23) | (mantissa << 13));
  float f;
  std::memcpy(&f, &wide, sizeof f);
  return f;
}

// Round to nearest even, as __float2half_rn: overflow to inf, subnormals by an fp32 add whose own
// rounding is the half rounding (F. Giesen's float_to_half_fast3_rtne), NaN kept quiet.
inline __half __float2half_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  if (u >= (127u + 16) << 23) {  // >= 2^16, inf or NaN
    return __half{static_cast<uint16_t>(sign | (u > 0x7f800000u ? 0x7e00u : 0x7c00u))};
  }
  if (u < 113u << 23) {  // below 2^-14: a half subnormal or zero
    constexpr uint32_t kMagic = 126u << 23;  // 0.5f: its ulp is the half subnormal step 2^-24
    float magic, shifted;
    std::memcpy(&magic, &kMagic, sizeof magic);
    std::memcpy(&shifted, &u, sizeof shifted);
    shifted += magic;
    std::memcpy(&u, &shifted, sizeof u);
    return __half{static_cast<uint16_t>(sign | (u - kMagic))};
  }
  const uint32_t odd = (u >> 13) & 1u;
  u += 0xc8000fffu + odd;  // rebias the exponent (15 - 127) << 23, plus the rounding bias
  return __half{static_cast<uint16_t>(sign | (u >> 13))};
}

// ---- runtime ------------------------------------------------------------------------------------

struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaError_t { cudaSuccess = 0 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

namespace mjp_host {

// A small pretend device: 2 SMs hold 2 * 2048 threads, so the launchers cap a grid at 64 blocks of
// 256 and a few thousand items already take several waves of the grid-stride loops.
constexpr int kSms = 2;
constexpr int kBlocksPerSm = 2;

// What the last launch asked for, for tests that check which kernel variant ran.
struct LaunchRecord {
  unsigned int blocks = 0;
  unsigned int threads = 0;
  int64_t launches = 0;
};
inline LaunchRecord last_launch;

template <typename... Params>
struct Launch {
  void (*kernel)(Params...);
  unsigned int blocks, threads;

  template <typename... Args>
  void operator()(const Args&... args) const {
    last_launch = LaunchRecord{blocks, threads, last_launch.launches + 1};
    gridDim = dim3{blocks, 1, 1};
    blockDim = dim3{threads, 1, 1};
    for (unsigned int b = 0; b < blocks; ++b) {
      blockIdx = dim3{b, 1, 1};
      for (unsigned int t = 0; t < threads; ++t) {
        threadIdx = dim3{t, 1, 1};
        kernel(args...);
      }
    }
  }
};

struct Grid {
  unsigned int blocks, threads;

  template <typename... Params>
  Launch<Params...> of(void (*kernel)(Params...)) const {
    return Launch<Params...>{kernel, blocks, threads};
  }
};

}  // namespace mjp_host

// csrc/common/cuda_utils.cuh launches through this macro; under nvcc it is the triple-chevron launch.
#define MJP_LAUNCH(blocks, stream, ...) \
  ((void)(stream),                     \
   ::mjp_host::Grid{static_cast<unsigned int>(blocks), static_cast<unsigned int>(::mjp::kThreads)}.of(__VA_ARGS__))

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "no error"; }

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
  *value = mjp_host::kSms;
  return cudaSuccess;
}

template <typename Kernel>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel, int, size_t) {
  *blocks = mjp_host::kBlocksPerSm;
  return cudaSuccess;
}
