// csr_spmm / csr_sddmm / csr_transpose on CUDA. SpMM: a lane group per (row, batch chunk), longest
// rows first; SDDMM: a lane group per span of nonzeros; O(nnz * batch) each, memory bound.
//
// Dense operands are used feature-major ((features, batch), contiguous), so
// every nonzero touches one contiguous batch vector of each operand and a group
// of lanes reads it with coalesced vector loads. Deterministic: there are no
// atomics; every output is summed by one thread (SpMM) or one group of lanes
// with a fixed shuffle tree (SDDMM), in an order that does not depend on
// scheduling, so repeated calls give identical bits. What depends only on the
// structure (its content check, the row order) is computed once per structure
// (memo_by_structure), so a call with a known structure never syncs with the host.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/argsort.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/repeat_interleave.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <tuple>
#include <type_traits>

#include "../sparsemom.h"
#include "elementwise.cuh"

namespace sparsemom {
namespace {

constexpr int kWarp = 32;

// VEC consecutive elements moved as one load/store (up to 16 bytes: LDG.128).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// The lanes of the calling thread's group of `lanes` (a power of two <= 32;
// groups never straddle a warp since blocks are whole warps). Shuffles name
// only their own group, so groups of one warp may diverge (rows of different
// lengths) without waiting for each other.
__device__ __forceinline__ unsigned group_mask(int lanes) {
  if (lanes == kWarp) return 0xffffffffu;
  const int first = (threadIdx.x & (kWarp - 1)) & ~(lanes - 1);
  return ((1u << lanes) - 1u) << first;
}

// y^T[row, b] = sum_k v_k * x^T[col_idx[k], b] (+ bias[row]).
//
// A group of `lanes` threads owns one (row, batch chunk) item: lane l covers
// the VEC batch entries at chunk * lanes * VEC + l * VEC. The group stages up
// to `lanes` nonzeros of the row (one per lane, coalesced) and broadcasts them
// with shuffles, then every lane adds v * x over its VEC entries in the row's
// own order k = begin..end-1. Items are numbered longest row first (`order`),
// so the grid-stride loop hands out the long rows in the first wave and the
// short ones fill in behind them.
template <typename scalar_t, int VEC>
__global__ void csr_spmm_kernel(const scalar_t* __restrict__ xt, const int32_t* __restrict__ row_ptr,
                                const int32_t* __restrict__ col_idx,
                                const scalar_t* __restrict__ values,
                                const int32_t* __restrict__ value_perm,
                                const scalar_t* __restrict__ bias, const int64_t* __restrict__ order,
                                scalar_t* __restrict__ yt, int64_t n_rows, int64_t batch,
                                int64_t n_chunks, int lanes) {
  using opmath_t = at::opmath_type<scalar_t>;
  using pack_t = Pack<scalar_t, VEC>;
  const int lane = threadIdx.x & (lanes - 1);
  const unsigned mask = group_mask(lanes);
  const int64_t groups_per_block = blockDim.x / lanes;
  const int64_t n_items = n_rows * n_chunks;
  for (int64_t item = blockIdx.x * groups_per_block + threadIdx.x / lanes; item < n_items;
       item += gridDim.x * groups_per_block) {
    const int64_t row = order[item / n_chunks];
    const int64_t b = (item % n_chunks) * lanes * VEC + static_cast<int64_t>(lane) * VEC;
    // batch is a multiple of VEC, so a lane is either fully inside or past the end.
    const bool active = b < batch;
    const int64_t begin = row_ptr[row];
    const int64_t end = row_ptr[row + 1];
    opmath_t acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = opmath_t(0);
    for (int64_t base = begin; base < end; base += lanes) {
      const int64_t k = base + lane;
      int32_t my_col = 0;
      opmath_t my_val = opmath_t(0);
      if (k < end) {
        my_col = col_idx[k];
        my_val = static_cast<opmath_t>(values[value_perm != nullptr ? value_perm[k] : k]);
      }
      const int staged = static_cast<int>(min(static_cast<int64_t>(lanes), end - base));
#pragma unroll 4
      for (int j = 0; j < staged; ++j) {
        const int64_t c = __shfl_sync(mask, my_col, j, lanes);
        const opmath_t v = __shfl_sync(mask, my_val, j, lanes);
        if (active) {
          const pack_t xv = *reinterpret_cast<const pack_t*>(xt + c * batch + b);
#pragma unroll
          for (int i = 0; i < VEC; ++i) acc[i] += v * static_cast<opmath_t>(xv.v[i]);
        }
      }
    }
    if (active) {
      // As in the reference: the bias is added to the finished sum.
      const opmath_t bias_v = bias != nullptr ? static_cast<opmath_t>(bias[row]) : opmath_t(0);
      pack_t out;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        out.v[i] = static_cast<scalar_t>(bias != nullptr ? acc[i] + bias_v : acc[i]);
      }
      *reinterpret_cast<pack_t*>(yt + row * batch + b) = out;
    }
  }
}

// The row r in [lo, n_rows) holding nonzero k: the first with row_ptr[r + 1] > k
// (empty rows are skipped). Needs row_ptr[lo] <= k < row_ptr[n_rows].
__device__ __forceinline__ int64_t find_row(const int32_t* __restrict__ row_ptr, int64_t lo,
                                            int64_t n_rows, int64_t k) {
  int64_t hi = n_rows - 1;  // row_ptr[n_rows] = nnz > k, so the answer is at most n_rows - 1
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (row_ptr[mid + 1] > k) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return lo;
}

// Nonzeros per group and span: enough to amortise the binary search for the
// span's first row, few enough that small matrices still fill the GPU.
constexpr int64_t kSddmmSpan = 8;

// out[k] = dot(a^T[row(k), :], b^T[col_idx[k], :]).
//
// A group of `lanes` threads owns a span of kSddmmSpan consecutive nonzeros, so
// the work per group is the same whatever the row lengths. The group finds the
// row of its first nonzero by binary search and then steps through the rows
// with the nonzeros. Per nonzero, lane l sums the products of its batch entries
// (l * VEC + i, then lanes * VEC further on, ...) in a fixed order, and the
// group adds the lane sums with an xor-shuffle tree.
template <typename scalar_t, int VEC>
__global__ void csr_sddmm_kernel(const scalar_t* __restrict__ a_t, const scalar_t* __restrict__ b_t,
                                 const int32_t* __restrict__ row_ptr,
                                 const int32_t* __restrict__ col_idx, scalar_t* __restrict__ out,
                                 int64_t n_rows, int64_t nnz, int64_t batch, int lanes) {
  using opmath_t = at::opmath_type<scalar_t>;
  using pack_t = Pack<scalar_t, VEC>;
  const int lane = threadIdx.x & (lanes - 1);
  const unsigned mask = group_mask(lanes);
  const int64_t groups_per_block = blockDim.x / lanes;
  const int64_t n_spans = (nnz + kSddmmSpan - 1) / kSddmmSpan;
  const int64_t step = static_cast<int64_t>(lanes) * VEC;
  for (int64_t span = blockIdx.x * groups_per_block + threadIdx.x / lanes; span < n_spans;
       span += gridDim.x * groups_per_block) {
    const int64_t k_begin = span * kSddmmSpan;
    const int64_t k_end = min(nnz, k_begin + kSddmmSpan);
    int64_t row = find_row(row_ptr, 0, n_rows, k_begin);
    int64_t row_end = row_ptr[row + 1];
    for (int64_t k = k_begin; k < k_end; ++k) {
      if (k >= row_end) {
        // Usually the next row; a run of empty rows needs the search.
        row = row_ptr[row + 2] > k ? row + 1 : find_row(row_ptr, row + 2, n_rows, k);
        row_end = row_ptr[row + 1];
      }
      const scalar_t* a_vec = a_t + row * batch;
      const scalar_t* b_vec = b_t + static_cast<int64_t>(col_idx[k]) * batch;
      opmath_t part[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) part[i] = opmath_t(0);
#pragma unroll 4
      for (int64_t b = static_cast<int64_t>(lane) * VEC; b < batch; b += step) {
        const pack_t av = *reinterpret_cast<const pack_t*>(a_vec + b);
        const pack_t bv = *reinterpret_cast<const pack_t*>(b_vec + b);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          part[i] += static_cast<opmath_t>(av.v[i]) * static_cast<opmath_t>(bv.v[i]);
        }
      }
      opmath_t sum = part[0];
#pragma unroll
      for (int i = 1; i < VEC; ++i) sum += part[i];
      for (int offset = lanes / 2; offset > 0; offset /= 2) {
        sum += __shfl_xor_sync(mask, sum, offset, lanes);
      }
      if (lane == 0) out[k] = static_cast<scalar_t>(sum);
    }
  }
}

// Widest pack (at most 16 bytes) that divides the batch and that every pointer
// is aligned to: then every feature row (offset feature * batch) is aligned too.
template <typename scalar_t>
int pick_vec(int64_t batch, std::initializer_list<const void*> ptrs) {
  int vec = 16 / static_cast<int>(sizeof(scalar_t));
  for (; vec > 1; vec /= 2) {
    const auto bytes = static_cast<uintptr_t>(vec) * sizeof(scalar_t);
    bool ok = batch % vec == 0;
    for (const void* p : ptrs) ok = ok && reinterpret_cast<uintptr_t>(p) % bytes == 0;
    if (ok) break;
  }
  return vec;
}

// Calls f(std::integral_constant<int, vec>{}) for a vec that pick_vec can return.
template <typename scalar_t, typename F>
void with_vec(int vec, F&& f) {
  constexpr int kMax = 16 / static_cast<int>(sizeof(scalar_t));
  if constexpr (kMax >= 8) {
    if (vec == 8) return f(std::integral_constant<int, 8>{});
  }
  if constexpr (kMax >= 4) {
    if (vec == 4) return f(std::integral_constant<int, 4>{});
  }
  if constexpr (kMax >= 2) {
    if (vec == 2) return f(std::integral_constant<int, 2>{});
  }
  f(std::integral_constant<int, 1>{});
}

// Lanes per group: enough to cover the batch with one pack each, at most a warp
// (small batches put several rows/nonzeros in one warp instead of idling lanes).
int lanes_for(int64_t batch, int vec) {
  const int64_t packs = (batch + vec - 1) / vec;
  int lanes = 1;
  while (lanes < kWarp && lanes < packs) lanes *= 2;
  return lanes;
}

int64_t blocks_for_groups(int64_t groups, int lanes) {
  const int64_t per_block = cuda::kThreadsPerBlock / lanes;
  return std::min<int64_t>((groups + per_block - 1) / per_block, cuda::kMaxBlocks);
}

at::Tensor csr_spmm_cuda(const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                         const at::Tensor& values, const std::optional<at::Tensor>& value_perm,
                         const std::optional<at::Tensor>& bias) {
  check_csr_spmm_args(x, row_ptr, col_idx, values, value_perm, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor row_ptr_c = row_ptr.contiguous();
  const at::Tensor col_idx_c = col_idx.contiguous();
  const at::Tensor perm_c = contiguous_or_undefined(value_perm);
  check_csr_content_once(row_ptr_c, col_idx_c, x.size(1), perm_c);
  const int64_t batch = x.size(0);
  const int64_t n_rows = row_ptr.numel() - 1;
  // Feature-major result: the kernel writes contiguous batch vectors per row.
  at::Tensor yt = at::empty({n_rows, batch}, x.options());
  if (batch == 0 || n_rows == 0) return yt.t();
  const at::Tensor xt = x.t().contiguous();  // no copy when x is already feature-major
  const at::Tensor values_c = values.contiguous();
  const at::Tensor bias_c = contiguous_or_undefined(bias);
  // Longest rows first for load balance: a sort of n_rows, once per structure.
  const at::Tensor order = memo_by_structure("csr_row_order", {row_ptr_c}, 0, [&] {
    return at::argsort(row_ptr_c.diff(), /*stable=*/true, /*dim=*/0, /*descending=*/true);
  });
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "csr_spmm_cuda", [&] {
    const int vec = pick_vec<scalar_t>(batch, {xt.data_ptr(), yt.data_ptr()});
    with_vec<scalar_t>(vec, [&](auto vec_c) {
      constexpr int VEC = decltype(vec_c)::value;
      const int lanes = lanes_for(batch, VEC);
      const int64_t n_chunks = (batch + static_cast<int64_t>(lanes) * VEC - 1) / (lanes * VEC);
      csr_spmm_kernel<scalar_t, VEC>
          <<<static_cast<unsigned>(blocks_for_groups(n_rows * n_chunks, lanes)),
             cuda::kThreadsPerBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
              xt.data_ptr<scalar_t>(), row_ptr_c.data_ptr<int32_t>(), col_idx_c.data_ptr<int32_t>(),
              values_c.data_ptr<scalar_t>(), data_or_null<int32_t>(perm_c),
              data_or_null<scalar_t>(bias_c), order.data_ptr<int64_t>(), yt.data_ptr<scalar_t>(),
              n_rows, batch, n_chunks, lanes);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return yt.t();
}

at::Tensor csr_sddmm_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& row_ptr,
                          const at::Tensor& col_idx) {
  check_csr_sddmm_args(a, b, row_ptr, col_idx);
  const c10::cuda::CUDAGuard guard(a.device());
  const at::Tensor row_ptr_c = row_ptr.contiguous();
  const at::Tensor col_idx_c = col_idx.contiguous();
  check_csr_content_once(row_ptr_c, col_idx_c, b.size(1), at::Tensor());
  const int64_t nnz = col_idx.numel();
  const int64_t batch = a.size(0);
  const int64_t n_rows = row_ptr.numel() - 1;
  at::Tensor out = at::empty({nnz}, a.options());
  if (nnz == 0) return out;
  if (batch == 0) return out.zero_();  // empty sums
  const at::Tensor a_t = a.t().contiguous();
  const at::Tensor b_t = b.t().contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "csr_sddmm_cuda", [&] {
    const int vec = pick_vec<scalar_t>(batch, {a_t.data_ptr(), b_t.data_ptr()});
    with_vec<scalar_t>(vec, [&](auto vec_c) {
      constexpr int VEC = decltype(vec_c)::value;
      const int lanes = lanes_for(batch, VEC);
      const int64_t n_spans = (nnz + kSddmmSpan - 1) / kSddmmSpan;
      csr_sddmm_kernel<scalar_t, VEC>
          <<<static_cast<unsigned>(blocks_for_groups(n_spans, lanes)), cuda::kThreadsPerBlock, 0,
             c10::cuda::getCurrentCUDAStream()>>>(
              a_t.data_ptr<scalar_t>(), b_t.data_ptr<scalar_t>(), row_ptr_c.data_ptr<int32_t>(),
              col_idx_c.data_ptr<int32_t>(), out.data_ptr<scalar_t>(), n_rows, nnz, batch, lanes);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

// Runs only when the topology changes, so plain ATen ops serve: a radix sort
// and a binary search, O(nnz + n_cols log nnz). Unlike bincount, neither syncs
// with the host or uses atomics.
std::tuple<at::Tensor, at::Tensor, at::Tensor> csr_transpose_cuda(const at::Tensor& row_ptr,
                                                                 const at::Tensor& col_idx,
                                                                 int64_t n_cols) {
  check_csr_transpose_args(row_ptr, col_idx, n_cols);
  const c10::cuda::CUDAGuard guard(row_ptr.device());
  const at::Tensor row_ptr_c = row_ptr.contiguous();
  const at::Tensor col_idx_c = col_idx.contiguous();
  check_csr_content_once(row_ptr_c, col_idx_c, n_cols, at::Tensor());
  const int64_t nnz = col_idx.numel();
  const auto int_opts = col_idx_c.options();
  if (nnz == 0) {
    return {at::zeros({n_cols + 1}, int_opts), at::empty({0}, int_opts), at::empty({0}, int_opts)};
  }
  // Stable, so the rows stay increasing within a column. (std::optional: a
  // plain `true` would pick the sort(self, dim, descending) overload.)
  const auto [sorted_cols, perm] =
      at::sort(col_idx_c, std::optional<bool>(true), /*dim=*/0, /*descending=*/false);
  // col_ptr[c] = number of nonzeros in columns < c: the first sorted position >= c.
  const at::Tensor col_ptr = at::searchsorted(sorted_cols, at::arange(n_cols + 1, int_opts),
                                              /*out_int32=*/true, /*right=*/false);
  // Row of every CSR position (int32, as the repeats). The size is passed so
  // that nothing syncs; std::optional, else repeat_interleave(self, int) is picked.
  const at::Tensor rows = at::repeat_interleave(row_ptr_c.diff(), std::optional<int64_t>(nnz));
  return {col_ptr, rows.index_select(0, perm), perm.to(at::kInt)};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsemom, CUDA, m) {
  m.impl("csr_spmm", &csr_spmm_cuda);
  m.impl("csr_sddmm", &csr_sddmm_cuda);
  m.impl("csr_transpose", &csr_transpose_cuda);
}

}  // namespace sparsemom
