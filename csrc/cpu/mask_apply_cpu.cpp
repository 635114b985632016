// mask_apply_ on CPU: weight[i] = mask[i] ? weight[i] : 0, in place.
// One streaming pass, O(numel), split over threads in contiguous chunks.
// mask_matches_csr on CPU: whether a mask holds exactly a CSR structure's positions.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>

#include "../inline_bits.h"
#include "../sparsemom.h"
#include "cpu_isa.h"

namespace sparsemom {
namespace {

// The weight is processed as unsigned integers of its width: AND-ing with an
// all-ones/all-zeros word gives +0 at inactive positions branch-free, which
// vectorises; a `mask ? w : 0` loop compiles to a branch per element that
// mispredicts on random masks.
template <typename scalar_t>
struct MaskApplyArgs {
  using bits_t = typename BitsOfSize<sizeof(scalar_t)>::type;
  bits_t* __restrict__ weight;
  // Read as bytes and compared with 0: a bool tensor viewed from uint8 may hold
  // other nonzero values, which count as true, as they do on CUDA.
  const uint8_t* __restrict__ mask;
};

template <typename Args>
SPARSEMOM_FORCE_INLINE void mask_apply_range(const Args& a, int64_t begin,
                                                            int64_t end) {
  using bits_t = typename Args::bits_t;
  for (int64_t i = begin; i < end; ++i) a.weight[i] &= -static_cast<bits_t>(a.mask[i] != 0);
}
SPARSEMOM_DEFINE_ISA_VARIANTS(mask_apply_range)

constexpr int64_t kGrainSize = 1 << 15;

void mask_apply_cpu(const at::Tensor& weight, const at::Tensor& mask) {
  check_mask_apply_args(weight, mask);
  const at::Tensor work = weight.contiguous();
  const at::Tensor mask_c = mask.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, work.scalar_type(), "mask_apply_cpu", [&] {
    using Args = MaskApplyArgs<scalar_t>;
    const Args args{reinterpret_cast<typename Args::bits_t*>(work.data_ptr<scalar_t>()),
                    reinterpret_cast<const uint8_t*>(mask_c.data_ptr<bool>())};
    const auto range = pick_mask_apply_range<Args>();
    at::parallel_for(0, work.numel(), kGrainSize,
                     [&](int64_t begin, int64_t end) { range(args, begin, end); });
  });
  write_back(weight, work);
}

// A mask equals a canonical structure's pattern iff every row holds as many true bytes
// as the structure has entries in it and the mask is true at each of them. One pass
// over the mask plus one read per nonzero, from the row just counted: far less than the
// dense weight-gradient matmul of the same layer's sparse backend (bench_mask_check.py).
struct MaskMatchArgs {
  const uint8_t* __restrict__ mask;
  const int32_t* __restrict__ row_ptr;
  const int32_t* __restrict__ col_idx;
  int64_t n_cols;
  std::atomic<bool>* differs;
  std::atomic<bool>* unordered;  // col_idx not strictly increasing within a row
};

// The number of nonzero bytes of p[0, n), eight at a time: a byte's high bit, after adding
// 0x7F to its low seven bits and or-ing the byte back in, is set iff the byte is nonzero.
// The bits are summed in per-byte lanes for up to 255 words, then across lanes: 24 GB/s on
// one core for a 1 MiB mask, where a compare-and-count loop left the whole check at 3.3 GB/s.
SPARSEMOM_FORCE_INLINE uint64_t count_nonzero_bytes(const uint8_t* p, int64_t n) {
  constexpr uint64_t kLow7 = 0x7F7F7F7F7F7F7F7FULL, kHigh = 0x8080808080808080ULL;
  constexpr uint64_t kEvenBytes = 0x00FF00FF00FF00FFULL;
  uint64_t count = 0;
  int64_t i = 0;
  while (i + 8 <= n) {
    const int64_t words = std::min<int64_t>((n - i) / 8, 255);
    uint64_t lanes = 0;  // eight byte-wide counters
    for (int64_t k = 0; k < words; ++k, i += 8) {
      uint64_t w;
      std::memcpy(&w, p + i, 8);
      lanes += ((((w & kLow7) + kLow7) | w) & kHigh) >> 7;
    }
    const uint64_t pairs = (lanes & kEvenBytes) + ((lanes >> 8) & kEvenBytes);  // four 16-bit sums
    count += (pairs * 0x0001000100010001ULL) >> 48;
  }
  for (; i < n; ++i) count += p[i] != 0;
  return count;
}

template <typename Args>
SPARSEMOM_FORCE_INLINE void mask_match_rows(const Args& a, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    if (a.differs->load(std::memory_order_relaxed)) return;
    const uint8_t* row = a.mask + r * a.n_cols;
    const uint64_t count = count_nonzero_bytes(row, a.n_cols);
    const int32_t lo = a.row_ptr[r], hi = a.row_ptr[r + 1];
    // Two loops without a carried dependency (each vectorises or pipelines on its own).
    bool ordered = true, set = true;
    for (int32_t k = lo + 1; k < hi; ++k) ordered &= a.col_idx[k] > a.col_idx[k - 1];
    for (int32_t k = lo; k < hi; ++k) set &= row[a.col_idx[k]] != 0;
    if (!ordered) a.unordered->store(true, std::memory_order_relaxed);
    if (!ordered || !set || count != static_cast<uint64_t>(hi - lo)) {
      a.differs->store(true, std::memory_order_relaxed);
      return;
    }
  }
}
SPARSEMOM_DEFINE_ISA_VARIANTS(mask_match_rows)

bool mask_matches_csr_cpu(const at::Tensor& mask, const at::Tensor& row_ptr, const at::Tensor& col_idx) {
  check_mask_matches_csr_args(mask, row_ptr, col_idx);
  const int64_t n_rows = mask.size(0), n_cols = mask.size(1), nnz = col_idx.numel();
  const at::Tensor mask_c = mask.contiguous(), row_ptr_c = row_ptr.contiguous(), col_c = col_idx.contiguous();
  check_csr_content_host(row_ptr_c.data_ptr<int32_t>(), n_rows, col_c.data_ptr<int32_t>(), nnz, n_cols,
                         nullptr);
  std::atomic<bool> differs{false}, unordered{false};
  const MaskMatchArgs args{reinterpret_cast<const uint8_t*>(mask_c.data_ptr<bool>()),
                           row_ptr_c.data_ptr<int32_t>(), col_c.data_ptr<int32_t>(), n_cols, &differs,
                           &unordered};
  const auto rows = pick_mask_match_rows<MaskMatchArgs>();
  const int64_t grain = std::max<int64_t>(1, kGrainSize / std::max<int64_t>(n_cols, 1));
  at::parallel_for(0, n_rows, grain, [&](int64_t begin, int64_t end) { rows(args, begin, end); });
  // A row found different may stop the others before they see their order: check the
  // order alone then, so the answer never depends on the thread count.
  if (differs.load() && !unordered.load()) {
    const int32_t* rp = args.row_ptr;
    for (int64_t r = 0; r < n_rows && !unordered.load(); ++r) {
      for (int32_t k = rp[r] + 1; k < rp[r + 1]; ++k) {
        if (args.col_idx[k] <= args.col_idx[k - 1]) {
          unordered.store(true);
          break;
        }
      }
    }
  }
  TORCH_CHECK_VALUE(!unordered.load(), "col_idx must be strictly increasing within each row (sorted, no "
                    "repeated column)");
  return !differs.load();
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsemom, CPU, m) {
  m.impl("mask_apply_", &mask_apply_cpu);
  m.impl("mask_matches_csr", &mask_matches_csr_cpu);
}

}  // namespace sparsemom
