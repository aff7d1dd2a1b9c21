// Launch plumbing shared by the .cu files: device guard, grid sizing, error reporting and dtype
// dispatch. Torch-free by design (DESIGN.md §6): only the CUDA runtime.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/dtype.h"

namespace mjp {

constexpr int kThreads = 256;

// The bindings cannot include torch's CUDA headers, so the launcher makes the tensors' device current
// for the launch and restores the caller's afterwards (what c10::cuda::CUDAGuard would do).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    cudaGetDevice(&previous_);
    if (previous_ != device) cudaSetDevice(device);
    target_ = device;
  }
  ~DeviceGuard() {
    if (previous_ != target_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  int target_ = 0;
};

// Grid for a grid-stride loop over `items`: enough blocks to fill every SM a few times over, no more
// (the loop covers the rest), so large tensors do not pay for millions of block launches.
inline unsigned int grid_blocks(int64_t items, int device) {
  static int sm_count[64] = {0};
  int& sms = sm_count[device & 63];
  if (sms == 0) cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t wanted = (items + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(sms > 0 ? sms : 132) * (2048 / kThreads) * 4;
  return static_cast<unsigned int>(wanted < cap ? (wanted > 0 ? wanted : 1) : cap);
}

// nullptr when the last launch succeeded, else the runtime's static error string.
inline const char* launch_status() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls fn(TypeTag<T>{}) with T the element type named by `dtype` (C++17: no templated lambdas).
template <typename Fn>
const char* dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: return fn(TypeTag<float>{});
    case DType::kBFloat16: return fn(TypeTag<__nv_bfloat16>{});
    case DType::kFloat16: return fn(TypeTag<__half>{});
  }
  return "unsupported dtype";
}

}  // namespace mjp
