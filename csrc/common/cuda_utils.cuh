// Launch plumbing shared by the .cu files: device guard, grid sizing, error reporting and dtype
// dispatch. Torch-free by design (docs/DESIGN.md §6): only the CUDA runtime.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/dtype.h"

namespace mjp {

constexpr int kThreads = 256;

// Every launch goes through this macro, so the host build (csrc/host/cuda_host.h defines it as a loop
// over blocks and threads) runs the very same kernels on the CPU.
#ifndef MJP_HOST_BUILD
#define MJP_LAUNCH(blocks, stream, ...) __VA_ARGS__<<<(blocks), ::mjp::kThreads, 0, (stream)>>>
#endif

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

inline int sm_count(int device) {
  static int cached[64] = {0};  // per device; a benign race at worst writes the same value twice
  int& sms = cached[device & 63];
  if (sms == 0 && cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    cudaGetLastError();  // clear it; assume an H100's 132 SMs, only the grid size depends on it
    sms = 132;
  }
  return sms;
}

// Threads the device keeps resident at once (2048 per SM on sm_80/sm_90): the parallelism a
// memory-bound kernel needs to keep enough loads in flight.
inline int64_t resident_threads(int device) { return static_cast<int64_t>(sm_count(device)) * 2048; }

// Threads of `kernel` the device keeps resident at once, from its register and shared-memory use
// (queried once per kernel instantiation: a node's GPUs share one architecture).
template <typename Kernel>
int64_t resident_threads_of(Kernel kernel, int device) {
  static const int blocks_per_sm = [&] {
    int blocks = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, 0) != cudaSuccess || blocks < 1) {
      cudaGetLastError();
      blocks = 1;
    }
    return blocks;
  }();
  return static_cast<int64_t>(blocks_per_sm) * kThreads * sm_count(device);
}

// Grid for a grid-stride loop over `items`: enough blocks to fill every SM a few times over, no more
// (the loop covers the rest), so large tensors do not pay for millions of block launches.
inline unsigned int grid_blocks(int64_t items, int device) {
  const int64_t wanted = (items + kThreads - 1) / kThreads;
  const int64_t cap = resident_threads(device) / kThreads * 4;
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
