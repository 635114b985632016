// csr_spmm / csr_sddmm / csr_transpose on CPU. SpMM and SDDMM read the dense
// operands feature-major (a contiguous batch vector per feature), so each
// nonzero costs one fused multiply-add per batch entry on contiguous memory:
// O(nnz * batch) work, O(nnz + (n_rows + n_cols) * batch) memory traffic.
// Rows are split over threads by nonzeros (not by row count), so skewed rows do
// not idle a core; every output is summed by one thread in a fixed order
// (deterministic, and bit-identical across the AVX-512 / AVX2 / baseline builds).
// csr_transpose is a counting sort, O(nnz + n_cols).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "../inline_bits.h"
#include "../sparsemom.h"
#include "cpu_isa.h"
#include "vec16.h"

namespace sparsemom {
namespace {

// How a kernel's walk takes the columns (csr_kernels.inc, walk_column_chunks).
struct ColumnChunks {
  int64_t cols;       // columns per chunk; n_cols: not chunked
  int64_t row_block;  // chunked: rows per pass over a chunk
};

struct SpmmArgs {
  const int32_t* row_ptr;
  const int32_t* col_idx;
  const float* values;        // in the structure's order (value_perm already applied)
  const float* bias;          // nullptr: no bias
  const float* xt;            // (n_cols, batch) contiguous
  float* yt;                  // (n_rows, batch) contiguous
  int64_t batch;
  int64_t nnz;
  int64_t n_cols;
  ColumnChunks chunks;
};

struct SddmmArgs {
  const int32_t* row_ptr;
  const int32_t* col_idx;
  const float* at;  // (n_rows, batch) contiguous
  const float* bt;  // (n_cols, batch) contiguous
  float* out;       // (nnz,)
  int64_t batch;
  int64_t nnz;
  int64_t n_cols;
  ColumnChunks chunks;
};

// The fused backward (csr_linear_backward), walked over the transposed
// structure: the field names are walk_column_chunks', so row_ptr / col_idx
// are col_ptr / row_idx here and n_cols is the number of W's rows.
struct BackwardArgs {
  const int32_t* row_ptr;  // col_ptr (n_in + 1)
  const int32_t* col_idx;  // row_idx (nnz)
  const int32_t* perm;     // CSC position -> CSR position
  const float* values;     // (nnz,) CSR order
  const float* gt;         // output gradient, (n_out, batch) contiguous
  const float* xt;         // input, (n_in, batch) contiguous
  float* gxt;              // input gradient, (n_in, batch) contiguous
  float* grad_values;      // (nnz,) CSR order
  int64_t batch;
  int64_t nnz;
  int64_t n_cols;  // n_out
  ColumnChunks chunks;
};

// Batch entries per register tile: 8 vectors of 16 floats. A tile of the
// feature-major input for a 4096-feature layer is then 2 MiB, about one core's L2.
constexpr int64_t kTileLanes = 128;
// How many nonzeros ahead the kernels prefetch the input tile they will read
// when the columns are not chunked (csr_kernels.inc, prefetch_tile_ahead).
constexpr int64_t kPrefetchAhead = 16;

// Column chunking (csr_kernels.inc): when the input tile of all columns does not
// fit in L2 (2 MiB for 4096 features at 128 lanes), rows go in blocks over chunks
// of columns whose input tile is `chunk_bytes`, so that what a block reads stays in
// L2. It costs a store and a reload of each row's output tile per chunk (the fused
// backward also reloads its x tile), so it is used only when rows have at least
// `min_nonzeros_per_row_chunk` nonzeros per chunk on average. A block passes over
// each chunk once, so larger blocks read the chunks fewer times but park more
// output tiles in L2: a block has about `block_nonzeros` nonzeros per chunk, within
// [min_row_block, max_row_block] rows.
constexpr int64_t kMaxRowBlock = 2048;
struct ColumnChunking {
  int64_t chunk_bytes;
  int64_t min_nonzeros_per_row_chunk;
  int64_t block_nonzeros;
  int64_t min_row_block, max_row_block;
};
// SpMM and SDDMM (128 x 4096 -> 4096, 2 threads): chunking pays from about 8
// nonzeros per row and chunk (1.3x at density 0.01-0.03; slower below), and blocks
// of about 24K nonzeros (256 rows at density 0.1, more below) are up to 1.3x faster
// than a fixed 256 rows.
constexpr ColumnChunking kSpmmChunking{512 * 1024, 8, 24 * 1024, 256, kMaxRowBlock};
// The fused backward also keeps the lines of `values` and `grad_values` it reaches
// through `perm` in L2, so half the chunk and blocks of 256 rows (about 10% faster
// than 512 KiB at density 0.05-0.1). Below about 3% density, where that leaves fewer
// than 16 nonzeros per row and chunk, 512 KiB chunks in blocks of 1024 rows from 12
// nonzeros per row and chunk (about 1.2x faster than unchunked at 0.015-0.03); at
// 0.01 (10 per row and chunk) unchunked is faster, so it stays unchunked there.
constexpr ColumnChunking kBackwardChunking{256 * 1024, 16, 0, 256, 256};
constexpr ColumnChunking kSparseBackwardChunking{512 * 1024, 12, 0, 1024, 1024};
static_assert(kSpmmChunking.max_row_block <= kMaxRowBlock && kBackwardChunking.max_row_block <= kMaxRowBlock &&
                  kSparseBackwardChunking.max_row_block <= kMaxRowBlock,
              "walk_column_chunks keeps one entry per row of a block on the stack");

// How a walk over n_rows x n_cols with nnz nonzeros takes its columns.
ColumnChunks column_chunks(int64_t n_rows, int64_t n_cols, int64_t nnz, int64_t batch,
                           const ColumnChunking& policy) {
  const int64_t lanes = std::clamp<int64_t>(batch, 1, kTileLanes);
  const int64_t chunk = std::max<int64_t>(16, policy.chunk_bytes / (lanes * static_cast<int64_t>(sizeof(float))));
  const int64_t grid = n_rows * n_cols;
  if (chunk >= n_cols || nnz * chunk < policy.min_nonzeros_per_row_chunk * grid) return {n_cols, n_rows};
  // nnz * chunk / grid nonzeros per row and chunk (at least min_nonzeros_per_row_chunk > 0 here).
  const int64_t rows = policy.block_nonzeros * grid / (nnz * chunk);
  return {chunk, std::clamp(rows, policy.min_row_block, policy.max_row_block)};
}

// The fused backward's: kBackwardChunking where it chunks, else kSparseBackwardChunking.
ColumnChunks backward_column_chunks(int64_t n_rows, int64_t n_cols, int64_t nnz, int64_t batch) {
  const ColumnChunks chunks = column_chunks(n_rows, n_cols, nnz, batch, kBackwardChunking);
  return chunks.cols < n_cols ? chunks : column_chunks(n_rows, n_cols, nnz, batch, kSparseBackwardChunking);
}

// ----------------------------------------------------------------- kernels per ISA
// The kernel body (csr_kernels.inc) once per ISA, with that ISA's vector (vec16.h).
namespace isa_default {
using V = vec16::isa_default::V;
#include "csr_kernels.inc"
}  // namespace isa_default

#if SPARSEMOM_HAVE_X86_ISA_VARIANTS
SPARSEMOM_BEGIN_TARGET("avx2,fma")
namespace isa_avx2 {
using V = vec16::isa_avx2::V;
#include "csr_kernels.inc"
}  // namespace isa_avx2
SPARSEMOM_END_TARGET

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
SPARSEMOM_BEGIN_TARGET("avx512f,avx512vl,avx512dq,avx2,fma")
namespace isa_avx512 {
using V = vec16::isa_avx512::V;
#include "csr_kernels.inc"

// dst (16 x 16, row stride ld_dst) = the transpose of src (16 x 16, row stride ld_src), as
// bits (4-byte elements of any type): 16 row loads, three rounds of shuffles, 16 row stores.
// After the 32-bit and 64-bit unpacks, u[4 g + j] holds in its 128-bit lane L the entries
// 4 L + j of rows 4 g .. 4 g + 3; the 128-bit shuffles then gather lane L of the four
// groups into row 4 L + j of dst.
void transpose_16x16(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  __m512 r[16], u[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ld_src);
  for (int i = 0; i < 16; i += 2) {
    u[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    u[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int g = 0; g < 16; g += 4) {
    const __m512d a = _mm512_castps_pd(u[g]), b = _mm512_castps_pd(u[g + 1]);
    const __m512d c = _mm512_castps_pd(u[g + 2]), d = _mm512_castps_pd(u[g + 3]);
    r[g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int j = 0; j < 4; ++j) {
    // Groups 0..3 of entry j: lanes (A0 A1 B0 B1), (A2 A3 B2 B3), and the same of C, D.
    const __m512 p0 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x44), p1 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xEE);
    const __m512 q0 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x44),
                 q1 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xEE);
    _mm512_storeu_ps(dst + (0 + j) * ld_dst, _mm512_shuffle_f32x4(p0, q0, 0x88));
    _mm512_storeu_ps(dst + (4 + j) * ld_dst, _mm512_shuffle_f32x4(p0, q0, 0xDD));
    _mm512_storeu_ps(dst + (8 + j) * ld_dst, _mm512_shuffle_f32x4(p1, q1, 0x88));
    _mm512_storeu_ps(dst + (12 + j) * ld_dst, _mm512_shuffle_f32x4(p1, q1, 0xDD));
  }
}
}  // namespace isa_avx512
SPARSEMOM_END_TARGET
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif  // SPARSEMOM_HAVE_X86_ISA_VARIANTS

// Returns false if a column was out of range (the kernels validate col_idx).
template <typename Args>
using RowsFn = bool (*)(const Args&, int64_t, int64_t);

#if SPARSEMOM_HAVE_X86_ISA_VARIANTS
#define SPARSEMOM_ROWS_FN(name) \
  cpu::pick_for_active_isa(&isa_avx512::name, &isa_avx2::name, &isa_default::name)
#else
#define SPARSEMOM_ROWS_FN(name) (&isa_default::name)
#endif

// ------------------------------------------------------------- work splitting
// Below this many multiply-adds a second thread costs more than it saves.
constexpr int64_t kMinMultiplyAddsPerThread = 1 << 16;

// Calls fn(row_begin, row_end) on parts of the rows with equal work, one unit
// per nonzero plus one per row (its output tile), in parallel. Row r's work
// starts at row_ptr[r] + r, which is strictly increasing: a binary search finds
// each part's first row.
template <typename F>
void parallel_over_rows(const int32_t* row_ptr, int64_t n_rows, int64_t batch, const F& fn) {
  const int64_t work = row_ptr[n_rows] + n_rows;
  const int64_t parts = std::clamp<int64_t>(work * batch / kMinMultiplyAddsPerThread, 1,
                                            std::min<int64_t>(at::get_num_threads(), n_rows));
  if (parts <= 1) {
    fn(int64_t{0}, n_rows);
    return;
  }
  auto first_row_at = [&](int64_t w) {
    int64_t lo = 0, hi = n_rows;  // answer in [lo, hi]
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (row_ptr[mid] + mid >= w) {
        hi = mid;
      } else {
        lo = mid + 1;
      }
    }
    return lo;
  };
  at::parallel_for(0, parts, 1, [&](int64_t p_begin, int64_t p_end) {
    for (int64_t p = p_begin; p < p_end; ++p) {
      fn(first_row_at(p * work / parts), first_row_at((p + 1) * work / parts));
    }
  });
}

// Runs a float kernel over all rows in parallel; raises the col_idx message if
// any part found a column out of range (its output is then incomplete).
template <typename Args>
void run_checking_columns(RowsFn<Args> rows, const Args& args, const int32_t* row_ptr, int64_t n_rows,
                          const int32_t* col_idx) {
  std::atomic<bool> complete{true};
  parallel_over_rows(row_ptr, n_rows, args.batch, [&](int64_t r0, int64_t r1) {
    if (!rows(args, r0, r1)) complete = false;
  });
  if (!complete) {
    check_csr_col_idx_host(col_idx, args.nnz, args.n_cols);
    TORCH_INTERNAL_ASSERT(false, "a CSR kernel stopped short of a row's end with every column in range");
  }
}

// The float kernels validate col_idx as they read it (run_checking_columns);
// other dtypes, and an empty batch (no kernel pass), check it here. Returns
// whether the kernel will.
bool check_columns_unless_kernel_does(const at::Tensor& col_idx, int64_t n_cols, at::ScalarType dtype,
                                      int64_t batch) {
  const bool kernel_checks = dtype == at::kFloat && batch > 0;
  if (!kernel_checks) check_csr_col_idx_host(col_idx.data_ptr<int32_t>(), col_idx.numel(), n_cols);
  return kernel_checks;
}

// ------------------------------------------------- other dtypes (plain loops)
// float64 / float16 / bfloat16: the same walk with scalar opmath accumulators
// over batch tiles; the compiler vectorises the lane loops.
constexpr int64_t kGenericTile = 64;

template <typename scalar_t>
void spmm_rows_generic(const int32_t* row_ptr, const int32_t* col_idx, const scalar_t* values,
                       const scalar_t* bias, const scalar_t* xt,
                       scalar_t* yt, int64_t batch, int64_t row_begin, int64_t row_end) {
  using opmath_t = at::opmath_type<scalar_t>;
  opmath_t acc[kGenericTile];
  for (int64_t b0 = 0; b0 < batch; b0 += kGenericTile) {
    const int64_t lanes = std::min(kGenericTile, batch - b0);
    for (int64_t r = row_begin; r < row_end; ++r) {
      const opmath_t init = bias != nullptr ? static_cast<opmath_t>(bias[r]) : opmath_t(0);
      for (int64_t i = 0; i < lanes; ++i) acc[i] = init;
      for (int64_t k = row_ptr[r]; k < row_ptr[r + 1]; ++k) {
        const opmath_t w = values[k];
        const scalar_t* src = xt + static_cast<int64_t>(col_idx[k]) * batch + b0;
        for (int64_t i = 0; i < lanes; ++i) acc[i] += w * static_cast<opmath_t>(src[i]);
      }
      scalar_t* dst = yt + r * batch + b0;
      for (int64_t i = 0; i < lanes; ++i) dst[i] = static_cast<scalar_t>(acc[i]);
    }
  }
}

template <typename scalar_t>
void sddmm_rows_generic(const int32_t* row_ptr, const int32_t* col_idx, const scalar_t* at,
                        const scalar_t* bt, scalar_t* out, int64_t batch, int64_t row_begin,
                        int64_t row_end) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const scalar_t* arow = at + r * batch;
    for (int64_t k = row_ptr[r]; k < row_ptr[r + 1]; ++k) {
      const scalar_t* src = bt + static_cast<int64_t>(col_idx[k]) * batch;
      opmath_t sum = 0;
      for (int64_t i = 0; i < batch; ++i) sum += static_cast<opmath_t>(arow[i]) * static_cast<opmath_t>(src[i]);
      out[k] = static_cast<scalar_t>(sum);
    }
  }
}

// ------------------------------------------------------------------------ ops
// A 16 x 16 transpose of 4-byte elements in vector registers, where the ISA has one.
using Transpose16Fn = void (*)(const float* src, int64_t ld_src, float* dst, int64_t ld_dst);
Transpose16Fn transpose_16x16_for_active_isa() {
#if SPARSEMOM_HAVE_X86_ISA_VARIANTS
  return cpu::pick_for_active_isa<Transpose16Fn>(&isa_avx512::transpose_16x16, nullptr, nullptr);
#else
  return nullptr;
#endif
}

// The transpose of a 2-D tensor of any strides as a contiguous tensor: the
// feature-major operand the kernels read (no copy when x already is one).
// Blocked so that both sides of each 32 x 32 block stay in L1: several times
// faster than a generic strided copy for the (batch, features) shapes here.
// Whole 32 x 32 blocks of 4-byte elements with rows contiguous in the source go
// through the ISA's 16 x 16 register transpose when it has one (128 x 4096
// floats, 2 threads: 0.16-0.18 ms against 0.47-0.53 ms element by element); the
// rest element by element.
template <typename T>
void transpose_blocked(const T* src, int64_t stride0, int64_t stride1, int64_t rows, int64_t cols,
                       T* dst) {
  constexpr int64_t kBlock = 32;
  const Transpose16Fn tile16 = sizeof(T) == 4 && stride1 == 1 ? transpose_16x16_for_active_isa() : nullptr;
  const int64_t col_blocks = (cols + kBlock - 1) / kBlock;
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, rows * kBlock));
  at::parallel_for(0, col_blocks, grain, [&](int64_t cb_begin, int64_t cb_end) {
    for (int64_t cb = cb_begin; cb < cb_end; ++cb) {
      const int64_t c0 = cb * kBlock, c1 = std::min(cols, c0 + kBlock);
      for (int64_t r0 = 0; r0 < rows; r0 += kBlock) {
        const int64_t r1 = std::min(rows, r0 + kBlock);
        if (tile16 != nullptr && r1 - r0 == kBlock && c1 - c0 == kBlock) {
          for (int64_t r = r0; r < r1; r += 16) {
            for (int64_t c = c0; c < c1; c += 16) {
              tile16(reinterpret_cast<const float*>(src + r * stride0 + c), stride0,
                     reinterpret_cast<float*>(dst + c * rows + r), rows);
            }
          }
          continue;
        }
        for (int64_t r = r0; r < r1; ++r) {
          for (int64_t c = c0; c < c1; ++c) dst[c * rows + r] = src[r * stride0 + c * stride1];
        }
      }
    }
  });
}

at::Tensor transposed_contiguous(const at::Tensor& x) {
  const at::Tensor t = x.t();
  if (t.is_contiguous()) return t;
  const int64_t element_size = x.element_size();
  if (element_size != 2 && element_size != 4 && element_size != 8) return t.contiguous();
  at::Tensor out = at::empty({x.size(1), x.size(0)}, x.options());
  if (out.numel() == 0) return out;
  auto run = [&](auto zero) {
    using T = decltype(zero);
    transpose_blocked(static_cast<const T*>(x.const_data_ptr()), x.stride(0), x.stride(1), x.size(0),
                      x.size(1), static_cast<T*>(out.data_ptr()));
  };
  switch (x.element_size()) {
    case 2:
      run(uint16_t{});
      break;
    case 4:
      run(uint32_t{});
      break;
    default:
      run(uint64_t{});
      break;
  }
  return out;
}

// The op: always a new tensor (transposed_contiguous returns a view when x
// already is feature-major).
at::Tensor transpose_contiguous_cpu(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 2, "x must be 2-D, got shape ", x.sizes());
  const at::Tensor t = x.t();
  return t.is_contiguous() ? t.clone() : transposed_contiguous(x);
}

// values[perm] as a new contiguous tensor. Validates perm in the same pass: an
// entry out of [0, nnz) is not read, and raises once the pass is done.
at::Tensor gather_values(const at::Tensor& values, const at::Tensor& perm) {
  at::Tensor out = at::empty_like(values);
  const int64_t n = perm.numel();
  const int32_t* idx = perm.data_ptr<int32_t>();
  std::atomic<bool> out_of_range{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "gather_values", [&] {
    const scalar_t* src = values.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const auto n_u = static_cast<uint64_t>(n);
    at::parallel_for(0, n, 1 << 16, [&](int64_t begin, int64_t end) {
      // Random reads: keep many misses in flight by touching the lines well ahead.
      constexpr int64_t kAhead = 64;
      uint32_t bad = 0;
      for (int64_t j = begin; j < end; ++j) {
        if (j + kAhead < end) __builtin_prefetch(src + idx[j + kAhead], 0, 3);
        const auto i = static_cast<uint32_t>(idx[j]);
        bad |= i >= n_u;
        dst[j] = src[i < n_u ? i : 0];
      }
      if (bad) out_of_range = true;
    });
  });
  if (out_of_range) {
    check_value_perm_host(idx, n);
    TORCH_INTERNAL_ASSERT(false, "gather_values found an entry out of range that the check did not");
  }
  return out;
}

at::Tensor csr_spmm_cpu(const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                        const at::Tensor& values, const std::optional<at::Tensor>& value_perm,
                        const std::optional<at::Tensor>& bias) {
  check_csr_spmm_args(x, row_ptr, col_idx, values, value_perm, bias);
  const at::Tensor rp = row_ptr.contiguous(), ci = col_idx.contiguous();
  const at::Tensor perm = contiguous_or_undefined(value_perm);
  const int64_t n_rows = rp.numel() - 1, batch = x.size(0), n_cols = x.size(1);
  check_csr_row_ptr_host(rp.data_ptr<int32_t>(), n_rows, ci.numel());
  // value_perm is validated by its gather.
  const bool kernel_checks_columns = check_columns_unless_kernel_does(ci, n_cols, x.scalar_type(), batch);
  const at::Tensor xt = transposed_contiguous(x);
  // Through value_perm each nonzero's value is a scattered read. One gather pass
  // up front makes them sequential, at nnz floats of scratch; reading them through
  // the permutation inside the kernel (with prefetching) was measured no faster.
  const at::Tensor vals = perm.defined() ? gather_values(values.contiguous(), perm) : values.contiguous();
  const at::Tensor b = contiguous_or_undefined(bias);
  at::Tensor yt = at::empty({n_rows, batch}, x.options());
  if (batch == 0 || n_rows == 0) return yt.t();
  const int32_t* rp_p = rp.data_ptr<int32_t>();
  if (kernel_checks_columns) {
    const SpmmArgs args{rp_p, ci.data_ptr<int32_t>(), vals.data_ptr<float>(),
                        data_or_null<float>(b), xt.data_ptr<float>(), yt.data_ptr<float>(), batch, ci.numel(),
                        n_cols, column_chunks(n_rows, n_cols, ci.numel(), batch, kSpmmChunking)};
    run_checking_columns(SPARSEMOM_ROWS_FN(spmm_rows), args, rp_p, n_rows, ci.data_ptr<int32_t>());
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "csr_spmm_cpu", [&] {
      parallel_over_rows(rp_p, n_rows, batch, [&](int64_t r0, int64_t r1) {
        spmm_rows_generic<scalar_t>(rp_p, ci.data_ptr<int32_t>(), vals.data_ptr<scalar_t>(),
                                    data_or_null<scalar_t>(b),
                                    xt.data_ptr<scalar_t>(), yt.data_ptr<scalar_t>(), batch, r0, r1);
      });
    });
  }
  return yt.t();
}

at::Tensor csr_sddmm_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& row_ptr,
                         const at::Tensor& col_idx) {
  check_csr_sddmm_args(a, b, row_ptr, col_idx);
  const at::Tensor rp = row_ptr.contiguous(), ci = col_idx.contiguous();
  const int64_t n_rows = rp.numel() - 1, nnz = ci.numel(), batch = a.size(0), n_cols = b.size(1);
  check_csr_row_ptr_host(rp.data_ptr<int32_t>(), n_rows, nnz);
  const bool kernel_checks_columns = check_columns_unless_kernel_does(ci, n_cols, a.scalar_type(), batch);
  if (batch == 0 || nnz == 0) return at::zeros({nnz}, a.options());
  const at::Tensor at_ = transposed_contiguous(a), bt = transposed_contiguous(b);
  at::Tensor out = at::empty({nnz}, a.options());
  const int32_t* rp_p = rp.data_ptr<int32_t>();
  if (kernel_checks_columns) {
    const SddmmArgs args{rp_p, ci.data_ptr<int32_t>(), at_.data_ptr<float>(), bt.data_ptr<float>(),
                         out.data_ptr<float>(), batch, nnz, n_cols,
                         column_chunks(n_rows, n_cols, nnz, batch, kSpmmChunking)};
    run_checking_columns(SPARSEMOM_ROWS_FN(sddmm_rows), args, rp_p, n_rows, ci.data_ptr<int32_t>());
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "csr_sddmm_cpu", [&] {
      parallel_over_rows(rp_p, n_rows, batch, [&](int64_t r0, int64_t r1) {
        sddmm_rows_generic<scalar_t>(rp_p, ci.data_ptr<int32_t>(), at_.data_ptr<scalar_t>(),
                                     bt.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), batch, r0, r1);
      });
    });
  }
  return out;
}

// Both gradients of y = x W^T in one pass over the nonzeros (backward_rows in
// csr_kernels.inc) for float32; other dtypes and empty operands run the two
// kernels it fuses.
std::tuple<at::Tensor, at::Tensor> csr_linear_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                           const at::Tensor& values, const at::Tensor& row_ptr,
                                                           const at::Tensor& col_idx, const at::Tensor& col_ptr,
                                                           const at::Tensor& row_idx, const at::Tensor& perm) {
  check_csr_linear_backward_args(grad, x, values, row_ptr, col_idx, col_ptr, row_idx, perm);
  const int64_t batch = grad.size(0), n_out = grad.size(1), n_in = x.size(1), nnz = col_idx.numel();
  if (grad.scalar_type() != at::kFloat || batch == 0 || nnz == 0) {
    return {csr_spmm_cpu(grad, col_ptr, row_idx, values.narrow(0, 0, nnz), perm, std::nullopt),
            pad_to_slots(csr_sddmm_cpu(grad, x, row_ptr, col_idx), values.numel())};
  }
  const at::Tensor rp = row_ptr.contiguous(), cp = col_ptr.contiguous(), ri = row_idx.contiguous(),
                   pm = perm.contiguous(), vals = values.contiguous();
  check_csr_row_ptr_host(rp.data_ptr<int32_t>(), n_out, nnz);
  check_csr_row_ptr_host(cp.data_ptr<int32_t>(), n_in, nnz, "col_ptr");
  // row_idx and perm are validated by the kernel; col_idx is not read (perm maps onto it).
  const at::Tensor gt = transposed_contiguous(grad), xt = transposed_contiguous(x);
  at::Tensor gxt = at::empty({n_in, batch}, grad.options());
  // One entry per slot of values: the kernel writes the nonzeros', idle slots get 0.
  at::Tensor grad_values = at::empty({values.numel()}, grad.options());
  grad_values.narrow(0, nnz, values.numel() - nnz).zero_();
  const int32_t* cp_p = cp.data_ptr<int32_t>();
  const BackwardArgs args{cp_p, ri.data_ptr<int32_t>(), pm.data_ptr<int32_t>(), vals.data_ptr<float>(),
                          gt.data_ptr<float>(), xt.data_ptr<float>(), gxt.data_ptr<float>(),
                          grad_values.data_ptr<float>(), batch, nnz, n_out,
                          backward_column_chunks(n_in, n_out, nnz, batch)};
  std::atomic<bool> complete{true};
  parallel_over_rows(cp_p, n_in, batch, [&](int64_t r0, int64_t r1) {
    if (!SPARSEMOM_ROWS_FN(backward_rows)(args, r0, r1)) complete = false;
  });
  if (!complete) {
    check_csr_col_idx_host(ri.data_ptr<int32_t>(), nnz, n_out, "row_idx", "out_features");
    check_value_perm_host(pm.data_ptr<int32_t>(), nnz, "perm");
    TORCH_INTERNAL_ASSERT(false, "csr_linear_backward stopped short with every row_idx and perm entry in range");
  }
  return {gxt.t(), grad_values};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> csr_transpose_cpu(const at::Tensor& row_ptr,
                                                                 const at::Tensor& col_idx,
                                                                 int64_t n_cols) {
  check_csr_transpose_args(row_ptr, col_idx, n_cols);
  const at::Tensor rp = row_ptr.contiguous(), ci = col_idx.contiguous();
  const int64_t n_rows = rp.numel() - 1, nnz = ci.numel();
  const int32_t* rp_p = rp.data_ptr<int32_t>();
  const int32_t* ci_p = ci.data_ptr<int32_t>();
  check_csr_content_host(rp_p, n_rows, ci_p, nnz, n_cols, nullptr);
  at::Tensor col_ptr = at::zeros({n_cols + 1}, rp.options());
  at::Tensor row_idx = at::empty({nnz}, ci.options());
  at::Tensor perm = at::empty({nnz}, ci.options());
  int32_t* cp = col_ptr.data_ptr<int32_t>();
  for (int64_t k = 0; k < nnz; ++k) ++cp[ci_p[k] + 1];
  for (int64_t c = 0; c < n_cols; ++c) cp[c + 1] += cp[c];
  // Rows are visited in increasing order, so each column's rows come out sorted.
  std::vector<int32_t> next(cp, cp + n_cols);
  int32_t* ri = row_idx.data_ptr<int32_t>();
  int32_t* pm = perm.data_ptr<int32_t>();
  for (int64_t r = 0; r < n_rows; ++r) {
    for (int64_t k = rp_p[r]; k < rp_p[r + 1]; ++k) {
      const int32_t pos = next[ci_p[k]]++;
      ri[pos] = static_cast<int32_t>(r);
      pm[pos] = static_cast<int32_t>(k);
    }
  }
  return {col_ptr, row_idx, perm};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsemom, CPU, m) {
  m.impl("csr_spmm", &csr_spmm_cpu);
  m.impl("csr_sddmm", &csr_sddmm_cpu);
  m.impl("csr_transpose", &csr_transpose_cpu);
  m.impl("csr_linear_backward", &csr_linear_backward_cpu);
  m.impl("transpose_contiguous", &transpose_contiguous_cpu);
}

}  // namespace sparsemom
