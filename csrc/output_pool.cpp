// A small caching allocator for the kernels' outputs.
//
// PyTorch's CPU allocator is glibc's malloc. A block above glibc's mmap
// threshold is mapped fresh and unmapped on free, and the heap top is trimmed
// back to the system, so a layer whose output is a few MB pays a page fault
// per 4 KB page on every call (the OS zeroes each page, then the kernel's
// stores write it again). Here an output's memory returns to an idle list on free
// and the next output of the same byte size takes it back: a network or a
// benchmark loop asks for the same sizes on every forward. Idle memory is
// capped (kMaxIdleBytes); dynprune.release_memory() frees it.
#include "output_pool.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <pthread.h>

#include <mutex>
#include <new>
#include <unordered_map>
#include <vector>

namespace dynprune {
namespace {

constexpr size_t kMaxIdleBytes = size_t{512} << 20;

class OutputPool final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (n == 0) return {nullptr, nullptr, &give_back, c10::Device(c10::DeviceType::CPU)};
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = idle_.find(n);
      if (it != idle_.end() && !it->second.empty()) {
        p = it->second.back();
        it->second.pop_back();
        idle_bytes_ -= n;
      }
    }
    if (p == nullptr) p = c10::alloc_cpu(n);  // throws on failure
    Block* block = nullptr;
    try {
      block = new Block{p, n};
    } catch (...) {
      c10::free_cpu(p);
      throw;
    }
    return {p, block, &give_back, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  int64_t release() {
    std::lock_guard<std::mutex> lock(mutex_);
    const int64_t freed = static_cast<int64_t>(idle_bytes_);
    for (auto& entry : idle_)
      for (void* p : entry.second) c10::free_cpu(p);
    idle_.clear();
    idle_bytes_ = 0;
    return freed;
  }

  int64_t idle_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int64_t>(idle_bytes_);
  }

 private:
  struct Block {
    void* ptr;
    size_t bytes;
  };

  static void give_back(void* ctx);
  friend OutputPool& pool();

  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<void*>> idle_;  // byte size -> idle blocks
  size_t idle_bytes_ = 0;
};

// Never destroyed: tensors alive at exit still return their blocks here. A
// child forked while another thread held the lock gets a fresh, unlocked one.
OutputPool& pool() {
  static OutputPool* p = [] {
    pthread_atfork(nullptr, nullptr, [] { new (&pool().mutex_) std::mutex(); });
    return new OutputPool();
  }();
  return *p;
}

void OutputPool::give_back(void* ctx) {
  if (ctx == nullptr) return;
  auto* block = static_cast<Block*>(ctx);
  OutputPool& self = pool();
  bool keep = false;
  try {
    std::lock_guard<std::mutex> lock(self.mutex_);
    if (self.idle_bytes_ + block->bytes <= kMaxIdleBytes) {
      self.idle_[block->bytes].push_back(block->ptr);  // may throw bad_alloc: freed below
      self.idle_bytes_ += block->bytes;
      keep = true;
    }
  } catch (...) {
    keep = false;
  }
  if (!keep) c10::free_cpu(block->ptr);
  delete block;
}

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_INTERNAL_ASSERT(options.device().is_cpu());
  return at::detail::empty_generic(sizes, &pool(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), c10::nullopt);
}

int64_t release_idle_outputs() { return pool().release(); }

int64_t idle_output_bytes() { return pool().idle_bytes(); }

}  // namespace dynprune
