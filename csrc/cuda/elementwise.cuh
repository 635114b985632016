// Launch helpers for the elementwise kernels: a grid-stride loop over n
// elements on the current stream of the tensors' device.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

namespace sparsemom::cuda {

constexpr int kThreadsPerBlock = 256;
// Enough blocks to fill any current GPU several times over; the grid-stride
// loop covers the rest, so the grid never exceeds launch limits.
constexpr int64_t kMaxBlocks = 4096;

inline int64_t blocks_for(int64_t n) {
  return std::min<int64_t>((n + kThreadsPerBlock - 1) / kThreadsPerBlock, kMaxBlocks);
}

#define SPARSEMOM_GRID_STRIDE_LOOP(i, n)                                              \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)

// Launches `kernel<<<...>>>(args...)` over n elements on the current stream and
// checks the launch. Nothing is launched for n == 0.
template <typename Kernel, typename... Args>
void launch_elementwise(int64_t n, Kernel kernel, Args... args) {
  if (n == 0) return;
  kernel<<<static_cast<unsigned>(blocks_for(n)), kThreadsPerBlock, 0,
           c10::cuda::getCurrentCUDAStream()>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace sparsemom::cuda
