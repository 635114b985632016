// magnitude_prune / momentum_grow / set_prune on CUDA: MSD radix select on integer keys (|x| bits),
// O(n) per pass: at most ceil(key bits / 11) histogram passes (3 for float32) and one marking pass.
//
// Each histogram pass counts the candidates of the current bucket by their
// next 11-bit digit (shared-memory histograms per block, added to one global
// histogram; integer counts, so the order of the atomics does not matter).
// The host reads the 2048 counts per class back, picks the next bucket with
// the same SelectionPlan as the CPU, and stops as soon as every class is
// decided. Ties at the threshold are marked by flat index: fixed per-block
// spans, an exclusive scan of per-block tie counts, and warp-ballot ranks
// inside a block. Nothing depends on block scheduling.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <vector>

#include "../selection.h"
#include "../sparsemom.h"
#include "elementwise.cuh"

namespace sparsemom {
namespace {

using namespace selection;

// What every kernel of one pass reads; built on the host from the plan.
template <typename bits_t, int C>
struct PassParams {
  // Histogram: count candidates with key >> shift == prefix[cls] by the
  // digit (key >> digit_shift) & digit_mask.
  bits_t prefix[C];
  int shift;
  int digit_shift;
  bits_t digit_mask;
  // Marking: key < below[cls] is selected, and (tie path) some of the
  // candidates with key == below[cls].
  bits_t below[C];
};

template <typename Source, typename Params>
__global__ void selection_histogram_kernel(Source source, Params p, int64_t n,
                                           unsigned long long* __restrict__ hist) {
  constexpr int C = Source::kClasses;
  using bits_t = typename Source::bits_t;
  __shared__ unsigned int local[C * kBins];
  for (int b = threadIdx.x; b < C * kBins; b += blockDim.x) local[b] = 0;
  __syncthreads();
  SPARSEMOM_GRID_STRIDE_LOOP(i, n) {
    const auto e = source.load(i);
    if (e.valid && static_cast<bits_t>(e.key >> p.shift) == pick<C>(p.prefix, e.cls)) {
      atomicAdd(&local[e.cls * kBins + ((e.key >> p.digit_shift) & p.digit_mask)], 1u);
    }
  }
  __syncthreads();
  for (int b = threadIdx.x; b < C * kBins; b += blockDim.x) {
    if (local[b] != 0) atomicAdd(&hist[b], static_cast<unsigned long long>(local[b]));
  }
}

template <typename Source, typename Params>
__global__ void selection_mark_kernel(Source source, Params p, int64_t n) {
  constexpr int C = Source::kClasses;
  SPARSEMOM_GRID_STRIDE_LOOP(i, n) {
    const auto e = source.load(i);
    source.emit(i, e, e.valid && e.key < pick<C>(p.below, e.cls));
  }
}

// Ties: block b owns the elements [b * span, (b + 1) * span).
template <typename Source, typename Params>
__global__ void selection_tie_count_kernel(Source source, Params p, int64_t n, int64_t span,
                                           long long* __restrict__ counts) {
  constexpr int C = Source::kClasses;
  __shared__ unsigned long long block_ties[C];
  if (threadIdx.x < C) block_ties[threadIdx.x] = 0;
  __syncthreads();
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * span;
  const int64_t end = begin + span < n ? begin + span : n;
  unsigned int mine[C] = {};
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const auto e = source.load(i);
    mine[e.cls] += e.valid && e.key == pick<C>(p.below, e.cls);
  }
  for (int c = 0; c < C; ++c) {
    if (mine[c] != 0) atomicAdd(&block_ties[c], static_cast<unsigned long long>(mine[c]));
  }
  __syncthreads();
  if (threadIdx.x < C) {
    counts[blockIdx.x * C + threadIdx.x] = static_cast<long long>(block_ties[threadIdx.x]);
  }
}

template <int C>
struct TieNeeds {
  long long value[C];
};

// One block: turns per-block tie counts into per-block tie needs, i.e. how
// many of its ties each block selects: clamp(need - ties before it, 0, its
// ties), an exclusive scan over blocks in index order.
template <int C>
__global__ void selection_tie_share_kernel(long long* __restrict__ counts, int64_t blocks,
                                           TieNeeds<C> needs) {
  constexpr int kThreads = 1024;
  __shared__ long long partial[kThreads];
  const int64_t per_thread = (blocks + kThreads - 1) / kThreads;
  const int64_t first = threadIdx.x * per_thread;
  const int64_t last = first + per_thread < blocks ? first + per_thread : blocks;
  for (int c = 0; c < C; ++c) {
    long long sum = 0;
    for (int64_t b = first; b < last; ++b) sum += counts[b * C + c];
    partial[threadIdx.x] = sum;
    __syncthreads();
    if (threadIdx.x == 0) {
      long long before = 0;
      for (int t = 0; t < kThreads; ++t) {
        const long long mine = partial[t];
        partial[t] = before;
        before += mine;
      }
    }
    __syncthreads();
    long long before = partial[threadIdx.x];
    for (int64_t b = first; b < last; ++b) {
      const long long ties = counts[b * C + c];
      const long long left = needs.value[c] - before;
      counts[b * C + c] = left < 0 ? 0 : (left < ties ? left : ties);
      before += ties;
    }
    __syncthreads();
  }
}

// Marks with ties: each block walks its span in tiles of blockDim elements;
// a tie's rank is the block's ties before the tile, plus the ties of lower
// warps in the tile, plus those of lower lanes (ballot), all in index order.
template <typename Source, typename Params>
__global__ void selection_mark_ties_kernel(Source source, Params p, int64_t n, int64_t span,
                                           const long long* __restrict__ tie_need) {
  constexpr int C = Source::kClasses;
  constexpr int kMaxWarps = cuda::kThreadsPerBlock / 32;
  __shared__ unsigned int warp_ties[C][kMaxWarps];
  __shared__ long long taken[C];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const unsigned int lower_lanes = (1u << lane) - 1u;
  if (threadIdx.x < C) taken[threadIdx.x] = 0;
  long long need[C];
  for (int c = 0; c < C; ++c) need[c] = tie_need[blockIdx.x * C + c];
  __syncthreads();
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * span;
  const int64_t end = begin + span < n ? begin + span : n;
  // Every thread runs every tile (the ballots need the whole warp).
  for (int64_t tile = begin; tile < end; tile += blockDim.x) {
    const int64_t i = tile + threadIdx.x;
    const bool inside = i < end;
    Element<typename Source::bits_t> e{};
    if (inside) e = source.load(i);
    const auto below = pick<C>(p.below, e.cls);
    const bool tie = inside && e.valid && e.key == below;
    unsigned int rank_in_warp = 0;
    for (int c = 0; c < C; ++c) {
      const unsigned int ballot = __ballot_sync(0xffffffffu, tie && e.cls == c);
      if (e.cls == c) rank_in_warp = __popc(ballot & lower_lanes);
      if (lane == 0) warp_ties[c][warp] = __popc(ballot);
    }
    __syncthreads();
    if (inside) {
      long long rank = taken[e.cls] + rank_in_warp;
      for (int w = 0; w < warp; ++w) rank += warp_ties[e.cls][w];
      source.emit(i, e, e.valid && (e.key < below || (tie && rank < need[e.cls])));
    }
    __syncthreads();
    if (threadIdx.x < C) {
      long long tile_ties = 0;
      for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) tile_ties += warp_ties[threadIdx.x][w];
      taken[threadIdx.x] += tile_ties;
    }
    __syncthreads();
  }
}

template <typename bits_t, int C>
PassParams<bits_t, C> params_of(const SelectionPlan& plan) {
  PassParams<bits_t, C> p{};
  for (int c = 0; c < C; ++c) {
    p.prefix[c] = plan.template prefix_of<bits_t>(c);
    p.below[c] = plan.template below_of<bits_t>(c);
  }
  p.shift = plan.shift();
  p.digit_shift = plan.digit_shift();
  p.digit_mask = static_cast<bits_t>((uint64_t(1) << plan.digit_bits()) - 1);
  return p;
}

template <typename Source>
void mark_cuda(const Source& source, int64_t n, const SelectionPlan& plan,
               const at::Tensor& like) {
  using bits_t = typename Source::bits_t;
  constexpr int C = Source::kClasses;
  if (n == 0) return;
  const auto params = params_of<bits_t, C>(plan);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (!plan.any_ties()) {
    cuda::launch_elementwise(n, selection_mark_kernel<Source, PassParams<bits_t, C>>, source,
                             params, n);
    return;
  }
  // Spans are whole tiles; at most 1024 blocks so one block scans their counts.
  constexpr int64_t kThreads = cuda::kThreadsPerBlock;
  const int64_t tiles = (n + kThreads - 1) / kThreads;
  const int64_t span = (tiles + 1023) / 1024 * kThreads;
  const int64_t blocks = (n + span - 1) / span;
  at::Tensor counts = at::empty({blocks * C}, like.options().dtype(at::kLong));
  auto* counts_ptr = reinterpret_cast<long long*>(counts.data_ptr<int64_t>());
  selection_tie_count_kernel<Source, PassParams<bits_t, C>>
      <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(source, params, n, span, counts_ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  TieNeeds<C> needs{};
  for (int c = 0; c < C; ++c) needs.value[c] = plan.cls(c).tie_need;
  selection_tie_share_kernel<C><<<1, 1024, 0, stream>>>(counts_ptr, blocks, needs);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  selection_mark_ties_kernel<Source, PassParams<bits_t, C>>
      <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(source, params, n, span, counts_ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <SelectKind kKind, typename bits_t>
void select_dense_cuda(const at::Tensor& values, const at::Tensor& mask, const at::Tensor& out,
                       int64_t k) {
  using Source = DenseSource<kKind, bits_t>;
  using Params = PassParams<bits_t, Source::kClasses>;
  constexpr int C = Source::kClasses;
  const int64_t n = values.numel();
  const Source source{reinterpret_cast<const bits_t*>(values.const_data_ptr()),
                      reinterpret_cast<const uint8_t*>(mask.const_data_ptr<bool>()),
                      reinterpret_cast<uint8_t*>(out.data_ptr<bool>())};
  SelectionPlan plan(KeyTraits<bits_t>::kKeyBits, C);
  if (k == 0) {
    const int64_t none[C] = {};
    plan.set_needs(none);  // every class decided: select nothing
    mark_cuda(source, n, plan, values);
    return;
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  // One zeroed histogram per possible pass, so no pass needs a memset.
  at::Tensor hist_dev = at::zeros({kMaxPasses * C * kBins}, values.options().dtype(at::kLong));
  auto* hist_base = reinterpret_cast<unsigned long long*>(hist_dev.data_ptr<int64_t>());
  std::vector<int64_t> hist(C * kBins);
  int pass = 0;
  auto histogram_pass = [&] {
    unsigned long long* h = hist_base + static_cast<int64_t>(pass++) * C * kBins;
    if (n > 0) {
      cuda::launch_elementwise(n, selection_histogram_kernel<Source, Params>, source,
                               params_of<bits_t, C>(plan), n, h);
    }
    // The plan's next step depends on these counts: the one host sync per pass.
    C10_CUDA_CHECK(cudaMemcpyAsync(hist.data(), h, hist.size() * sizeof(int64_t),
                                   cudaMemcpyDeviceToHost, stream));
    C10_CUDA_CHECK(cudaStreamSynchronize(stream));
  };
  histogram_pass();
  int64_t available[C] = {};
  for (int c = 0; c < C; ++c) {
    for (int b = 0; b < (1 << plan.digit_bits()); ++b) available[c] += hist[c * kBins + b];
  }
  int64_t needs[C];
  if constexpr (kKind == SelectKind::kSetPrune) {
    check_selection_k(k, available[0] + available[1], "active positions in mask");
    set_prune_needs(k, available, needs);
  } else {
    check_selection_k(k, available[0],
                      kKind == SelectKind::kMomentumGrow ? "inactive positions in mask"
                                                         : "active positions in mask");
    needs[0] = k;
  }
  plan.set_needs(needs);
  plan.advance(hist.data());
  while (!plan.all_done()) {
    histogram_pass();
    plan.advance(hist.data());
  }
  mark_cuda(source, n, plan, values);
}

template <SelectKind kKind>
at::Tensor selection_cuda(const at::Tensor& values, const char* values_name,
                          const at::Tensor& mask, int64_t k) {
  check_selection_args(values, values_name, mask, k);
  const c10::cuda::CUDAGuard guard(values.device());
  const at::Tensor values_c = values.contiguous();
  const at::Tensor mask_c = mask.contiguous();
  at::Tensor out = at::empty(mask.sizes(), mask.options());
  switch (values.element_size()) {
    case 2:
      select_dense_cuda<kKind, uint16_t>(values_c, mask_c, out, k);
      break;
    case 4:
      select_dense_cuda<kKind, uint32_t>(values_c, mask_c, out, k);
      break;
    default:
      select_dense_cuda<kKind, uint64_t>(values_c, mask_c, out, k);
      break;
  }
  return out;
}

at::Tensor magnitude_prune_cuda(const at::Tensor& weight, const at::Tensor& mask, int64_t k) {
  return selection_cuda<SelectKind::kMagnitudePrune>(weight, "weight", mask, k);
}

at::Tensor momentum_grow_cuda(const at::Tensor& score, const at::Tensor& mask, int64_t k) {
  return selection_cuda<SelectKind::kMomentumGrow>(score, "score", mask, k);
}

at::Tensor set_prune_cuda(const at::Tensor& weight, const at::Tensor& mask, int64_t k) {
  return selection_cuda<SelectKind::kSetPrune>(weight, "weight", mask, k);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsemom, CUDA, m) {
  m.impl("magnitude_prune", &magnitude_prune_cuda);
  m.impl("momentum_grow", &momentum_grow_cuda);
  m.impl("set_prune", &set_prune_cuda);
}

}  // namespace sparsemom
