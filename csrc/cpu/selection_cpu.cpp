// magnitude_prune / momentum_grow / set_prune on CPU: sample-guided radix select on integer keys,
// O(n): usually one vectorised pass over the tensor plus O(n/32) for the sample and O(gathered) after.
//
// A systematic sample (1/32 of the tensor in blocks) brackets the k-th key of
// each class in a narrow key range [lo, hi). One pass then writes the new mask
// (candidates below lo are selected), counts the candidates exactly and
// gathers those in [lo, hi) -- typically well under 1% -- in index order.
// The exact counts prove whether the k-th key lies in the range; it almost
// always does, and the gathered list is finished by radix passes of its own.
// Otherwise (the sample misled, or heavy ties made the range huge) the exact
// path runs instead: 11-bit histogram passes over the tensor narrow the
// threshold bucket until it is small enough to gather, or is a single key
// whose ties are marked by index. Threads own contiguous chunks and every
// count is exact; per-chunk counts give each chunk its share of the ties, so
// the result never depends on the thread count.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "../selection.h"
#include "../sparsemom.h"
#include "cpu_isa.h"

namespace sparsemom {
namespace {

using namespace selection;

// A gathered key range of one class: keys and flat indices, in index order.
// Selected entries flip their position in `out` (the marking pass left them
// at their mask value).
template <typename bits_t_>
struct ListSource {
  using bits_t = bits_t_;
  static constexpr int kClasses = 1;

  const bits_t* __restrict__ keys;
  const int64_t* __restrict__ index;
  uint8_t* __restrict__ out;

  SPARSEMOM_SELECT_INLINE Element<bits_t> load(int64_t p) const {
    return Element<bits_t>{false, true, 0, keys[p]};
  }
  SPARSEMOM_SELECT_INLINE void emit(int64_t p, const Element<bits_t>&, bool selected) const {
    if (selected) out[index[p]] ^= 1;
  }
};

// What one chunk's gathering pass produces.
template <typename bits_t, int C>
struct ChunkGather {
  std::vector<bits_t> keys[C];
  std::vector<int64_t> index[C];
  int64_t candidates[C] = {};
  int64_t below[C] = {};  // candidates with key < lo: selected by the pass
  int64_t cap = 0;        // gather at most this many per class, else overflow
  bool overflow = false;
};

// Everything a pass over one chunk needs; each chunk gets its own copy with
// its histogram, tie shares or gather output filled in.
template <typename Source>
struct PassArgs {
  using source_type = Source;
  using bits_t = typename Source::bits_t;
  static constexpr int kClasses = Source::kClasses;

  Source source;
  // Histogram pass: count candidates with key >> shift == prefix[cls], by
  // the digit (key >> digit_shift) & digit_mask.
  uint32_t* hist;
  bits_t prefix[kClasses];
  int shift;
  int digit_shift;
  bits_t digit_mask;
  // Marking: key < below[cls] is selected; with ties, so are the first
  // tie_need[cls] of this chunk's candidates with key == below[cls].
  bits_t below[kClasses];
  int64_t tie_need[kClasses];
  // Gathering: candidates with below[cls] <= key < range_end[cls].
  bits_t range_end[kClasses];
  ChunkGather<bits_t, kClasses>* gather;
};

// The loops below copy what they read from `a` into locals first: stores
// through the uint8_t output may alias anything as far as the compiler knows,
// which would reload every parameter per element and block vectorisation.
// Predicates combine with & and | (not && and ||) so the loops have no
// branches to if-convert. The element is a non-const local: GCC 12 keeps a
// `const auto e` in memory (its bool fields then read as an interleaved
// access) and gives up on vectorising.
template <typename Args>
struct LoopParams {
  using bits_t = typename Args::bits_t;
  static constexpr int C = Args::kClasses;
  bits_t prefix[C];
  bits_t below[C];
  bits_t range_end[C];
  int64_t tie_need[C];
  explicit LoopParams(const Args& a) {
    for (int c = 0; c < C; ++c) {
      prefix[c] = a.prefix[c];
      below[c] = a.below[c];
      range_end[c] = a.range_end[c];
      tie_need[c] = a.tie_need[c];
    }
  }
};

template <typename Args>
SPARSEMOM_FORCE_INLINE void selection_histogram_range(const Args& a, int64_t begin,
                                                                     int64_t end) {
  using bits_t = typename Args::bits_t;
  constexpr int C = Args::kClasses;
  const LoopParams<Args> p(a);
  uint32_t* __restrict__ hist = a.hist;
  const auto source = a.source;
  const int shift = a.shift;
  const int digit_shift = a.digit_shift;
  const bits_t digit_mask = a.digit_mask;
  // Adding 0 for non-candidates instead of branching: candidates are 1-99%
  // of the elements at random positions, a branch would mispredict often.
  for (int64_t i = begin; i < end; ++i) {
    auto e = source.load(i);
    const bool counted = e.valid & (static_cast<bits_t>(e.key >> shift) == pick<C>(p.prefix, e.cls));
    hist[e.cls * kBins + ((e.key >> digit_shift) & digit_mask)] += counted;
  }
}
SPARSEMOM_DEFINE_ISA_VARIANTS(selection_histogram_range)

template <typename Args>
SPARSEMOM_FORCE_INLINE void selection_mark_range(const Args& a, int64_t begin,
                                                                int64_t end) {
  constexpr int C = Args::kClasses;
  const LoopParams<Args> p(a);
  const auto source = a.source;
  for (int64_t i = begin; i < end; ++i) {
    auto e = source.load(i);
    source.emit(i, e, e.valid & (e.key < pick<C>(p.below, e.cls)));
  }
}
SPARSEMOM_DEFINE_ISA_VARIANTS(selection_mark_range)

// A running rank per class makes this loop serial; it only runs when a single
// key straddles the threshold.
template <typename Args>
SPARSEMOM_FORCE_INLINE void selection_mark_ties_range(const Args& a, int64_t begin,
                                                                     int64_t end) {
  constexpr int C = Args::kClasses;
  const LoopParams<Args> p(a);
  const auto source = a.source;
  int64_t rank[C] = {};
  for (int64_t i = begin; i < end; ++i) {
    auto e = source.load(i);
    const auto below = pick<C>(p.below, e.cls);
    const bool tie = e.valid & (e.key == below);
    int64_t& r = rank[C == 1 ? 0 : e.cls];
    source.emit(i, e, (e.valid & (e.key < below)) | (tie & (r < pick<C>(p.tie_need, e.cls))));
    r += tie;
  }
}
SPARSEMOM_DEFINE_ISA_VARIANTS(selection_mark_ties_range)

// Marks like selection_mark_range, counts candidates, and gathers those in
// [below, range_end). The block loop stays vectorisable by only flagging
// range members (class + 1) in a small buffer, collected afterwards by a
// scan that skips 8 clear flags at a time.
template <typename Args>
SPARSEMOM_FORCE_INLINE void selection_mark_gather_range(const Args& a, int64_t begin,
                                                                       int64_t end) {
  constexpr int C = Args::kClasses;
  constexpr int64_t kBlock = 512;
  const LoopParams<Args> p(a);
  const auto source = a.source;
  auto& g = *a.gather;
  alignas(64) uint8_t flags[kBlock + 8];
  for (int64_t start = begin; start < end && !g.overflow; start += kBlock) {
    const int64_t len = std::min(kBlock, end - start);
    uint8_t any = 0;
    // Per-block counts fit 16 bits and keep the reductions narrow. With two
    // classes, totals and class-1 counts are summed (class 0 is the
    // difference): GCC 12 vectorises `x * cls` sums but not `x & (cls == 0)`.
    uint16_t candidates = 0;
    uint16_t below = 0;
    uint16_t candidates_1 = 0;
    uint16_t below_1 = 0;
    for (int64_t j = 0; j < len; ++j) {
      auto e = source.load(start + j);
      const auto lo = pick<C>(p.below, e.cls);
      const bool selected = e.valid & (e.key < lo);
      const bool in_range = e.valid & (e.key >= lo) & (e.key < pick<C>(p.range_end, e.cls));
      source.emit(start + j, e, selected);
      const uint8_t flag = static_cast<uint8_t>(in_range * (e.cls + 1));
      flags[j] = flag;
      any |= flag;
      candidates += e.valid;
      below += selected;
      if constexpr (C == 2) {
        candidates_1 += e.valid * e.cls;
        below_1 += selected * e.cls;
      }
    }
    g.candidates[0] += candidates - candidates_1;
    g.below[0] += below - below_1;
    if constexpr (C == 2) {
      g.candidates[1] += candidates_1;
      g.below[1] += below_1;
    }
    if (any == 0) continue;
    const int64_t padded = (len + 7) & ~int64_t(7);
    std::memset(flags + len, 0, padded - len);
    for (int64_t j = 0; j < padded; j += 8) {
      uint64_t word;
      std::memcpy(&word, flags + j, 8);
      while (word != 0) {
        const int byte = __builtin_ctzll(word) >> 3;
        const int cls = static_cast<int>((word >> (8 * byte)) & 0xff) - 1;
        const int64_t i = start + j + byte;
        if (static_cast<int64_t>(g.keys[cls].size()) == g.cap) {
          g.overflow = true;
          break;
        }
        g.keys[cls].push_back(source.load(i).key);
        g.index[cls].push_back(i);
        word &= ~(uint64_t(0xff) << (8 * byte));
      }
    }
  }
}
SPARSEMOM_DEFINE_ISA_VARIANTS(selection_mark_gather_range)

// Per-class counts of the sample's candidates by the top `shift`-shifted
// bits of their keys.
template <typename Args>
SPARSEMOM_FORCE_INLINE void selection_sample_range(const Args& a, int64_t begin,
                                                                  int64_t end) {
  uint32_t* __restrict__ hist = a.hist;
  const auto source = a.source;
  const int shift = a.digit_shift;
  const int bins = 1 << (Args::source_type::Traits::kKeyBits - shift);
  for (int64_t i = begin; i < end; ++i) {
    auto e = source.load(i);
    hist[e.cls * bins + (e.key >> shift)] += e.valid;
  }
}
SPARSEMOM_DEFINE_ISA_VARIANTS(selection_sample_range)

// Contiguous chunks of a range of n elements, a few per thread. The same
// chunks serve every pass of one select: the marking pass reads the
// histogram pass's per-chunk counts.
struct Chunks {
  int64_t n;
  int64_t count;
  int64_t length;

  explicit Chunks(int64_t n_) : n(n_) {
    constexpr int64_t kMinChunk = 1 << 15;
    // uint32 per-chunk counts must not overflow.
    constexpr int64_t kMaxChunk = int64_t(1) << 30;
    const int64_t wanted = std::min<int64_t>(4 * at::get_num_threads(), n / kMinChunk);
    count = std::max<int64_t>({wanted, (n + kMaxChunk - 1) / kMaxChunk, int64_t(1)});
    length = (n + count - 1) / count;
  }
  int64_t begin(int64_t chunk) const { return std::min(n, chunk * length); }
  int64_t end(int64_t chunk) const { return std::min(n, (chunk + 1) * length); }

  template <typename Fn>
  void for_each(const Fn& fn) const {
    at::parallel_for(0, count, 1, [&](int64_t first, int64_t last) {
      for (int64_t chunk = first; chunk < last; ++chunk) fn(chunk);
    });
  }
};

// The gathered candidates of one class, concatenated over chunks.
template <typename bits_t>
struct Gathered {
  std::vector<bits_t> keys;
  std::vector<int64_t> index;
  int64_t candidates = 0;
  int64_t below = 0;
};

template <typename Source>
class Selector {
 public:
  using bits_t = typename Source::bits_t;
  using Args = PassArgs<Source>;
  static constexpr int C = Source::kClasses;

  Selector(const Source& source, int64_t n)
      : source_(source), chunks_(n), chunk_hist_(chunks_.count * C * kBins), hist_(C * kBins) {}

  // Merged counts of the last histogram pass (class-major, kBins per class).
  const int64_t* hist() const { return hist_.data(); }

  void histogram_pass(const SelectionPlan& plan) {
    Args base = base_args(plan);
    base.shift = plan.shift();
    base.digit_shift = plan.digit_shift();
    base.digit_mask = static_cast<bits_t>((uint64_t(1) << plan.digit_bits()) - 1);
    const auto range = pick_selection_histogram_range<Args>();
    chunks_.for_each([&](int64_t chunk) {
      Args args = base;
      args.hist = chunk_hist_.data() + chunk * C * kBins;
      std::fill(args.hist, args.hist + C * kBins, 0u);
      range(args, chunks_.begin(chunk), chunks_.end(chunk));
    });
    const int bins = 1 << plan.digit_bits();
    for (int c = 0; c < C; ++c) {
      int64_t* merged = hist_.data() + c * kBins;
      std::fill(merged, merged + kBins, 0);
      for (int64_t chunk = 0; chunk < chunks_.count; ++chunk) {
        const uint32_t* h = chunk_hist_.data() + (chunk * C + c) * kBins;
        for (int b = 0; b < bins; ++b) merged[b] += h[b];
      }
    }
  }

  // Runs histogram passes until every class is decided, then marks.
  void finish(SelectionPlan& plan) {
    while (!plan.all_done()) {
      histogram_pass(plan);
      plan.advance(hist());
    }
    mark(plan);
  }

  // Writes the result of a decided plan. Ties need the per-chunk counts of
  // the last histogram pass, which chose the tie key's bin.
  void mark(const SelectionPlan& plan) {
    Args base = base_args(plan);
    if (!plan.any_ties()) {
      const auto range = pick_selection_mark_range<Args>();
      chunks_.for_each(
          [&](int64_t chunk) { range(base, chunks_.begin(chunk), chunks_.end(chunk)); });
      return;
    }
    std::vector<int64_t> tie_need(chunks_.count * C, 0);
    for (int c = 0; c < C; ++c) {
      const ClassPlan& p = plan.cls(c);
      if (p.tie_need == 0) continue;
      int64_t before = 0;
      for (int64_t chunk = 0; chunk < chunks_.count; ++chunk) {
        const int64_t ties = chunk_hist_[(chunk * C + c) * kBins + p.last_bin];
        tie_need[chunk * C + c] = std::clamp<int64_t>(p.tie_need - before, 0, ties);
        before += ties;
      }
    }
    const auto range = pick_selection_mark_ties_range<Args>();
    chunks_.for_each([&](int64_t chunk) {
      Args args = base;
      for (int c = 0; c < C; ++c) args.tie_need[c] = tie_need[chunk * C + c];
      range(args, chunks_.begin(chunk), chunks_.end(chunk));
    });
  }

  // One pass: selects the candidates with key < lo[c], counts the
  // candidates, and gathers those with lo[c] <= key < hi[c] in index order.
  // When `capped`, returns false (result unusable) as soon as a chunk would
  // gather more than 1/16 of its elements for a class: that is heavy ties (or
  // a misleading sample), which histogram passes handle without the memory.
  bool mark_and_gather(const bits_t (&lo)[C], const bits_t (&hi)[C], bool capped,
                       Gathered<bits_t> (&gathered)[C]) {
    const int64_t cap = capped ? std::max<int64_t>(chunks_.length / 16, 1 << 12)
                               : std::numeric_limits<int64_t>::max();
    Args base{};
    base.source = source_;
    for (int c = 0; c < C; ++c) {
      base.below[c] = lo[c];
      base.range_end[c] = hi[c];
    }
    std::vector<ChunkGather<bits_t, C>> chunk_gather(chunks_.count);
    const auto range = pick_selection_mark_gather_range<Args>();
    chunks_.for_each([&](int64_t chunk) {
      Args args = base;
      args.gather = &chunk_gather[chunk];
      args.gather->cap = cap;
      range(args, chunks_.begin(chunk), chunks_.end(chunk));
    });
    for (const auto& g : chunk_gather) {
      if (g.overflow) return false;
    }
    for (int c = 0; c < C; ++c) {
      int64_t total = 0;
      for (const auto& g : chunk_gather) total += static_cast<int64_t>(g.keys[c].size());
      Gathered<bits_t>& out = gathered[c];
      out.keys.clear();
      out.index.clear();
      out.keys.reserve(total);
      out.index.reserve(total);
      out.candidates = 0;
      out.below = 0;
      for (const auto& g : chunk_gather) {
        out.keys.insert(out.keys.end(), g.keys[c].begin(), g.keys[c].end());
        out.index.insert(out.index.end(), g.index[c].begin(), g.index[c].end());
        out.candidates += g.candidates[c];
        out.below += g.below[c];
      }
    }
    return true;
  }

 private:
  Args base_args(const SelectionPlan& plan) const {
    Args a{};
    a.source = source_;
    for (int c = 0; c < C; ++c) {
      a.prefix[c] = plan.template prefix_of<bits_t>(c);
      a.below[c] = plan.template below_of<bits_t>(c);
      a.tie_need[c] = plan.cls(c).tie_need;
    }
    return a;
  }

  Source source_;
  Chunks chunks_;
  std::vector<uint32_t> chunk_hist_;
  std::vector<int64_t> hist_;
};

// Selects the `need` smallest keys of a gathered list whose keys all lie in
// [lo, hi) (ties by list order, which is index order) and flips them in out.
template <typename bits_t>
void finish_gathered(const Gathered<bits_t>& list, bits_t lo, bits_t hi, int64_t need,
                     uint8_t* out) {
  const int64_t size = static_cast<int64_t>(list.keys.size());
  if (need == 0) return;
  if (need == size) {
    for (const int64_t i : list.index) out[i] ^= 1;
    return;
  }
  // Every key shares the bits above the highest bit where lo and hi - 1 differ.
  const uint64_t differ = static_cast<uint64_t>(lo) ^ static_cast<uint64_t>(hi - 1);
  if (differ == 0) {
    // A single key: the first `need` in index order.
    for (int64_t p = 0; p < need; ++p) out[list.index[p]] ^= 1;
    return;
  }
  const int shift = 64 - __builtin_clzll(differ);
  using List = ListSource<bits_t>;
  SelectionPlan plan(shift, static_cast<uint64_t>(lo) >> shift, need, size);
  Selector<List> selector(List{list.keys.data(), list.index.data(), out}, size);
  selector.finish(plan);
}

// Exact path: histogram passes narrow each class's threshold bucket; once the
// buckets are small they are gathered and finished as lists, or, when a
// bucket is a single key, its ties are marked by index.
template <typename Source>
void select_exact(const Source& source, int64_t n, int64_t k, uint8_t* out,
                  void (*needs_of)(int64_t, const int64_t*, int64_t*)) {
  using bits_t = typename Source::bits_t;
  constexpr int C = Source::kClasses;
  Selector<Source> selector(source, n);
  SelectionPlan plan(KeyTraits<bits_t>::kKeyBits, C);
  selector.histogram_pass(plan);
  int64_t available[C] = {};
  for (int c = 0; c < C; ++c) {
    for (int b = 0; b < (1 << plan.digit_bits()); ++b) available[c] += selector.hist()[c * kBins + b];
  }
  int64_t needs[C];
  needs_of(k, available, needs);
  plan.set_needs(needs);
  plan.advance(selector.hist());
  // Gathering pays while the buckets are small next to the tensor; past that,
  // one more histogram pass is cheaper than writing and rereading 12-16 bytes
  // per entry (and heavy ties would make the lists huge).
  const int64_t gather_limit = std::max<int64_t>(n / 8, 1 << 16);
  while (!plan.all_done() && plan.ambiguous() > gather_limit) {
    selector.histogram_pass(plan);
    plan.advance(selector.hist());
  }
  if (plan.all_done()) {
    selector.mark(plan);
    return;
  }
  TORCH_INTERNAL_ASSERT(!plan.any_ties(), "ties are only decided once every class is");
  bits_t lo[C];
  bits_t hi[C];
  for (int c = 0; c < C; ++c) {
    lo[c] = plan.template below_of<bits_t>(c);
    const ClassPlan& p = plan.cls(c);
    hi[c] = p.done ? lo[c] : static_cast<bits_t>((p.prefix + 1) << plan.shift());
  }
  Gathered<bits_t> gathered[C];
  const bool fits = selector.mark_and_gather(lo, hi, /*capped=*/false, gathered);
  TORCH_INTERNAL_ASSERT(fits);
  for (int c = 0; c < C; ++c) {
    const ClassPlan& p = plan.cls(c);
    if (p.done) continue;
    TORCH_INTERNAL_ASSERT(static_cast<int64_t>(gathered[c].keys.size()) == p.bucket);
    finish_gathered(gathered[c], lo[c], hi[c], p.need, out);
  }
}

// Systematic sample: kSampleBlock contiguous elements out of every
// kSampleStride (whole cache lines, spread over the whole tensor).
constexpr int64_t kSampleBlock = 128;
constexpr int64_t kSampleStride = 32 * kSampleBlock;
// Below this size the exact path is as fast and the sample too thin.
constexpr int64_t kSampleMinNumel = int64_t(1) << 16;
// A class with fewer sampled candidates goes to the exact path.
constexpr int64_t kSampleMinCandidates = 64;

// Fast path. Returns false when the exact path must decide (nothing it wrote
// matters then: the exact path writes every position again).
template <typename Source>
bool select_sampled(const Source& source, int64_t n, int64_t k, uint8_t* out,
                    void (*needs_of)(int64_t, const int64_t*, int64_t*)) {
  using bits_t = typename Source::bits_t;
  using Args = PassArgs<Source>;
  constexpr int C = Source::kClasses;
  constexpr int kKeyBits = KeyTraits<bits_t>::kKeyBits;
  // 16-bit sample bins: finer than the sample's own uncertainty for float32.
  constexpr int kSampleBits = std::min(16, kKeyBits);
  constexpr int kSampleShift = kKeyBits - kSampleBits;
  constexpr int64_t kSampleBins = int64_t(1) << kSampleBits;

  // A few partitions of the sample blocks, each with its own histogram,
  // summed: exact counts whatever the split. Few, because each histogram is
  // 256 KiB per class to clear and merge.
  const int64_t blocks = (n + kSampleStride - 1) / kSampleStride;
  const int64_t parts = std::clamp<int64_t>(blocks / 256, 1, std::min(at::get_num_threads(), 8));
  const int64_t blocks_per_part = (blocks + parts - 1) / parts;
  std::vector<uint32_t> part_hist(parts * C * kSampleBins, 0);
  Args args{};
  args.source = source;
  args.digit_shift = kSampleShift;
  const auto sample_range = pick_selection_sample_range<Args>();
  at::parallel_for(0, parts, 1, [&](int64_t first, int64_t last) {
    for (int64_t part = first; part < last; ++part) {
      Args local = args;
      local.hist = part_hist.data() + part * C * kSampleBins;
      const int64_t end_block = std::min(blocks, (part + 1) * blocks_per_part);
      for (int64_t block = part * blocks_per_part; block < end_block; ++block) {
        const int64_t start = block * kSampleStride;
        sample_range(local, start, std::min(n, start + kSampleBlock));
      }
    }
  });
  const int64_t sampled = (blocks - 1) * kSampleBlock +
                          std::min(kSampleBlock, n - (blocks - 1) * kSampleStride);
  std::vector<int64_t> sample(C * kSampleBins, 0);
  for (int64_t part = 0; part < parts; ++part) {
    const uint32_t* h = part_hist.data() + part * C * kSampleBins;
    for (int64_t b = 0; b < C * kSampleBins; ++b) sample[b] += h[b];
  }

  int64_t in_sample[C] = {};
  int64_t estimated[C];
  for (int c = 0; c < C; ++c) {
    for (int64_t b = 0; b < kSampleBins; ++b) in_sample[c] += sample[c * kSampleBins + b];
    if (in_sample[c] < kSampleMinCandidates) return false;
    estimated[c] = static_cast<int64_t>(std::llround(static_cast<double>(in_sample[c]) * n / sampled));
  }
  int64_t needs[C];
  int64_t capped_k = k;
  if constexpr (C == 1) capped_k = std::min(k, estimated[0]);
  else capped_k = std::min(k, estimated[0] + estimated[1]);
  needs_of(capped_k, estimated, needs);

  // The sample rank of the k-th key is binomial: bracket it by 4 standard
  // deviations plus a margin, and take the key range of those sample ranks.
  bits_t lo[C];
  bits_t hi[C];
  for (int c = 0; c < C; ++c) {
    const double m = static_cast<double>(in_sample[c]);
    const double q = std::clamp(static_cast<double>(needs[c]) / estimated[c], 0.0, 1.0);
    const double rank = q * m;
    const double spread = 4.0 * std::sqrt(m * q * (1.0 - q)) + 8.0;
    const double rank_lo = rank - spread;
    const double rank_hi = rank + spread;
    const int64_t* h = sample.data() + c * kSampleBins;
    // lo: start of the bin holding sample rank rank_lo (at most rank_lo
    // sampled keys lie below it); hi: end of the bin holding rank_hi.
    int64_t bin_lo = 0;
    int64_t before = 0;
    if (rank_lo > 0) {
      while (bin_lo < kSampleBins - 1 && before + h[bin_lo] <= rank_lo) before += h[bin_lo++];
    }
    int64_t bin_hi = kSampleBins - 1;
    if (rank_hi < m) {
      bin_hi = 0;
      before = 0;
      while (bin_hi < kSampleBins - 1 && before + h[bin_hi] < rank_hi) before += h[bin_hi++];
    }
    lo[c] = static_cast<bits_t>(static_cast<uint64_t>(bin_lo) << kSampleShift);
    hi[c] = static_cast<bits_t>(static_cast<uint64_t>(bin_hi + 1) << kSampleShift);
  }

  Selector<Source> selector(source, n);
  Gathered<bits_t> gathered[C];
  if (!selector.mark_and_gather(lo, hi, /*capped=*/true, gathered)) return false;

  // Exact counts now: k is checked against them, and split over the classes.
  int64_t available[C];
  for (int c = 0; c < C; ++c) available[c] = gathered[c].candidates;
  needs_of(k, available, needs);
  for (int c = 0; c < C; ++c) {
    const int64_t from_list = needs[c] - gathered[c].below;
    if (from_list < 0 || from_list > static_cast<int64_t>(gathered[c].keys.size())) return false;
  }
  for (int c = 0; c < C; ++c) {
    finish_gathered(gathered[c], lo[c], hi[c], needs[c] - gathered[c].below, out);
  }
  return true;
}

template <SelectKind kKind, typename bits_t>
void select_dense(const at::Tensor& values, const at::Tensor& mask, const at::Tensor& out,
                  int64_t k) {
  using Source = DenseSource<kKind, bits_t>;
  constexpr int C = Source::kClasses;
  const int64_t n = values.numel();
  auto* out_ptr = reinterpret_cast<uint8_t*>(out.data_ptr<bool>());
  const Source source{reinterpret_cast<const bits_t*>(values.const_data_ptr()),
                      reinterpret_cast<const uint8_t*>(mask.const_data_ptr<bool>()), out_ptr};
  if (k == 0) {
    Selector<Source> selector(source, n);
    SelectionPlan plan(KeyTraits<bits_t>::kKeyBits, C);
    const int64_t none[C] = {};
    plan.set_needs(none);  // every class decided: select nothing
    selector.mark(plan);
    return;
  }
  // Validates k against the exact count, then splits it over the classes.
  auto needs_of = [](int64_t k, const int64_t* available, int64_t* needs) {
    if constexpr (kKind == SelectKind::kSetPrune) {
      check_selection_k(k, available[0] + available[1], "active positions in mask");
      set_prune_needs(k, available, needs);
    } else {
      check_selection_k(k, available[0],
                        kKind == SelectKind::kMomentumGrow ? "inactive positions in mask"
                                                           : "active positions in mask");
      needs[0] = k;
    }
  };
  if (n >= kSampleMinNumel && select_sampled(source, n, k, out_ptr, +needs_of)) return;
  select_exact(source, n, k, out_ptr, +needs_of);
}

template <SelectKind kKind>
at::Tensor selection_cpu(const at::Tensor& values, const char* values_name, const at::Tensor& mask,
                         int64_t k) {
  check_selection_args(values, values_name, mask, k);
  const at::Tensor values_c = values.contiguous();
  const at::Tensor mask_c = mask.contiguous();
  at::Tensor out = at::empty(mask.sizes(), mask.options());
  switch (values.element_size()) {
    case 2:
      select_dense<kKind, uint16_t>(values_c, mask_c, out, k);
      break;
    case 4:
      select_dense<kKind, uint32_t>(values_c, mask_c, out, k);
      break;
    default:
      select_dense<kKind, uint64_t>(values_c, mask_c, out, k);
      break;
  }
  return out;
}

at::Tensor magnitude_prune_cpu(const at::Tensor& weight, const at::Tensor& mask, int64_t k) {
  return selection_cpu<SelectKind::kMagnitudePrune>(weight, "weight", mask, k);
}

at::Tensor momentum_grow_cpu(const at::Tensor& score, const at::Tensor& mask, int64_t k) {
  return selection_cpu<SelectKind::kMomentumGrow>(score, "score", mask, k);
}

at::Tensor set_prune_cpu(const at::Tensor& weight, const at::Tensor& mask, int64_t k) {
  return selection_cpu<SelectKind::kSetPrune>(weight, "weight", mask, k);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsemom, CPU, m) {
  m.impl("magnitude_prune", &magnitude_prune_cpu);
  m.impl("momentum_grow", &momentum_grow_cpu);
  m.impl("set_prune", &set_prune_cpu);
}

}  // namespace sparsemom
