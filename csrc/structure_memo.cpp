// Per-structure memo: what a CUDA op derives from a sparse structure (its content check,
// its row order) once per topology instead of once per call. On the GPU, reading index
// contents costs a host sync; a training step calls the ops with the same structure
// thousands of times between topology updates.
#include "sparsemom.h"

#include <c10/util/intrusive_ptr.h>

#include <algorithm>
#include <cstring>
#include <deque>
#include <mutex>
#include <vector>

namespace sparsemom {
namespace {

using StoragePtr = c10::intrusive_ptr<c10::StorageImpl>;
using WeakStoragePtr = c10::weak_intrusive_ptr<c10::StorageImpl>;

// One key tensor's contents as they were when the value was computed: its memory (storage,
// offset, sizes, strides) and its version. Any alias of that memory that shares the version
// counter (a view, a detach, a fresh slice of the same buffer, what AOTAutograd hands a
// compiled backward) matches, and a write through any of them bumps the version. The
// StorageImpl is held weakly: its object stays allocated while the weak reference lives, so
// no other storage can appear at the same address, and freed memory never matches.
struct Snapshot {
  bool defined;
  WeakStoragePtr storage;
  int64_t version;
  const void* data;
  std::vector<int64_t> sizes, strides;

  explicit Snapshot(const at::Tensor& t)
      : defined(t.defined()),
        storage(defined ? StoragePtr::reclaim_copy(t.storage().unsafeGetStorageImpl()) : StoragePtr()),
        version(defined ? t._version() : 0),
        data(defined ? t.data_ptr() : nullptr),
        sizes(defined ? t.sizes().vec() : std::vector<int64_t>{}),
        strides(defined ? t.strides().vec() : std::vector<int64_t>{}) {}

  bool matches(const at::Tensor& t) const {
    if (!defined || !t.defined()) return defined == t.defined();
    return alive() && storage._unsafe_get_target() == t.storage().unsafeGetStorageImpl() &&
           version == t._version() && data == t.data_ptr() && t.sizes().equals(sizes) &&
           t.strides().equals(strides);
  }

  bool alive() const { return !defined || !storage.expired(); }
};

struct Entry {
  const char* tag;
  int64_t extra;
  std::vector<Snapshot> keys;
  at::Tensor value;

  bool matches(const char* t, int64_t e, std::initializer_list<at::Tensor> tensors) const {
    if (std::strcmp(tag, t) != 0 || extra != e || keys.size() != tensors.size()) return false;
    size_t i = 0;
    for (const at::Tensor& tensor : tensors) {
      if (!keys[i++].matches(tensor)) return false;
    }
    return true;
  }

  bool alive() const {
    for (const Snapshot& key : keys) {
      if (!key.alive()) return false;
    }
    return true;
  }
};

// A model holds a few entries per sparse layer (content checks of the row and the
// transposed structure, row orders); past this many, the oldest go first.
constexpr size_t kCapacity = 256;

// Never destroyed: the entries hold device tensors, which must not be freed by static
// destructors after the CUDA runtime has shut down at exit.
std::mutex& memo_mutex = *new std::mutex;
std::deque<Entry>& memo = *new std::deque<Entry>;

}  // namespace

at::Tensor memo_by_structure(const char* tag, std::initializer_list<at::Tensor> tensors,
                             int64_t extra, const std::function<at::Tensor()>& compute) {
  bool memoisable = true;
  for (const at::Tensor& t : tensors) {
    // Inference tensors have no version counter, so a write to them would go unseen.
    memoisable = memoisable && !(t.defined() && (t.is_inference() || !t.has_storage()));
  }
  if (!memoisable) return compute();
  {
    const std::lock_guard<std::mutex> lock(memo_mutex);
    for (const Entry& entry : memo) {
      if (entry.matches(tag, extra, tensors)) return entry.value;
    }
  }
  // Outside the lock: compute() may raise (a failed check is not remembered) or sync.
  at::Tensor value = compute();
  Entry entry{tag, extra, {}, value};
  for (const at::Tensor& t : tensors) entry.keys.emplace_back(t);
  const std::lock_guard<std::mutex> lock(memo_mutex);
  memo.erase(std::remove_if(memo.begin(), memo.end(), [](const Entry& e) { return !e.alive(); }),
             memo.end());
  if (memo.size() >= kCapacity) memo.pop_front();
  memo.push_back(std::move(entry));
  return value;
}

void check_csr_content_once(const at::Tensor& row_ptr, const at::Tensor& col_idx, int64_t n_cols,
                            const at::Tensor& value_perm) {
  memo_by_structure("csr_content", {row_ptr, col_idx, value_perm}, n_cols, [&] {
    check_csr_content(row_ptr, col_idx, n_cols, value_perm);
    return at::Tensor();
  });
}

}  // namespace sparsemom
