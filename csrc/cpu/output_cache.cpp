// Large CPU outputs from a cache of freed blocks.
//
// glibc serves blocks of 32 MB and more with a fresh mmap on every call, and on a VM faulting a
// fresh 51 MB gradient in costs more than the kernel that fills it (about 4.5 ms with huge pages,
// 17 ms without, against 1.9 ms to write it once mapped). A training loop frees and allocates the
// same sizes every step, so the blocks freed by our outputs are kept (mapped, huge pages where
// the kernel gives them) and handed to the next output that fits, the way torch's CUDA caching
// allocator keeps device memory. The free blocks kept are capped (TORCHPOOL_CPU_CACHE_MB,
// default 512; 0 turns the cache off), the oldest are unmapped first, and
// torchpool.empty_cpu_cache() unmaps them all. The tensors are ordinary resizable CPU tensors.
#include "cpu/output_cache.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace torchpool::cpu {
namespace {

constexpr size_t kHuge = size_t{1} << 21;  // 2 MiB: blocks are aligned to it
// Smaller outputs come from malloc, whose heap reuses freed memory without new pages. Not much
// larger: glibc maps a block fresh when it is at least its mmap threshold, which only rises when
// a mapped block is freed, so with the large outputs served here, outputs of a few MB would be
// fresh maps on every call (a 12.8 MB forward output: ~1 ms of faults; the 3.2 MB positions of
// a max pool's training forward likewise).
constexpr size_t kMinBytes = size_t{1} << 20;

// Block sizes: multiples of 64 KiB below 8 MiB, of 2 MiB (a huge page) above.
size_t block_bytes(size_t n) {
  const size_t unit = n < (size_t{8} << 20) ? size_t{1} << 16 : kHuge;
  return (std::max<size_t>(n, 1) + unit - 1) / unit * unit;
}

#if defined(__linux__) && defined(MADV_HUGEPAGE)

size_t limit_from_env() {
  const char* v = std::getenv("TORCHPOOL_CPU_CACHE_MB");
  if (v == nullptr || *v == '\0') return size_t{512} << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(v, &end, 10);
  TORCH_CHECK(*end == '\0' && mb >= 0 && mb < (1LL << 40),
              "TORCHPOOL_CPU_CACHE_MB must be a whole number of megabytes >= 0, got '", v, "'");
  return static_cast<size_t>(mb) << 20;
}

// Outputs from malloc: where a large one is fresh pages, ask for transparent huge pages on its
// 2 MiB-aligned interior before the first write; already-mapped memory is unaffected.
void advise_huge_pages(const at::Tensor& t) {
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(uintptr_t{kHuge} - 1);
  const uintptr_t last = (begin + t.nbytes()) & ~(uintptr_t{kHuge} - 1);
  if (last >= first + 2 * kHuge) {
    (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // advice only
  }
}

struct Block {
  void* ptr;
  size_t bytes;
};

// A 2 MiB-aligned anonymous mapping of `bytes`, with huge pages asked for.
void* map_block(size_t bytes) {
  void* raw = mmap(nullptr, bytes + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  TORCH_CHECK(raw != MAP_FAILED, "torchpool: out of memory allocating ", bytes, " bytes for an output");
  const auto base = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = (base + kHuge - 1) & ~(uintptr_t{kHuge} - 1);
  if (aligned > base) munmap(raw, aligned - base);
  const uintptr_t tail = base + bytes + kHuge - (aligned + bytes);
  if (tail > 0) munmap(reinterpret_cast<void*>(aligned + bytes), tail);
  void* p = reinterpret_cast<void*>(aligned);
  (void)madvise(p, bytes, MADV_HUGEPAGE);  // advice only: without THP the pages stay small
  return p;
}

class OutputCache final : public c10::Allocator {
 public:
  OutputCache() : limit_(limit_from_env()) {}

  bool enabled() const { return limit_ > 0; }

  c10::DataPtr allocate(size_t n) override {
    const size_t bytes = block_bytes(n);
    Block b{nullptr, 0};
    {
      std::lock_guard<std::mutex> lock(mu_);
      // The smallest free block that fits with at most 1/8 to spare (the newest among equals).
      auto best = free_.end();
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (it->bytes >= bytes && it->bytes <= bytes + bytes / 8 &&
            (best == free_.end() || it->bytes <= best->bytes)) {
          best = it;
        }
      }
      if (best != free_.end()) {
        b = *best;
        held_ -= b.bytes;
        free_.erase(best);
        ++hits_;
      } else {
        ++misses_;
      }
    }
    if (b.ptr == nullptr) b = Block{map_block(bytes), bytes};
    return {b.ptr, new Block(b), &OutputCache::release, c10::Device(c10::kCPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {static_cast<int64_t>(held_), static_cast<int64_t>(free_.size()), hits_, misses_,
            static_cast<int64_t>(limit_)};
  }

  int64_t empty() {
    std::deque<Block> gone;
    {
      std::lock_guard<std::mutex> lock(mu_);
      gone.swap(free_);
      held_ = 0;
    }
    int64_t bytes = 0;
    for (const Block& b : gone) {
      munmap(b.ptr, b.bytes);
      bytes += static_cast<int64_t>(b.bytes);
    }
    return bytes;
  }

  static OutputCache& get() {
    static OutputCache* cache = new OutputCache();  // never destroyed: deleters may run at exit
    return *cache;
  }

 private:
  static void release(void* ctx) {
    const Block* b = static_cast<Block*>(ctx);
    get().put(*b);
    delete b;
  }

  void put(Block b) {
    std::deque<Block> gone;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (b.bytes > limit_) {
        gone.push_back(b);
      } else {
        while (held_ + b.bytes > limit_) {
          gone.push_back(free_.front());
          held_ -= free_.front().bytes;
          free_.pop_front();
        }
        free_.push_back(b);
        held_ += b.bytes;
      }
    }
    for (const Block& g : gone) munmap(g.ptr, g.bytes);
  }

  const size_t limit_;
  std::mutex mu_;
  std::deque<Block> free_;  // oldest first
  size_t held_ = 0;
  int64_t hits_ = 0, misses_ = 0;
};

#endif  // __linux__ && MADV_HUGEPAGE

}  // namespace

at::Tensor empty_output(c10::IntArrayRef shape, const at::TensorOptions& options) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  OutputCache& cache = OutputCache::get();
  if (cache.enabled() && !options.pinned_memory()) {
    int64_t numel = 1;
    for (const int64_t s : shape) numel *= s;
    const size_t bytes = static_cast<size_t>(numel) * options.dtype().itemsize();
    if (bytes >= kMinBytes) {
      return at::detail::empty_generic(shape, &cache, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                       options.dtype().toScalarType(), options.memory_format_opt());
    }
  }
  at::Tensor t = at::empty(shape, options);
  advise_huge_pages(t);
  return t;
#else
  return at::empty(shape, options);
#endif
}

std::vector<int64_t> output_cache_stats() {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  return OutputCache::get().stats();
#else
  return {0, 0, 0, 0, 0};
#endif
}

int64_t output_cache_empty() {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  return OutputCache::get().empty();
#else
  return 0;
#endif
}

}  // namespace torchpool::cpu
