// Shared core of the selection ops (magnitude_prune, momentum_grow, set_prune),
// included by the CPU and the CUDA implementations so both select exactly the
// same positions:
//   - integer keys: the bits of |x| (sign bit cleared) as an unsigned integer
//     of the value's width are monotone in |x|, and NaN lands above inf;
//   - element sources: which positions are candidates, in which class (SET has
//     two: the >= 0 side and the < 0 side), and their keys;
//   - SelectionPlan: the host-side state of a radix select, digit by digit from
//     the most significant, fed with one merged histogram per pass.
// Every selection is "the `need` candidates with the smallest keys, ties broken
// by lower flat index"; growth turns "largest |score|" into that by reversing
// the key. This header is light on purpose: nvcc compiles it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "inline_bits.h"

#if defined(__CUDACC__)
#define SPARSEMOM_SELECT_INLINE __host__ __device__ SPARSEMOM_FORCE_INLINE
#else
#define SPARSEMOM_SELECT_INLINE SPARSEMOM_FORCE_INLINE
#endif

namespace sparsemom::selection {

// 11-bit digits: a per-class histogram of 2048 uint32 counts (8 KiB) stays in
// L1 on CPU and fits shared memory twice over on GPU; a float32 key takes at
// most 3 passes (11 + 11 + 9 bits), usually one plus a small compacted rest.
constexpr int kDigitBits = 11;
constexpr int kBins = 1 << kDigitBits;
constexpr int kMaxClasses = 2;
// Enough for the 63-bit keys of float64.
constexpr int kMaxPasses = (63 + kDigitBits - 1) / kDigitBits;

enum class SelectKind { kMagnitudePrune, kMomentumGrow, kSetPrune };

using ::sparsemom::BitsOfSize;

template <typename bits_t>
struct KeyTraits {
  static constexpr int kKeyBits = 8 * static_cast<int>(sizeof(bits_t)) - 1;
  // |x| as bits: everything but the sign bit. Keys are < 2^kKeyBits, so
  // 2^kKeyBits ("select every candidate") still fits in bits_t.
  static constexpr bits_t kMagnitude = static_cast<bits_t>(static_cast<bits_t>(~bits_t(0)) >> 1);
  static constexpr bits_t kNoPrefix = static_cast<bits_t>(~bits_t(0));
};

// One element as the selection sees it.
template <typename bits_t>
struct Element {
  bool active;  // the mask bit (any nonzero byte is active, as in mask_apply_)
  bool valid;   // a candidate for this selection
  int cls;      // its class, 0 or 1 (SET: 1 = the < 0 side)
  bits_t key;   // smaller keys are selected first
};

// Values and mask of one dense tensor, read as integers. `out` receives the
// new mask: active XOR selected (selected positions are always candidates, so
// this removes pruned positions and adds grown ones).
template <SelectKind kKind, typename bits_t_>
struct DenseSource {
  using bits_t = bits_t_;
  using Traits = KeyTraits<bits_t>;
  static constexpr int kClasses = kKind == SelectKind::kSetPrune ? 2 : 1;
  static constexpr bool kDense = true;

  const bits_t* __restrict__ values;
  const uint8_t* __restrict__ mask;
  uint8_t* __restrict__ out;

  SPARSEMOM_SELECT_INLINE Element<bits_t> load(int64_t i) const {
    const bits_t bits = values[i];
    const bits_t magnitude = static_cast<bits_t>(bits & Traits::kMagnitude);
    Element<bits_t> e;
    e.active = mask[i] != 0;
    if constexpr (kKind == SelectKind::kMomentumGrow) {
      // Largest |score| first == smallest reversed key; index ties unchanged.
      e.valid = !e.active;
      e.cls = 0;
      e.key = static_cast<bits_t>(Traits::kMagnitude - magnitude);
    } else if constexpr (kKind == SelectKind::kSetPrune) {
      // Closest to zero on either side == smallest |w|. -0.0 is a zero (the
      // >= 0 side); NaN goes by its sign bit.
      e.valid = e.active;
      e.cls = static_cast<int>((bits >> Traits::kKeyBits) & static_cast<bits_t>(magnitude != 0));
      e.key = magnitude;
    } else {
      e.valid = e.active;
      e.cls = 0;
      e.key = magnitude;
    }
    return e;
  }

  SPARSEMOM_SELECT_INLINE void emit(int64_t i, const Element<bits_t>& e, bool selected) const {
    out[i] = static_cast<uint8_t>(e.active != selected);
  }
};

// `values[cls]` (cls 0 or 1) without an indexed load or a select, so loops
// over two classes vectorise: GCC 12 does not vectorise `cls ? v1 : v0`
// when cls is computed from wider integers than v0.
template <int kClasses, typename T>
SPARSEMOM_SELECT_INLINE T pick(const T (&values)[kClasses], int cls) {
  if constexpr (kClasses == 1) {
    return values[0];
  } else {
    using U = std::make_unsigned_t<T>;
    const U first = static_cast<U>(values[0]);
    const U second = static_cast<U>(values[1]);
    return static_cast<T>(first ^ ((first ^ second) & static_cast<U>(U(0) - static_cast<U>(cls))));
  }
}

// SET's split of k over the two sides (docs/algorithms.md, section 2): ceil(k/2)
// from the >= 0 side, floor(k/2) from the < 0 side, and what a side cannot
// give moves to the other. Requires 0 <= k <= available[0] + available[1].
inline void set_prune_needs(int64_t k, const int64_t available[2], int64_t needs[2]) {
  needs[0] = k - k / 2;
  needs[1] = k / 2;
  if (needs[0] > available[0]) {
    needs[1] += needs[0] - available[0];
    needs[0] = available[0];
  }
  if (needs[1] > available[1]) {
    needs[0] += needs[1] - available[1];
    needs[1] = available[1];
  }
}

// Per-class state of the radix select.
struct ClassPlan {
  bool done = false;
  // Undecided: every candidate with key >> shift < prefix is selected, `need`
  // more are to come from the `bucket` candidates with key >> shift == prefix.
  uint64_t prefix = 0;
  int64_t need = 0;
  int64_t bucket = 0;
  // Done: select the candidates with key < below, plus the first tie_need
  // candidates (by index) with key == below.
  uint64_t below = 0;
  int64_t tie_need = 0;
  // The bin the last pass chose: per-chunk (per-block) counts of that bin are
  // the offsets of a chunk's ties or compacted entries.
  int last_bin = -1;
};

// The host-side driver of a radix select: call digit_bits()/digit_shift() for
// the next histogram pass, then advance() with its merged counts, until
// all_done(). Classes refine in lockstep (one shift for all).
class SelectionPlan {
 public:
  SelectionPlan(int key_bits, int classes) : shift_(key_bits), classes_(classes) {}

  // Starts from an ambiguous bucket found earlier (a gathered list): its
  // `bucket` keys all have key >> shift == prefix, and 0 < need < bucket,
  // shift > 0 (otherwise nothing is left to find by histogram).
  SelectionPlan(int shift, uint64_t prefix, int64_t need, int64_t bucket)
      : shift_(shift), classes_(1) {
    c_[0].prefix = prefix;
    c_[0].need = need;
    c_[0].bucket = bucket;
    finish_if_decided(c_[0], shift_);
  }

  // Sets how many each class selects, before the first advance(). A class
  // that selects nothing is decided at once.
  void set_needs(const int64_t* needs) {
    for (int c = 0; c < classes_; ++c) {
      c_[c].need = needs[c];
      if (needs[c] == 0) finish_if_decided(c_[c], shift_);
    }
  }

  int classes() const { return classes_; }
  int shift() const { return shift_; }
  int digit_bits() const { return std::min(kDigitBits, shift_); }
  int digit_shift() const { return shift_ - digit_bits(); }
  const ClassPlan& cls(int c) const { return c_[c]; }

  bool all_done() const {
    for (int c = 0; c < classes_; ++c) {
      if (!c_[c].done) return false;
    }
    return true;
  }
  bool any_ties() const {
    for (int c = 0; c < classes_; ++c) {
      if (c_[c].done && c_[c].tie_need > 0) return true;
    }
    return false;
  }
  // Candidates still in an ambiguous bucket, over all undecided classes.
  int64_t ambiguous() const {
    int64_t total = 0;
    for (int c = 0; c < classes_; ++c) total += c_[c].done ? 0 : c_[c].bucket;
    return total;
  }

  // Consumes the merged histogram (classes x kBins, only the first
  // 2^digit_bits() bins of each class are read) of the pass just made.
  void advance(const int64_t* hist) {
    const int bits = digit_bits();
    const int next_shift = shift_ - bits;
    for (int c = 0; c < classes_; ++c) {
      ClassPlan& p = c_[c];
      if (p.done) {
        p.last_bin = -1;
        continue;
      }
      const int64_t* h = hist + static_cast<int64_t>(c) * kBins;
      int64_t before = 0;
      int bin = 0;
      // need >= 1 and need <= the bucket's count, so the scan stops in range.
      while (bin < (1 << bits) - 1 && before + h[bin] < p.need) before += h[bin++];
      p.prefix = (p.prefix << bits) | static_cast<uint64_t>(bin);
      p.need -= before;
      p.bucket = h[bin];
      p.last_bin = bin;
      finish_if_decided(p, next_shift);
    }
    shift_ = next_shift;
  }

  // The prefix an element of class c must have (key >> shift()) to be counted
  // by the next pass, or to be compacted; an impossible value once c is done.
  template <typename bits_t>
  bits_t prefix_of(int c) const {
    return c_[c].done ? KeyTraits<bits_t>::kNoPrefix : static_cast<bits_t>(c_[c].prefix);
  }
  // Candidates of class c with a key below this are selected for sure.
  template <typename bits_t>
  bits_t below_of(int c) const {
    return static_cast<bits_t>(c_[c].done ? c_[c].below : c_[c].prefix << shift_);
  }

 private:
  // A class is decided when nothing (need 0) or all (need == bucket) of its
  // bucket is selected, or when the bucket is a single key (shift 0): then
  // only which of its ties are selected remains, settled by index.
  static void finish_if_decided(ClassPlan& p, int shift) {
    if (p.need == 0) {
      p.below = p.prefix << shift;
    } else if (p.need == p.bucket) {
      p.below = (p.prefix + 1) << shift;
    } else if (shift == 0) {
      p.below = p.prefix;
      p.tie_need = p.need;
    } else {
      return;
    }
    p.done = true;
  }

  int shift_;
  int classes_;
  ClassPlan c_[kMaxClasses];
};

}  // namespace sparsemom::selection
