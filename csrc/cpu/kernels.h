// CPU pooling kernels, compiled once per instruction set (see kernels_base.cpp / kernels_avx2.cpp).
//
// Every function here is templated on the element type and works on the 3-d geometry of
// geometry.h, so 1d and 2d pools run the same code with unit leading dims.
//
// Contiguous (N, C, D, H, W) input is processed one output row at a time: float rows with W
// stride 1 or 2 are reduced 8 outputs at a time straight from the input rows in registers
// (for_fused_chunks; leaner walks for max windows two wide at stride 2 that lie inside the input,
// max_tiles_w2, and three wide at stride 2, max_w3s2); other rows are copied once into a padded
// buffer split into `stride` phases, after which every kernel column is a unit-stride pass over
// the output row.
// Backward writes windows that tile the input straight into their cells (write_tiles), builds
// other planes that fit in L2 whole in cache (max_bwd_scatter, avg_bwd_scatter) and gathers per
// input row for larger ones; each plane is written by one thread in a fixed order:
// deterministic, no atomics.
//
// Channels-last input (N, D, H, W, C) vectorizes over C: every window cell is a contiguous
// C-vector.
//
// This header is included after the ATen headers and must include nothing itself: the AVX2
// translation unit compiles it under `#pragma GCC target`, in its own namespace.

namespace TORCHPOOL_CPU_NS {

using at::Tensor;
using torchpool::PoolGeometry;

template <typename T>
using acc_type = at::opmath_type<T>;

template <typename acc_t>
inline acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

// Rows of `work` elements each: chunks of about 16K elements per task.
inline int64_t grain_for(int64_t work) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(work, 1));
}

// ---------------------------------------------------------------------------------------------
// Writing a large result: ordinary stores read every cache line before writing it (read for
// ownership), so a stream of them costs twice its bytes in memory traffic; non-temporal stores
// write whole lines without that read and without keeping them in the cache. The window
// backwards write gradients of kStreamBytes or more into a staging buffer in L1 or L2, then
// stream it out. Smaller ones are written as before: the block they land in (recycled from an
// earlier output) was then often still in the last-level cache, where streaming was slower
// (NOTES §69; the threshold is this measurement's, on a VM whose cache holds 64 MiB or more).
// The global backwards stream from half that size (§74). AVX2 build only, as are the window
// kernels that use it (the global backwards reach it through streams_out and Staged).
#if defined(TORCHPOOL_AVX2)
constexpr int64_t kStreamBytes = int64_t{32} << 20;

// Float results only: the half types' backwards are bound by their instructions, and there the
// staging copy cost more than the streaming saved (NOTES §69).
template <typename T>
inline bool streams(int64_t elems, int64_t min_bytes = kStreamBytes) {
  return std::is_same_v<T, float> && elems * static_cast<int64_t>(sizeof(T)) >= min_bytes;
}

// dst[0, n) = src[0, n): the whole 64-byte lines of dst by non-temporal stores, the partial lines
// at either end by memcpy. Call stream_fence() before the task's results are used.
template <typename T>
inline void stream_copy(T* dst, const T* src, int64_t n) {
  char* d = reinterpret_cast<char*>(dst);
  const char* s = reinterpret_cast<const char*>(src);
  int64_t bytes = n * static_cast<int64_t>(sizeof(T));
  const int64_t head = std::min<int64_t>(bytes, (64 - reinterpret_cast<uintptr_t>(d) % 64) % 64);
  std::memcpy(d, s, head);
  d += head, s += head, bytes -= head;
  for (; bytes >= 64; bytes -= 64, d += 64, s += 64) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d),
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)));
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d + 32),
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + 32)));
  }
  std::memcpy(d, s, bytes);
}

// dst[0, n) = v, as stream_copy writes: whole lines by non-temporal stores, the ends one by one.
// T: float or a 16-bit type (its bit pattern repeated).
template <typename T>
inline void stream_fill(T* dst, int64_t n, T v) {
  constexpr int64_t kLine = 64 / sizeof(T);
  const int64_t head =
      std::min<int64_t>(n, (64 - reinterpret_cast<uintptr_t>(dst) % 64) % 64 / sizeof(T));
  for (int64_t i = 0; i < head; ++i) dst[i] = v;
  dst += head, n -= head;
  __m256i x;
  if constexpr (sizeof(T) == 2) {
    x = _mm256_set1_epi16(static_cast<int16_t>(v.x));
  } else {
    x = _mm256_castps_si256(_mm256_set1_ps(v));
  }
  for (; n >= kLine; n -= kLine, dst += kLine) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst), x);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst) + 1, x);
  }
  for (int64_t i = 0; i < n; ++i) dst[i] = v;
}

// The forwards' outputs (and the stride-1 box walks' gradients) stream from a quarter of that: a
// window forward reads its input once and writes its output once, so the output's read for
// ownership is a large share of its traffic (a 2 x 2 pool's: a sixth; a stride-1 pool's: a
// third); below 8 MiB streaming them did not pay on the EPYC VM, whose last-level cache is
// 32 MiB (NOTES §89). Their rows (or bands of rows) are staged up to kOutRunBytes each.
template <typename T>
inline bool forward_streams(int64_t elems) {
  return streams<T>(elems, kStreamBytes / 4);
}
constexpr int64_t kOutRunBytes = 32 << 10;

// Orders the non-temporal stores before what follows (they are weakly ordered).
inline void stream_fence() { _mm_sfence(); }

// Staging capacity for runs (planes, rows) of n cells written one after the other: as many whole
// runs as fill 4 KiB, at least one; 0 (not staged) where a run is over max_bytes (the tile
// backward's planes: 512 KiB; the forwards' rows: kOutRunBytes). Short copies out interleave with
// the kernel's loads: 32 KiB at a time left the reads waiting behind the streaming stores in the
// tile backward (NOTES §76), and was slower for pool1d's output rows of 8 KiB (§89).
template <typename T>
inline int64_t staged_whole(int64_t n, int64_t max_bytes) {
  const int64_t bytes = std::max<int64_t>(1, n * static_cast<int64_t>(sizeof(T)));
  return bytes > max_bytes ? 0 : n * std::max<int64_t>(1, (4 << 10) / bytes);
}

// Scratch memory of n cells that starts on a 4 KiB page boundary, its size rounded up to whole
// pages, so that a buffer of up to 4 KiB lies within one page: loads and stores split across two
// pages are the core's slow case, and a small buffer rewritten over and over where the heap put it
// across a page's end slowed its thread to half speed (NOTES §108).
template <typename T>
class PageBuffer {
 public:
  PageBuffer() = default;
  explicit PageBuffer(int64_t n) {
    const size_t bytes = static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(T);
    p_.reset(static_cast<T*>(std::aligned_alloc(kPage, (bytes + kPage - 1) / kPage * kPage)));
    TORCH_CHECK(p_ != nullptr, "torchpool: out of memory for a ", bytes, "-byte scratch buffer");
  }
  T* get() const { return p_.get(); }
  explicit operator bool() const { return p_ != nullptr; }

 private:
  static constexpr size_t kPage = 4096;
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T[], Free> p_;
};

// Consecutive runs of a result, staged and streamed out: at(dst, n) gives where to write the n
// cells meant for dst (the staging buffer when streaming, else dst itself); runs follow each other
// in memory until flush() (or a run that does not follow) writes the staged ones out. A full
// buffer writes out its whole lines only and keeps the last partial one for the runs that follow,
// so that runs which do not end on line boundaries (planes of 784 bytes, say) cost no partial
// lines between them, which ordinary stores would have to read first (NOTES §81). The destructor
// flushes and fences.
//
// The buffer starts on a 4 KiB page boundary, so that one of up to 4 KiB lies within a page. The
// window backwards stage short rows 1 KiB at a time, rewriting the same buffer every few rows
// with stores a cell off the lines (padding of one); where the buffer from `new` straddled two
// pages, the stores and loads across the boundary slowed the thread that owned it to half speed,
// in some processes and not others, by where the heap put it (NOTES §108).
template <typename T>
class StagedRuns {
 public:
  // cap: the most cells staged at once (by default 32 KiB of them), besides a kept partial line.
  static constexpr int64_t kCap = 32 * 1024 / sizeof(T);
  static constexpr int64_t kLineCells = 64 / sizeof(T);
  explicit StagedRuns(bool on, int64_t cap = kCap) : on_(on), cap_(cap) {}
  ~StagedRuns() {
    flush();
    if (streamed_) stream_fence();
  }

  T* at(T* dst, int64_t n) {
    if (!on_ || n > cap_) {
      flush();
      return dst;
    }
    if (used_ > 0 && dst != dst_ + used_) {
      flush();
    } else if (used_ + n > cap_) {
      flush_lines();
    }
    if (!buf_) buf_ = PageBuffer<T>(cap_ + kLineCells);
    if (used_ == 0) dst_ = dst;
    T* p = buf_.get() + used_;
    used_ += n;
    return p;
  }

  void flush() {
    if (used_ > 0) {
      stream_copy(dst_, buf_.get(), used_);
      used_ = 0;
      streamed_ = true;
    }
  }

 private:
  // Writes out the staged cells up to the last line boundary of their destination; the rest
  // (less than a line) moves to the buffer's start.
  void flush_lines() {
    const int64_t keep =
        static_cast<int64_t>(reinterpret_cast<uintptr_t>(dst_ + used_) % 64) / sizeof(T);
    const int64_t out = used_ - keep;
    if (out <= 0) return;
    stream_copy(dst_, buf_.get(), out);
    std::memmove(buf_.get(), buf_.get() + out, keep * sizeof(T));
    dst_ += out;
    used_ = keep;
    streamed_ = true;
  }

  bool on_, streamed_ = false;
  int64_t cap_;
  PageBuffer<T> buf_;
  T* dst_ = nullptr;
  int64_t used_ = 0;
};

// Staging capacity for rows of n cells written one after the other (the window backwards): rows
// under 4 KiB as many whole as fill 1 KiB, at least one, so that each copy out interleaves with
// the next rows' loads; longer rows the default 32 KiB (one 16 KiB row at a time was slower),
// rows over that not staged. NOTES §78.
template <typename T>
inline int64_t staged_rows(int64_t n) {
  const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
  return bytes >= (4 << 10) ? StagedRuns<T>::kCap
                            : n * std::max<int64_t>(1, 1024 / std::max<int64_t>(1, bytes));
}
#endif  // TORCHPOOL_AVX2

// ---------------------------------------------------------------------------------------------
// Unit-stride passes over L1-resident rows. Written so the compiler vectorizes them (no aliasing,
// no early exits). `take` is torch's max update rule: a larger value or a NaN replaces the current
// one, so NaN propagates and among equal maxima the first stays.

template <typename T>
inline bool takes(T v, T cur) {
  return (v > cur) | (v != v);
}

// Merges lane results of a strided scan (each lane's value and the cell it came from) into what
// the sequential scan with `takes` gives: the last NaN if any, else the first maximum.
template <typename T>
struct ScanMerge {
  T value = -std::numeric_limits<T>::infinity();
  int64_t at = 0;
  bool nan = false;
  void add(T v, int64_t cell) {
    if (v != v) {
      if (!nan || cell > at) { value = v; at = cell; }
      nan = true;
    } else if (!nan && (v > value || (v == value && cell < at))) {
      value = v; at = cell;
    }
  }
  // The cells after the lanes, in order.
  template <typename S>
  void tail(const S* src, int64_t i, int64_t n) {
    for (; i < n; ++i) {
      const T v = static_cast<T>(src[i]);
      if (takes(v, value)) { value = v; at = i; }
    }
  }
};

template <typename T>
inline void max_pass(const T* __restrict src, T* __restrict acc, int64_t n, int64_t /*ahead*/ = 0) {
  for (int64_t i = 0; i < n; ++i) {
    const T v = src[i];
    acc[i] = takes(v, acc[i]) ? v : acc[i];
  }
}

template <typename T>
inline void max_pass_pos(const T* __restrict src, T* __restrict acc, int32_t* __restrict best,
                         int32_t k, int64_t n, int64_t /*ahead*/ = 0) {
  for (int64_t i = 0; i < n; ++i) {
    const T v = src[i];
    const bool t = takes(v, acc[i]);
    acc[i] = t ? v : acc[i];
    best[i] = t ? k : best[i];
  }
}

template <typename T>
inline void sum_pass(const T* __restrict src, T* __restrict acc, int64_t n, int64_t /*ahead*/ = 0) {
  for (int64_t i = 0; i < n; ++i) acc[i] += src[i];
}

// dst[i] += grad[i] where the saved window position equals k (max pool backward).
template <typename scalar_t, typename pos_t, typename acc_t>
inline void masked_add(const scalar_t* __restrict grad, const pos_t* __restrict pos, int32_t k,
                       acc_t* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t v = static_cast<acc_t>(grad[i]);
    dst[i] += (static_cast<int32_t>(pos[i]) == k) ? v : acc_t(0);
  }
}

template <typename scalar_t, typename acc_t>
inline void convert(const scalar_t* __restrict src, acc_t* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_t>(src[i]);
}

#if defined(TORCHPOOL_AVX2)
// Element types of the fused forwards: float, and bfloat16 / half converted to float in
// registers as they are loaded and rounded to nearest even (torch's rounding) as they are stored.
template <typename T>
constexpr bool kFusedType = std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16> ||
                            std::is_same_v<T, c10::Half>;

// 8 elements at p as floats.
inline __m256 loadf(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 loadf(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 loadf(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Stores 8 floats at p as T.
template <bool kExact = false>
inline void storef(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
// The float bits of v plus c10's rounding increment: their top 16 bits are the rounded bfloat16
// (NaNs apart).
inline __m256i bf16_rounding(__m256 v) {
  const __m256i b = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  return _mm256_add_epi32(b, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF)));
}

// v as bfloat16 bits in the low half of each 32-bit lane, the high half 0: c10::BFloat16's
// rounding (+ 0x7FFF + the kept part's lowest bit, keep the top 16 bits); NaN -> 0x7FC0.
// kExact: every lane already is a bfloat16 value (an input, or a maximum of inputs), so its top
// 16 bits are kept without rounding.
template <bool kExact>
inline __m256i bf16_bits(__m256 v) {
  const __m256i r = _mm256_srli_epi32(kExact ? _mm256_castps_si256(v) : bf16_rounding(v), 16);
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
}
template <bool kExact = false>
inline void storef(c10::BFloat16* p, __m256 v) {
  const __m256i r = bf16_bits<kExact>(v);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
template <bool kExact = false>
inline void storef(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

// Stores 16 elements at p: cell 2j from lane j of a, cell 2j + 1 from lane j of b (kExact: as
// storef). bfloat16 packs each pair into one 32-bit lane: one store, no lane moves.
template <bool kExact = false, typename T>
__attribute__((always_inline)) inline void store_pairs(T* p, __m256 a, __m256 b) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if constexpr (!kExact) {
      // Without NaNs (one compare for both vectors) the rounding alone, b's rounded bits kept
      // where they are: 13 instructions instead of 21 (NOTES §73).
      if (__builtin_expect(_mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_UNORD_Q)) == 0, 1)) {
        const __m256i lo = _mm256_srli_epi32(bf16_rounding(a), 16);
        const __m256i hi = _mm256_and_si256(bf16_rounding(b), _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_or_si256(lo, hi));
        return;
      }
    }
    const __m256i lo = bf16_bits<kExact>(a), hi = _mm256_slli_epi32(bf16_bits<kExact>(b), 16);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_or_si256(lo, hi));
  } else {
    const __m256 lo = _mm256_unpacklo_ps(a, b), hi = _mm256_unpackhi_ps(a, b);
    storef<kExact>(p, _mm256_permute2f128_ps(lo, hi, 0x20));
    storef<kExact>(p + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
  }
}

// AVX2 versions of the passes for float and the half types (and the half-type conversions): the
// compiler does not vectorize the generic ones reliably. Overloads, so they win over the
// templates above.

inline __m256 take_mask(__m256 v, __m256 cur) {
  return _mm256_or_ps(_mm256_cmp_ps(v, cur, _CMP_GT_OQ), _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}

// torch's rule for the maximum m and its position b, by compare-and-blend: the value v at
// position k replaces them if greater or NaN.
__attribute__((always_inline)) inline void take_torch(__m256& m, __m256& b, __m256 v, __m256 k) {
  const __m256 t = take_mask(v, m);
  m = _mm256_blendv_ps(m, v, t);
  b = _mm256_blendv_ps(b, k, t);
}

// The maximum m and its position b updated with the value v at position k, where k is greater
// than every position b holds (later in scan order) and NaNs are dealt with apart: v replaces m
// only if greater (of equal values, +0 and -0 too, the first stays; a NaN v never replaces it).
// Four instructions where take_mask and two blends take nine (blendv is three on this class of
// core).
__attribute__((always_inline)) inline void take_greater(__m256& m, __m256& b, __m256 v, __m256i k) {
  const __m256i t = _mm256_castps_si256(_mm256_cmp_ps(v, m, _CMP_GT_OQ));
  b = _mm256_castsi256_ps(_mm256_max_epi32(_mm256_castps_si256(b), _mm256_and_si256(t, k)));
  m = _mm256_max_ps(v, m);
}

// take_greater by one variable blend of the position: one instruction on AMD's cores where and +
// integer max take two; two or three on Intel's (Tuning::positions_by_blend, NOTES §96).
__attribute__((always_inline)) inline void take_greater_blend(__m256& m, __m256& b, __m256 v, __m256i k) {
  b = _mm256_blendv_ps(b, _mm256_castsi256_ps(k), _mm256_cmp_ps(v, m, _CMP_GT_OQ));
  m = _mm256_max_ps(v, m);
}

// body(i) for i = 0, 8, ... while i + 8 <= n; returns where it stopped. Where `ahead` is not 0,
// the cache line of src `ahead` elements on is prefetched once per line read (the channels-last
// global pools: NOTES §75).
template <typename T, typename Body>
__attribute__((always_inline)) inline int64_t vector_steps(const T* src, int64_t n, int64_t ahead,
                                                           Body&& body) {
  constexpr int64_t kLine = 64 / sizeof(T);  // 16 floats or 32 half-type values
  int64_t i = 0;
  if (ahead != 0) {
    for (; i + kLine <= n; i += kLine) {
      _mm_prefetch(reinterpret_cast<const char*>(src + i + ahead), _MM_HINT_T0);
      for (int64_t j = 0; j < kLine; j += 8) body(i + j);
    }
  }
  for (; i + 8 <= n; i += 8) body(i);
  return i;
}

// The passes over a row of T (float, or a half type widened in registers) into float
// accumulators, prefetching `ahead` elements on if that is not 0; the overloads below pick them
// for float and the half types.
template <typename T>
inline void max_pass_simd(const T* __restrict src, float* __restrict acc, int64_t n,
                          int64_t ahead) {
  int64_t i = vector_steps(src, n, ahead, [&](int64_t i) {
    const __m256 v = loadf(src + i), a = _mm256_loadu_ps(acc + i);
    _mm256_storeu_ps(acc + i, _mm256_blendv_ps(a, v, take_mask(v, a)));
  });
  for (; i < n; ++i) {
    const float v = static_cast<float>(src[i]);
    acc[i] = takes(v, acc[i]) ? v : acc[i];
  }
}

template <typename T>
inline void max_pass_pos_simd(const T* __restrict src, float* __restrict acc,
                              int32_t* __restrict best, int32_t k, int64_t n, int64_t ahead) {
  const __m256 kv = _mm256_castsi256_ps(_mm256_set1_epi32(k));
  int64_t i = vector_steps(src, n, ahead, [&](int64_t i) {
    const __m256 v = loadf(src + i), a = _mm256_loadu_ps(acc + i);
    const __m256 m = take_mask(v, a);
    const __m256 b = _mm256_loadu_ps(reinterpret_cast<const float*>(best + i));
    _mm256_storeu_ps(acc + i, _mm256_blendv_ps(a, v, m));
    _mm256_storeu_ps(reinterpret_cast<float*>(best + i), _mm256_blendv_ps(b, kv, m));
  });
  for (; i < n; ++i) {
    const float v = static_cast<float>(src[i]);
    const bool t = takes(v, acc[i]);
    acc[i] = t ? v : acc[i];
    best[i] = t ? k : best[i];
  }
}

template <typename T>
inline void sum_pass_simd(const T* __restrict src, float* __restrict acc, int64_t n,
                          int64_t ahead) {
  int64_t i = vector_steps(src, n, ahead, [&](int64_t i) {
    _mm256_storeu_ps(acc + i, _mm256_add_ps(_mm256_loadu_ps(acc + i), loadf(src + i)));
  });
  for (; i < n; ++i) acc[i] += static_cast<float>(src[i]);
}

// Four rows r + q * stride (q = 0 .. 3) of n values added into acc, in sum_pass's order (the same
// sums to the bit), each accumulator loaded and stored once for the four rows instead of once a
// row (the channels-last global average: NOTES §91). Prefetches each row `ahead` elements on,
// once a cache line, where ahead is not 0.
template <typename T>
inline void sum_rows4(const T* __restrict r, int64_t stride, float* __restrict acc, int64_t n,
                      int64_t ahead) {
  constexpr int64_t kLine = 64 / sizeof(T);
  auto body = [&](int64_t j) __attribute__((always_inline)) {
    __m256 a = _mm256_loadu_ps(acc + j);
    for (int q = 0; q < 4; ++q) a = _mm256_add_ps(a, loadf(r + q * stride + j));
    _mm256_storeu_ps(acc + j, a);
  };
  int64_t j = 0;
  if (ahead != 0) {
    for (; j + kLine <= n; j += kLine) {
      for (int q = 0; q < 4; ++q) {
        _mm_prefetch(reinterpret_cast<const char*>(r + q * stride + j + ahead), _MM_HINT_T0);
      }
      for (int64_t k = 0; k < kLine; k += 8) body(j + k);
    }
  }
  for (; j + 8 <= n; j += 8) body(j);
  for (; j < n; ++j) {
    float a = acc[j];
    for (int q = 0; q < 4; ++q) a += static_cast<float>(r[q * stride + j]);
    acc[j] = a;
  }
}

template <typename T>
using if_half = std::enable_if_t<kFusedType<T> && !std::is_same_v<T, float>, int>;

inline void max_pass(const float* src, float* acc, int64_t n, int64_t ahead = 0) {
  max_pass_simd(src, acc, n, ahead);
}
template <typename T, if_half<T> = 0>
inline void max_pass(const T* src, float* acc, int64_t n, int64_t ahead = 0) {
  max_pass_simd(src, acc, n, ahead);
}

inline void max_pass_pos(const float* src, float* acc, int32_t* best, int32_t k, int64_t n,
                         int64_t ahead = 0) {
  max_pass_pos_simd(src, acc, best, k, n, ahead);
}
template <typename T, if_half<T> = 0>
inline void max_pass_pos(const T* src, float* acc, int32_t* best, int32_t k, int64_t n,
                         int64_t ahead = 0) {
  max_pass_pos_simd(src, acc, best, k, n, ahead);
}

inline void sum_pass(const float* src, float* acc, int64_t n, int64_t ahead = 0) {
  sum_pass_simd(src, acc, n, ahead);
}
template <typename T, if_half<T> = 0>
inline void sum_pass(const T* src, float* acc, int64_t n, int64_t ahead = 0) {
  sum_pass_simd(src, acc, n, ahead);
}

inline void masked_add(const float* __restrict grad, const uint8_t* __restrict pos, int32_t k,
                       float* __restrict dst, int64_t n) {
  const __m256i kv = _mm256_set1_epi32(k);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i p = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(pos + i)));
    const __m256 m = _mm256_castsi256_ps(_mm256_cmpeq_epi32(p, kv));
    const __m256 g = _mm256_and_ps(m, _mm256_loadu_ps(grad + i));
    _mm256_storeu_ps(dst + i, _mm256_add_ps(_mm256_loadu_ps(dst + i), g));
  }
  for (; i < n; ++i) dst[i] += (static_cast<int32_t>(pos[i]) == k) ? grad[i] : 0.f;
}

// Half type <-> float, 8 at a time (the generic convert goes one element at a time).
template <typename T, if_half<T> = 0>
inline void convert(const T* __restrict src, float* __restrict dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, loadf(src + i));
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename T, if_half<T> = 0>
inline void convert(const float* __restrict src, T* __restrict dst, int64_t n) {
  int64_t i = 0;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    // 16 at a time: one pack of two rounded vectors (its lanes interleave the 128-bit halves,
    // which one permute undoes) and one 32-byte store.
    for (; i + 16 <= n; i += 16) {
      const __m256i p = _mm256_packus_epi32(bf16_bits<false>(_mm256_loadu_ps(src + i)),
                                            bf16_bits<false>(_mm256_loadu_ps(src + i + 8)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm256_permute4x64_epi64(p, 0xD8));
    }
  }
  for (; i + 8 <= n; i += 8) storef(dst + i, _mm256_loadu_ps(src + i));
  for (; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// Lanes in the order j = 0 1 4 5 2 3 6 7 (_mm256_shuffle_ps of two vectors) put back in order.
inline __m256 unshuffle(__m256 v) {
  return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(v), 0xD8));
}

// a[j] = src[2j], b[j] = src[2j + 1] for j < m (reads exactly src[0, 2m)).
inline void deinterleave2(const float* __restrict src, float* __restrict a, float* __restrict b,
                          int64_t m) {
  int64_t j = 0;
  for (; j + 8 <= m; j += 8) {
    const __m256 lo = _mm256_loadu_ps(src + 2 * j), hi = _mm256_loadu_ps(src + 2 * j + 8);
    const __m256 even = _mm256_shuffle_ps(lo, hi, 0x88), odd = _mm256_shuffle_ps(lo, hi, 0xDD);
    _mm256_storeu_ps(a + j, unshuffle(even));
    _mm256_storeu_ps(b + j, unshuffle(odd));
  }
  for (; j < m; ++j) { a[j] = src[2 * j]; b[j] = src[2 * j + 1]; }
}

// dst[2j] = a[j], dst[2j + 1] = b[j] for j < m.
inline void interleave2(const float* __restrict a, const float* __restrict b,
                        float* __restrict dst, int64_t m) {
  int64_t j = 0;
  for (; j + 8 <= m; j += 8) store_pairs(dst + 2 * j, _mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j));
  for (; j < m; ++j) { dst[2 * j] = a[j]; dst[2 * j + 1] = b[j]; }
}
#define TORCHPOOL_HAS_STRIDE2 1

// Software prefetch of the two cache lines kAhead bytes (default two KiB) ahead, for loops with
// much work per cache line (the argmax, NOTES §18) or several interleaved streams (channels-last
// windows, §22; NCHW window rows, §29): there the hardware prefetchers alone fall behind.
// Prefetches do not fault, so running past the end of the data is harmless.
template <int64_t kAhead = 2048, int kLines = 2>
inline void prefetch_ahead(const void* p) {
  _mm_prefetch(static_cast<const char*>(p) + kAhead, _MM_HINT_T0);
  if constexpr (kLines > 1) _mm_prefetch(static_cast<const char*>(p) + kAhead + 64, _MM_HINT_T0);
}

// Whether the global reductions over T prefetch: the half types always, float where the tuning
// says (on AMD the hardware prefetchers keep up, and the prefetches cost: NOTES §84).
template <typename T>
inline bool reductions_prefetch() {
  return !std::is_same_v<T, float> || tuning().float_reductions_prefetch;
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// Sum of n elements (as floats) with four independent vector accumulators.
template <typename T>
inline float reduce_sum(const T* __restrict src, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  const bool pf = reductions_prefetch<T>();
  for (; i + 32 <= n; i += 32) {
    if (pf) prefetch_ahead<2048, 2>(src + i);
    a0 = _mm256_add_ps(a0, loadf(src + i));
    a1 = _mm256_add_ps(a1, loadf(src + i + 8));
    a2 = _mm256_add_ps(a2, loadf(src + i + 16));
    a3 = _mm256_add_ps(a3, loadf(src + i + 24));
  }
  for (; i + 8 <= n; i += 8) a0 = _mm256_add_ps(a0, loadf(src + i));
  float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; i < n; ++i) s += static_cast<float>(src[i]);
  return s;
}

// The lanes' maxima of n cells (a multiple of 16) taken into m0 (the first 8 of every 16) and m1
// (the others), and their NaNs into nan's lanes; pf: reductions_prefetch<T>().
template <typename T>
inline void max_lanes16(const T* __restrict src, int64_t n, __m256& m0, __m256& m1, __m256& nan,
                        bool pf) {
  for (int64_t i = 0; i < n; i += 16) {
    if (pf) prefetch_ahead<2048, 1>(src + i);
    const __m256 v0 = loadf(src + i), v1 = loadf(src + i + 8);
    m0 = _mm256_max_ps(m0, v0);
    m1 = _mm256_max_ps(m1, v1);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v0, v1, _CMP_UNORD_Q));
  }
}

// Maximum of n elements (as a float); NaN if any is NaN.
template <typename T>
inline float reduce_max(const T* __restrict src, int64_t n) {
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 m0 = ninf, m1 = ninf, nan = _mm256_setzero_ps();
  int64_t i = n / 16 * 16;
  max_lanes16(src, i, m0, m1, nan, reductions_prefetch<T>());
  for (; i + 8 <= n; i += 8) {
    const __m256 v = loadf(src + i);
    m0 = _mm256_max_ps(m0, v);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_max_ps(m0, m1));
  float m = lanes[0];
  for (int j = 1; j < 8; ++j) m = lanes[j] > m ? lanes[j] : m;
  const bool any_nan = _mm256_movemask_ps(nan) != 0;
  for (; i < n; ++i) {
    const float v = static_cast<float>(src[i]);
    m = takes(v, m) ? v : m;
  }
  return any_nan ? std::numeric_limits<float>::quiet_NaN() : m;
}

// Every lane = the maximum of v's lanes (no NaN among them).
inline __m256 hmax_all(__m256 v) {
  v = _mm256_max_ps(v, _mm256_permute2f128_ps(v, v, 0x01));
  v = _mm256_max_ps(v, _mm256_shuffle_ps(v, v, 0x4E));
  return _mm256_max_ps(v, _mm256_shuffle_ps(v, v, 0xB1));
}

inline int32_t hmin_epi32(__m256i v) {
  __m128i s = _mm_min_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_min_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  return _mm_cvtsi128_si32(_mm_min_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}

// Position of the maximum of n floats, as a sequential scan with the `takes` rule finds it: the
// last NaN if there is one, else the first maximum. One pass: 16 lanes each keep their largest
// value and the first cell that held it; the lanes merge to the smallest cell among those holding
// the maximum. A NaN anywhere (rare) sends it to a scan for the last NaN.
template <typename T>
inline int64_t reduce_argmax(const T* __restrict src, int64_t n, T* value) {
  // Set k of lanes sees the cells 32t + 8k + lane; each lane keeps its largest value and the block
  // t where it first appeared.
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 b[4] = {ninf, ninf, ninf, ninf}, nan = _mm256_setzero_ps();
  __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  __m256i t = _mm256_setzero_si256();
  const __m256i one = _mm256_set1_epi32(1);
  auto take = [&](int k, __m256 v) {
    const __m256 gt = _mm256_cmp_ps(v, b[k], _CMP_GT_OQ);
    b[k] = _mm256_max_ps(v, b[k]);  // v > b ? v : b
    a[k] = _mm256_blendv_ps(a[k], _mm256_castsi256_ps(t), gt);
  };
  int64_t i = 0;
  const bool pf = reductions_prefetch<T>();
  for (; i + 32 <= n; i += 32) {
    if (pf) prefetch_ahead(src + i);
    const __m256 v0 = loadf(src + i), v1 = loadf(src + i + 8);
    const __m256 v2 = loadf(src + i + 16), v3 = loadf(src + i + 24);
    take(0, v0);
    take(1, v1);
    take(2, v2);
    take(3, v3);
    nan = _mm256_or_ps(nan, _mm256_or_ps(_mm256_cmp_ps(v0, v1, _CMP_UNORD_Q),
                                         _mm256_cmp_ps(v2, v3, _CMP_UNORD_Q)));
    t = _mm256_add_epi32(t, one);
  }
  for (int k = 0; i + 8 <= n; i += 8, ++k) {
    const __m256 v = loadf(src + i);
    take(k, v);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  int64_t at = 0;
  if (_mm256_movemask_ps(nan) != 0) {
    for (at = n - 1; !std::isnan(static_cast<float>(src[at])); --at) {}
  } else {
    // Branch-free merge (a mispredicted branch per plane stalls the loads of the next one): the
    // smallest cell among the lanes that hold the maximum.
    const __m256 mv = hmax_all(_mm256_max_ps(_mm256_max_ps(b[0], b[1]), _mm256_max_ps(b[2], b[3])));
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i none = _mm256_set1_epi32(std::numeric_limits<int32_t>::max());
    __m256i best = none;
    for (int k = 0; k < 4; ++k) {
      const __m256i cell = _mm256_add_epi32(_mm256_slli_epi32(_mm256_castps_si256(a[k]), 5),
                                            _mm256_add_epi32(lane, _mm256_set1_epi32(8 * k)));
      const __m256 hit = _mm256_cmp_ps(b[k], mv, _CMP_EQ_OQ);
      best = _mm256_min_epi32(best, _mm256_castps_si256(_mm256_blendv_ps(
                                        _mm256_castsi256_ps(none), _mm256_castsi256_ps(cell), hit)));
    }
    float m = _mm256_cvtss_f32(mv);
    at = hmin_epi32(best);
    if (at >= n) at = 0;  // n == 0
    for (; i < n; ++i) {
      const float v = static_cast<float>(src[i]);
      const bool t = takes(v, m);
      m = t ? v : m;
      at = t ? i : at;
    }
  }
  // The cell itself (+0 and -0 compare equal).
  *value = n > 0 ? src[at] : static_cast<T>(-std::numeric_limits<float>::infinity());
  return at;
}

#endif  // TORCHPOOL_AVX2

// A C-vector as acc_t: the input itself when it already is, else converted into `tmp`.
template <typename scalar_t, typename acc_t>
inline const acc_t* src_as_acc(const scalar_t* src, acc_t* tmp, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    convert(src, tmp, n);
    return tmp;
  }
}

// A row as the passes read it: the row itself where the AVX2 passes take its type (float, and
// the half types widened in registers), else src_as_acc's.
template <typename scalar_t, typename acc_t>
inline auto pass_input(const scalar_t* src, acc_t* tmp, int64_t n) {
#if defined(TORCHPOOL_AVX2)
  if constexpr (kFusedType<scalar_t>) return src;
  else
#endif
    return src_as_acc(src, tmp, n);
}

// ---------------------------------------------------------------------------------------------
// Phase buffer: one padded input row (padding filled with `fill`) stored as `s` phases so that
// element x = j*s + p lives at buf[p*len + j]; input element iw sits at x = iw + pad.
// Then the cell `off` (= kw*dilation) of the windows of outputs 0.. is the unit-stride run
// starting at phase(off % s)[off / s].
struct RowPhases {
  int64_t s, len, width;
  RowPhases(const PoolGeometry& g) {
    s = g.stride[2];
    const int64_t need = (g.out[2] - 1) * s + (g.kernel[2] - 1) * g.dilation[2] + 1;
    width = std::max(g.pad[2] + g.in[2] + g.pad_after[2], need);
    len = (width + s - 1) / s;
  }
  int64_t size() const { return s * len; }
  int64_t index(int64_t x) const { return (x % s) * len + x / s; }
  int64_t run(int64_t off) const { return (off % s) * len + off / s; }
};

// Moves row[0, n) to / from its place x = i + pad in the phases. The generic version goes phase by
// phase with strided accesses; float rows of stride 2 use the SIMD (de)interleave.
template <typename scalar_t, typename acc_t, bool kLoad>
inline void move_row(std::conditional_t<kLoad, const scalar_t*, scalar_t*> row, acc_t* buf,
                     const RowPhases& ph, int64_t pad, int64_t n) {
  const int64_t s = ph.s;
#if defined(TORCHPOOL_HAS_STRIDE2)
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    if (s == 2) {
      int64_t i = 0;
      if (pad & 1) {  // row[0] is alone at the start of phase 1
        if constexpr (kLoad) buf[ph.index(pad)] = row[0]; else row[0] = buf[ph.index(pad)];
        i = 1;
      }
      const int64_t pairs = (n - i) / 2, j = (i + pad) / 2;
      if constexpr (kLoad) {
        deinterleave2(row + i, buf + j, buf + ph.len + j, pairs);
      } else {
        interleave2(buf + j, buf + ph.len + j, row + i, pairs);
      }
      i += 2 * pairs;
      if (i < n) {
        if constexpr (kLoad) buf[ph.index(i + pad)] = row[i]; else row[i] = buf[ph.index(i + pad)];
      }
      return;
    }
  }
#endif
  for (int64_t p = 0; p < s; ++p) {
    acc_t* ph_p = buf + p * ph.len;
    // Phase p holds the elements i = j*s + p - pad, j in [j0, j1).
    const int64_t j0 = std::min(ph.len, pad > p ? (pad - p + s - 1) / s : 0);
    const int64_t j1 = std::max(j0, std::min(ph.len, (n + pad - p + s - 1) / s));
    const int64_t cnt = j1 - j0, first = j0 * s + p - pad;
    if constexpr (kLoad) {
      const scalar_t* __restrict src = row + first;
      acc_t* __restrict dst = ph_p + j0;
      if (s == 1) {
        convert(src, dst, cnt);
      } else {
        for (int64_t j = 0; j < cnt; ++j) dst[j] = static_cast<acc_t>(src[s * j]);
      }
    } else {
      scalar_t* __restrict dst = row + first;
      const acc_t* __restrict src = ph_p + j0;
      if (s == 1) {
        convert(src, dst, cnt);
      } else {
        for (int64_t j = 0; j < cnt; ++j) dst[s * j] = static_cast<scalar_t>(src[j]);
      }
    }
  }
}

// Fills the phases with one input row: padding (and the slack past the padded width) = `fill`.
template <typename scalar_t, typename acc_t>
inline void load_row(const scalar_t* row, acc_t* buf, const RowPhases& ph, int64_t pad,
                     int64_t in_w, acc_t fill) {
  for (int64_t x = 0; x < pad; ++x) buf[ph.index(x)] = fill;
  for (int64_t x = pad + in_w; x < ph.s * ph.len; ++x) buf[ph.index(x)] = fill;
  move_row<scalar_t, acc_t, true>(row, buf, ph, pad, in_w);
}

// Inverse of load_row for the in-input part: row[i] = buf[x = i + pad].
template <typename scalar_t, typename acc_t>
inline void store_row(const acc_t* buf, scalar_t* row, const RowPhases& ph, int64_t pad,
                      int64_t in_w) {
  move_row<scalar_t, acc_t, false>(row, const_cast<acc_t*>(buf), ph, pad, in_w);
}

// ---------------------------------------------------------------------------------------------
// Per-dim window tables, built once per call so that the row loops divide nothing.

struct DimTable {
  std::vector<int64_t> lo, hi;       // per output: window cells [lo, hi) that lie in the input
  std::vector<int64_t> count;        // per output: average divisor factor (avg pools)
  std::vector<int64_t> first;        // per input coordinate: its run in `cover`
  std::vector<int64_t> cover_o, cover_k;  // (output, window cell) pairs covering it, o ascending

  // Whether input coordinate i is window cell k of output o along dim d (o from
  // covering_outputs: dilation may still skip it).
  static bool window_cell(const PoolGeometry& g, int d, int64_t i, int64_t o, int64_t& k) {
    const int64_t rel = i + g.pad[d] - o * g.stride[d];
    k = rel / g.dilation[d];
    return rel % g.dilation[d] == 0 && k < g.kernel[d];
  }

  DimTable(const PoolGeometry& g, int d, bool with_cover, bool count_include_pad = true)
      : lo(g.out[d]), hi(g.out[d]), count(g.out[d]) {
    for (int64_t o = 0; o < g.out[d]; ++o) {
      g.valid_cells(d, o, lo[o], hi[o]);
      count[o] = g.avg_count(d, o, count_include_pad);
    }
    if (!with_cover) return;
    first.assign(g.in[d] + 1, 0);
    for (int64_t i = 0; i < g.in[d]; ++i) {
      first[i] = static_cast<int64_t>(cover_o.size());
      int64_t o0, o1;
      g.covering_outputs(d, i, o0, o1);
      for (int64_t o = o0; o < o1; ++o) {
        int64_t k;
        if (!window_cell(g, d, i, o, k)) continue;
        cover_o.push_back(o);
        cover_k.push_back(k);
      }
    }
    first[g.in[d]] = static_cast<int64_t>(cover_o.size());
  }
};

// Row index r = (a * B + b) * C + c, advanced without division.
struct RowCounter {
  int64_t a, b, c;
  const int64_t B, C;
  RowCounter(int64_t r, int64_t B_, int64_t C_) : a(r / (B_ * C_)), b((r / C_) % B_), c(r % C_), B(B_), C(C_) {}
  void next() {
    if (++c == C) {
      c = 0;
      if (++b == B) { b = 0; ++a; }
    }
  }
};

// Saved positions: int32 window cells -> pos_t; a window whose values never replaced -inf
// reports its first in-input cell, as torch does.
template <typename pos_t>
inline void store_positions(int32_t* best, pos_t* __restrict out, int32_t first_dh,
                            const DimTable& tw, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if (best[i] < 0) best[i] = first_dh + static_cast<int32_t>(tw.lo[i]);
  }
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<pos_t>(best[i]);
}

#if defined(TORCHPOOL_AVX2)
// ---------------------------------------------------------------------------------------------
// Fused AVX2 rows: float NCHW with stride 1 or 2 and no dilation along W. Eight outputs at a
// time straight from the input rows, the whole window reduced in registers: no row buffers and
// no scalar tails (edges use masked loads and stores).

inline bool fused_rows_ok(const PoolGeometry& g) {
  return g.dilation[2] == 1 && (g.stride[2] == 1 || g.stride[2] == 2) && g.in[2] < (1 << 30);
}

// Lanes j with 0 <= x0 + j < w.
inline __m256i lanes_inside(int64_t x0, int64_t w) {
  const __m256i x = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(x0)),
                                     _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  return _mm256_and_si256(_mm256_cmpgt_epi32(x, _mm256_set1_epi32(-1)),
                          _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(w)), x));
}

// The first n (<= 8) elements at p as floats; the other lanes are 0 and are not read.
inline __m256 load_lanes(const float* p, int64_t n) {
  return n == 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, lanes_inside(0, n));
}
template <typename T>
inline __m256 load_lanes(const T* p, int64_t n) {
  if (n == 8) return loadf(p);
  T t[8] = {};
  for (int64_t j = 0; j < n; ++j) t[j] = p[j];
  return loadf(t);
}

// row[x0 .. x0 + 8), cells outside [0, w) read as `fill`. kEdge = false: the caller knows all
// 8 cells are inside.
template <bool kEdge = true, typename T>
inline __m256 load8(const T* row, int64_t x0, int64_t w, __m256 fill) {
  if (!kEdge || (x0 >= 0 && x0 + 8 <= w)) return loadf(row + x0);
  if constexpr (std::is_same_v<T, float>) {
    const __m256i in = lanes_inside(x0, w);
    // Masked-off lanes are not read, so the address may point outside the row.
    const __m256 v = _mm256_maskload_ps(row + x0, in);
    return _mm256_blendv_ps(fill, v, _mm256_castsi256_ps(in));
  } else if (w >= 8) {
    // The 8 cells of the row nearest to x0, moved to their lanes.
    const int64_t base = std::min(std::max<int64_t>(x0, 0), w - 8);
    const __m256i from = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                          _mm256_set1_epi32(static_cast<int32_t>(x0 - base)));
    const __m256 v = _mm256_permutevar8x32_ps(loadf(row + base), from);
    return _mm256_blendv_ps(fill, v, _mm256_castsi256_ps(lanes_inside(x0, w)));
  } else {
    alignas(32) float t[8];
    _mm256_store_ps(t, fill);
    for (int64_t j = std::max<int64_t>(0, -x0); j < 8 && x0 + j < w; ++j) {
      t[j] = static_cast<float>(row[x0 + j]);
    }
    return _mm256_load_ps(t);
  }
}

// Cells past x0 that for_window_row loads: x0 + reach <= w means no cell is outside the row.
template <int S>
inline int64_t window_row_reach(int64_t KW) {
  return S == 1 ? KW - 1 + 8 : ((KW - 1) & ~int64_t{1}) + 16;
}

// for_window_row's lanes come out in order for stride 1 and for bfloat16.
template <int S, typename T>
constexpr bool kNaturalLanes = S == 1 || std::is_same_v<T, c10::BFloat16>;

// Calls f(kw, v) for kw = 0 .. KW-1 in order, v holding the 8 cells row[x0 + kw + S*j], j < 8,
// cells outside [0, w) reading as `fill`. For S == 2 two neighbouring columns share their loads
// (even and odd lanes). For float and float16 those lanes come out in the order of
// _mm256_shuffle_ps (j = 0 1 4 5 2 3 6 7), and natural<S, T> restores it once per result.
// bfloat16 takes both columns from one 32-byte load, in order: cell 2j in the low and cell
// 2j + 1 in the high half of 32-bit lane j, so a shift and a mask widen them. KWc: the window
// width when known at compile time (the loop unrolls), else 0.
template <int S, int KWc, bool kEdge, typename T, typename F>
inline void for_window_row(const T* row, int64_t x0, int64_t w, int64_t KW, __m256 fill, F&& f) {
  if constexpr (KWc > 0) KW = KWc;
  if constexpr (S == 1) {
    for (int64_t kw = 0; kw < KW; ++kw) f(kw, load8<kEdge>(row, x0 + kw, w, fill));
  } else if constexpr (std::is_same_v<T, c10::BFloat16> && !kEdge) {
    const __m256i high = _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
    for (int64_t kw = 0; kw < KW; kw += 2) {
      const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + x0 + kw));
      f(kw, _mm256_castsi256_ps(_mm256_slli_epi32(p, 16)));
      if (kw + 1 < KW) f(kw + 1, _mm256_castsi256_ps(_mm256_and_si256(p, high)));
    }
  } else {
    constexpr bool kInOrder = kNaturalLanes<S, T>;
    for (int64_t kw = 0; kw < KW; kw += 2) {
      const __m256 lo = load8<kEdge>(row, x0 + kw, w, fill);
      const __m256 hi = load8<kEdge>(row, x0 + kw + 8, w, fill);
      const __m256 even = _mm256_shuffle_ps(lo, hi, 0x88);
      f(kw, kInOrder ? unshuffle(even) : even);
      if (kw + 1 < KW) {
        const __m256 odd = _mm256_shuffle_ps(lo, hi, 0xDD);
        f(kw + 1, kInOrder ? unshuffle(odd) : odd);
      }
    }
  }
}

template <int S, typename T>
inline __m256 natural(__m256 v) {
  if constexpr (kNaturalLanes<S, T>) {
    return v;
  } else {
    return unshuffle(v);
  }
}

// Start of the output chunk that begins at i: rows of at least 8 outputs end with a chunk moved
// back to finish exactly at OW (it recomputes a few outputs of the chunk before, identically), so
// every store is a full vector; shorter rows have one chunk and masked stores.
inline int64_t chunk_start(int64_t i, int64_t OW) {
  return OW >= 8 ? std::min(i, OW - 8) : i;
}

// Stores the first n (<= 8) lanes (kExact: as storef).
template <bool kExact = false>
inline void store8(float* dst, __m256 v, int64_t n) {
  if (n == 8) {
    _mm256_storeu_ps(dst, v);
  } else {
    _mm256_maskstore_ps(dst, lanes_inside(0, n), v);
  }
}
template <bool kExact = false, typename T>
inline void store8(T* dst, __m256 v, int64_t n) {
  if (n == 8) {
    storef<kExact>(dst, v);
  } else {
    T t[8];
    storef<kExact>(t, v);
    for (int64_t j = 0; j < n; ++j) dst[j] = t[j];
  }
}

// Stores the first n (<= 8) int32 lanes as window positions.
template <typename pos_t>
inline void store_pos8(pos_t* dst, __m256i p, int64_t n) {
  if constexpr (std::is_same_v<pos_t, uint8_t>) {
    if (n == 8) {  // values < 256: the saturating packs keep them
      const __m128i w16 = _mm_packus_epi32(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), _mm_packus_epi16(w16, w16));
      return;
    }
  } else {
    if (n == 8) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), p);
      return;
    }
  }
  alignas(32) int32_t t[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(t), p);
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<pos_t>(t[j]);
}

// Calls f(std::integral_constant<int, S>, std::integral_constant<int, KWc>) for the pool's W
// stride (1 or 2) and window width (2 and 3 at compile time, others 0 = run time).
template <typename F>
inline void with_fused_width(const PoolGeometry& g, F&& f) {
  using std::integral_constant;
  auto kw = [&](auto S) {
    switch (g.kernel[2]) {
      case 2: return f(S, integral_constant<int, 2>{});
      case 3: return f(S, integral_constant<int, 3>{});
      default: return f(S, integral_constant<int, 0>{});
    }
  };
  g.stride[2] == 1 ? kw(integral_constant<int, 1>{}) : kw(integral_constant<int, 2>{});
}

// Calls f(std::integral_constant<int, S>, std::integral_constant<int, KWc>,
// std::integral_constant<int, NRc>) as with_fused_width, with the rows per window (KD * KH: 1, or
// KWc in square 2d windows, or KWc * KWc in cubic 3d ones at compile time, others 0).
template <typename F>
inline void with_fused_shape(const PoolGeometry& g, F&& f) {
  using std::integral_constant;
  const int64_t nr = g.kernel[0] * g.kernel[1];
  with_fused_width(g, [&](auto S, auto KW) {
    constexpr int K = decltype(KW)::value;
    if (nr == 1) return f(S, KW, integral_constant<int, 1>{});
    if constexpr (K > 0) {
      if (g.kernel[0] == 1 && g.kernel[1] == K) return f(S, KW, integral_constant<int, K>{});
      if (g.kernel[0] == K && g.kernel[1] == K) return f(S, KW, integral_constant<int, K * K>{});
    }
    return f(S, KW, integral_constant<int, 0>{});
  });
}

// Offset of window row j (j = kd * KH + kh, scan order) from the window's first row, in cells of
// an NCDHW plane.
inline int64_t window_row_offset(const PoolGeometry& g, int64_t j) {
  const int64_t kd = j / g.kernel[1], kh = j % g.kernel[1];
  return (kd * g.dilation[0] * g.in[1] + kh * g.dilation[1]) * g.in[2];
}

// The input rows (pointers to their first cell) inside the window of output row (od, oh) of a
// plane, in scan order, and each one's window position of its first cell (kd * KH + kh) * KW.
template <typename T>
struct WindowRows {
  const PoolGeometry& g;
  std::vector<const T*> rows;
  std::vector<int32_t> bases;
  explicit WindowRows(const PoolGeometry& g_)
      : g(g_), rows(g_.kernel[0] * g_.kernel[1]), bases(rows.size()) {}
  // Fills rows/bases; returns how many there are. td, th: DimTable(g, 0 / 1, false).
  int64_t find(const T* in, int64_t plane, int64_t od, int64_t oh, const DimTable& td,
               const DimTable& th) {
    const int64_t IH = g.in[1], IW = g.in[2], KH = g.kernel[1], KW = g.kernel[2];
    int64_t nr = 0;
    for (int64_t kd = td.lo[od]; kd < td.hi[od]; ++kd) {
      const int64_t id = g.input_coord(0, od, kd);
      for (int64_t kh = th.lo[oh]; kh < th.hi[oh]; ++kh, ++nr) {
        rows[nr] = in + ((plane * g.in[0] + id) * IH + g.input_coord(1, oh, kh)) * IW;
        bases[nr] = static_cast<int32_t>((kd * KH + kh) * KW);
      }
    }
    return nr;
  }
};

// The fused forward's walk: for every chunk of 8 outputs (chunk_start) of every output row,
// chunk(r, od, oh, ow0, first, visit, edge), where `first` is the window position of the row's
// first in-input window cell and visit(f) calls f(window position in 8 int32 lanes, 8 cells,
// whether the cells begin a window row) over the window in scan order, cells outside the input
// reading as `fill`. Chunks whose cells all lie inside the row (edge: std::false_type) load
// without edge checks. Output rows whose window lies inside the input along D and H (all but the
// few at padded borders) find their input rows at fixed offsets from the first; with NRc (the
// number of such rows when known at compile time, else 0) the walk over them unrolls and their
// window positions are constants.
template <int S, int KWc, int NRc, typename T, typename Chunk>
void for_fused_chunks(const T* in, const PoolGeometry& g, int64_t planes, __m256 fill,
                      const Chunk& chunk) {
  const int64_t OD = g.out[0], OH = g.out[1], OW = g.out[2];
  const int64_t ID = g.in[0], IH = g.in[1], IW = g.in[2];
  const int64_t KD = g.kernel[0], KH = g.kernel[1], KW = g.kernel[2];
  const DimTable td(g, 0, false), th(g, 1, false);
  // Offsets of the window rows from the first, for output rows whose window lies inside the
  // input along D and H (with_fused_shape gives NRc = KD * KH or 0).
  std::vector<int64_t> full_off;
  if constexpr (NRc > 0) {
    TORCH_INTERNAL_ASSERT(KD * KH == NRc);
    for (int64_t j = 0; j < NRc; ++j) full_off.push_back(window_row_offset(g, j));
  }
  at::parallel_for(0, planes * OD * OH, grain_for(OW * g.window_cells()), [&](int64_t begin, int64_t end) {
    // What the chunks use, copied into locals: the vector stores may alias anything, so values
    // read through the closures' references would be reloaded after every store.
    const int64_t ow_n = OW, iw_n = IW, kw_n = KW, pad_w = g.pad[2];
    const int64_t reach = window_row_reach<S>(KW);
    const __m256 fill_v = fill;
    const Chunk ch = chunk;
    // The chunks of output row r, from its nr input rows (NR: nr at compile time, or 0).
    auto walk = [&](auto NR, int64_t r, int64_t od, int64_t oh, const T* const* rows,
                    const int32_t* bases, int64_t nr, int32_t first) {
      if constexpr (NR.value > 0) nr = NR.value;
      for (int64_t i = 0; i < ow_n; i += 8) {
        const int64_t ow0 = chunk_start(i, ow_n), x0 = ow0 * S - pad_w;
        // Two copies of the chunk: the interior one computes no edge masks at all.
        auto visit_with = [&](auto edge) {
          return [&, edge](auto&& f) {
            for (int64_t j = 0; j < nr; ++j) {
              const int32_t base = NR.value > 0 ? static_cast<int32_t>(j * kw_n) : bases[j];
              const __m256i kb = _mm256_set1_epi32(base);
              // Several input rows are several streams a few hundred bytes apart, which the
              // hardware prefetchers follow badly: four KiB ahead in each; two cache lines,
              // except in windows of four rows or more, where one is faster (NOTES §32). Short
              // rows and windows of one row too: without it a 2-core Xeon read them from memory
              // at 40–95 % of the rate it reaches with it, bfloat16 at 40–70 % (NOTES §66).
              if constexpr (!decltype(edge)::value) {
                if (nr >= 4) {
                  prefetch_ahead<4096, 1>(rows[j] + x0);
                } else {
                  prefetch_ahead<4096, 2>(rows[j] + x0);
                }
              }
              auto cell = [&](int64_t kw, __m256 v) {
                f(_mm256_add_epi32(kb, _mm256_set1_epi32(static_cast<int32_t>(kw))), v, kw == 0);
              };
              for_window_row<S, KWc, decltype(edge)::value>(rows[j], x0, iw_n, kw_n, fill_v, cell);
            }
          };
        };
        if (x0 >= 0 && x0 + reach <= iw_n) {
          ch(r, od, oh, ow0, first, visit_with(std::false_type{}), std::false_type{});
        } else {
          ch(r, od, oh, ow0, first, visit_with(std::true_type{}), std::true_type{});
        }
      }
    };
    WindowRows<T> wr(g);
    const int64_t* off = full_off.data();
    RowCounter it(begin, OD, OH);
    for (int64_t r = begin; r < end; ++r, it.next()) {
      const int64_t od = it.b, oh = it.c;
      if constexpr (NRc > 0) {
        // Output rows whose window lies inside the input along D and H.
        if (td.lo[od] == 0 && td.hi[od] == KD && th.lo[oh] == 0 && th.hi[oh] == KH) {
          const T* first_row =
              in + ((it.a * ID + g.input_coord(0, od, 0)) * IH + g.input_coord(1, oh, 0)) * IW;
          const T* rows[NRc];
          for (int j = 0; j < NRc; ++j) rows[j] = first_row + off[j];
          walk(std::integral_constant<int, NRc>{}, r, od, oh, rows, nullptr, NRc, 0);
          continue;
        }
      }
      const int64_t nr = wr.find(in, it.a, od, oh, td, th);
      const int32_t first = static_cast<int32_t>((td.lo[od] * KH + th.lo[oh]) * KW);
      walk(std::integral_constant<int, 0>{}, r, od, oh, wr.rows.data(), wr.bases.data(), nr, first);
    }
  });
}

// The maximum of the cells visit(f) passes to f(k, v, row_start), for the forward without
// positions, with torch's rules: a value replaces the maximum only if greater (of equal values,
// +0 and -0 too, the first in scan order stays), and a NaN anywhere in the window is the result.
// Each window row's maximum by _mm256_max_ps(new, max), which keeps max unless new is greater,
// the rows' folded the same way (short chains side by side), and the NaNs found apart, two cells
// per compare (unordered: either is NaN), then put into their lanes at the end. Two instructions
// a cell where compare-and-blend takes four. Cells outside the input read as -inf, which never
// wins.
template <typename Visit>
__attribute__((always_inline)) inline __m256 max_of_cells(Visit&& visit) {
  __m256 nan = _mm256_setzero_ps(), pend = nan;
  __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity()), rm = m;
  bool row_open = false, folded = false, pending = false;
  visit([&](__m256i, __m256 v, bool row_start) {
    if (row_start || !row_open) {
      if (row_open) {
        m = folded ? _mm256_max_ps(rm, m) : rm;
        folded = true;
      }
      rm = v;
      row_open = true;
    } else {
      rm = _mm256_max_ps(v, rm);
    }
    if (pending) nan = _mm256_or_ps(nan, _mm256_cmp_ps(pend, v, _CMP_UNORD_Q));
    pend = v;
    pending = !pending;
  });
  m = folded ? _mm256_max_ps(rm, m) : rm;
  if (pending) nan = _mm256_or_ps(nan, _mm256_cmp_ps(pend, pend, _CMP_UNORD_Q));
  return _mm256_blendv_ps(m, _mm256_set1_ps(std::numeric_limits<float>::quiet_NaN()), nan);
}

template <int S, int KWc, int NRc, bool kPos, typename pos_t, typename T>
void max_rows_fused(const T* in, T* out, pos_t* pos, const PoolGeometry& g,
                    int64_t planes) {
  const int64_t OW = g.out[2];
  const DimTable tw(g, 2, false);
  // First in-input window column per output, for windows whose values never replace -inf.
  std::vector<int32_t> wlo(OW + 8, 0);
  for (int64_t ow = 0; ow < OW; ++ow) wlo[ow] = static_cast<int32_t>(tw.lo[ow]);
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  const int32_t* wl = wlo.data();
  for_fused_chunks<S, KWc, NRc>(in, g, planes, ninf, [=](int64_t r, int64_t, int64_t, int64_t ow0,
                                                    int32_t first, auto&& visit, auto edge) {
    constexpr bool kEdge = decltype(edge)::value;
    // (m, b): maximum and position so far; (cm, cb) takes the next candidate.
    __m256 m = ninf, b = _mm256_castsi256_ps(_mm256_set1_epi32(kEdge ? -1 : first));
    if constexpr (!kPos) {
      m = max_of_cells(visit);
    } else if constexpr (kEdge) {
      // Cells outside the input read as -inf and never win; their lanes keep "never" (-1).
      visit([&](__m256i k, __m256 v, bool) { take_torch(m, b, v, _mm256_castsi256_ps(k)); });
    } else {
      // Every cell is inside the input. Each window row is reduced on its own, starting from
      // its first cell, then folded into the window's in scan order: the rows' chains run side
      // by side instead of one chain through the whole window (NOTES §49). Ties keep the earlier
      // row, as the single chain would. Values and positions by take_greater, the NaNs found
      // apart as max_of_cells does; a chunk with a NaN is redone by torch's compare-and-blend
      // chain (rare; NOTES §73). The window's first cell is at `first`, which is then the
      // position when nothing beats -inf.
      __m256 rm = m, rb = b, nan = _mm256_setzero_ps(), pend = nan;
      bool row_open = false, folded = false, pending = false;
      auto fold = [&] {
        if (!folded) {
          m = rm;
          b = rb;
          folded = true;
        } else {
          take_greater(m, b, rm, _mm256_castps_si256(rb));
        }
      };
      visit([&](__m256i k, __m256 v, bool row_start) {
        if (row_start) {
          if (row_open) fold();
          rm = v;
          rb = _mm256_castsi256_ps(k);
          row_open = true;
        } else {
          take_greater(rm, rb, v, k);
        }
        if (pending) nan = _mm256_or_ps(nan, _mm256_cmp_ps(pend, v, _CMP_UNORD_Q));
        pend = v;
        pending = !pending;
      });
      fold();
      if (pending) nan = _mm256_or_ps(nan, _mm256_cmp_ps(pend, pend, _CMP_UNORD_Q));
      if (__builtin_expect(_mm256_movemask_ps(nan) != 0, 0)) {
        m = ninf;
        b = _mm256_castsi256_ps(_mm256_set1_epi32(first));
        visit([&](__m256i k, __m256 v, bool) { take_torch(m, b, v, _mm256_castsi256_ps(k)); });
      }
    }
    const int64_t n = std::min<int64_t>(8, OW - ow0);
    store8<true>(out + r * OW + ow0, natural<S, T>(m), n);
    if (kPos && !kEdge) {
      store_pos8(pos + r * OW + ow0, _mm256_castps_si256(natural<S, T>(b)), n);
    } else if (kPos) {
      const __m256i bn = _mm256_castps_si256(natural<S, T>(b));
      const __m256i dflt = _mm256_add_epi32(
          _mm256_set1_epi32(first),
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wl + ow0)));
      const __m256i never = _mm256_cmpgt_epi32(_mm256_setzero_si256(), bn);
      store_pos8(pos + r * OW + ow0, _mm256_blendv_epi8(bn, dflt, never), n);
    }
  });
}

// NCHW windows two cells wide at W stride 2 that all lie inside the input (no padding, none past
// the end), NR = KD * KH window rows, rows of at least 8 outputs, max and average: small planes
// spend most of their time per row and per chunk in for_fused_chunks' general walk (edge checks,
// row tables); this walk finds each output row's input rows at fixed offsets and does nothing
// else. Max (max_tiles_w2): each window row's two cells are reduced by one `max` (first of equals
// stays), the rows' maxima folded the same way in scan order, and the NaNs found by one unordered
// compare per row; a chunk with a NaN in it is redone by the single chain of torch's rule (rare).
// Average (avg_tiles_w2): the cells summed in scan order from 0, as avg_rows_fused does.
inline bool tiles_w2_ok(const PoolGeometry& g) {
  for (int d = 0; d < 3; ++d) {
    if (g.pad[d] != 0 || g.input_coord(d, g.out[d] - 1, g.kernel[d] - 1) >= g.in[d]) return false;
  }
  const int64_t nr = g.kernel[0] * g.kernel[1];
  return g.kernel[2] == 2 && g.stride[2] == 2 && g.dilation[2] == 1 && g.out[2] >= 8 &&
         (nr == 1 || nr == 2 || nr == 4) && g.in[2] < (1 << 30);
}

// The walk: chunk(o, dst, cells) for every chunk of 8 outputs (o: the flat index of its first
// output; rows end with a chunk moved back to finish exactly at OW), dst: where the chunk's 8
// outputs go (out + o, or their place in the staging buffer of a large float output, written out
// by non-temporal stores), cells(j, c) setting c[0], c[1] to the chunk's even and odd cells of
// window row j (j < NR, in scan order).
template <int NR, typename T, typename Chunk>
void for_tiles_w2(const T* in, T* out, const PoolGeometry& g, int64_t planes, const Chunk& chunk) {
  const int64_t OD = g.out[0], OH = g.out[1], OW = g.out[2];
  const int64_t ID = g.in[0], IH = g.in[1], IW = g.in[2];
  int64_t off[NR];
  for (int j = 0; j < NR; ++j) off[j] = window_row_offset(g, j);
  const int64_t sd = g.stride[0], sh = g.stride[1];
  const bool staged = forward_streams<T>(planes * OD * OH * OW);
  at::parallel_for(0, planes * OD * OH, grain_for(OW * 2 * NR), [&](int64_t begin, int64_t end) {
    StagedRuns<T> st(staged, staged_whole<T>(OW, kOutRunBytes));
    // Locals, as in for_fused_chunks: the stores may alias what the closures reference.
    const int64_t ow_n = OW, iw_n = IW, ih_n = IH, id_n = ID, sd_n = sd, sh_n = sh;
    int64_t o[NR];
    for (int j = 0; j < NR; ++j) o[j] = off[j];
    const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    const Chunk ch = chunk;
    RowCounter it(begin, OD, OH);
    // The first window row of output row r, stepped from row to row (one row of outputs further
    // along H, else one along D, else the next plane) rather than computed from (plane, od, oh).
    const T* row0 = in + ((it.a * id_n + it.b * sd_n) * ih_n + it.c * sh_n) * iw_n;
    const int64_t step_h = sh_n * iw_n, step_d = (sd_n * ih_n - (OH - 1) * sh_n) * iw_n,
                  step_p = (id_n - (OD - 1) * sd_n) * ih_n * iw_n - (OH - 1) * sh_n * iw_n;
    for (int64_t r = begin; r < end; ++r, it.next(),
                 row0 += it.c != 0 ? step_h : it.b != 0 ? step_d : step_p) {
      T* const dst = st.at(out + r * ow_n, ow_n);
      for (int64_t i = 0; i < ow_n; i += 8) {
        const int64_t ow0 = std::min(i, ow_n - 8), x0 = 2 * ow0;
        auto cells = [&](int j, __m256* c) {
          // As in for_fused_chunks (NOTES §29, §32, §66), but the 2-byte types' windows of 4
          // rows (3d) 8 KiB ahead, which takes 40 % off bfloat16 pool3d where float32 is best
          // at 4 (§63).
          if (NR >= 4) {
            prefetch_ahead<sizeof(T) == 2 ? 8192 : 4096, 1>(row0 + o[j] + x0);
          } else {
            prefetch_ahead<4096, 1>(row0 + o[j] + x0);
          }
          for_window_row<2, 2, false>(row0 + o[j], x0, iw_n, 2, ninf,
                                      [&](int64_t kw, __m256 v) { c[kw] = v; });
        };
        ch(r * ow_n + ow0, dst + ow0, cells);
      }
    }
  });
}

// A chunk of windows two cells wide over NR rows, redone by torch's compare-and-blend chain (it
// holds a NaN): m and b become its maxima and their positions, cells(j, c) giving window row j's
// even and odd cells.
template <int NR, typename Cells>
__attribute__((always_inline)) inline void max_w2_by_torch_chain(Cells&& cells, __m256& m, __m256& b) {
  m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  b = _mm256_setzero_ps();
  for (int j = 0; j < NR; ++j) {
    __m256 c[2];
    cells(j, c);
    for (int kw = 0; kw < 2; ++kw) take_torch(m, b, c[kw], _mm256_castsi256_ps(_mm256_set1_epi32(2 * j + kw)));
  }
}

template <int NR, bool kPos, typename pos_t, typename T>
void max_tiles_w2(const T* in, T* out, pos_t* pos, const PoolGeometry& g, int64_t planes) {
  for_tiles_w2<NR>(in, out, g, planes, [=](int64_t o, T* dst, auto&& cells) {
    __m256 nan = _mm256_setzero_ps();
    __m256 rm[NR], rb[NR];
    for (int j = 0; j < NR; ++j) {
      __m256 c[2];
      cells(j, c);
      rm[j] = _mm256_max_ps(c[1], c[0]);
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(c[0], c[1], _CMP_UNORD_Q));
      if (kPos) {  // 2j, or 2j + 1 where the compare's all-ones (-1) says the odd cell is greater
        rb[j] = _mm256_castsi256_ps(_mm256_sub_epi32(
            _mm256_set1_epi32(2 * j), _mm256_castps_si256(_mm256_cmp_ps(c[1], c[0], _CMP_GT_OQ))));
      }
    }
    // Row j2 after row j: a later row wins only if greater.
    auto fold = [&](int j, int j2) {
      if (kPos) {
        take_greater(rm[j], rb[j], rm[j2], _mm256_castps_si256(rb[j2]));
      } else {
        rm[j] = _mm256_max_ps(rm[j2], rm[j]);
      }
    };
    if constexpr (NR == 2) fold(0, 1);
    if constexpr (NR == 4) {
      fold(0, 1);
      fold(2, 3);
      fold(0, 2);
    }
    __m256 m = rm[0], b = kPos ? rb[0] : _mm256_setzero_ps();
    if (__builtin_expect(_mm256_movemask_ps(nan) != 0, 0)) max_w2_by_torch_chain<NR>(cells, m, b);
    store8<true>(dst, natural<2, T>(m), 8);
    if (kPos) store_pos8(pos + o, _mm256_castps_si256(natural<2, T>(b)), 8);
  });
}

// tiles_w2_ok's windows of 2 x 2 x 2 cells (NCDHW, NR = 4 rows from two depth slices): for_tiles_w2
// made each output row from its four window rows, two in each of two input slices at once, two
// streams a slice apart, and read the input at 60-85 % of the rate of the same bytes pooled 2 x 2
// as one slice (NOTES §109, §111). This walk does each output slice in two passes, each over one
// input slice, so the input is read in its own order: first(kept, cells) for every chunk of 8
// outputs of the slice, row by row, with cells(j, c) giving the chunk's even and odd cells of window
// row j < 2 (the first input slice) and kept the chunk's kKept vectors of floats in a buffer in L1
// or L2; then second(kept, o, dst, cells) for the same chunks in the same order, where cells takes
// j < 4 (2 and 3: the second input slice), o is the chunk's first output and dst where its 8
// outputs go (staged and streamed out as in for_tiles_w2).
inline bool tiles_w2_slices_ok(const PoolGeometry& g) {
  return tiles_w2_ok(g) && g.kernel[0] == 2 && g.kernel[1] == 2;
}

template <int kKept, typename T, typename First, typename Second>
void for_tiles_w2_slices(const T* in, T* out, const PoolGeometry& g, int64_t planes,
                         const First& first, const Second& second) {
  const int64_t OD = g.out[0], OH = g.out[1], OW = g.out[2];
  const int64_t ID = g.in[0], IH = g.in[1], IW = g.in[2];
  const int64_t chunks = (OW + 7) / 8;
  const bool staged = forward_streams<T>(planes * OD * OH * OW);
  at::parallel_for(0, planes * OD, grain_for(OH * OW * 8), [&](int64_t begin, int64_t end) {
    StagedRuns<T> st(staged, staged_whole<T>(OW, kOutRunBytes));
    // Locals, as in for_fused_chunks: the stores may alias what the closures reference.
    const int64_t ow_n = OW, oh_n = OH, iw_n = IW, od_n = OD, id_n = ID, slice = IH * IW;
    const int64_t step_h = g.stride[1] * IW, sd = g.stride[0];
    const int64_t off[4] = {0, window_row_offset(g, 1), window_row_offset(g, 2), window_row_offset(g, 3)};
    const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    const First f1 = first;
    const Second f2 = second;
    PageBuffer<float> kept_buf(OH * chunks * 8 * kKept);
    float* const kept = kept_buf.get();
    for (int64_t s = begin; s < end; ++s) {
      const T* const a0 = in + ((s / od_n) * id_n + s % od_n * sd) * slice;
      for (int pass = 0; pass < 2; ++pass) {
        float* kp = kept;
        for (int64_t oh = 0; oh < oh_n; ++oh) {
          const T* const row0 = a0 + oh * step_h;
          const int64_t o_row = (s * oh_n + oh) * ow_n;
          T* const dst = pass == 0 ? nullptr : st.at(out + o_row, ow_n);
          for (int64_t i = 0; i < ow_n; i += 8, kp += 8 * kKept) {
            const int64_t ow0 = std::min(i, ow_n - 8), x0 = 2 * ow0;
            auto cells = [&](int j, __m256* c) __attribute__((always_inline)) {
              prefetch_ahead<4096, 1>(row0 + off[j] + x0);
              for_window_row<2, 2, false>(row0 + off[j], x0, iw_n, 2, ninf, [&](int64_t kw, __m256 v) { c[kw] = v; });
            };
            if (pass == 0) {
              f1(kp, cells);
            } else {
              f2(kp, o_row + ow0, dst + ow0, cells);
            }
          }
        }
      }
    }
  });
}

// Max over 2 x 2 x 2 windows (for_tiles_w2_slices): the first slice's two-row maxima, positions
// (0-3) and NaN test are kept, the second slice's (4-7) folded into them by take_greater (a later
// slice wins only if greater, so the first of equal values stays). A chunk with a NaN in either
// slice is redone by torch's compare-and-blend chain over its eight cells (rare).
template <bool kPos, typename pos_t, typename T>
void max_tiles_w2_slices(const T* in, T* out, pos_t* pos, const PoolGeometry& g, int64_t planes) {
  // Window rows j0 and j0 + 1: their maximum m, its position b (2 j0 + 0-3, the first of equals)
  // and the NaN test.
  auto two_rows = [](auto&& cells, int j0, __m256& m, __m256& b, __m256& nan) __attribute__((always_inline)) {
    __m256 c[2][2];
    cells(j0, c[0]);
    cells(j0 + 1, c[1]);
    const __m256 m1 = _mm256_max_ps(c[1][1], c[1][0]);
    m = _mm256_max_ps(c[0][1], c[0][0]);
    nan = _mm256_or_ps(_mm256_cmp_ps(c[0][0], c[0][1], _CMP_UNORD_Q),
                       _mm256_cmp_ps(c[1][0], c[1][1], _CMP_UNORD_Q));
    if (kPos) {  // 2j, or 2j + 1 where the odd cell is greater
      b = _mm256_castsi256_ps(_mm256_sub_epi32(
          _mm256_set1_epi32(2 * j0), _mm256_castps_si256(_mm256_cmp_ps(c[0][1], c[0][0], _CMP_GT_OQ))));
      const __m256i b1 = _mm256_sub_epi32(
          _mm256_set1_epi32(2 * j0 + 2), _mm256_castps_si256(_mm256_cmp_ps(c[1][1], c[1][0], _CMP_GT_OQ)));
      take_greater(m, b, m1, b1);
    } else {
      m = _mm256_max_ps(m1, m);
    }
  };
  for_tiles_w2_slices<kPos ? 3 : 2>(
      in, out, g, planes,
      [=](float* kept, auto&& cells) {
        __m256 m, b, nan;
        two_rows(cells, 0, m, b, nan);
        _mm256_store_ps(kept, m);
        _mm256_store_ps(kept + 8, nan);
        if (kPos) _mm256_store_ps(kept + 16, b);
      },
      [=](const float* kept, int64_t o, T* dst, auto&& cells) {
        __m256 m2, b2, nan;
        two_rows(cells, 2, m2, b2, nan);
        __m256 m = _mm256_load_ps(kept), b = kPos ? _mm256_load_ps(kept + 16) : m;
        if (kPos) {
          take_greater(m, b, m2, _mm256_castps_si256(b2));
        } else {
          m = _mm256_max_ps(m2, m);
        }
        if (__builtin_expect(_mm256_movemask_ps(_mm256_or_ps(nan, _mm256_load_ps(kept + 8))) != 0, 0)) {
          max_w2_by_torch_chain<4>(cells, m, b);
        }
        store8<true>(dst, natural<2, T>(m), 8);
        if (kPos) store_pos8(pos + o, _mm256_castps_si256(natural<2, T>(b)), 8);
      });
}

// NCHW float and half-type windows three cells wide at W stride 2 with at most one padded column
// (resnet's 3 × 3 stride-2 stem pool, 1d pools of 3 at stride 2), NR = KD * KH window rows (1 or
// 3), rows of at least 8 outputs whose last window ends inside the row, max: the general walk
// spends about as long on its bookkeeping (row tables, edge checks, counters kept on the stack) as
// on the chunks' own work. Here every chunk of an output row loads without checks: window rows
// cut off by padding along D and H are replaced by a repeat of the last row inside the input, and
// the padded column before the row (the first chunk's first cell) by a repeat of the row's first
// cell, whose position it reports. A repeated cell equals the cell before it in scan order, so it
// never changes the maximum, which of equal values (+0, -0) is taken, or (being no greater) the
// position. The third column comes from loads at x0 + 2 and x0 + 9 (float; not x0 + 10) or x0 + 1
// (bfloat16's odd cells), so the last chunk reads no cell past its last window. Rows reduced and
// folded in scan order, positions by take_greater, and NaNs found two cells per compare as in
// max_of_cells; a chunk with a NaN is redone by torch's compare-and-blend chain (rare). Large
// float outputs are staged a few rows at a time and written out by non-temporal stores.
inline bool w3s2_ok(const PoolGeometry& g) {
  const int64_t OW = g.out[2], IW = g.in[2], nr = g.kernel[0] * g.kernel[1];
  return g.kernel[2] == 3 && g.stride[2] == 2 && g.dilation[2] == 1 && g.pad[2] <= 1 && OW >= 8 &&
         2 * (OW - 1) - g.pad[2] + 2 < IW && (nr == 1 || nr == 3) && IW < (1 << 30);
}

template <int NR, bool kPos, typename pos_t, typename T>
void max_w3s2(const T* in, T* out, pos_t* pos, const PoolGeometry& g, int64_t planes) {
  const int64_t OD = g.out[0], OH = g.out[1], OW = g.out[2];
  const DimTable td(g, 0, false), th(g, 1, false);
  const bool staged = forward_streams<T>(planes * OD * OH * OW);
  at::parallel_for(0, planes * OD * OH, grain_for(OW * 3 * NR), [&](int64_t begin, int64_t end) {
    StagedRuns<T> st(staged, staged_whole<T>(OW, kOutRunBytes));
    // Locals, as in for_fused_chunks: the stores may alias what the closures reference.
    const int64_t ow_n = OW, pad_w = g.pad[2];
    const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    const __m256i first_twice = _mm256_setr_epi32(0, 0, 1, 2, 3, 4, 5, 6);
    // Window positions of the first chunk's even column: the repeated first cell of output 0
    // (lane 0) reports the cell it repeats (kw 1).
    const __m256i first_kw = _mm256_setr_epi32(1, 0, 0, 0, 0, 0, 0, 0);
    const __m256i high = _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
    WindowRows<T> wr(g);
    // Inference over 3 window rows: at stride 2 an output row's bottom window row is the next
    // output row's top one, so the bottom row's three-cell maxima are kept (when it holds no NaN)
    // and the next output row reads them instead of that row's cells (NOTES §98). They are kept
    // as the chunks hold them (lanes in shuffle order), 8 a chunk, at the chunk's slot i rather
    // than at its first output: a row's last chunk overlaps the one before it.
    constexpr bool kKeep = !kPos && NR == 3;
    std::vector<float> kept_rows(kKeep ? ow_n + 8 : 0);
    float* const kept = kept_rows.data();
    const T* kept_row = nullptr;  // the input row whose maxima `kept` holds, if any
    // Output rows whose window lies inside the input along D and H (all but the few at padded
    // borders) find their window rows at fixed offsets from the first, without WindowRows' search.
    const int64_t KD = g.kernel[0], KH = g.kernel[1], KW = g.kernel[2];
    const int64_t ID = g.in[0], IH = g.in[1], IW = g.in[2];
    int64_t off[NR];
    for (int j = 0; j < NR; ++j) off[j] = window_row_offset(g, j);
    RowCounter it(begin, OD, OH);
    for (int64_t r = begin; r < end; ++r, it.next()) {
      const T* rows[NR];
      int32_t base[NR];
      int64_t nr = NR;
      if (td.lo[it.b] == 0 && td.hi[it.b] == KD && th.lo[it.c] == 0 && th.hi[it.c] == KH) {
        const T* row0 =
            in + ((it.a * ID + g.input_coord(0, it.b, 0)) * IH + g.input_coord(1, it.c, 0)) * IW;
        for (int j = 0; j < NR; ++j) {
          rows[j] = row0 + off[j];
          base[j] = static_cast<int32_t>(j * KW);
        }
      } else {
        nr = wr.find(in, it.a, it.b, it.c, td, th);
        for (int j = 0; j < NR; ++j) {
          rows[j] = wr.rows[std::min<int64_t>(j, nr - 1)];
          base[j] = wr.bases[std::min<int64_t>(j, nr - 1)];
        }
      }
      const bool reuse = kKeep && nr == NR && rows[0] == kept_row;
      __m256 bottom_nan = _mm256_setzero_ps();
      const int64_t o = r * ow_n;
      T* const dst = st.at(out + o, ow_n);
      auto chunk = [&](int64_t ow0, int64_t slot, auto left) {
        constexpr bool kLeft = decltype(left)::value;
        const int64_t x0 = 2 * ow0 - pad_w;
        // The window's cells in scan order: even (kw 0), odd (kw 1) and next even (kw 2) columns
        // of each row, lanes in _mm256_shuffle_ps order; k[]: their window positions.
        // Zeroed: a kept top row leaves c[0..2] unloaded, which the compiler cannot see is never
        // read then.
        __m256 c[3 * NR] = {};
        __m256i k[3 * NR];
        auto load_row = [&](int j) {
          const T* row = rows[j];
          prefetch_ahead<4096, 2>(row + x0 + 1);
          if constexpr (!std::is_same_v<T, c10::BFloat16>) {  // float, float16 (converted)
            const __m256 a = kLeft ? _mm256_permutevar8x32_ps(loadf(row), first_twice)
                                   : loadf(row + x0);
            const __m256 b = loadf(row + (x0 + 8));
            c[3 * j] = _mm256_shuffle_ps(a, b, 0x88);
            c[3 * j + 1] = _mm256_shuffle_ps(a, b, 0xDD);
            c[3 * j + 2] = _mm256_shuffle_ps(loadf(row + (x0 + 2)), loadf(row + (x0 + 9)), 0xD8);
          } else {
            // bfloat16, as for_window_row takes it: 16 cells a load, the even ones in the low
            // and the odd ones in the high half of each 32-bit lane, in order.
            const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + (x0 + 1)));
            c[3 * j + 2] = _mm256_castsi256_ps(_mm256_and_si256(q, high));
            if (kLeft) {  // q holds cells 0 .. 15: kw 1 its even cells, kw 0 the odd ones moved up
              c[3 * j + 1] = _mm256_castsi256_ps(_mm256_slli_epi32(q, 16));
              c[3 * j] = _mm256_blend_ps(_mm256_permutevar8x32_ps(c[3 * j + 2], first_twice),
                                         c[3 * j + 1], 1);
            } else {
              const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + x0));
              c[3 * j] = _mm256_castsi256_ps(_mm256_slli_epi32(p, 16));
              c[3 * j + 1] = _mm256_castsi256_ps(_mm256_and_si256(p, high));
            }
          }
          if (kPos) {
            const __m256i kb = _mm256_set1_epi32(base[j]);
            k[3 * j] = kLeft ? _mm256_add_epi32(kb, first_kw) : kb;
            k[3 * j + 1] = _mm256_add_epi32(kb, _mm256_set1_epi32(1));
            k[3 * j + 2] = _mm256_add_epi32(kb, _mm256_set1_epi32(2));
          }
        };
        for (int j = 0; j < NR; ++j) {  // a fixed count, so that c[] stays in registers
          if (j > 0 || !reuse) load_row(j);
        }
        __m256 m = ninf, b = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
        for (int j = 0; j < NR; ++j) {
          if (kPos) {
            __m256 rm = c[3 * j], rb = _mm256_castsi256_ps(k[3 * j]);
            take_greater(rm, rb, c[3 * j + 1], k[3 * j + 1]);
            take_greater(rm, rb, c[3 * j + 2], k[3 * j + 2]);
            if (j == 0) {
              m = rm;
              b = rb;
            } else {
              take_greater(m, b, rm, _mm256_castps_si256(rb));
            }
          } else {
            const __m256 rm =
                kKeep && j == 0 && reuse
                    ? _mm256_loadu_ps(kept + slot)
                    : _mm256_max_ps(c[3 * j + 2], _mm256_max_ps(c[3 * j + 1], c[3 * j]));
            if (kKeep && j == NR - 1) _mm256_storeu_ps(kept + slot, rm);  // after the load
            m = j == 0 ? rm : _mm256_max_ps(rm, m);
          }
        }
        if constexpr (kKeep) {  // the NaNs row by row: the bottom row's decide whether it is kept
          const __m256 bottom = _mm256_or_ps(_mm256_cmp_ps(c[6], c[7], _CMP_UNORD_Q),
                                             _mm256_cmp_ps(c[8], c[8], _CMP_UNORD_Q));
          bottom_nan = _mm256_or_ps(bottom_nan, bottom);
          nan = _mm256_or_ps(bottom, _mm256_or_ps(_mm256_cmp_ps(c[3], c[4], _CMP_UNORD_Q),
                                                  _mm256_cmp_ps(c[5], c[5], _CMP_UNORD_Q)));
          if (!reuse) {
            nan = _mm256_or_ps(nan, _mm256_or_ps(_mm256_cmp_ps(c[0], c[1], _CMP_UNORD_Q),
                                                 _mm256_cmp_ps(c[2], c[2], _CMP_UNORD_Q)));
          }
        } else {
          for (int q = 0; q < 3 * NR; q += 2) {
            nan = _mm256_or_ps(nan,
                               _mm256_cmp_ps(c[q], c[std::min(q + 1, 3 * NR - 1)], _CMP_UNORD_Q));
          }
        }
        if (__builtin_expect(_mm256_movemask_ps(nan) != 0, 0)) {
          if (reuse) load_row(0);
          m = ninf;
          for (int q = 0; q < 3 * NR; ++q) {
            if (kPos) {
              take_torch(m, b, c[q], _mm256_castsi256_ps(k[q]));
            } else {
              m = _mm256_blendv_ps(m, c[q], take_mask(c[q], m));
            }
          }
        }
        store8<true>(dst + ow0, natural<2, T>(m), 8);
        if (kPos) store_pos8(pos + o + ow0, _mm256_castps_si256(natural<2, T>(b)), 8);
      };
      int64_t i = 0;
      if (pad_w) {
        chunk(0, 0, std::true_type{});
        i = 8;
      }
      for (; i < ow_n; i += 8) chunk(std::min(i, ow_n - 8), i, std::false_type{});
      if constexpr (kKeep) {
        kept_row = nr == NR && _mm256_movemask_ps(bottom_nan) == 0 ? rows[NR - 1] : nullptr;
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Fused AVX2 channels-last forwards (float): the channels of one output cell are reduced over its
// window in registers, 32 channels (4 vectors) at a time, then 8 at a time, the last block masked.

// Software prefetch of a few ranges (whole rows) spread over the steps of a loop: add() the
// ranges, then step(k, n) at each step k of n issues the next equal share of their cache lines,
// in order, into L2. The channels-last window kernels read several rows side by side, each
// IW * C values long: streams far apart, which the hardware prefetchers (AMD's, Intel's) do not
// keep ahead of (NOTES §92, §114). So while one row of results is computed, the rows that the next one adds are
// prefetched. Only for data of kAheadMinBytes or more, which comes from memory: from the last-level
// cache the prefetches cost more than they saved; and never more than kMaxBytes at a time, which
// would not stay in L2 until read.
constexpr int64_t kAheadMinBytes = int64_t{16} << 20;

class SpreadPrefetch {
 public:
  void clear() {
    ptr_.clear();
    lines_.clear();
    total_ = issued_ = range_ = line_ = 0;
    over_ = false;
  }
  void add(const void* p, int64_t bytes) {
    if (bytes <= 0 || over_) return;
    ptr_.push_back(static_cast<const char*>(p));
    lines_.push_back((bytes + 63) / 64);
    total_ += lines_.back();
    if (total_ * 64 > kMaxBytes) {  // none of them, then
      over_ = true;
      total_ = 0;
    }
  }
  void step(int64_t k, int64_t n) {
    for (const int64_t want = (k + 1) * total_ / n; issued_ < want; ++issued_) {
      _mm_prefetch(ptr_[range_] + 64 * line_, _MM_HINT_T1);
      if (++line_ == lines_[range_]) {
        line_ = 0;
        ++range_;
      }
    }
  }

 private:
  static constexpr int64_t kMaxBytes = 512 * 1024;
  std::vector<const char*> ptr_;
  std::vector<int64_t> lines_;
  int64_t total_ = 0, issued_ = 0, range_ = 0, line_ = 0;
  bool over_ = false;
};

// Whether any of the n values at p is a NaN: floats by unordered compares, two vectors each; the
// half types by their bits, 16 values an integer compare.
inline bool any_nan(const float* p, int64_t n) {
  __m256 u = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    u = _mm256_or_ps(u, _mm256_cmp_ps(_mm256_loadu_ps(p + i), _mm256_loadu_ps(p + i + 8), _CMP_UNORD_Q));
  }
  if (i + 8 <= n) {
    const __m256 v = _mm256_loadu_ps(p + i);
    u = _mm256_or_ps(u, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    i += 8;
  }
  if (_mm256_movemask_ps(u) != 0) return true;
  for (; i < n; ++i) {
    if (std::isnan(p[i])) return true;
  }
  return false;
}
template <typename T, if_half<T> = 0>
inline bool any_nan(const T* p, int64_t n) {
  // |x| above the infinity's bits: the exponent all ones and a mantissa not 0
  const __m256i mag = _mm256_set1_epi16(0x7FFF);
  const __m256i inf = _mm256_set1_epi16(std::is_same_v<T, c10::BFloat16> ? 0x7F80 : 0x7C00);
  __m256i u = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i));
    u = _mm256_or_si256(u, _mm256_cmpgt_epi16(_mm256_and_si256(x, mag), inf));
  }
  if (!_mm256_testz_si256(u, u)) return true;
  for (; i < n; ++i) {
    if (std::isnan(static_cast<float>(p[i]))) return true;
  }
  return false;
}

// The in-input cells of one output cell's window: element offsets of their channel vectors and
// their window positions, in scan order. for_cl_windows(g, N, C, in, out, cell) calls cell(w, dst)
// for each output cell in order, dst: where its C outputs go (out + w.o * C, or their place in
// the staging buffer of a large float output, written out a row at a time by non-temporal
// stores). With kNanRows, each input row is searched for NaNs once, when an output row first
// reads it, and w.nan_rows says whether one of the rows the cell's output row reads holds one:
// the max kernels then need no NaN test in their window loops (NOTES §96).
struct ClWindow {
  int64_t o, od, oh, ow;  // flat output cell and its coordinates
  int64_t base;           // cell j's channel vector starts at base + offs[j]
  const int64_t* offs;
  const int32_t* ks;
  int64_t cells;
  int32_t first;  // position of the first in-input cell (reported when nothing beats -inf)
  bool nan_rows;  // kNanRows: a NaN in the input rows of this output row
  bool stream;    // float cells of whole cache lines of a large output: see cell_store
};

// Whether input rows hold a NaN, each searched once: rows are asked for in rising order, a few
// output rows at a time, so the last `keep` answers are kept.
template <typename T>
class NanRows {
 public:
  NanRows(const T* in, int64_t row_len, int64_t keep) : in_(in), len_(row_len), keep_(keep) {}
  bool has_nan(int64_t row) {
    for (const auto& [r, nan] : seen_) {
      if (r == row) return nan;
    }
    const bool nan = any_nan(in_ + row * len_, len_);
    if (static_cast<int64_t>(seen_.size()) == keep_) seen_.erase(seen_.begin());
    seen_.emplace_back(row, nan);
    return nan;
  }

 private:
  const T* in_;
  int64_t len_, keep_;
  std::vector<std::pair<int64_t, bool>> seen_;
};

// Whether a large float channels-last result (a forward's output, a backward's gradient) is
// written cell by cell straight from the registers by non-temporal stores rather than staged
// row by row: where its cells are whole cache lines (C a multiple of 16, the block aligned).
// Staged rows go out in bursts of up to 32 KiB, during which the kernel's loads wait; stores
// spread over the row do not hold them up, and skip the staging copy (NOTES §99; on the Xeon VM
// too, §114).
template <typename T>
inline bool cells_stream_direct(const T* dst, int64_t C) {
  return std::is_same_v<T, float> && C % 16 == 0 &&
         reinterpret_cast<uintptr_t>(dst) % 64 == 0;
}

template <bool kNanRows = false, typename T, typename Cell>
void for_cl_windows(const PoolGeometry& g, int64_t N, int64_t C, const T* in, T* out, Cell&& cell) {
  const int64_t OD = g.out[0], OH = g.out[1], OW = g.out[2];
  const int64_t ID = g.in[0], IH = g.in[1], IW = g.in[2], KH = g.kernel[1], KW = g.kernel[2];
  const DimTable td(g, 0, false), th(g, 1, false), tw(g, 2, false);
  // Windows that lie inside the input: offsets from the window's first cell, fixed.
  std::vector<int64_t> rel;
  std::vector<int32_t> all_ks;
  for (int64_t kd = 0; kd < g.kernel[0]; ++kd) {
    for (int64_t kh = 0; kh < KH; ++kh) {
      for (int64_t kw = 0; kw < KW; ++kw) {
        rel.push_back(((kd * g.dilation[0] * IH + kh * g.dilation[1]) * IW + kw * g.dilation[2]) * C);
        all_ks.push_back(static_cast<int32_t>(rel.size() - 1));
      }
    }
  }
  const int64_t ncells = static_cast<int64_t>(rel.size());
  const bool streamed = forward_streams<T>(N * OD * OH * OW * C);
  const bool direct = streamed && cells_stream_direct(out, C);
  const bool staged = streamed && !direct;
  const bool ahead = N * ID * IH * IW * C * static_cast<int64_t>(sizeof(T)) >= kAheadMinBytes;
  at::parallel_for(0, N * OD * OH, grain_for(OW * C * g.window_cells()), [&](int64_t begin, int64_t end) {
    StagedRuns<T> st(staged, staged_whole<T>(OW * C, kOutRunBytes));
    SpreadPrefetch next_rows;
    NanRows<T> nan_rows(in, IW * C, kNanRows ? 2 * g.kernel[0] * KH : 0);
    // The task's own copy of the callback: what it captures by value stays in registers across
    // its stores (NOTES §33).
    const std::decay_t<Cell> cell_fn = cell;
    std::vector<int64_t> offs(g.window_cells());
    std::vector<int32_t> ks(g.window_cells());
    RowCounter it(begin, OD, OH);
    for (int64_t r = begin; r < end; ++r, it.next()) {
      const int64_t n = it.a, od = it.b, oh = it.c;
      const bool rows_inside = td.lo[od] == 0 && td.hi[od] == g.kernel[0] && th.lo[oh] == 0 &&
                               th.hi[oh] == KH;
      const int64_t row_base =
          ((n * ID + g.input_coord(0, od, 0)) * IH + g.input_coord(1, oh, 0)) * IW;
      T* const row_dst = st.at(out + r * OW * C, OW * C);
      bool row_nan = false;
      if constexpr (kNanRows) {
        for (int64_t kd = td.lo[od]; kd < td.hi[od]; ++kd) {
          for (int64_t kh = th.lo[oh]; kh < th.hi[oh]; ++kh) {
            row_nan |= nan_rows.has_nan((n * ID + g.input_coord(0, od, kd)) * IH + g.input_coord(1, oh, kh));
          }
        }
      }
      next_rows.clear();
      if (ahead && r + 1 < end) {  // the input rows that the next output row reads and this one does not
        RowCounter nx = it;
        nx.next();
        for (int64_t kd = td.lo[nx.b]; kd < td.hi[nx.b]; ++kd) {
          for (int64_t kh = th.lo[nx.c]; kh < th.hi[nx.c]; ++kh) {
            const int64_t ih = g.input_coord(1, nx.c, kh);
            int64_t k;
            if (nx.a == n && nx.b == od && DimTable::window_cell(g, 1, ih, oh, k) && k >= th.lo[oh] &&
                k < th.hi[oh]) {
              continue;
            }
            next_rows.add(in + ((nx.a * ID + g.input_coord(0, nx.b, kd)) * IH + ih) * IW * C,
                          IW * C * static_cast<int64_t>(sizeof(T)));
          }
        }
      }
      for (int64_t ow = 0; ow < OW; ++ow) {
        T* const dst = row_dst + ow * C;
        if (ahead) next_rows.step(ow, OW);
        if (rows_inside && tw.lo[ow] == 0 && tw.hi[ow] == KW) {
          cell_fn(ClWindow{r * OW + ow, od, oh, ow, (row_base + g.input_coord(2, ow, 0)) * C,
                           rel.data(), all_ks.data(), ncells, 0, row_nan, direct}, dst);
          continue;
        }
        int64_t nc = 0;
        for (int64_t kd = td.lo[od]; kd < td.hi[od]; ++kd) {
          const int64_t id = g.input_coord(0, od, kd);
          for (int64_t kh = th.lo[oh]; kh < th.hi[oh]; ++kh) {
            const int64_t ih = g.input_coord(1, oh, kh);
            for (int64_t kw = tw.lo[ow]; kw < tw.hi[ow]; ++kw, ++nc) {
              offs[nc] = (((n * ID + id) * IH + ih) * IW + g.input_coord(2, ow, kw)) * C;
              ks[nc] = static_cast<int32_t>((kd * KH + kh) * KW + kw);
            }
          }
        }
        const int32_t first = static_cast<int32_t>((td.lo[od] * KH + th.lo[oh]) * KW + tw.lo[ow]);
        cell_fn(ClWindow{r * OW + ow, od, oh, ow, 0, offs.data(), ks.data(), nc, first, row_nan,
                         direct},
                dst);
      }
    }
    if (direct) stream_fence();
  });
}

// Calls block(std::integral_constant<int, NV>, c, n) for channel blocks of NV vectors starting
// at c; n (<= 8) is the number of valid lanes of each vector (8 except in a final partial one).
template <typename Block>
inline void for_channel_blocks(int64_t C, Block&& block) {
  int64_t c = 0;
  for (; c + 32 <= C; c += 32) block(std::integral_constant<int, 4>{}, c, int64_t{8});
  for (; c + 8 <= C; c += 8) block(std::integral_constant<int, 1>{}, c, int64_t{8});
  if (c < C) block(std::integral_constant<int, 1>{}, c, C - c);
}

// A channel block's NV vectors of 8 channels as floats (the first n lanes of each). bfloat16
// blocks of 32 channels come from two 32-byte loads in pair order instead: vector 2h holds the
// even channels of the h-th 16, vector 2h + 1 the odd ones (a shift and a mask widen them, no
// lane moves); block_store and block_store_pos put them back in order (NOTES §51).
template <typename T, int NV>
constexpr bool kPairBlock = std::is_same_v<T, c10::BFloat16> && NV % 2 == 0;

template <int NV, typename T>
inline void block_load(const T* src, int64_t n, __m256* v) {
  if constexpr (kPairBlock<T, NV>) {
    const __m256i high = _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
    for (int h = 0; h < NV / 2; ++h) {
      const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 16 * h));
      v[2 * h] = _mm256_castsi256_ps(_mm256_slli_epi32(p, 16));
      v[2 * h + 1] = _mm256_castsi256_ps(_mm256_and_si256(p, high));
    }
  } else {
    for (int i = 0; i < NV; ++i) v[i] = load_lanes(src + 8 * i, n);
  }
}

template <bool kExact, int NV, typename T>
inline void block_store(T* dst, const __m256* v, int64_t n) {
  if constexpr (kPairBlock<T, NV>) {
    for (int h = 0; h < NV / 2; ++h) store_pairs<kExact>(dst + 16 * h, v[2 * h], v[2 * h + 1]);
  } else {
    for (int i = 0; i < NV; ++i) store8<kExact>(dst + 8 * i, v[i], n);
  }
}

// block_store, or for float cells of whole cache lines in a large output (ClWindow::stream) by
// non-temporal stores straight from the registers: no staging copy, and the stores spread over
// the row instead of going out in bursts (NOTES §99).
template <bool kExact, int NV, typename T>
inline void cell_store(T* dst, const __m256* v, int64_t n, bool stream) {
  if constexpr (std::is_same_v<T, float>) {
    if (stream) {
      for (int i = 0; i < NV; ++i) _mm256_stream_ps(dst + 8 * i, v[i]);
      return;
    }
  }
  block_store<kExact, NV>(dst, v, n);
}

// Window positions (int32 lanes) of a block loaded by block_load, stored in channel order.
template <int NV, typename T, typename pos_t>
inline void block_store_pos(pos_t* dst, const __m256* b, int64_t n) {
  if constexpr (kPairBlock<T, NV>) {
    for (int h = 0; h < NV / 2; ++h) {
      const __m256i e = _mm256_castps_si256(b[2 * h]), o = _mm256_castps_si256(b[2 * h + 1]);
      if constexpr (std::is_same_v<pos_t, uint8_t>) {  // positions < 256: 16-bit pairs, then bytes
        const __m256i w = _mm256_or_si256(e, _mm256_slli_epi32(o, 16));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16 * h),
                         _mm_packus_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1)));
      } else {
        const __m256i lo = _mm256_unpacklo_epi32(e, o), hi = _mm256_unpackhi_epi32(e, o);
        store_pos8(dst + 16 * h, _mm256_permute2x128_si256(lo, hi, 0x20), 8);
        store_pos8(dst + 16 * h + 8, _mm256_permute2x128_si256(lo, hi, 0x31), 8);
      }
    }
  } else {
    for (int i = 0; i < NV; ++i) store_pos8(dst + 8 * i, _mm256_castps_si256(b[i]), n);
  }
}

// One channel block of a channels-last max window by torch's compare-and-blend chain (a value
// replaces the maximum if greater or NaN: the last NaN wins), stored with its positions at
// pos_cell: the windows that hold a NaN. Inline in the inference loop; out of line in the
// training loop (max_cl_block_torch_call), which calls it before its window loop.
template <bool kPos, int NV, typename pos_t, typename T>
__attribute__((always_inline)) inline void max_cl_block_torch(const T* in, const ClWindow& w, int64_t c,
                                                             int64_t n, T* dst, pos_t* pos_cell) {
  __m256 m[NV], b[NV];
  for (int v = 0; v < NV; ++v) {
    m[v] = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    b[v] = _mm256_castsi256_ps(_mm256_set1_epi32(w.first));
  }
  for (int64_t j = 0; j < w.cells; ++j) {
    const __m256 k = _mm256_castsi256_ps(_mm256_set1_epi32(w.ks[j]));
    __m256 x[NV];
    block_load<NV>(in + w.base + w.offs[j] + c, n, x);
    for (int v = 0; v < NV; ++v) take_torch(m[v], b[v], x[v], k);
  }
  block_store<true, NV>(dst + c, m, n);
  if (kPos) block_store_pos<NV, T>(pos_cell + c, b, n);
}
template <bool kPos, int NV, typename pos_t, typename T>
__attribute__((noinline)) void max_cl_block_torch_call(const T* in, const ClWindow& w, int64_t c,
                                                       int64_t n, T* dst, pos_t* pos_cell) {
  max_cl_block_torch<kPos, NV>(in, w, c, n, dst, pos_cell);
}

// Each channel vector's maximum by _mm256_max_ps(new, max), which keeps max unless new is greater
// (of equal values, +0 and -0 too, the first in scan order stays), with its position by
// take_greater in training. NaNs are found apart, and a block with one anywhere is redone by
// torch's chain (max_cl_block_torch), which is rare. In inference, two instructions a value where
// compare-and-blend takes six: max, and an unordered compare of two vectors (NOTES §73). In
// training, four (three by take_greater_blend): the NaNs are searched for once per input row
// instead (for_cl_windows<true>), and the windows of an output row whose input rows hold one take
// torch's chain (NOTES §96).
template <bool kPos, bool kBlend, typename pos_t, typename T>
void max_cl_fused_as(const T* in, T* out, pos_t* pos, const PoolGeometry& g, int64_t N,
                     int64_t C) {
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  for_cl_windows<kPos>(g, N, C, in, out, [=](const ClWindow& w, T* dst) {
    for_channel_blocks(C, [&](auto NVc, int64_t c, int64_t n) {
      constexpr int NV = decltype(NVc)::value;
      if (kPos && __builtin_expect(w.nan_rows, 0)) {
        max_cl_block_torch_call<kPos, NV>(in, w, c, n, dst, pos + w.o * C);
        return;
      }
      __m256 m[NV], b[NV], nan = _mm256_setzero_ps();
      for (int v = 0; v < NV; ++v) {
        m[v] = ninf;
        b[v] = _mm256_castsi256_ps(_mm256_set1_epi32(w.first));
      }
      for (int64_t j = 0; j < w.cells; ++j) {
        const T* src = in + w.base + w.offs[j] + c;
        const __m256i k = _mm256_set1_epi32(w.ks[j]);
        prefetch_ahead(src);
        __m256 x[NV];
        block_load<NV>(src, n, x);
        for (int v = 0; v < NV; ++v) {
          if (kPos) {
            if (kBlend) {
              take_greater_blend(m[v], b[v], x[v], k);
            } else {
              take_greater(m[v], b[v], x[v], k);
            }
          } else {
            m[v] = _mm256_max_ps(x[v], m[v]);
            if (v % 2 == 1) nan = _mm256_or_ps(nan, _mm256_cmp_ps(x[v - 1], x[v], _CMP_UNORD_Q));
          }
        }
        if (!kPos && NV % 2 == 1) {
          nan = _mm256_or_ps(nan, _mm256_cmp_ps(x[NV - 1], x[NV - 1], _CMP_UNORD_Q));
        }
      }
      if (!kPos && __builtin_expect(_mm256_movemask_ps(nan) != 0, 0)) {
        max_cl_block_torch<kPos, NV>(in, w, c, n, dst, pos);
        return;
      }
      cell_store<true, NV>(dst + c, m, n, w.stream);
      if (kPos) block_store_pos<NV, T>(pos + w.o * C + c, b, n);
    });
  });
}

template <bool kPos, typename pos_t, typename T>
void max_cl_fused(const T* in, T* out, pos_t* pos, const PoolGeometry& g, int64_t N,
                  int64_t C) {
  if constexpr (kPos) {
    if (tuning().positions_by_blend) return max_cl_fused_as<true, true>(in, out, pos, g, N, C);
  }
  max_cl_fused_as<kPos, false>(in, out, pos, g, N, C);
}

// 8 saved window positions widened to int32: the first n (<= 8) read, the other lanes 0 (their
// gradient lanes are 0 too).
inline __m256i load_pos8(const uint8_t* p, int64_t n) {
  if (n == 8) return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  alignas(8) uint8_t t[8] = {};
  for (int64_t i = 0; i < n; ++i) t[i] = p[i];
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(t)));
}

// As load_pos8, from the 8 bytes that end at p + n (n >= 1), shifted down: no copy through the
// stack, whose byte stores a wider load cannot take forwarded. The caller knows the 8 - n bytes
// before p are readable (a row of 8 or more).
inline __m256i load_pos8_end(const uint8_t* p, int64_t n) {
  uint64_t v;
  std::memcpy(&v, p + n - 8, 8);
  if (n < 8) v >>= 8 * (8 - n);
  return _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<int64_t>(v)));
}

// Channels-last max backward, gathered per input cell in registers: the outputs whose windows
// cover the cell are listed once (the depth/height part per input row, the width part per
// cell), then each block of channels adds the gradients whose saved position is this cell and
// is stored once. No accumulator row, no zero fill, no copy. The output rows (gradients and
// positions) that the next input row adds are prefetched (SpreadPrefetch). A large float
// gradient is written straight from the registers where cells_stream_direct allows, otherwise
// its rows are staged.
template <typename T>
void max_bwd_cl_fused(const T* gout, const uint8_t* pos, T* gin, const PoolGeometry& g,
                      int64_t N, int64_t C) {
  const int64_t OD = g.out[0], OH = g.out[1], OW = g.out[2];
  const int64_t ID = g.in[0], IH = g.in[1], IW = g.in[2], KH = g.kernel[1], KW = g.kernel[2];
  const DimTable td(g, 0, true), th(g, 1, true), tw(g, 2, true);
  const bool streamed = streams<T>(N * ID * IH * IW * C);
  const bool direct = streamed && cells_stream_direct(gin, C);
  const bool stream_rows = streamed && !direct;
  const bool ahead = (N * OD * OH * OW * C * static_cast<int64_t>(sizeof(T) + 1) +
                     N * ID * IH * IW * C * static_cast<int64_t>(sizeof(T))) >= kAheadMinBytes;
  at::parallel_for(0, N * ID * IH, grain_for(IW * C), [&](int64_t begin, int64_t end) {
    std::vector<int64_t> row_o, offs;
    std::vector<int32_t> row_k, ks;
    StagedRuns<T> out(stream_rows, staged_rows<T>(IW * C));
    SpreadPrefetch next_rows;
    RowCounter it(begin, ID, IH);
    for (int64_t r = begin; r < end; ++r, it.next()) {
      const int64_t n = it.a, id = it.b, ih = it.c;
      row_o.clear();
      row_k.clear();
      for (int64_t cd = td.first[id]; cd < td.first[id + 1]; ++cd) {
        for (int64_t ch = th.first[ih]; ch < th.first[ih + 1]; ++ch) {
          row_o.push_back(((n * OD + td.cover_o[cd]) * OH + th.cover_o[ch]) * OW);
          row_k.push_back(static_cast<int32_t>((td.cover_k[cd] * KH + th.cover_k[ch]) * KW));
        }
      }
      const int64_t nr = static_cast<int64_t>(row_o.size());
      T* row = out.at(gin + r * IW * C, IW * C);
      next_rows.clear();
      if (ahead && r + 1 < end) {  // the output rows that the next input row adds
        RowCounter nx = it;
        nx.next();
        for (int64_t cd = td.first[nx.b]; cd < td.first[nx.b + 1]; ++cd) {
          for (int64_t ch = th.first[nx.c]; ch < th.first[nx.c + 1]; ++ch) {
            const int64_t o2 = ((nx.a * OD + td.cover_o[cd]) * OH + th.cover_o[ch]) * OW;
            if (std::find(row_o.begin(), row_o.end(), o2) != row_o.end()) continue;
            next_rows.add(gout + o2 * C, OW * C * static_cast<int64_t>(sizeof(T)));
            next_rows.add(pos + o2 * C, OW * C);
          }
        }
      }
      for (int64_t iw = 0; iw < IW; ++iw) {
        T* dst = row + iw * C;
        next_rows.step(iw, IW);
        const int64_t w0 = tw.first[iw], nw = tw.first[iw + 1] - w0;
        // The cell's covering outputs: NR rows times NW columns at compile time (1 or 2 each:
        // every cell of 3 x 3 stride-2 windows), their offsets and window positions in locals,
        // which the compiler keeps in registers; other counts listed at run time (0).
        auto cell = [&](auto NRc, auto NWc) {
          constexpr int NR = decltype(NRc)::value, NW = decltype(NWc)::value, kN = NR * NW;
          int64_t fixed_o[kN > 0 ? kN : 1];
          int32_t fixed_k[kN > 0 ? kN : 1];
          if constexpr (kN > 0) {
            for (int a = 0; a < NR; ++a) {
              for (int b = 0; b < NW; ++b) {
                fixed_o[a * NW + b] = (row_o[a] + tw.cover_o[w0 + b]) * C;
                fixed_k[a * NW + b] = row_k[a] + static_cast<int32_t>(tw.cover_k[w0 + b]);
              }
            }
          } else {
            offs.clear();
            ks.clear();
            for (int64_t j = 0; j < nr; ++j) {
              for (int64_t cw = w0; cw < w0 + nw; ++cw) {
                offs.push_back((row_o[j] + tw.cover_o[cw]) * C);
                ks.push_back(row_k[j] + static_cast<int32_t>(tw.cover_k[cw]));
              }
            }
          }
          // Locals, not references: the stores below may alias anything (NOTES §33).
          const T* go = gout;
          const uint8_t* po = pos;
          const int64_t* op = offs.data();
          const int32_t* kp = ks.data();
          const int64_t nc = kN > 0 ? kN : static_cast<int64_t>(offs.size());
          for_channel_blocks(C, [=](auto NVc, int64_t c, int64_t nl) {
            constexpr int NV = decltype(NVc)::value;
            __m256 acc[NV];
            for (int v = 0; v < NV; ++v) acc[v] = _mm256_setzero_ps();
            for (int64_t j = 0; j < nc; ++j) {
              const int64_t o = kN > 0 ? fixed_o[j] : op[j];
              const int32_t k = kN > 0 ? fixed_k[j] : kp[j];
              const T* gs = go + o + c;
              const uint8_t* ps = po + o + c;
              if constexpr (kPairBlock<T, NV>) {
                // bfloat16, 16 channels at a time: the positions widened to 16 bits and compared
                // there, the gradient bits masked before they are widened in pair order
                // (block_load's): no lane-crossing widening of either (NOTES §73).
                const __m256i kv = _mm256_set1_epi16(static_cast<int16_t>(k));
                const __m256i high = _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
                for (int h = 0; h < NV / 2; ++h) {
                  const __m256i q = _mm256_cvtepu8_epi16(
                      _mm_loadu_si128(reinterpret_cast<const __m128i*>(ps + 16 * h)));
                  const __m256i gm = _mm256_and_si256(
                      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(gs + 16 * h)),
                      _mm256_cmpeq_epi16(q, kv));
                  acc[2 * h] = _mm256_add_ps(acc[2 * h], _mm256_castsi256_ps(_mm256_slli_epi32(gm, 16)));
                  acc[2 * h + 1] =
                      _mm256_add_ps(acc[2 * h + 1], _mm256_castsi256_ps(_mm256_and_si256(gm, high)));
                }
              } else {
                const __m256i kv = _mm256_set1_epi32(k);
                for (int v = 0; v < NV; ++v) {
                  const __m256 m =
                      _mm256_castsi256_ps(_mm256_cmpeq_epi32(load_pos8(ps + 8 * v, nl), kv));
                  acc[v] = _mm256_add_ps(acc[v], _mm256_and_ps(m, load_lanes(gs + 8 * v, nl)));
                }
              }
            }
            cell_store<false, NV>(dst + c, acc, nl, direct);
          });
        };
        using One = std::integral_constant<int, 1>;
        using Two = std::integral_constant<int, 2>;
        if (nr == 1 && nw == 1) {
          cell(One{}, One{});
        } else if (nr == 1 && nw == 2) {
          cell(One{}, Two{});
        } else if (nr == 2 && nw == 1) {
          cell(Two{}, One{});
        } else if (nr == 2 && nw == 2) {
          cell(Two{}, Two{});
        } else {
          cell(std::integral_constant<int, 0>{}, std::integral_constant<int, 0>{});
        }
      }
    }
    if (direct) stream_fence();
  });
}

#endif  // TORCHPOOL_AVX2

#if defined(TORCHPOOL_AVX2)
// ---------------------------------------------------------------------------------------------
// Window pools over tiny NCHW planes, eight planes a vector (NOTES §106). On planes of a few
// dozen cells the row walks spend most of their lanes, and their set-up, on rows two or three
// outputs wide. Here eight planes are turned by 8x8 transposes into one vector per cell (lane l
// holds plane l), each window is then taken in whole vectors from a table of its cells built once
// per call (any window: 1d to 3d, padding, dilation, ceil mode), and the results are turned back.

// Planes of at most this many cells, in and out, with output rows under 8 wide, take this path.
constexpr int64_t kTinyPlaneCells = 64;

inline bool tiny_planes_ok(const PoolGeometry& g, int64_t planes) {
  return planes >= 8 && g.in_plane() <= kTinyPlaneCells && g.out_plane() <= kTinyPlaneCells &&
         g.out[2] < 8;
}

// Every output's window: its cells inside the input (their index in the plane) and their window
// positions, in torch's scan order; output o's run is [first[o], first[o + 1]). `whole`: no
// window is empty (a dilated window can miss the input altogether; the general paths take those).
struct PlaneWindows {
  std::vector<int32_t> first, cell, k;
  bool whole = true;
  explicit PlaneWindows(const PoolGeometry& g) {
    const DimTable td(g, 0, false), th(g, 1, false), tw(g, 2, false);
    for (int64_t od = 0; od < g.out[0]; ++od) {
      for (int64_t oh = 0; oh < g.out[1]; ++oh) {
        for (int64_t ow = 0; ow < g.out[2]; ++ow) {
          first.push_back(static_cast<int32_t>(cell.size()));
          for (int64_t kd = td.lo[od]; kd < td.hi[od]; ++kd) {
            for (int64_t kh = th.lo[oh]; kh < th.hi[oh]; ++kh) {
              for (int64_t kw = tw.lo[ow]; kw < tw.hi[ow]; ++kw) {
                const int64_t id = g.input_coord(0, od, kd), ih = g.input_coord(1, oh, kh);
                const int64_t iw = g.input_coord(2, ow, kw);
                cell.push_back(static_cast<int32_t>((id * g.in[1] + ih) * g.in[2] + iw));
                k.push_back(static_cast<int32_t>((kd * g.kernel[1] + kh) * g.kernel[2] + kw));
              }
            }
          }
          whole = whole && first.back() < static_cast<int32_t>(cell.size());
        }
      }
    }
    first.push_back(static_cast<int32_t>(cell.size()));
  }
};

// Eight floats, one vector, in a std::vector (whose allocations are not 32-byte aligned here).
struct V8 {
  float f[8];
  __m256 get() const { return _mm256_loadu_ps(f); }
  void set(__m256 v) { _mm256_storeu_ps(f, v); }
};

// The 8x8 block of floats r[0..7] (rows) transposed in place.
inline void transpose8(__m256* r) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// The vectors a block keeps for P cells: P rounded up to whole 8x8 transposes.
inline int64_t cell_vectors(int64_t P) { return (P + 7) / 8 * 8; }

// Cells [0, P) of the n (<= 8) planes at src as vectors t[c], lane l from plane l (the lanes from
// n on repeat plane 0; t has cell_vectors(P) entries, those from P on hold what follows the
// plane). `room`: the elements readable from src, to the end of the tensor.
template <typename T>
inline void planes_to_cells8(const T* src, int64_t P, int64_t n, int64_t room, V8* t) {
  for (int64_t c = 0; c < P; c += 8) {
    __m256 r[8];
    for (int64_t l = 0; l < 8; ++l) {
      const int64_t at = (l < n ? l : 0) * P + c;
      r[l] = room - at >= 8 ? loadf(src + at) : load_lanes(src + at, room - at);
    }
    transpose8(r);
    for (int64_t j = 0; j < 8; ++j) t[c + j].set(r[j]);
  }
}

// The reverse: vectors t[c], c < P, to cells [0, P) of the n planes at dst (kExact: as storef).
// Planes of whole vectors go by transposes straight to dst; others, whose rows would end in
// masked stores, by the same transposes into a buffer of the n planes' n * P consecutive
// elements, then stored in whole vectors. There the 8 cells from c of plane l go to l * P + c,
// the last ones of each plane past its end, into the next plane's first cells: the columns of
// vectors are written from the last to the first, so the first's stores come last and put those
// cells right (NOTES §113).
template <bool kExact, typename T>
inline void cells_to_planes8(const V8* t, int64_t P, int64_t n, T* dst) {
  auto transposed = [&](int64_t c, __m256* r) {
    for (int64_t j = 0; j < 8; ++j) r[j] = t[c + j].get();
    transpose8(r);
  };
  if (P % 8 == 0) {
    for (int64_t c = 0; c < P; c += 8) {
      __m256 r[8];
      transposed(c, r);
      for (int64_t l = 0; l < n; ++l) storef<kExact>(dst + l * P + c, r[l]);
    }
    return;
  }
  float tmp[8 * kTinyPlaneCells + 8];  // + 8: the last plane's last vector passes its cells
  for (int64_t c = (P - 1) / 8 * 8; c >= 0; c -= 8) {
    __m256 r[8];
    transposed(c, r);
    for (int64_t l = 0; l < n; ++l) _mm256_storeu_ps(tmp + l * P + c, r[l]);
  }
  const int64_t total = n * P;
  for (int64_t i = 0; i < total; i += 8) {
    store8<kExact>(dst + i, _mm256_loadu_ps(tmp + i), std::min<int64_t>(8, total - i));
  }
}

// Runs the blocks of eight planes p .. p + n - 1 (the last may have fewer), split between
// threads: task() makes each thread's block(p, n), with its buffers. `per_block`: the cells a
// block touches.
template <typename Task>
void for_blocks8(int64_t planes, int64_t per_block, Task&& task) {
  at::parallel_for(0, (planes + 7) / 8, grain_for(per_block), [&](int64_t b0, int64_t b1) {
    auto block = task();
    for (int64_t b = b0; b < b1; ++b) block(b * 8, std::min<int64_t>(8, planes - b * 8));
  });
}

inline int64_t tiny_block_cells(const PoolGeometry& g, const PlaneWindows& w) {
  return 8 * (g.in_plane() + static_cast<int64_t>(w.cell.size()));
}

// Max forward (kPos: with each maximum's window position). Returns false, doing nothing, where a
// window is empty.
template <bool kPos, typename pos_t, typename T>
bool max_tiny_planes(const T* in, T* out, pos_t* pos, const PoolGeometry& g, int64_t planes) {
  const PlaneWindows w(g);
  if (!w.whole) return false;
  const int64_t P = g.in_plane(), Q = g.out_plane();
  const int32_t *first = w.first.data(), *cell = w.cell.data(), *k = w.k.data();
  for_blocks8(planes, tiny_block_cells(g, w), [&] {
    return [&, cells = std::vector<V8>(cell_vectors(P)), res = std::vector<V8>(cell_vectors(Q)),
            at = std::vector<V8>(kPos ? Q : 0)](int64_t p, int64_t n) mutable {
      planes_to_cells8(in + p * P, P, n, (planes - p) * P, cells.data());
      for (int64_t o = 0; o < Q; ++o) {
        __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
        __m256 best = _mm256_castsi256_ps(_mm256_set1_epi32(k[first[o]]));
        for (int32_t e = first[o]; e < first[o + 1]; ++e) {
          const __m256 v = cells[cell[e]].get();
          if constexpr (kPos) {
            take_torch(m, best, v, _mm256_castsi256_ps(_mm256_set1_epi32(k[e])));
          } else {
            m = _mm256_blendv_ps(m, v, take_mask(v, m));
          }
        }
        res[o].set(m);
        if constexpr (kPos) at[o].set(best);
      }
      cells_to_planes8<true>(res.data(), Q, n, out + p * Q);
      if constexpr (kPos) {
        for (int64_t o = 0; o < Q; ++o) {
          int32_t t[8];
          std::memcpy(t, at[o].f, sizeof t);
          for (int64_t l = 0; l < n; ++l) pos[(p + l) * Q + o] = static_cast<pos_t>(t[l]);
        }
      }
    };
  });
  return true;
}

// Max backward: each output's gradient added to the cell at its saved position, in output order
// (torch's order of the additions). Returns false, doing nothing, where a window is empty.
template <typename T, typename pos_t>
bool max_bwd_tiny_planes(const T* gout, const pos_t* pos, T* gin, const PoolGeometry& g,
                         int64_t planes) {
  const PlaneWindows w(g);
  if (!w.whole) return false;
  const int64_t P = g.in_plane(), Q = g.out_plane();
  const int32_t *first = w.first.data(), *cell = w.cell.data(), *k = w.k.data();
  for_blocks8(planes, tiny_block_cells(g, w), [&] {
    return [&, grad = std::vector<V8>(cell_vectors(Q)),
            acc = std::vector<V8>(cell_vectors(P))](int64_t p, int64_t n) mutable {
      planes_to_cells8(gout + p * Q, Q, n, (planes - p) * Q, grad.data());
      std::fill(acc.begin(), acc.end(), V8{});
      for (int64_t o = 0; o < Q; ++o) {
        int32_t t[8];
        for (int64_t l = 0; l < 8; ++l) t[l] = l < n ? static_cast<int32_t>(pos[(p + l) * Q + o]) : -1;
        const __m256i at = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t));
        for (int32_t e = first[o]; e < first[o + 1]; ++e) {
          const __m256 hit = _mm256_castsi256_ps(_mm256_cmpeq_epi32(at, _mm256_set1_epi32(k[e])));
          acc[cell[e]].set(_mm256_add_ps(acc[cell[e]].get(), _mm256_and_ps(hit, grad[o].get())));
        }
      }
      cells_to_planes8<false>(acc.data(), P, n, gin + p * P);
    };
  });
  return true;
}

// Average forward (kGrad false) and backward; div[o]: output o's divisor. The forward sums each
// window in torch's order and divides once; the backward divides each output's gradient once and
// adds it to the window's cells in output order, as avg_bwd_scatter does.
template <bool kGrad, typename T>
void avg_tiny_planes(const T* src, T* dst, const PoolGeometry& g, int64_t planes, const float* div) {
  const PlaneWindows w(g);
  const int64_t P = g.in_plane(), Q = g.out_plane();
  const int64_t S = kGrad ? Q : P, D = kGrad ? P : Q;  // cells of a source and a result plane
  const int32_t *first = w.first.data(), *cell = w.cell.data();
  for_blocks8(planes, tiny_block_cells(g, w), [&] {
    return [&, a = std::vector<V8>(cell_vectors(S)),
            b = std::vector<V8>(cell_vectors(D))](int64_t p, int64_t n) mutable {
      planes_to_cells8(src + p * S, S, n, (planes - p) * S, a.data());
      if (kGrad) std::fill(b.begin(), b.end(), V8{});
      for (int64_t o = 0; o < Q; ++o) {
        const __m256 d = _mm256_set1_ps(div[o]);
        if constexpr (kGrad) {
          const __m256 share = _mm256_div_ps(a[o].get(), d);
          for (int32_t e = first[o]; e < first[o + 1]; ++e) {
            b[cell[e]].set(_mm256_add_ps(b[cell[e]].get(), share));
          }
        } else {
          __m256 s = _mm256_setzero_ps();
          for (int32_t e = first[o]; e < first[o + 1]; ++e) s = _mm256_add_ps(s, a[cell[e]].get());
          b[o].set(_mm256_div_ps(s, d));
        }
      }
      cells_to_planes8<false>(b.data(), D, n, dst + p * D);
    };
  });
}

#endif  // TORCHPOOL_AVX2

// ---------------------------------------------------------------------------------------------
// Max pool forward.

template <typename scalar_t, typename pos_t, bool kPos>
void max_fwd_planar(const scalar_t* in, scalar_t* out, pos_t* pos, const PoolGeometry& g,
                    int64_t planes) {
#if defined(TORCHPOOL_AVX2)
  if constexpr (kFusedType<scalar_t>) {
    if (tiny_planes_ok(g, planes) && max_tiny_planes<kPos>(in, out, pos, g, planes)) return;
    if (tiles_w2_ok(g)) {
      const int64_t nr = g.kernel[0] * g.kernel[1];
      if (nr == 1) max_tiles_w2<1, kPos>(in, out, pos, g, planes);
      if (nr == 2) max_tiles_w2<2, kPos>(in, out, pos, g, planes);
      if (nr == 4 && tiles_w2_slices_ok(g)) {
        max_tiles_w2_slices<kPos>(in, out, pos, g, planes);
      } else if (nr == 4) {
        max_tiles_w2<4, kPos>(in, out, pos, g, planes);
      }
      return;
    }
    if (w3s2_ok(g)) {
      if (g.kernel[0] * g.kernel[1] == 1) {
        max_w3s2<1, kPos>(in, out, pos, g, planes);
      } else {
        max_w3s2<3, kPos>(in, out, pos, g, planes);
      }
      return;
    }
    if (fused_rows_ok(g)) {
      with_fused_shape(g, [&](auto S, auto KW, auto NR) {
        max_rows_fused<S.value, KW.value, NR.value, kPos>(in, out, pos, g, planes);
      });
      return;
    }
  }
#endif
  using acc_t = acc_type<scalar_t>;
  const int64_t OD = g.out[0], OH = g.out[1], OW = g.out[2];
  const int64_t IH = g.in[1], IW = g.in[2], KH = g.kernel[1], KW = g.kernel[2];
  const DimTable td(g, 0, false), th(g, 1, false), tw(g, 2, false);
  const RowPhases ph(g);
  at::parallel_for(0, planes * OD * OH, grain_for(OW * g.window_cells()), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(ph.size()), acc(OW);
    std::vector<int32_t> best(kPos ? OW : 0);
    RowCounter it(begin, OD, OH);
    for (int64_t r = begin; r < end; ++r, it.next()) {
      const int64_t plane = it.a, od = it.b, oh = it.c;
      std::fill(acc.begin(), acc.end(), neg_inf<acc_t>());
      if (kPos) std::fill(best.begin(), best.end(), -1);
      for (int64_t kd = td.lo[od]; kd < td.hi[od]; ++kd) {
        const int64_t id = g.input_coord(0, od, kd);
        for (int64_t kh = th.lo[oh]; kh < th.hi[oh]; ++kh) {
          const int64_t ih = g.input_coord(1, oh, kh);
          load_row(in + ((plane * g.in[0] + id) * IH + ih) * IW, buf.data(), ph, g.pad[2], IW,
                   neg_inf<acc_t>());
          const int32_t base = static_cast<int32_t>((kd * KH + kh) * KW);
          for (int64_t kw = 0; kw < KW; ++kw) {
            const acc_t* src = buf.data() + ph.run(kw * g.dilation[2]);
            if (kPos) {
              max_pass_pos(src, acc.data(), best.data(), base + static_cast<int32_t>(kw), OW);
            } else {
              max_pass(src, acc.data(), OW);
            }
          }
        }
      }
      convert(acc.data(), out + r * OW, OW);
      if (kPos) {
        const int32_t first_dh = static_cast<int32_t>((td.lo[od] * KH + th.lo[oh]) * KW);
        store_positions(best.data(), pos + r * OW, first_dh, tw, OW);
      }
    }
  });
}

template <typename scalar_t, typename pos_t, bool kPos>
void max_fwd_cl(const scalar_t* in, scalar_t* out, pos_t* pos, const PoolGeometry& g,
                int64_t N, int64_t C) {
#if defined(TORCHPOOL_AVX2)
  if constexpr (kFusedType<scalar_t>) {
    max_cl_fused<kPos>(in, out, pos, g, N, C);
    return;
  }
#endif
  using acc_t = acc_type<scalar_t>;
  const int64_t OD = g.out[0], OH = g.out[1], OW = g.out[2];
  const int64_t ID = g.in[0], IH = g.in[1], IW = g.in[2], KH = g.kernel[1], KW = g.kernel[2];
  const DimTable td(g, 0, false), th(g, 1, false), tw(g, 2, false);
  at::parallel_for(0, N * OD * OH, grain_for(OW * C * g.window_cells()), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(C), tmp(C);
    std::vector<int32_t> best(kPos ? C : 0);
    RowCounter it(begin, OD, OH);
    for (int64_t r = begin; r < end; ++r, it.next()) {
      const int64_t n = it.a, od = it.b, oh = it.c;
      for (int64_t ow = 0; ow < OW; ++ow) {
        std::fill(acc.begin(), acc.end(), neg_inf<acc_t>());
        if (kPos) {
          std::fill(best.begin(), best.end(),
                    static_cast<int32_t>((td.lo[od] * KH + th.lo[oh]) * KW + tw.lo[ow]));
        }
        for (int64_t kd = td.lo[od]; kd < td.hi[od]; ++kd) {
          const int64_t id = g.input_coord(0, od, kd);
          for (int64_t kh = th.lo[oh]; kh < th.hi[oh]; ++kh) {
            const int64_t ih = g.input_coord(1, oh, kh);
            for (int64_t kw = tw.lo[ow]; kw < tw.hi[ow]; ++kw) {
              const int64_t iw = g.input_coord(2, ow, kw);
              const acc_t* v =
                  src_as_acc(in + (((n * ID + id) * IH + ih) * IW + iw) * C, tmp.data(), C);
              if (kPos) {
                max_pass_pos(v, acc.data(), best.data(),
                             static_cast<int32_t>((kd * KH + kh) * KW + kw), C);
              } else {
                max_pass(v, acc.data(), C);
              }
            }
          }
        }
        const int64_t o = (r * OW + ow) * C;
        convert(acc.data(), out + o, C);
        if (kPos) convert(best.data(), pos + o, C);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Max pool backward: each input row gathers from the outputs whose windows cover it, in a fixed
// order, so every input cell is written once by one thread.

#if defined(TORCHPOOL_AVX2)
// Fused AVX2 backward of one input row (float NCHW, stride S in {1, 2}, no dilation along W, at
// most 8 window columns): walks the outputs 8 at a time; `contrib(ow0, C, full)` sets C[kw] to
// what outputs ow0 .. ow0 + 7 send through window column kw (`full`, a std::bool_constant: all 8
// outputs exist). Input cell x = S*ow - pad + kw, so column kw feeds phase kw % S shifted by
// kw / S outputs; the shifted lanes come from the previous chunk (kept in `prev`). Each chunk
// writes its 8*S input cells once. Inlined whole into its caller, so that the callback's state
// stays in registers across the stores (NOTES §33, §54).
inline bool fused_bwd_ok(const PoolGeometry& g) {
  return fused_rows_ok(g) && g.kernel[2] <= 8;
}

// Lanes j of concat(prev, cur)[8 + j - s], s in 1 .. 7: cur moved up by s lanes, the top s
// lanes of prev coming in below.
inline __m256 shift_in(__m256 prev, __m256 cur, int64_t s) {
  const __m256i p = _mm256_castps_si256(prev), c = _mm256_castps_si256(cur);
  const __m256i t = _mm256_permute2x128_si256(p, c, 0x21);  // prev's high half, cur's low half
  switch (s) {
    case 1: return _mm256_castsi256_ps(_mm256_alignr_epi8(c, t, 12));
    case 2: return _mm256_castsi256_ps(_mm256_alignr_epi8(c, t, 8));
    case 3: return _mm256_castsi256_ps(_mm256_alignr_epi8(c, t, 4));
    case 4: return _mm256_castsi256_ps(t);
    case 5: return _mm256_castsi256_ps(_mm256_alignr_epi8(t, p, 12));
    case 6: return _mm256_castsi256_ps(_mm256_alignr_epi8(t, p, 8));
    default: return _mm256_castsi256_ps(_mm256_alignr_epi8(t, p, 4));
  }
}

// Lanes j of concat(lo, hi)[s + j], s in 0 .. 8 at run time (for shifts known at compile time,
// shift_in's byte alignment is cheaper).
inline __m256 funnel8(__m256 lo, __m256 hi, int64_t s) {
  const __m256i idx = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                       _mm256_set1_epi32(static_cast<int32_t>(s)));
  const __m256i from_hi = _mm256_cmpgt_epi32(idx, _mm256_set1_epi32(7));
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx),
                          _mm256_castsi256_ps(from_hi));
}

// direct: the chunks inside the row are whole aligned cache lines (float, S == 2: see
// rows_stream_direct), written by non-temporal stores.
template <int S, int KWc, typename T, typename Contrib>
__attribute__((always_inline)) inline void bwd_row_fused(T* row, int64_t IW, int64_t OW, int64_t KW,
                                                         int64_t pad, const Contrib& contrib,
                                                         bool direct = false) {
  if constexpr (KWc > 0) KW = KWc;
  __m256 prev[8];  // each column's contributions of the previous chunk
  for (int64_t kw = S; kw < KW; ++kw) prev[kw] = _mm256_setzero_ps();
  __m256 C[8];
  // The previous chunk's cells, kept for the row's last chunk, which rewrites some of them: in
  // order (float), or as its even and odd cells (the half types).
  __m256 last_lo = _mm256_setzero_ps(), last_hi = _mm256_setzero_ps();
  // Rows of 8 * S cells or more take no masked stores (slow on AMD: NOTES §90). The first chunk
  // writes whole vectors from the row's start, the cells past its own into the next chunk's,
  // which rewrites them; the last chunk writes the row's last 8 * S cells, those before its own
  // from the previous chunk's.
  const bool wide = IW >= 8 * S;
  // One chunk; kFull: its 8 outputs exist, so contrib's loads need no edge checks; kInside: its
  // 8 * S cells lie inside the row, so its stores need none either.
  auto chunk = [&](int64_t ow0, auto full, auto inside) __attribute__((always_inline)) {
    constexpr bool kInside = decltype(inside)::value;
    contrib(ow0, C, full);
    // Columns kw < S land in this chunk's own lanes; later ones are shifted by kw / S outputs,
    // in registers (through memory, the load spanning two fresh stores stalls on forwarding).
    __m256 even = C[0];
    __m256 odd = (S == 2 && KW > 1) ? C[1] : _mm256_setzero_ps();
    for (int64_t kw = S; kw < KW; ++kw) {
      const __m256 v = shift_in(prev[kw], C[kw], kw / S);
      if (S == 2 && (kw & 1)) {
        odd = _mm256_add_ps(odd, v);
      } else {
        even = _mm256_add_ps(even, v);
      }
      prev[kw] = C[kw];
    }
    const int64_t x0 = S * ow0 - pad;
    if constexpr (std::is_same_v<T, float>) {
      // The chunk's cells x0 .. x0 + 8 * S in order: a, then b (S == 2).
      __m256 a = even, b = even;
      if constexpr (S == 2) {
        const __m256 lo = _mm256_unpacklo_ps(even, odd), hi = _mm256_unpackhi_ps(even, odd);
        a = _mm256_permute2f128_ps(lo, hi, 0x20);
        b = _mm256_permute2f128_ps(lo, hi, 0x31);
      }
      const __m256 prev_lo = last_lo, prev_hi = last_hi;
      last_lo = a;
      last_hi = b;
      if (kInside || (x0 >= 0 && x0 + 8 * S <= IW)) {
        if (S == 2 && direct) {
          _mm256_stream_ps(row + x0, a);
          _mm256_stream_ps(row + x0 + 8, b);
          return;
        }
        _mm256_storeu_ps(row + x0, a);
        if (S == 2) _mm256_storeu_ps(row + x0 + 8, b);
        return;
      }
      if (wide && x0 < 0) {  // the first chunk: cells 0 .. 8 * S from lane -x0 on
        if constexpr (S == 2) {
          _mm256_storeu_ps(row, funnel8(a, b, -x0));
          _mm256_storeu_ps(row + 8, funnel8(b, b, -x0));
        } else {
          _mm256_storeu_ps(row, funnel8(a, a, -x0));
        }
        return;
      }
      if (wide) {  // the last chunk: cells IW - 8 * S .. IW, m = IW - x0 of them its own
        const int64_t m = IW - x0;
        if constexpr (S == 2) {
          const bool early = m < 8;
          const __m256 v0 = early ? prev_lo : prev_hi, v1 = early ? prev_hi : a;
          const __m256 v2 = early ? a : b;
          const int64_t s = early ? m : m - 8;
          _mm256_storeu_ps(row + IW - 16, funnel8(v0, v1, s));
          _mm256_storeu_ps(row + IW - 8, funnel8(v1, v2, s));
        } else {
          _mm256_storeu_ps(row + IW - 8, funnel8(prev_lo, a, m));
        }
        return;
      }
      // Rows shorter than 8 * S: masked stores. Masked-off lanes are not written, so the
      // addresses may lie outside the row.
      _mm256_maskstore_ps(row + x0, lanes_inside(x0, IW), a);
      if (S == 2) _mm256_maskstore_ps(row + x0 + 8, lanes_inside(x0 + 8, IW), b);
    } else {
      const __m256 prev_even = last_lo, prev_odd = last_hi;
      last_lo = even;
      last_hi = odd;
      if (kInside || (x0 >= 0 && x0 + 8 * S <= IW)) {
        if constexpr (S == 2) {
          store_pairs(row + x0, even, odd);
        } else {
          storef(row + x0, even);
        }
        return;
      }
      if (wide) {
        // As float's edges, in the chunks' own order: the first chunk writes cells 0 .. 8 * S
        // from its cell t = -x0 on, the last the row's last 8 * S cells, from the previous
        // chunk's cell t = IW - x0 on (its own follow). Even cells of the result then are
        // cells t + 2j of the pair of chunks, odd ones t + 2j + 1.
        const bool first = x0 < 0;
        const int64_t t = first ? -x0 : IW - x0;
        const __m256 lo_even = first ? even : prev_even, lo_odd = first ? odd : prev_odd;
        T* dst = first ? row : row + IW - 8 * S;
        if constexpr (S == 2) {
          const int64_t q = t >> 1;
          if (t & 1) {
            store_pairs(dst, funnel8(lo_odd, odd, q), funnel8(lo_even, even, q + 1));
          } else {
            store_pairs(dst, funnel8(lo_even, even, q), funnel8(lo_odd, odd, q));
          }
        } else {
          storef(dst, funnel8(lo_even, even, t));
        }
        return;
      }
      // The half types in rows shorter than 8 * S: the chunk converted in registers into a
      // stack row, its cells inside the row copied out.
      T cells[8 * S];
      if constexpr (S == 2) {
        store_pairs(cells, even, odd);
      } else {
        storef(cells, even);
      }
      const int64_t j0 = std::max<int64_t>(0, -x0), j1 = std::min<int64_t>(8 * S, IW - x0);
      if (j1 > j0) std::memcpy(row + x0 + j0, cells + j0, (j1 - j0) * sizeof(T));
    }
  };
  // The chunks walk the row in order (each carries its shifted lanes into the next): those
  // reaching into the padding, the inner ones, then those past the row or the outputs.
  const std::true_type yes;
  const std::false_type no;
  auto full = [&](int64_t ow0) { return ow0 + 8 <= OW; };
  auto inside = [&](int64_t ow0) { return S * ow0 - pad >= 0 && S * ow0 - pad + 8 * S <= IW; };
  int64_t ow0 = 0;
  for (; S * ow0 - pad < 0 && full(ow0); ow0 += 8) chunk(ow0, yes, no);
  for (; full(ow0) && inside(ow0); ow0 += 8) chunk(ow0, yes, yes);
  for (; S * ow0 - pad < IW; ow0 += 8) chunk(ow0, no, no);
}

// Whether a large float gradient of rows IW long is written by max_bwd_fused's row walk
// straight from the registers (non-temporal stores) rather than staged: stride 2, whose chunks
// inside a row are 16 cells, and rows that start on cache lines (IW a multiple of 16, the block
// aligned) with padding that keeps the chunks on them; rows of 4 KiB or more, so the row ends
// that ordinary stores write are a small share (NOTES §99). A row is then what
// cells_stream_direct asks of a channels-last cell (float, whole lines).
template <typename T, int S>
inline bool rows_stream_direct(const T* gin, int64_t IW, int64_t pad) {
  return S == 2 && pad % 16 == 0 && IW * static_cast<int64_t>(sizeof(T)) >= (4 << 10) &&
         cells_stream_direct(gin, IW);
}

// The most output rows (along D and H) whose windows cover one input row.
inline int64_t max_cover_rows(const PoolGeometry& g) {
  int64_t most = 1;
  for (int d = 0; d < 2; ++d) {
    int64_t m = 0;
    for (int64_t i = 0; i < g.in[d]; ++i) {
      int64_t o0, o1, n = 0, k;
      g.covering_outputs(d, i, o0, o1);
      for (int64_t o = o0; o < o1; ++o) n += DimTable::window_cell(g, d, i, o, k);
      m = std::max(m, n);
    }
    most *= m;
  }
  return most;
}

template <int S, int KWc, typename T>
void max_bwd_fused(const T* gout, const uint8_t* pos, T* gin, const PoolGeometry& g,
                   int64_t planes) {
  const int64_t OD = g.out[0], OH = g.out[1], OW = g.out[2];
  const int64_t ID = g.in[0], IH = g.in[1], IW = g.in[2], KH = g.kernel[1], KW = g.kernel[2];
  const DimTable td(g, 0, true), th(g, 1, true);
  const int64_t most = max_cover_rows(g);
  // The output rows covering each input row of a plane, the same in every plane: their first
  // flat index within the plane and the window position of their cells in this input row.
  std::vector<int64_t> cover_n(ID * IH), cover_o(ID * IH * most);
  std::vector<int32_t> cover_k(ID * IH * most);
  for (int64_t id = 0, i = 0; id < ID; ++id) {
    for (int64_t ih = 0; ih < IH; ++ih, ++i) {
      int64_t nc = 0;
      for (int64_t cd = td.first[id]; cd < td.first[id + 1]; ++cd) {
        for (int64_t ch = th.first[ih]; ch < th.first[ih + 1]; ++ch, ++nc) {
          cover_o[i * most + nc] = (td.cover_o[cd] * OH + th.cover_o[ch]) * OW;
          cover_k[i * most + nc] = static_cast<int32_t>((td.cover_k[cd] * KH + th.cover_k[ch]) * KW);
        }
      }
      cover_n[i] = nc;
    }
  }
  const bool streamed = streams<T>(planes * ID * IH * IW);
  const bool direct = streamed && rows_stream_direct<T, S>(gin, IW, g.pad[2]);
  const bool stream_rows = streamed && !direct;
  at::parallel_for(0, planes * ID * IH, grain_for(IW * 2), [&](int64_t begin, int64_t end) {
    // Sizes in locals, and this row's covering output rows copied into local arrays: the vector
    // stores may alias anything, so values read through the closure's references would be
    // reloaded after every store (NOTES §33).
    const int64_t ow_n = OW, iw_n = IW, kw_n = KW, pad_w = g.pad[2], rows_n = ID * IH;
    const int64_t out_plane = OD * OH * OW;
    std::vector<int64_t> orow_v(most);
    std::vector<int32_t> base_v(most);
    int64_t* orow = orow_v.data();
    int32_t* base = base_v.data();
    StagedRuns<T> out(stream_rows, staged_rows<T>(iw_n));
    RowCounter it(begin, 1, rows_n);  // a division per row showed in profiles (NOTES §90)
    for (int64_t r = begin; r < end; ++r, it.next()) {
      const int64_t plane = it.a, i = it.c, nc = cover_n[i];
      for (int64_t j = 0; j < nc; ++j) {
        orow[j] = plane * out_plane + cover_o[i * most + j];
        base[j] = cover_k[i * most + j];
      }
      T* row = out.at(gin + r * iw_n, iw_n);
      // One to four covering output rows (3 x 3 stride-2 windows: one or two) at compile time,
      // with their rows' addresses and window positions in locals, where the compiler keeps them
      // in registers; more at run time.
      auto walk = [&](auto NCc) {
        constexpr int NC = decltype(NCc)::value;
        constexpr int kRows = NC > 0 ? NC : 1, kCols = KWc > 0 ? KWc : 1;
        const T* grow[kRows];
        const uint8_t* prow[kRows];
        __m256i kv[kRows][kCols];
        for (int j = 0; j < NC; ++j) {
          grow[j] = gout + orow[j];
          prow[j] = pos + orow[j];
          for (int kw = 0; kw < kCols; ++kw) kv[j][kw] = _mm256_set1_epi32(base[j] + kw);
        }
        const int64_t rows = NC > 0 ? NC : nc;
        auto contrib = [=](int64_t ow0, __m256* C, auto full) __attribute__((always_inline)) {
          constexpr bool kFull = decltype(full)::value;
          const __m256 zero = _mm256_setzero_ps();
          const int64_t kws = KWc > 0 ? KWc : kw_n;
          for (int64_t kw = 0; kw < kws; ++kw) C[kw] = zero;
          const int64_t n = kFull ? 8 : std::min<int64_t>(8, ow_n - ow0);
          for (int64_t j = 0; j < (n > 0 ? rows : 0); ++j) {
            const T* gr = gout + orow[j];
            const uint8_t* pr = pos + orow[j];
            if constexpr (NC > 0) gr = grow[j], pr = prow[j];
            const __m256 g8 = load8<!kFull>(gr, ow0, ow_n, zero);
            const __m256i p8 = ow_n >= 8 ? load_pos8_end(pr + ow0, n) : load_pos8(pr + ow0, n);
            for (int64_t kw = 0; kw < kws; ++kw) {
              __m256i k;
              if constexpr (NC > 0) {
                k = kv[j][kw];
              } else {
                k = _mm256_set1_epi32(base[j] + int32_t(kw));
              }
              const __m256i hit = _mm256_cmpeq_epi32(p8, k);
              C[kw] = _mm256_add_ps(C[kw], _mm256_and_ps(_mm256_castsi256_ps(hit), g8));
            }
          }
        };
        bwd_row_fused<S, KWc>(row, iw_n, ow_n, kw_n, pad_w, contrib, direct);
      };
      if constexpr (KWc > 0) {
        switch (nc) {
          case 1: walk(std::integral_constant<int, 1>{}); continue;
          case 2: walk(std::integral_constant<int, 2>{}); continue;
          case 3: walk(std::integral_constant<int, 3>{}); continue;
          case 4: walk(std::integral_constant<int, 4>{}); continue;
          default: break;
        }
      }
      walk(std::integral_constant<int, 0>{});
    }
    if (direct) stream_fence();
  });
}
#endif  // TORCHPOOL_AVX2

// The backward builds whole planes in cache (max_bwd_scatter, avg_bwd_scatter) when a plane's
// buffer of `elems` accumulators fits in 256 KB of L2 and there is a plane for every thread.
template <typename acc_t>
inline bool fits_scatter_plane(int64_t elems, int64_t planes) {
  return elems * static_cast<int64_t>(sizeof(acc_t)) <= 256 * 1024 &&
         planes >= at::get_num_threads();
}

// Max pool backward by plane, for planes that fit in L2: each task zeroes a plane, then every
// output adds its gradient at its saved cell, in output order (torch's own order, so the sums
// match torch's bit for bit), and the plane reaches memory once. One thread per plane and a
// fixed order: deterministic. A saved position that falls outside the plane (never written by
// the forward) is skipped rather than written out of bounds.
template <typename scalar_t, typename pos_t>
void max_bwd_scatter(const scalar_t* gout, const pos_t* pos, scalar_t* gin, const PoolGeometry& g,
                     int64_t planes) {
  using acc_t = acc_type<scalar_t>;
  constexpr bool kDirect = std::is_same_v<scalar_t, acc_t>;  // accumulate in the output itself
  const int64_t P = g.in_plane(), OP = g.out_plane(), IH = g.in[1], IW = g.in[2];
  // Offset of each output's window origin in the input plane (may lie in the padding), and of
  // each window cell from its origin. A window that misses the input (possible with dilation)
  // sends no gradient: its origin is put far outside the plane.
  const DimTable td(g, 0, false), th(g, 1, false), tw(g, 2, false);
  constexpr int64_t kNowhere = std::numeric_limits<int64_t>::min() / 4;
  std::vector<int64_t> origin(OP), cell(g.window_cells());
  for (int64_t od = 0, o = 0; od < g.out[0]; ++od) {
    for (int64_t oh = 0; oh < g.out[1]; ++oh) {
      for (int64_t ow = 0; ow < g.out[2]; ++ow, ++o) {
        const bool hits = td.lo[od] < td.hi[od] && th.lo[oh] < th.hi[oh] && tw.lo[ow] < tw.hi[ow];
        origin[o] = hits ? (g.input_coord(0, od, 0) * IH + g.input_coord(1, oh, 0)) * IW +
                               g.input_coord(2, ow, 0)
                         : kNowhere;
      }
    }
  }
  for (int64_t kd = 0, k = 0; kd < g.kernel[0]; ++kd) {
    for (int64_t kh = 0; kh < g.kernel[1]; ++kh) {
      for (int64_t kw = 0; kw < g.kernel[2]; ++kw, ++k) {
        cell[k] = (kd * g.dilation[0] * IH + kh * g.dilation[1]) * IW + kw * g.dilation[2];
      }
    }
  }
  const uint64_t cells = static_cast<uint64_t>(g.window_cells());
  at::parallel_for(0, planes, grain_for(P), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(kDirect ? 0 : P);
    for (int64_t pl = begin; pl < end; ++pl) {
      acc_t* dst = kDirect ? reinterpret_cast<acc_t*>(gin + pl * P) : buf.data();
      std::fill(dst, dst + P, acc_t(0));
      const scalar_t* go = gout + pl * OP;
      const pos_t* ps = pos + pl * OP;
      for (int64_t o = 0; o < OP; ++o) {
        const uint64_t k = static_cast<uint64_t>(static_cast<int64_t>(ps[o]));
        const int64_t at = origin[o] + cell[k < cells ? k : 0];
        if (static_cast<uint64_t>(at) < static_cast<uint64_t>(P) && k < cells) {
          dst[at] += static_cast<acc_t>(go[o]);
        }
      }
      if constexpr (!kDirect) convert(dst, gin + pl * P, P);
    }
  });
}

#if defined(TORCHPOOL_AVX2)
// Backward of windows that tile the input (kernel == stride in every dim, 2 wide along W, no
// padding or dilation), float NCHW: every input cell belongs to at most one window, so each output
// row writes its KD x KH x 2 tile rows directly, 8 outputs (16 cells) a chunk, the two window
// columns interleaved in registers. No zeroing pass, no sums, one write per cell; cells no window
// covers (odd sizes) are zeroed. `output_row(o, od, oh)` is called once per output row (o: its
// first flat output index) and returns a callable cols(ow0, each_row): for the 8 outputs from
// ow0 it calls each_row(f), which calls f(j, dst) for the output row's tile rows j = kd * KH + kh
// in turn, dst being where the chunk's 16 cells of tile row j go; f stores them there.
inline bool tile_bwd_ok(const PoolGeometry& g, int64_t planes) {
  if (planes < at::get_num_threads()) return false;  // one task per plane
  for (int d = 0; d < 3; ++d) {
    if (g.kernel[d] != g.stride[d] || g.pad[d] != 0 || g.dilation[d] != 1 ||
        g.out[d] * g.kernel[d] > g.in[d]) {
      return false;
    }
  }
  return g.kernel[2] == 2 && g.out[2] >= 8;
}

template <typename T, typename OutputRow>
void write_tiles(T* gin, const PoolGeometry& g, int64_t planes, OutputRow&& output_row) {
  const int64_t OD = g.out[0], OH = g.out[1], OW = g.out[2];
  const int64_t ID = g.in[0], IH = g.in[1], IW = g.in[2], KD = g.kernel[0], KH = g.kernel[1];
  // NRc: the tile rows per output row (KD * KH) when 1, 2 or 4, known at compile time; else 0.
  auto walk = [&](auto NRc) {
    constexpr int kNR = decltype(NRc)::value;
    at::parallel_for(0, planes, grain_for(g.in_plane()), [&](int64_t begin, int64_t end) {
      // Sizes in locals: the vector stores may alias anything, so values read through the
      // closure's references would be reloaded after every store (NOTES §33).
      const int64_t ow_n = OW, iw_n = IW, ih_n = IH, kd_n = KD, kh_n = KH;
      const int64_t nr = kNR > 0 ? kNR : KD * KH;
      // Tile rows of 384 bytes or more are written one after the other (the stores one stream
      // through memory); shorter ones chunk by chunk across the tile rows, each chunk's gradient
      // and positions loaded once for all of them (NOTES §62).
      const bool row_by_row = 2 * ow_n * static_cast<int64_t>(sizeof(T)) >= 384;
      std::vector<T*> row_list(kNR > 0 ? 0 : nr);
      T* row_fixed[kNR > 0 ? kNR : 1];
      T** rows = kNR > 0 ? row_fixed : row_list.data();
      // The tile rows' offsets from the first (j = kd * KH + kh), so that an output row finds
      // them by one add each.
      std::vector<int64_t> off_list(kNR > 0 ? 0 : nr);
      int64_t off_fixed[kNR > 0 ? kNR : 1];
      int64_t* off = kNR > 0 ? off_fixed : off_list.data();
      for (int64_t kd = 0, j = 0; kd < kd_n; ++kd) {
        for (int64_t kh = 0; kh < kh_n; ++kh, ++j) off[j] = (kd * ih_n + kh) * iw_n;
      }
      // Large gradients: planes up to 512 KiB staged whole (4 KiB of them at a time, at least
      // one: staged_whole) and streamed out.
      const int64_t plane_n = ID * IH * IW;
      StagedRuns<T> out(streams<T>(planes * plane_n), staged_whole<T>(plane_n, 512 << 10));
      for (int64_t pl = begin; pl < end; ++pl) {
        T* plane = out.at(gin + pl * plane_n, plane_n);
        // Rows no window covers: past the last window row, and every row of the depth slices
        // past the last window slice.
        for (int64_t id = 0; id < ID; ++id) {
          for (int64_t ih = (id < OD * KD ? OH * KH : 0); ih < IH; ++ih) {
            std::fill(plane + (id * IH + ih) * IW, plane + (id * IH + ih + 1) * IW, T(0));
          }
        }
        for (int64_t od = 0; od < OD; ++od) {
          for (int64_t oh = 0; oh < OH; ++oh) {
            auto cols = output_row(((pl * OD + od) * OH + oh) * OW, od, oh);
            T* const first = plane + (od * kd_n * ih_n + oh * kh_n) * iw_n;
            for (int64_t j = 0; j < nr; ++j) rows[j] = first + off[j];
            if (row_by_row) {
              for (int64_t j = 0; j < nr; ++j) {
                for (int64_t i = 0; i < ow_n; i += 8) {
                  const int64_t ow0 = chunk_start(i, ow_n);
                  cols(ow0, [&](auto&& tile_row) { tile_row(j, rows[j] + 2 * ow0); });
                }
              }
            } else {
              for (int64_t i = 0; i < ow_n; i += 8) {
                const int64_t ow0 = chunk_start(i, ow_n);
                cols(ow0, [&](auto&& tile_row) {
                  for (int64_t j = 0; j < nr; ++j) tile_row(j, rows[j] + 2 * ow0);
                });
              }
            }
            if (2 * ow_n < iw_n) {  // columns past the last window
              for (int64_t j = 0; j < nr; ++j) std::fill(rows[j] + 2 * ow_n, rows[j] + iw_n, T(0));
            }
          }
        }
      }
    });
  };
  switch (KD * KH) {
    case 1: return walk(std::integral_constant<int, 1>{});
    case 2: return walk(std::integral_constant<int, 2>{});
    case 4: return walk(std::integral_constant<int, 4>{});
    default: return walk(std::integral_constant<int, 0>{});
  }
}

// Max: the saved position selects the column whose cell took the maximum; bit-identical to torch.
template <typename T>
void max_bwd_tiles(const T* gout, const uint8_t* pos, T* gin, const PoolGeometry& g,
                   int64_t planes) {
  write_tiles(gin, g, planes, [&](int64_t o, int64_t, int64_t) {
    return [=](int64_t ow0, auto&& each_row) {
      prefetch_ahead<4096, 1>(gout + o + ow0);
      prefetch_ahead<1024, 1>(pos + o + ow0);
      const __m256i p8 =
          _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(pos + o + ow0)));
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        // bfloat16 bits moved, not converted: tile row j's pair of cells for output i is one
        // 32-bit lane, the gradient in its low half where the position is 2j, in its high half
        // where it is 2j + 1. NaNs become 0x7FC0, as torch's float round trip makes them.
        __m256i g16 = _mm256_cvtepu16_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(gout + o + ow0)));
        const __m256i is_nan = _mm256_cmpgt_epi32(
            _mm256_and_si256(g16, _mm256_set1_epi32(0x7FFF)), _mm256_set1_epi32(0x7F80));
        g16 = _mm256_blendv_epi8(g16, _mm256_set1_epi32(0x7FC0), is_nan);
        const __m256i hi = _mm256_slli_epi32(g16, 16);
        each_row([&](int64_t j, T* dst) {
          const __m256i k0 = _mm256_set1_epi32(static_cast<int32_t>(2 * j));
          const __m256i k1 = _mm256_set1_epi32(static_cast<int32_t>(2 * j + 1));
          const __m256i v = _mm256_or_si256(_mm256_and_si256(_mm256_cmpeq_epi32(p8, k0), g16),
                                            _mm256_and_si256(_mm256_cmpeq_epi32(p8, k1), hi));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), v);
        });
      } else {
        const __m256 g8 = loadf(gout + o + ow0);
        each_row([&](int64_t j, T* dst) {
          const __m256i k0 = _mm256_set1_epi32(static_cast<int32_t>(2 * j));
          const __m256i k1 = _mm256_set1_epi32(static_cast<int32_t>(2 * j + 1));
          store_pairs<true>(dst, _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(p8, k0)), g8),
                            _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(p8, k1)), g8));
        });
      }
    };
  });
}
#endif  // TORCHPOOL_AVX2

template <typename scalar_t, typename pos_t>
void max_bwd_planar(const scalar_t* gout, const pos_t* pos, scalar_t* gin, const PoolGeometry& g,
                    int64_t planes) {
#if defined(TORCHPOOL_AVX2)
  if constexpr (kFusedType<scalar_t>) {
    if (tiny_planes_ok(g, planes) && max_bwd_tiny_planes(gout, pos, gin, g, planes)) return;
  }
  if constexpr (kFusedType<scalar_t> && std::is_same_v<pos_t, uint8_t>) {
    if (tile_bwd_ok(g, planes)) {
      max_bwd_tiles(gout, pos, gin, g, planes);
      return;
    }
  }
  // Windows one row high (1d pools): each input row comes from one output row, 8 outputs per
  // chunk in registers, which beats the plane scatter's one output at a time (NOTES §39).
  // Windows 2 or 3 wide with at most 4 output rows over each input row too, in rows of 48
  // outputs or more (§54, §59); narrower rows, whose edge chunks are a larger share, and other
  // taller windows are faster through the scatter.
  auto fused = [&]() {
    if constexpr (kFusedType<scalar_t> && std::is_same_v<pos_t, uint8_t>) {
      if (fused_bwd_ok(g)) {
        with_fused_width(g, [&](auto S, auto KW) {
          max_bwd_fused<decltype(S)::value, decltype(KW)::value>(gout, pos, gin, g, planes);
        });
        return true;
      }
    }
    return false;
  };
  if (g.kernel[0] * g.kernel[1] == 1 && fused()) return;
  if ((g.kernel[2] == 2 || g.kernel[2] == 3) && g.out[2] >= 48 && max_cover_rows(g) <= 4 &&
      fused()) {
    return;
  }
#endif
  if (g.window_cells() <= 4096 && fits_scatter_plane<acc_type<scalar_t>>(g.in_plane(), planes)) {
    max_bwd_scatter(gout, pos, gin, g, planes);
    return;
  }
#if defined(TORCHPOOL_AVX2)
  if (fused()) return;
#endif
  using acc_t = acc_type<scalar_t>;
  const int64_t OD = g.out[0], OH = g.out[1], OW = g.out[2];
  const int64_t ID = g.in[0], IH = g.in[1], IW = g.in[2], KH = g.kernel[1], KW = g.kernel[2];
  const DimTable td(g, 0, true), th(g, 1, true);
  const RowPhases ph(g);
  at::parallel_for(0, planes * ID * IH, grain_for(IW * 2), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(ph.size());
    RowCounter it(begin, ID, IH);
    for (int64_t r = begin; r < end; ++r, it.next()) {
      const int64_t plane = it.a, id = it.b, ih = it.c;
      std::fill(buf.begin(), buf.end(), acc_t(0));
      for (int64_t cd = td.first[id]; cd < td.first[id + 1]; ++cd) {
        const int64_t od = td.cover_o[cd], kd = td.cover_k[cd];
        for (int64_t ch = th.first[ih]; ch < th.first[ih + 1]; ++ch) {
          const int64_t oh = th.cover_o[ch], kh = th.cover_k[ch];
          const int64_t orow = ((plane * OD + od) * OH + oh) * OW;
          const int32_t base = static_cast<int32_t>((kd * KH + kh) * KW);
          for (int64_t kw = 0; kw < KW; ++kw) {
            masked_add(gout + orow, pos + orow, base + static_cast<int32_t>(kw),
                       buf.data() + ph.run(kw * g.dilation[2]), OW);
          }
        }
      }
      store_row(buf.data(), gin + r * IW, ph, g.pad[2], IW);
    }
  });
}

template <typename scalar_t, typename pos_t>
void max_bwd_cl(const scalar_t* gout, const pos_t* pos, scalar_t* gin, const PoolGeometry& g,
                int64_t N, int64_t C) {
#if defined(TORCHPOOL_AVX2)
  if constexpr (kFusedType<scalar_t> && std::is_same_v<pos_t, uint8_t>) {
    max_bwd_cl_fused(gout, pos, gin, g, N, C);
    return;
  }
#endif
  using acc_t = acc_type<scalar_t>;
  const int64_t OD = g.out[0], OH = g.out[1], OW = g.out[2];
  const int64_t ID = g.in[0], IH = g.in[1], IW = g.in[2], KH = g.kernel[1], KW = g.kernel[2];
  const DimTable td(g, 0, true), th(g, 1, true), tw(g, 2, true);
  at::parallel_for(0, N * ID * IH, grain_for(IW * C), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(C);
    RowCounter it(begin, ID, IH);
    for (int64_t r = begin; r < end; ++r, it.next()) {
      const int64_t n = it.a, id = it.b, ih = it.c;
      for (int64_t iw = 0; iw < IW; ++iw) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t cd = td.first[id]; cd < td.first[id + 1]; ++cd) {
          for (int64_t ch = th.first[ih]; ch < th.first[ih + 1]; ++ch) {
            for (int64_t cw = tw.first[iw]; cw < tw.first[iw + 1]; ++cw) {
              const int32_t k = static_cast<int32_t>(
                  (td.cover_k[cd] * KH + th.cover_k[ch]) * KW + tw.cover_k[cw]);
              const int64_t o =
                  (((n * OD + td.cover_o[cd]) * OH + th.cover_o[ch]) * OW + tw.cover_o[cw]) * C;
              masked_add(gout + o, pos + o, k, acc.data(), C);
            }
          }
        }
        convert(acc.data(), gin + (r * IW + iw) * C, C);
      }
    }
  });
}

// Window position -> flat index into the input's spatial plane. `cl`: channels-last element order.
template <typename pos_t>
void pos_to_index(const pos_t* pos, int64_t* idx, const PoolGeometry& g, int64_t planes,
                  int64_t C, bool cl) {
  const int64_t OD = g.out[0], OH = g.out[1], OW = g.out[2];
  const int64_t KH = g.kernel[1], KW = g.kernel[2];
  const int64_t total = planes * g.out_plane();
  at::parallel_for(0, total, 16384, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      const int64_t spatial = cl ? (e / C) % (OD * OH * OW) : e % (OD * OH * OW);
      const int64_t od = spatial / (OH * OW), oh = (spatial / OW) % OH, ow = spatial % OW;
      const int64_t k = static_cast<int64_t>(pos[e]);
      const int64_t id = g.input_coord(0, od, k / (KH * KW));
      const int64_t ih = g.input_coord(1, oh, (k / KW) % KH);
      const int64_t iw = g.input_coord(2, ow, k % KW);
      idx[e] = (id * g.in[1] + ih) * g.in[2] + iw;
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Average pool (no dilation). The divisor of output (od, oh, ow) is divisor_override, or the
// product of the per-dim counts (torch's rule).

struct AvgTables {
  DimTable d, h, w;
  int64_t divisor_override;
  AvgTables(const PoolGeometry& g, bool cover, bool count_include_pad, int64_t divisor_override_)
      : d(g, 0, cover, count_include_pad), h(g, 1, cover, count_include_pad),
        w(g, 2, cover, count_include_pad), divisor_override(divisor_override_) {}

  template <typename acc_t>
  void row_divisors(int64_t od, int64_t oh, acc_t* div) const {
    const int64_t dh = d.count[od] * h.count[oh];
    for (size_t ow = 0; ow < w.count.size(); ++ow) {
      div[ow] = static_cast<acc_t>(divisor_override != 0 ? divisor_override : dh * w.count[ow]);
    }
  }
  // Every output's divisor, the same for each plane.
  template <typename acc_t>
  std::vector<acc_t> divisors() const {
    const int64_t OD = d.count.size(), OH = h.count.size(), OW = w.count.size();
    std::vector<acc_t> div(OD * OH * OW);
    for (int64_t od = 0; od < OD; ++od) {
      for (int64_t oh = 0; oh < OH; ++oh) row_divisors(od, oh, div.data() + (od * OH + oh) * OW);
    }
    return div;
  }
  // The divisor is separable: (d count * h count) * w count, or the override everywhere.
  int64_t dh_factor(int64_t od, int64_t oh) const {
    return divisor_override != 0 ? divisor_override : d.count[od] * h.count[oh];
  }
  std::vector<float> w_factors(int64_t padded) const {
    std::vector<float> f(padded, 1.f);
    for (size_t ow = 0; ow < w.count.size(); ++ow) {
      f[ow] = divisor_override != 0 ? 1.f : static_cast<float>(w.count[ow]);
    }
    return f;
  }
  int64_t divisor(int64_t od, int64_t oh, int64_t ow) const {
    return divisor_override != 0 ? divisor_override : d.count[od] * h.count[oh] * w.count[ow];
  }
};

#if defined(TORCHPOOL_AVX2)
// The float divisors of outputs ow0 .. ow0 + 7 of output row (od, oh); `wf` is
// t.w_factors(OW rounded up to 8). Products of counts are exact in float, so this divides by the
// same values torch does. The tables are held as plain pointers, so that a copy of it in a loop
// keeps them in registers.
struct Divisors8 {
  const int64_t *d, *h;
  const float* w;
  int64_t over;
  Divisors8(const AvgTables& t, const std::vector<float>& wf)
      : d(t.d.count.data()), h(t.h.count.data()), w(wf.data()), over(t.divisor_override) {}
  __m256 operator()(int64_t od, int64_t oh, int64_t ow0) const {
    const int64_t dh = over != 0 ? over : d[od] * h[oh];
    return _mm256_mul_ps(_mm256_set1_ps(static_cast<float>(dh)), _mm256_loadu_ps(w + ow0));
  }
};
#endif

template <typename scalar_t, typename acc_t>
inline void divide(const acc_t* __restrict a, const acc_t* __restrict div,
                   scalar_t* __restrict out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(a[i] / div[i]);
}

#if defined(TORCHPOOL_AVX2)
template <int S, int KWc, int NRc, typename T>
void avg_rows_fused(const T* in, T* out, const PoolGeometry& g, int64_t planes,
                    bool count_include_pad, int64_t divisor_override) {
  const int64_t OW = g.out[2];
  const AvgTables t(g, false, count_include_pad, divisor_override);
  const std::vector<float> wf = t.w_factors((OW + 7) / 8 * 8);
  const Divisors8 divisors(t, wf);
  const __m256 zero = _mm256_setzero_ps();
  for_fused_chunks<S, KWc, NRc>(in, g, planes, zero, [=](int64_t r, int64_t od, int64_t oh, int64_t ow0,
                                                    int32_t, auto&& visit, auto) {
    __m256 sum = zero;
    visit([&](__m256i, __m256 v, bool) { sum = _mm256_add_ps(sum, v); });
    store8(out + r * OW + ow0, _mm256_div_ps(natural<S, T>(sum), divisors(od, oh, ow0)),
           std::min<int64_t>(8, OW - ow0));
  });
}

// Every window lies inside the input, so every divisor is the window's size (or the override). A
// power of two divides as a multiply by its reciprocal, which gives the same result (both exact
// before the one rounding) without the divide's latency. Windows of 2 x 2 x 2 cells take
// for_tiles_w2_slices, the cells added in the same order (NOTES §111).
template <int NR, typename T>
void avg_tiles_w2(const T* in, T* out, const PoolGeometry& g, int64_t planes,
                  int64_t divisor_override) {
  const int64_t d = divisor_override != 0 ? divisor_override : 2 * NR;
  // The cells of window rows j0 .. j1 - 1 added to sum in scan order.
  auto add_rows = [](__m256 sum, auto&& cells, int j0, int j1) __attribute__((always_inline)) {
    for (int j = j0; j < j1; ++j) {
      __m256 c[2];
      cells(j, c);
      sum = _mm256_add_ps(_mm256_add_ps(sum, c[0]), c[1]);
    }
    return sum;
  };
  auto walk = [&](auto kPow2) {
    const __m256 divisor = _mm256_set1_ps(static_cast<float>(d));
    const __m256 recip = _mm256_set1_ps(1.f / static_cast<float>(d));
    auto finish = [=](__m256 sum, T* dst) __attribute__((always_inline)) {
      sum = natural<2, T>(sum);
      store8(dst, kPow2 ? _mm256_mul_ps(sum, recip) : _mm256_div_ps(sum, divisor), 8);
    };
    if constexpr (NR == 4) {
      if (tiles_w2_slices_ok(g)) {  // the first slice's sums kept, the second's cells added on
        for_tiles_w2_slices<1>(
            in, out, g, planes,
            [=](float* kept, auto&& cells) { _mm256_store_ps(kept, add_rows(_mm256_setzero_ps(), cells, 0, 2)); },
            [=](const float* kept, int64_t, T* dst, auto&& cells) {
              finish(add_rows(_mm256_load_ps(kept), cells, 2, 4), dst);
            });
        return;
      }
    }
    for_tiles_w2<NR>(in, out, g, planes, [=](int64_t, T* dst, auto&& cells) {
      finish(add_rows(_mm256_setzero_ps(), cells, 0, NR), dst);
    });
  };
  if (d > 0 && (d & (d - 1)) == 0 && d <= (int64_t{1} << 24)) {
    walk(std::true_type{});
  } else {
    walk(std::false_type{});
  }
}

// A row's last IW % 8 cells: their lanes, and for the half types where they sit among the
// row's last 8 cells (rows of 8 or more load those whole and move them down in registers).
struct RowTail {
  __m256i mask, from;
  explicit RowTail(int64_t IW)
      : mask(lanes_inside(0, IW % 8)),
        from(_mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                              _mm256_set1_epi32(static_cast<int32_t>(8 - IW % 8)))) {}
};

// The last IW % 8 cells of a row of IW cells (tail: RowTail(IW)) in lanes 0 .., the others 0.
template <typename T>
inline __m256 load_row_tail(const T* row, int64_t IW, const RowTail& tail) {
  const int64_t x = IW - IW % 8;
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_maskload_ps(row + x, tail.mask);
  } else if (IW >= 8) {  // the row's last 8 cells, moved down in registers
    return _mm256_and_ps(_mm256_permutevar8x32_ps(loadf(row + IW - 8), tail.from),
                         _mm256_castsi256_ps(tail.mask));
  } else {
    return load_lanes(row, IW);
  }
}

// v[x] = (kAcc ? v[x] : 0) + the sum of rows p, p + IW, ... (n of them) at x, for x < IW; whole
// vectors are stored, the lanes past IW as 0 (tail: RowTail(IW)). NC: n when known at compile
// time, else 0.
template <int NC, bool kAcc, typename T>
inline void sum_rows(const T* p, int64_t n, int64_t IW, const RowTail& tail, float* v) {
  if constexpr (NC > 0) n = NC;
  auto column = [&](int64_t x, auto masked) {
    auto load = [&](const T* q) {
      if constexpr (decltype(masked)::value) {
        return load_row_tail(q - x, IW, tail);
      } else {
        return loadf(q);
      }
    };
    __m256 s = load(p + x);
    if constexpr (kAcc) s = _mm256_add_ps(_mm256_loadu_ps(v + x), s);
    for (int64_t j = 1; j < n; ++j) s = _mm256_add_ps(s, load(p + j * IW + x));
    _mm256_storeu_ps(v + x, s);
  };
  int64_t x = 0;
  for (; x + 8 <= IW; x += 8) column(x, std::false_type{});
  if (x < IW) column(x, std::true_type{});
}

template <bool kAcc, typename T>
inline void sum_rows_any(const T* p, int64_t n, int64_t IW, const RowTail& tail, float* v) {
  switch (n) {
    case 2: return sum_rows<2, kAcc>(p, n, IW, tail, v);
    case 3: return sum_rows<3, kAcc>(p, n, IW, tail, v);
    default: return sum_rows<0, kAcc>(p, n, IW, tail, v);
  }
}

// 1 / the divisor of every output of each output row (od, oh): row[od * OH + oh] points to OW
// of them (then zeros up to a whole vector), one table per distinct factor d count * h count (or
// the override), the same in every plane.
struct RowReciprocals {
  std::vector<std::pair<int64_t, std::vector<float>>> tables;
  std::vector<const float*> row;
  RowReciprocals(const PoolGeometry& g, const AvgTables& t) {
    const int64_t OD = g.out[0], OH = g.out[1], OW = g.out[2];
    const std::vector<float> wf = t.w_factors((OW + 7) / 8 * 8);
    std::vector<size_t> which(OD * OH);
    for (int64_t od = 0, o = 0; od < OD; ++od) {
      for (int64_t oh = 0; oh < OH; ++oh, ++o) {
        const int64_t dh = t.dh_factor(od, oh);
        size_t k = 0;
        while (k < tables.size() && tables[k].first != dh) ++k;
        if (k == tables.size()) {
          std::vector<float> rec((OW + 7) / 8 * 8, 0.f);
          for (int64_t ow = 0; ow < OW; ++ow) rec[ow] = 1.f / (static_cast<float>(dh) * wf[ow]);
          tables.emplace_back(dh, std::move(rec));
        }
        which[o] = k;
      }
    }
    row.resize(which.size());
    for (size_t o = 0; o < which.size(); ++o) row[o] = tables[which[o]].second.data();
  }
};

// Stride 1 along W, separable: the window's input rows of an output row are summed once into a
// zero-padded row buffer (cells outside the input are zeros), then each chunk of 8 outputs adds KW
// shifted loads of it: per output about nr + KW adds instead of nr * KW. The shifted loads read
// the previous row's buffer (two buffers, the horizontal pass one row behind), so they never wait
// on the stores just made. Each output is multiplied by 1 / divisor; with the sum's order differing
// from torch's cell-by-cell one, results differ from torch's in the last bits.
template <int KWc, typename T>
void avg_rows_separable(const T* in, T* out, const PoolGeometry& g, int64_t planes,
                        bool count_include_pad, int64_t divisor_override) {
  const int64_t OD = g.out[0], OH = g.out[1], OW = g.out[2];
  const int64_t ID = g.in[0], IH = g.in[1], IW = g.in[2], PW = g.pad[2];
  const int64_t KW = KWc > 0 ? KWc : g.kernel[2];
  const AvgTables t(g, false, count_include_pad, divisor_override);
  const DimTable td(g, 0, false), th(g, 1, false);
  const RowTail tail(IW);
  // Chunks read cells [ow0 - PW, ow0 - PW + 8 + KW - 1) with ow0 + 8 <= max(OW, 8); the vertical
  // pass writes whole vectors up to IW rounded up to 8.
  const int64_t buf_len = (PW + std::max(IW, std::max<int64_t>(OW, 8) + KW) + 15) / 8 * 8;
  // Per output row (od, oh), the same in every plane: the offset of its first window row in the
  // plane, how many rows its window has in the input along H and D, and 1 / divisor of each of
  // its outputs (one table per distinct factor d count * h count, or the override).
  const int64_t rows_n = OD * OH;
  std::vector<int64_t> first_row(rows_n), nh(rows_n), nd(rows_n);
  for (int64_t od = 0, o = 0; od < OD; ++od) {
    for (int64_t oh = 0; oh < OH; ++oh, ++o) {
      first_row[o] = (g.input_coord(0, od, td.lo[od]) * IH + g.input_coord(1, oh, th.lo[oh])) * IW;
      nh[o] = th.hi[oh] - th.lo[oh];
      nd[o] = td.hi[od] - td.lo[od];
    }
  }
  const RowReciprocals rr(g, t);
  const std::vector<const float*>& rc_row = rr.row;
  at::parallel_for(0, planes * rows_n, grain_for(OW * g.window_cells()), [&](int64_t begin, int64_t end) {
    // What the rows use, in locals: the vector stores may alias anything, so values read through
    // the closure's references would be reloaded after every store (NOTES §33).
    const int64_t ow_n = OW, iw_n = IW, kw_n = KW, rows_per_plane = rows_n;
    const int64_t plane_len = ID * IH * IW, slice_len = IH * IW;
    const int64_t *first = first_row.data(), *nhs = nh.data(), *nds = nd.data();
    const float* const* rcs = rc_row.data();
    const RowTail tl = tail;
    std::vector<float> bufv(2 * buf_len, 0.f);
    // vs(r)[x]: the sum of input column x over the window rows of output row r (x from -PW).
    float* const b0 = bufv.data() + PW;
    float* const b1 = b0 + buf_len;
    auto horizontal = [&](int64_t r, int64_t o) __attribute__((always_inline)) {
      const float* v = (r & 1 ? b1 : b0) - PW;
      const float* rc = rcs[o];
      T* dst = out + r * ow_n;
      auto chunk = [&](int64_t ow0) {
        __m256 sum = _mm256_loadu_ps(v + ow0);
        for (int64_t kw = 1; kw < kw_n; ++kw) sum = _mm256_add_ps(sum, _mm256_loadu_ps(v + ow0 + kw));
        return _mm256_mul_ps(sum, _mm256_loadu_ps(rc + ow0));
      };
      if (ow_n < 8) {
        store8(dst, chunk(0), ow_n);
        return;
      }
      int64_t ow0 = 0;
      for (; ow0 + 8 <= ow_n; ow0 += 8) storef(dst + ow0, chunk(ow0));
      if (ow0 < ow_n) storef(dst + ow_n - 8, chunk(ow_n - 8));  // overlaps, recomputed equal
    };
    int64_t plane = begin / rows_per_plane, o = begin % rows_per_plane, prev_o = 0;
    for (int64_t r = begin; r < end; ++r) {
      float* v = r & 1 ? b1 : b0;
      const T* p = in + plane * plane_len + first[o];
      const int64_t n = nhs[o], depth = nds[o];
      sum_rows_any<false>(p, n, iw_n, tl, v);
      for (int64_t kd = 1; kd < depth; ++kd) sum_rows_any<true>(p + kd * slice_len, n, iw_n, tl, v);
      if (r > begin) horizontal(r - 1, prev_o);
      prev_o = o;
      if (++o == rows_per_plane) {
        o = 0;
        ++plane;
      }
    }
    horizontal(end - 1, prev_o);
  });
}

// Planes up to this many cells take avg_planes_flat3: its input, output, row sums and reciprocals
// (four planes of floats, up to 32 KiB) then stay in L1 or close to it.
constexpr int64_t kFlatAvgCells = 2048;

// Stride 1 along H and W, a K x K window (K = 2 or 3), one depth slice, rows of input and output
// at least 8 wide: the forward and the backward are both box sums of K x K source cells per
// destination cell, walked down columns (box_rows_rolling).
inline bool rolling_avg_ok(const PoolGeometry& g) {
  return g.in[0] == 1 && g.out[0] == 1 && g.kernel[0] == 1 && g.stride[1] == 1 &&
         g.stride[2] == 1 && g.dilation[1] == 1 && g.dilation[2] == 1 &&
         g.kernel[1] == g.kernel[2] && (g.kernel[2] == 2 || g.kernel[2] == 3) && g.in[2] >= 8 &&
         g.out[2] >= 8 && g.in[1] * g.in[2] < (int64_t{1} << 40);
}

// dst[r][c] for planes of DH x DW = the sum over j, k < K of H(r + roff + j) at source column
// c + coff + k, source planes SH x SW, cells outside them 0. Forward (kGrad false): the source
// cell itself, the sum times rc[r][c] (1 / divisor). Backward: each source cell (an output's
// gradient) times its own rc[s][x] first. Each chunk of 8 destination cells walks down its
// columns: a source row's K shifted loads are summed once, and the last K such sums stay in
// registers, so a destination vector costs K loads (backward: 2K), 2K - 2 adds and a multiply,
// with no row buffer to store and reload (the separable paths'). Bands of about 24 KB of source
// rows per task keep a column's rows in L1 for the next one; large float destinations are staged
// a unit at a time and written out by non-temporal stores. The additions' order is not torch's
// (results differ in the last bits).
template <int K, bool kGrad, typename T>
void box_rows_rolling(const T* src, T* dst, int64_t planes, int64_t SH, int64_t SW, int64_t DH,
                      int64_t DW, int64_t roff, int64_t coff, const float* const* rc) {
  const int64_t band = std::max<int64_t>(4 * K, (24 << 10) / static_cast<int64_t>(SW * sizeof(T)));
  const int64_t bands = (DH + band - 1) / band;
  // Large destinations: each unit's rows (contiguous) staged and streamed out, 4 KiB of them at a
  // time or one unit where larger (units over kOutRunBytes not staged).
  const bool staged = forward_streams<T>(planes * DH * DW);
  const int64_t cap = staged_whole<T>(std::min(band, DH) * DW, kOutRunBytes);
  at::parallel_for(0, planes * bands, grain_for(std::min(band, DH) * DW * K * K), [&](int64_t begin, int64_t end) {
    StagedRuns<T> out(staged, cap);
    // Sizes in locals: the vector stores may alias anything, so values read through the
    // closure's references would be reloaded after every store (NOTES §33).
    const int64_t sh_n = SH, sw_n = SW, dh_n = DH, dw_n = DW, roff_n = roff, coff_n = coff;
    const int64_t band_n = band, bands_n = bands;
    const float* const* rcs = rc;
    // The same cells two units (bands, or planes when a band is a whole plane) ahead are
    // prefetched as they are read and written: the walks' column order across rows leaves the
    // hardware prefetchers behind (NOTES §57).
    const int64_t src_ahead = 2 * (bands_n == 1 ? sh_n * sw_n : band_n * sw_n);
    const int64_t dst_ahead = 2 * (bands_n == 1 ? dh_n * dw_n : band_n * dw_n);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t plane = u / bands_n, r0 = u % bands_n * band_n;
      const int64_t r1 = std::min(dh_n, r0 + band_n);
      const T* sp = src + plane * sh_n * sw_n;
      // The unit's destination rows r0 .. r1 - 1 in place, or where they are staged.
      T* const unit_dst = dst + (plane * dh_n + r0) * dw_n;
      T* const ud = out.at(unit_dst, (r1 - r0) * dw_n);
      const bool pf_dst = ud == unit_dst;
      // Chunk c0's column (first source cell x0 = c0 + coff) down the band; h_row(s) sums
      // source row s's K shifted loads, and h holds those sums for the current destination
      // row's K source rows, the oldest first (rows outside the plane: 0).
      auto walk = [&](int64_t c0, int64_t x0, auto h_row) __attribute__((always_inline)) {
        auto h_of = [&](int64_t sr) __attribute__((always_inline)) {
          if (sr < 0 || sr >= sh_n) return _mm256_setzero_ps();
          const T* row = sp + sr * sw_n;
          _mm_prefetch(reinterpret_cast<const char*>(row + x0 + src_ahead), _MM_HINT_T0);
          return h_row(row, rcs[kGrad ? sr : 0]);
        };
        __m256 h[K];
        for (int j = 0; j + 1 < K; ++j) h[j] = h_of(r0 + roff_n + j);
        T* d = ud + c0;
        for (int64_t r = r0; r < r1; ++r, d += dw_n) {
          h[K - 1] = h_of(r + roff_n + K - 1);
          __m256 sum = h[0];
          for (int j = 1; j < K; ++j) sum = _mm256_add_ps(sum, h[j]);
          if constexpr (!kGrad) sum = _mm256_mul_ps(sum, _mm256_loadu_ps(rcs[r] + c0));
          if (pf_dst) _mm_prefetch(reinterpret_cast<const char*>(d + dst_ahead), _MM_HINT_T0);
          storef(d, sum);
          for (int j = 0; j + 1 < K; ++j) h[j] = h[j + 1];
        }
      };
      for (int64_t i = 0; i < dw_n; i += 8) {
        const int64_t c0 = chunk_start(i, dw_n), x0 = c0 + coff_n;
        if (x0 >= 0 && x0 + K - 1 + 8 <= sw_n) {
          walk(c0, x0, [&](const T* row, const float* w) __attribute__((always_inline)) {
            auto term = [&](int k) __attribute__((always_inline)) {
              const __m256 v = loadf(row + x0 + k);
              return kGrad ? _mm256_mul_ps(v, _mm256_loadu_ps(w + x0 + k)) : v;
            };
            __m256 s = term(0);
            for (int k = 1; k < K; ++k) s = _mm256_add_ps(s, term(k));
            return s;
          });
          continue;
        }
        // An edge chunk: cells outside the row read as 0. float: masked loads (masked-off lanes
        // are not read); the half types: the row's 8 cells nearest each load, moved to their
        // lanes. The backward's divisors load the same way (the tables hold sw_n of them).
        __m256i inside[K], from[K];
        int64_t base[K];
        for (int k = 0; k < K; ++k) {
          inside[k] = lanes_inside(x0 + k, sw_n);
          base[k] = std::min(std::max<int64_t>(x0 + k, 0), sw_n - 8);
          from[k] = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                     _mm256_set1_epi32(static_cast<int32_t>(x0 + k - base[k])));
        }
        walk(c0, x0, [&](const T* row, const float* w) __attribute__((always_inline)) {
          auto edge_load = [&](const auto* p, int k) __attribute__((always_inline)) {
            if constexpr (std::is_same_v<std::remove_cv_t<std::remove_pointer_t<decltype(p)>>, float>) {
              return _mm256_maskload_ps(p + x0 + k, inside[k]);
            } else {
              return _mm256_and_ps(_mm256_permutevar8x32_ps(loadf(p + base[k]), from[k]),
                                   _mm256_castsi256_ps(inside[k]));
            }
          };
          __m256 s = _mm256_setzero_ps();
          for (int k = 0; k < K; ++k) {
            __m256 v = edge_load(row, k);
            if constexpr (kGrad) v = _mm256_mul_ps(v, edge_load(w, k));
            s = k == 0 ? v : _mm256_add_ps(s, v);
          }
          return s;
        });
      }
    }
  });
}

// The forward of 3 x 3 windows at stride 1 with a padding of one (outputs the size of the input,
// as inception's) over small planes: box_rows_rolling walks a chunk of 8 columns down a plane
// of 35 rows and spends much of its time outside the sums (the edge chunks' masked loads, a last
// chunk overlapping the one before, loads and stores split across cache lines at every row's odd
// offset: 0.33 ns a cell in L2, one thread). Here each plane is read as one flat run of cells, its
// rows' 3-cell sums go into a buffer in L1 (the two cells at each row's ends, whose loads reached
// into the neighbouring rows, redone alone), then each output is the sum of its column's 3 row
// sums, times its reciprocal: the sums of box_rows_rolling in the same order, so the same results
// to the bit. The half types' plane is widened into a float buffer first; they take this walk
// only where the tuning prefetches each next plane (Tuning::flat_avg_prefetch, NOTES §121). The
// backward stays with box_rows_rolling: its source cells each multiplied by their own reciprocal
// first, this walk was slower from memory (NOTES §110).
inline bool avg_flat3_ok(const PoolGeometry& g) {
  return rolling_avg_ok(g) && g.kernel[2] == 3 && g.pad[1] == 1 && g.pad[2] == 1 &&
         g.in[1] * g.in[2] >= 16 && g.in[1] * g.in[2] <= kFlatAvgCells;
}

template <typename T>
void avg_planes_flat3(const T* in, T* out, int64_t planes, int64_t H, int64_t W,
                      const float* const* rc) {
  const int64_t n = H * W;
  const bool staged = forward_streams<T>(planes * n), prefetch = tuning().flat_avg_prefetch;
  at::parallel_for(0, planes, grain_for(n * 9), [&](int64_t begin, int64_t end) {
    StagedRuns<T> st(staged, staged_whole<T>(n, kOutRunBytes));
    const int64_t n_n = n, w_n = W, h_n = H;
    // The reciprocals as one flat plane; the row sums with a row of zeros before and after; the
    // half types' plane widened to float.
    PageBuffer<float> rcp(n_n), sums((h_n + 2) * w_n);
    PageBuffer<float> wide =
        std::is_same_v<T, float> ? PageBuffer<float>() : PageBuffer<float>(n_n);
    float* const r = rcp.get();
    for (int64_t y = 0; y < h_n; ++y) std::copy(rc[y], rc[y] + w_n, r + y * w_n);
    float* const hb = sums.get();
    std::fill(hb, hb + w_n, 0.f);
    std::fill(hb + (h_n + 1) * w_n, hb + (h_n + 2) * w_n, 0.f);
    float* const h = hb + w_n;
    const int64_t last = n_n - 8;
    // The plane's first and last vectors take their outer neighbours from their own loads, moved
    // one lane, a zero shifted in (no load reaches outside the plane).
    const __m256i up = _mm256_setr_epi32(7, 0, 1, 2, 3, 4, 5, 6), down = _mm256_setr_epi32(1, 2, 3, 4, 5, 6, 7, 0);
    const __m256 zero = _mm256_setzero_ps();
    for (int64_t p = begin; p < end; ++p) {
      if (prefetch && p + 1 < end) {
        const char* next = reinterpret_cast<const char*>(in + (p + 1) * n_n);
        for (int64_t b = 0; b < n_n * static_cast<int64_t>(sizeof(T)); b += 64) {
          _mm_prefetch(next + b, _MM_HINT_T0);
        }
      }
      const float* s;
      if constexpr (std::is_same_v<T, float>) {
        s = in + p * n_n;
      } else {
        for (int64_t j = 0; j < n_n; j += 8) {
          const int64_t at = std::min(j, last);
          _mm256_storeu_ps(wide.get() + at, loadf(in + p * n_n + at));
        }
        s = wide.get();
      }
      // Row sums: cells i - 1 and i + 1 taken across row ends.
      auto row3 = [&](int64_t at, __m256 left, __m256 right) __attribute__((always_inline)) {
        _mm256_storeu_ps(h + at, _mm256_add_ps(_mm256_add_ps(left, _mm256_loadu_ps(s + at)), right));
      };
      row3(0, _mm256_blend_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(s), up), zero, 0x01),
           _mm256_loadu_ps(s + 1));
      int64_t i = 8;
      for (; i + 9 <= n_n; i += 8) row3(i, _mm256_loadu_ps(s + i - 1), _mm256_loadu_ps(s + i + 1));
      row3(last, _mm256_loadu_ps(s + last - 1),
           _mm256_blend_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(s + last), down), zero, 0x80));
      for (int64_t y = 0; y < n_n; y += w_n) {  // each row's first and last cells, without the wrap
        h[y] = (0.f + s[y]) + s[y + 1];
        h[y + w_n - 1] = (s[y + w_n - 2] + s[y + w_n - 1]) + 0.f;
      }
      T* const d = st.at(out + p * n_n, n_n);
      for (int64_t j = 0; j < n_n; j += 8) {
        const int64_t at = std::min(j, last);
        const __m256 v = _mm256_add_ps(
            _mm256_add_ps(_mm256_loadu_ps(hb + at), _mm256_loadu_ps(h + at)), _mm256_loadu_ps(h + w_n + at));
        storef(d + at, _mm256_mul_ps(v, _mm256_loadu_ps(r + at)));
      }
    }
  });
}

template <int K, typename T>
void avg_rows_rolling(const T* in, T* out, const PoolGeometry& g, int64_t planes,
                      bool count_include_pad, int64_t divisor_override) {
  const AvgTables t(g, false, count_include_pad, divisor_override);
  const RowReciprocals rr(g, t);
  if (avg_flat3_ok(g) && (std::is_same_v<T, float> || tuning().flat_avg_prefetch)) {
    return avg_planes_flat3(in, out, planes, g.in[1], g.in[2], rr.row.data());
  }
  box_rows_rolling<K, false>(in, out, planes, g.in[1], g.in[2], g.out[1], g.out[2], -g.pad[1],
                             -g.pad[2], rr.row.data());
}

template <typename T>
void avg_cl_fused(const T* in, T* out, const PoolGeometry& g, int64_t N, int64_t C,
                  bool count_include_pad, int64_t divisor_override) {
  const AvgTables t(g, false, count_include_pad, divisor_override);
  for_cl_windows(g, N, C, in, out, [&](const ClWindow& w, T* cell_dst) {
    const __m256 div = _mm256_set1_ps(static_cast<float>(t.divisor(w.od, w.oh, w.ow)));
    for_channel_blocks(C, [&](auto NVc, int64_t c, int64_t n) {
      constexpr int NV = decltype(NVc)::value;
      __m256 sum[NV];
      for (int v = 0; v < NV; ++v) sum[v] = _mm256_setzero_ps();
      for (int64_t j = 0; j < w.cells; ++j) {
        const T* src = in + w.base + w.offs[j] + c;
        prefetch_ahead(src);
        if constexpr (kPairBlock<T, NV>) {
          __m256 x[NV];
          block_load<NV>(src, n, x);
          for (int v = 0; v < NV; ++v) sum[v] = _mm256_add_ps(sum[v], x[v]);
        } else {  // float, float16: as block_load would, but written out (8 % faster, NOTES §51)
          for (int v = 0; v < NV; ++v) sum[v] = _mm256_add_ps(sum[v], load_lanes(src + 8 * v, n));
        }
      }
      for (int v = 0; v < NV; ++v) sum[v] = _mm256_div_ps(sum[v], div);
      cell_store<false, NV>(cell_dst + c, sum, n, w.stream);
    });
  });
}
#endif  // TORCHPOOL_AVX2

template <typename scalar_t>
void avg_fwd_planar(const scalar_t* in, scalar_t* out, const PoolGeometry& g, int64_t planes,
                    bool count_include_pad, int64_t divisor_override) {
#if defined(TORCHPOOL_AVX2)
  if constexpr (kFusedType<scalar_t>) {
    if (tiny_planes_ok(g, planes)) {
      const AvgTables t(g, false, count_include_pad, divisor_override);
      avg_tiny_planes<false>(in, out, g, planes, t.divisors<float>().data());
      return;
    }
    if (tiles_w2_ok(g)) {
      const int64_t nr = g.kernel[0] * g.kernel[1];
      if (nr == 1) avg_tiles_w2<1>(in, out, g, planes, divisor_override);
      if (nr == 2) avg_tiles_w2<2>(in, out, g, planes, divisor_override);
      if (nr == 4) avg_tiles_w2<4>(in, out, g, planes, divisor_override);
      return;
    }
    if (fused_rows_ok(g)) {
      with_fused_shape(g, [&](auto S, auto KW, auto NR) {
        if (S.value == 1 && KW.value > 0 && rolling_avg_ok(g)) {
          avg_rows_rolling<KW.value>(in, out, g, planes, count_include_pad, divisor_override);
        } else if (S.value == 1 && g.kernel[2] > 1 && g.kernel[0] * g.kernel[1] > 1) {
          avg_rows_separable<KW.value>(in, out, g, planes, count_include_pad, divisor_override);
        } else {
          avg_rows_fused<S.value, KW.value, NR.value>(in, out, g, planes, count_include_pad, divisor_override);
        }
      });
      return;
    }
  }
#endif
  using acc_t = acc_type<scalar_t>;
  const int64_t OD = g.out[0], OH = g.out[1], OW = g.out[2];
  const int64_t IH = g.in[1], IW = g.in[2], KW = g.kernel[2];
  const AvgTables t(g, false, count_include_pad, divisor_override);
  const RowPhases ph(g);
  at::parallel_for(0, planes * OD * OH, grain_for(OW * g.window_cells()), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(ph.size()), acc(OW), div(OW);
    RowCounter it(begin, OD, OH);
    for (int64_t r = begin; r < end; ++r, it.next()) {
      const int64_t plane = it.a, od = it.b, oh = it.c;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t kd = t.d.lo[od]; kd < t.d.hi[od]; ++kd) {
        const int64_t id = g.input_coord(0, od, kd);
        for (int64_t kh = t.h.lo[oh]; kh < t.h.hi[oh]; ++kh) {
          const int64_t ih = g.input_coord(1, oh, kh);
          load_row(in + ((plane * g.in[0] + id) * IH + ih) * IW, buf.data(), ph, g.pad[2], IW,
                   acc_t(0));
          for (int64_t kw = 0; kw < KW; ++kw) sum_pass(buf.data() + ph.run(kw), acc.data(), OW);
        }
      }
      t.row_divisors(od, oh, div.data());
      divide(acc.data(), div.data(), out + r * OW, OW);
    }
  });
}

template <typename scalar_t>
void avg_fwd_cl(const scalar_t* in, scalar_t* out, const PoolGeometry& g, int64_t N, int64_t C,
                bool count_include_pad, int64_t divisor_override) {
#if defined(TORCHPOOL_AVX2)
  if constexpr (kFusedType<scalar_t>) {
    avg_cl_fused(in, out, g, N, C, count_include_pad, divisor_override);
    return;
  }
#endif
  using acc_t = acc_type<scalar_t>;
  const int64_t OD = g.out[0], OH = g.out[1], OW = g.out[2];
  const int64_t ID = g.in[0], IH = g.in[1], IW = g.in[2];
  const AvgTables t(g, false, count_include_pad, divisor_override);
  at::parallel_for(0, N * OD * OH, grain_for(OW * C * g.window_cells()), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(C), tmp(C), div(C);
    RowCounter it(begin, OD, OH);
    for (int64_t r = begin; r < end; ++r, it.next()) {
      const int64_t n = it.a, od = it.b, oh = it.c;
      for (int64_t ow = 0; ow < OW; ++ow) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t kd = t.d.lo[od]; kd < t.d.hi[od]; ++kd) {
          const int64_t id = g.input_coord(0, od, kd);
          for (int64_t kh = t.h.lo[oh]; kh < t.h.hi[oh]; ++kh) {
            const int64_t ih = g.input_coord(1, oh, kh);
            for (int64_t kw = t.w.lo[ow]; kw < t.w.hi[ow]; ++kw) {
              const int64_t iw = g.input_coord(2, ow, kw);
              const scalar_t* src = in + (((n * ID + id) * IH + ih) * IW + iw) * C;
              sum_pass(src_as_acc(src, tmp.data(), C), acc.data(), C);
            }
          }
        }
        std::fill(div.begin(), div.end(), static_cast<acc_t>(t.divisor(od, oh, ow)));
        divide(acc.data(), div.data(), out + (r * OW + ow) * C, C);
      }
    }
  });
}

#if defined(TORCHPOOL_AVX2)
template <int S, typename T>
void avg_bwd_fused(const T* gout, T* gin, const PoolGeometry& g, int64_t planes,
                   const AvgTables& t) {
  const int64_t OD = g.out[0], OH = g.out[1], OW = g.out[2];
  const int64_t ID = g.in[0], IH = g.in[1], IW = g.in[2], KW = g.kernel[2];
  const int64_t OW8 = (OW + 7) / 8 * 8;
  const __m256 zero = _mm256_setzero_ps();
  const std::vector<float> wf = t.w_factors(OW8);
  const Divisors8 divisors(t, wf);
  at::parallel_for(0, planes * ID * IH, grain_for(IW * 2), [&](int64_t begin, int64_t end) {
    RowCounter it(begin, ID, IH);
    for (int64_t r = begin; r < end; ++r, it.next()) {
      const int64_t plane = it.a, id = it.b, ih = it.c;
      bwd_row_fused<S, 0>(gin + r * IW, IW, OW, KW, g.pad[2], [&](int64_t ow0, __m256* C, auto) {
        __m256 sum = zero;
        for (int64_t cd = t.d.first[id]; ow0 < OW && cd < t.d.first[id + 1]; ++cd) {
          for (int64_t ch = t.h.first[ih]; ch < t.h.first[ih + 1]; ++ch) {
            const int64_t od = t.d.cover_o[cd], oh = t.h.cover_o[ch];
            const __m256 g8 = load8(gout + ((plane * OD + od) * OH + oh) * OW, ow0, OW, zero);
            const __m256 div = divisors(od, oh, ow0);
            sum = _mm256_add_ps(sum, _mm256_div_ps(g8, div));
          }
        }
        for (int64_t kw = 0; kw < KW; ++kw) C[kw] = sum;
      });
    }
  });
}
#endif  // TORCHPOOL_AVX2

#if defined(TORCHPOOL_AVX2)
// Average over windows that tile the input (write_tiles): both columns of every tile row get
// grad / divisor, the one contribution torch adds there, so the result is bit-identical.
template <typename T>
void avg_bwd_tiles(const T* gout, T* gin, const PoolGeometry& g, int64_t planes,
                   const AvgTables& t) {
  const int64_t OW = g.out[2];
  const std::vector<float> wf = t.w_factors((OW + 7) / 8 * 8);
  const Divisors8 divisors(t, wf);
  write_tiles(gin, g, planes, [&](int64_t o, int64_t od, int64_t oh) {
    return [=, &divisors](int64_t ow0, auto&& each_row) {
      prefetch_ahead<4096, 1>(gout + o + ow0);
      const __m256 v = _mm256_div_ps(loadf(gout + o + ow0), divisors(od, oh, ow0));
      each_row([&](int64_t, T* dst) { store_pairs(dst, v, v); });
    };
  });
}
#endif  // TORCHPOOL_AVX2

// dst += the window columns of one output row, dst being a phase-split row (RowPhases layout,
// phases of L cells, L a multiple of 8): dst[kw % S][ow + kw / S] += grad[ow] for every kw < KW.
// `grad` reads as 0 outside [0, OW) (the caller's buffer has zero margins: KW cells before,
// L + 8 after). Each dst vector is loaded and stored once with all its columns added in
// registers: passes that stored to dst and reloaded it shifted by a cell would stall on every
// load (a load spanning two recent stores is not forwarded).
template <typename acc_t>
inline void add_window_row(acc_t* __restrict dst, const acc_t* __restrict grad, int64_t S,
                           int64_t KW, int64_t L) {
  for (int64_t p = 0; p < S && p < KW; ++p) {
    acc_t* d = dst + p * L;
    for (int64_t j0 = 0; j0 < L; j0 += 8) {
      acc_t v[8];
      for (int l = 0; l < 8; ++l) v[l] = d[j0 + l];
      for (int64_t kw = p, q = 0; kw < KW; kw += S, ++q) {  // q = kw / S
        const acc_t* g = grad + j0 - q;
        for (int l = 0; l < 8; ++l) v[l] += g[l];
      }
      for (int l = 0; l < 8; ++l) d[j0 + l] = v[l];
    }
  }
}

#if defined(TORCHPOOL_AVX2)
inline void add_window_row(float* __restrict dst, const float* __restrict grad, int64_t S,
                           int64_t KW, int64_t L) {
  for (int64_t p = 0; p < S && p < KW; ++p) {
    float* d = dst + p * L;
    for (int64_t j0 = 0; j0 < L; j0 += 8) {
      __m256 v = _mm256_loadu_ps(d + j0);
      for (int64_t kw = p, q = 0; kw < KW; kw += S, ++q) {  // q = kw / S
        v = _mm256_add_ps(v, _mm256_loadu_ps(grad + j0 - q));
      }
      _mm256_storeu_ps(d + j0, v);
    }
  }
}
#endif

// Average pool backward by plane, for planes that fit in L2 (as max_bwd_scatter): each output
// row's gradient is divided once, then added to the rows of its windows (add_window_row) in a
// plane of phase-split rows, which then goes to memory once. One thread per plane and a fixed
// order: deterministic.
template <typename scalar_t>
void avg_bwd_scatter(const scalar_t* gout, scalar_t* gin, const PoolGeometry& g, int64_t planes,
                     const AvgTables& t) {
  using acc_t = acc_type<scalar_t>;
  const int64_t OD = g.out[0], OH = g.out[1], OW = g.out[2];
  const int64_t ID = g.in[0], IH = g.in[1], IW = g.in[2], KW = g.kernel[2], S = g.stride[2];
  RowPhases ph(g);
  ph.len = (ph.len + 7) / 8 * 8;  // whole vectors per phase
  const int64_t len = ph.size();
  const std::vector<acc_t> div = t.divisors<acc_t>();
  at::parallel_for(0, planes, grain_for(g.in_plane()), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(ID * IH * len), tmp(OW);
    std::vector<acc_t> scaled(KW + ph.len + 8, acc_t(0));  // zero margins around [KW, KW + OW)
    acc_t* sc = scaled.data() + KW;
    for (int64_t pl = begin; pl < end; ++pl) {
      std::fill(buf.begin(), buf.end(), acc_t(0));
      for (int64_t od = 0; od < OD; ++od) {
        for (int64_t oh = 0; oh < OH; ++oh) {
          const int64_t orow = (od * OH + oh) * OW;
          divide(src_as_acc(gout + pl * OD * OH * OW + orow, tmp.data(), OW), div.data() + orow, sc, OW);
          for (int64_t kd = t.d.lo[od]; kd < t.d.hi[od]; ++kd) {
            const int64_t id = g.input_coord(0, od, kd);
            for (int64_t kh = t.h.lo[oh]; kh < t.h.hi[oh]; ++kh) {
              add_window_row(buf.data() + (id * IH + g.input_coord(1, oh, kh)) * len, sc, S, KW,
                             ph.len);
            }
          }
        }
      }
      for (int64_t r = 0; r < ID * IH; ++r) {
        store_row(buf.data() + r * len, gin + (pl * ID * IH + r) * IW, ph, g.pad[2], IW);
      }
    }
  });
}

#if defined(TORCHPOOL_AVX2)
// Stride 1 along W, by plane (planes that fit in L2, one per thread), separable like the forward
// of avg_rows_separable: each output row's gradient times 1 / divisor is summed
// along W once, H[o][iw] = sum over the row's windows covering iw; each input row is then the sum
// of the H rows of the outputs whose windows cover it (DimTable cover order), stored once. Per
// input cell about KW + KH adds instead of KH * KW; the order of the additions is not torch's.
inline bool separable_bwd_ok(const PoolGeometry& g, int64_t planes) {
  const int64_t rows = g.out[0] * g.out[1], width = (g.in[2] + 7) / 8 * 8;
  return g.stride[2] == 1 && g.kernel[2] > 1 && g.kernel[0] * g.kernel[1] > 1 &&
         fits_scatter_plane<float>(rows * width, planes);
}

template <int KWc, typename T>
void avg_bwd_separable(const T* gout, T* gin, const PoolGeometry& g, int64_t planes,
                       const AvgTables& t) {
  const int64_t OD = g.out[0], OH = g.out[1], OW = g.out[2];
  const int64_t ID = g.in[0], IH = g.in[1], IW = g.in[2], PW = g.pad[2];
  const int64_t KW = KWc > 0 ? KWc : g.kernel[2];
  const int64_t width = (IW + 7) / 8 * 8;  // H row stride: whole vectors
  // 1 / every output's divisor, the same for each plane (8 spare lanes at the end)
  std::vector<float> div(OD * OH * OW + 8, 1.f);
  for (int64_t od = 0; od < OD; ++od) {
    for (int64_t oh = 0; oh < OH; ++oh) t.row_divisors(od, oh, div.data() + (od * OH + oh) * OW);
  }
  for (int64_t i = 0; i < OD * OH * OW; ++i) div[i] = 1.f / div[i];
  // sc[j] = gradient of output j / its divisor at j - (KW - 1), zero outside [0, OW): H[iw] adds
  // sc[iw + PW - kw + KW - 1] over kw, reading up to index width + PW + KW - 1.
  const int64_t sc_len = (KW - 1 + std::max(OW, width + PW) + 8 + 7) / 8 * 8;
  // The H rows covering each input row (offsets in the plane's H buffer), the same in every plane.
  std::vector<int64_t> cover_first(ID * IH + 1, 0), cover_off;
  for (int64_t id = 0; id < ID; ++id) {
    for (int64_t ih = 0; ih < IH; ++ih) {
      cover_first[id * IH + ih] = static_cast<int64_t>(cover_off.size());
      for (int64_t cd = t.d.first[id]; cd < t.d.first[id + 1]; ++cd) {
        for (int64_t ch = t.h.first[ih]; ch < t.h.first[ih + 1]; ++ch) {
          cover_off.push_back((t.d.cover_o[cd] * OH + t.h.cover_o[ch]) * width);
        }
      }
    }
  }
  cover_first[ID * IH] = static_cast<int64_t>(cover_off.size());
  at::parallel_for(0, planes, grain_for(g.in_plane()), [&](int64_t begin, int64_t end) {
    // Sizes in locals: the vector stores may alias anything, so values read through the
    // closure's references would be reloaded after every store (NOTES §33).
    const int64_t ow_n = OW, iw_n = IW, pw = PW, kw_n = KW, width_n = width;
    const RowTail otail(OW);
    // Two scaled rows: the sums along W read the row scaled one step before, so that their
    // shifted loads never wait on the stores just made (a load spanning two fresh stores is not
    // forwarded).
    std::vector<float> hbuf(OD * OH * width), sc(2 * sc_len, 0.f);
    std::vector<const float*> rows;  // the H rows covering one input row
    const int64_t rows_n = OD * OH;
    auto scv = [&](int64_t o) { return sc.data() + (o & 1) * sc_len + (kw_n - 1); };
    for (int64_t pl = begin; pl < end; ++pl) {
      const T* go = gout + pl * rows_n * ow_n;
      auto along_w = [&](int64_t o) {
        const float* s = scv(o);
        float* h = hbuf.data() + o * width_n;
        for (int64_t iw = 0; iw < width_n; iw += 8) {
          const float* src = s + iw + pw;  // kw = 0 reads output iw + PW
          __m256 v = _mm256_loadu_ps(src);
          for (int64_t kw = 1; kw < kw_n; ++kw) v = _mm256_add_ps(v, _mm256_loadu_ps(src - kw));
          _mm256_storeu_ps(h + iw, v);
        }
      };
      for (int64_t o = 0; o < rows_n; ++o) {
        const T* grow = go + o * ow_n;
        const float* drow = div.data() + o * ow_n;
        float* s = scv(o);
        int64_t ow = 0;
        for (; ow + 8 <= ow_n; ow += 8) {
          _mm256_storeu_ps(s + ow, _mm256_mul_ps(loadf(grow + ow), _mm256_loadu_ps(drow + ow)));
        }
        if (ow < ow_n) {  // lanes past OW: 0 times whatever follows in `div` (sc stays 0 there)
          _mm256_storeu_ps(s + ow, _mm256_mul_ps(load_row_tail(grow, ow_n, otail),
                                                 _mm256_loadu_ps(drow + ow)));
        }
        if (o > 0) along_w(o - 1);
      }
      along_w(rows_n - 1);
      T* gi = gin + pl * ID * IH * IW;
      for (int64_t id = 0; id < ID; ++id) {
        for (int64_t ih = 0; ih < IH; ++ih) {
          T* dst = gi + (id * IH + ih) * IW;
          rows.clear();
          for (int64_t k = cover_first[id * IH + ih]; k < cover_first[id * IH + ih + 1]; ++k) {
            rows.push_back(hbuf.data() + cover_off[k]);
          }
          // NC: the number of covering rows when known at compile time, else 0.
          auto store_row = [&](auto NC) {
            const int64_t n = NC.value > 0 ? NC.value : static_cast<int64_t>(rows.size());
            // Known counts: the row pointers in registers, not reloaded from `rows` per store.
            const float* fixed[NC.value > 0 ? NC.value : 1];
            if constexpr (NC.value > 0) {
              for (int j = 0; j < NC.value; ++j) fixed[j] = rows[j];
            }
            const float* const* rp = NC.value > 0 ? fixed : rows.data();
            auto col = [&](int64_t x) {
              __m256 v = _mm256_setzero_ps();
              for (int64_t j = 0; j < n; ++j) v = _mm256_add_ps(v, _mm256_loadu_ps(rp[j] + x));
              return v;
            };
            int64_t x = 0;
            for (; x + 8 <= iw_n; x += 8) storef(dst + x, col(x));
            if (x < iw_n) store8(dst + x, col(x), iw_n - x);
          };
          switch (rows.size()) {
            case 2: store_row(std::integral_constant<int, 2>{}); break;
            case 3: store_row(std::integral_constant<int, 3>{}); break;
            default: store_row(std::integral_constant<int, 0>{});
          }
        }
      }
    }
  });
}
#endif

template <typename scalar_t>
void avg_bwd_planar(const scalar_t* gout, scalar_t* gin, const PoolGeometry& g, int64_t planes,
                    bool count_include_pad, int64_t divisor_override) {
  using acc_t = acc_type<scalar_t>;
  const int64_t OD = g.out[0], OH = g.out[1], OW = g.out[2];
  const int64_t ID = g.in[0], IH = g.in[1], IW = g.in[2], KW = g.kernel[2];
  const AvgTables t(g, true, count_include_pad, divisor_override);
#if defined(TORCHPOOL_AVX2)
  if constexpr (kFusedType<scalar_t>) {
    if (tiny_planes_ok(g, planes)) {
      avg_tiny_planes<true>(gout, gin, g, planes, t.divisors<float>().data());
      return;
    }
    if (tile_bwd_ok(g, planes)) {
      avg_bwd_tiles(gout, gin, g, planes, t);
      return;
    }
    if (rolling_avg_ok(g)) {
      const RowReciprocals rr(g, t);
      const int64_t K = g.kernel[2];
      K == 3 ? box_rows_rolling<3, true>(gout, gin, planes, g.out[1], g.out[2], g.in[1], g.in[2],
                                         g.pad[1] - 2, g.pad[2] - 2, rr.row.data())
             : box_rows_rolling<2, true>(gout, gin, planes, g.out[1], g.out[2], g.in[1], g.in[2],
                                         g.pad[1] - 1, g.pad[2] - 1, rr.row.data());
      return;
    }
    if (separable_bwd_ok(g, planes)) {
      g.kernel[2] == 3 ? avg_bwd_separable<3>(gout, gin, g, planes, t)
                       : avg_bwd_separable<0>(gout, gin, g, planes, t);
      return;
    }
  }
#endif
  if (fits_scatter_plane<acc_type<scalar_t>>(RowPhases(g).size() * ID * IH, planes)) {
    avg_bwd_scatter(gout, gin, g, planes, t);
    return;
  }
#if defined(TORCHPOOL_AVX2)
  if constexpr (kFusedType<scalar_t>) {
    if (fused_bwd_ok(g)) {
      g.stride[2] == 1 ? avg_bwd_fused<1>(gout, gin, g, planes, t)
                       : avg_bwd_fused<2>(gout, gin, g, planes, t);
      return;
    }
  }
#endif
  const RowPhases ph(g);
  at::parallel_for(0, planes * ID * IH, grain_for(IW * 2), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(ph.size()), grad(OW), scaled(OW), div(OW);
    RowCounter it(begin, ID, IH);
    for (int64_t r = begin; r < end; ++r, it.next()) {
      const int64_t plane = it.a, id = it.b, ih = it.c;
      std::fill(buf.begin(), buf.end(), acc_t(0));
      for (int64_t cd = t.d.first[id]; cd < t.d.first[id + 1]; ++cd) {
        const int64_t od = t.d.cover_o[cd];
        for (int64_t ch = t.h.first[ih]; ch < t.h.first[ih + 1]; ++ch) {
          const int64_t oh = t.h.cover_o[ch];
          convert(gout + ((plane * OD + od) * OH + oh) * OW, grad.data(), OW);
          t.row_divisors(od, oh, div.data());
          divide(grad.data(), div.data(), scaled.data(), OW);
          for (int64_t kw = 0; kw < KW; ++kw) sum_pass(scaled.data(), buf.data() + ph.run(kw), OW);
        }
      }
      store_row(buf.data(), gin + r * IW, ph, g.pad[2], IW);
    }
  });
}

#if defined(TORCHPOOL_AVX2)
// Channels-last average backward, gathered per input cell in registers as max_bwd_cl_fused's. The
// output rows that cover an input row are divided by their windows' divisors first, once per
// output row and task (a few rows kept as floats, one not needed replaced), then each
// input cell adds its covering outputs' shares, 8 channels at a time, in the order the scalar
// path adds them (the same sums to the bit), and is stored once (NOTES §95). Returns false,
// doing nothing, where the kept rows would take over 8 MiB a task (tall windows over wide rows):
// the portable path then.
template <typename T>
bool avg_bwd_cl_fused(const T* gout, T* gin, const PoolGeometry& g, int64_t N, int64_t C,
                      bool count_include_pad, int64_t divisor_override) {
  const int64_t OD = g.out[0], OH = g.out[1], OW = g.out[2];
  const int64_t ID = g.in[0], IH = g.in[1], IW = g.in[2];
  const AvgTables t(g, true, count_include_pad, divisor_override);
  const bool streamed = streams<T>(N * ID * IH * IW * C);
  const bool direct = streamed && cells_stream_direct(gin, C);
  const bool stream_rows = streamed && !direct;
  // The most output rows that cover one input row: the rows kept.
  int64_t most_d = 1, most_h = 1;
  for (int64_t i = 0; i < ID; ++i) most_d = std::max(most_d, t.d.first[i + 1] - t.d.first[i]);
  for (int64_t i = 0; i < IH; ++i) most_h = std::max(most_h, t.h.first[i + 1] - t.h.first[i]);
  const int64_t slots = most_d * most_h, row_len = OW * C;
  if (slots * row_len > (int64_t{2} << 20)) return false;
  at::parallel_for(0, N * ID * IH, grain_for(IW * C), [&](int64_t begin, int64_t end) {
    StagedRuns<T> out(stream_rows, staged_rows<T>(IW * C));
    std::vector<float> kept(slots * row_len);
    std::vector<int64_t> kept_row(slots, -1), need;
    std::vector<const float*> cover;
    RowCounter it(begin, ID, IH);
    for (int64_t r = begin; r < end; ++r, it.next()) {
      const int64_t n = it.a, id = it.b, ih = it.c;
      need.clear();
      for (int64_t cd = t.d.first[id]; cd < t.d.first[id + 1]; ++cd) {
        for (int64_t ch = t.h.first[ih]; ch < t.h.first[ih + 1]; ++ch) {
          need.push_back((n * OD + t.d.cover_o[cd]) * OH + t.h.cover_o[ch]);
        }
      }
      cover.clear();
      for (const int64_t o : need) {
        int64_t s = std::find(kept_row.begin(), kept_row.end(), o) - kept_row.begin();
        if (s == slots) {  // divide it into a slot whose row this input row does not need
          s = 0;
          while (std::find(need.begin(), need.end(), kept_row[s]) != need.end()) ++s;
          kept_row[s] = o;
          const int64_t od = (o / OH) % OD, oh = o % OH;
          const T* src = gout + o * row_len;
          float* dst = kept.data() + s * row_len;
          for (int64_t ow = 0; ow < OW; ++ow) {
            const __m256 dv = _mm256_set1_ps(static_cast<float>(t.divisor(od, oh, ow)));
            for (int64_t c = 0; c < C; c += 8) {
              const int64_t nl = std::min<int64_t>(8, C - c);
              store8(dst + ow * C + c, _mm256_div_ps(load_lanes(src + ow * C + c, nl), dv), nl);
            }
          }
        }
        cover.push_back(kept.data() + s * row_len);
      }
      const int64_t nr = static_cast<int64_t>(cover.size());
      const float* const* rows = cover.data();
      T* row = out.at(gin + r * IW * C, IW * C);
      for (int64_t iw = 0; iw < IW; ++iw) {
        T* dst = row + iw * C;
        const int64_t* cols = t.w.cover_o.data() + t.w.first[iw];
        const int64_t nw = t.w.first[iw + 1] - t.w.first[iw];
        for_channel_blocks(C, [=](auto NVc, int64_t c, int64_t nl) {
          constexpr int NV = decltype(NVc)::value;
          __m256 acc[NV];
          for (int v = 0; v < NV; ++v) acc[v] = _mm256_setzero_ps();
          for (int64_t a = 0; a < nr; ++a) {
            for (int64_t b = 0; b < nw; ++b) {
              const float* src = rows[a] + cols[b] * C + c;
              for (int v = 0; v < NV; ++v) acc[v] = _mm256_add_ps(acc[v], load_lanes(src + 8 * v, nl));
            }
          }
          if constexpr (std::is_same_v<T, float>) {
            if (direct) {  // as cell_store (the channels here are in order, never in pairs)
              for (int v = 0; v < NV; ++v) _mm256_stream_ps(dst + c + 8 * v, acc[v]);
              return;
            }
          }
          for (int v = 0; v < NV; ++v) store8(dst + c + 8 * v, acc[v], nl);
        });
      }
    }
    if (direct) stream_fence();
  });
  return true;
}
#endif

template <typename scalar_t>
void avg_bwd_cl(const scalar_t* gout, scalar_t* gin, const PoolGeometry& g, int64_t N, int64_t C,
                bool count_include_pad, int64_t divisor_override) {
#if defined(TORCHPOOL_AVX2)
  if constexpr (kFusedType<scalar_t>) {
    if (avg_bwd_cl_fused(gout, gin, g, N, C, count_include_pad, divisor_override)) return;
  }
#endif
  using acc_t = acc_type<scalar_t>;
  const int64_t OD = g.out[0], OH = g.out[1], OW = g.out[2];
  const int64_t ID = g.in[0], IH = g.in[1], IW = g.in[2];
  const AvgTables t(g, true, count_include_pad, divisor_override);
  at::parallel_for(0, N * ID * IH, grain_for(IW * C), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(C), grad(C), scaled(C), div(C);
    RowCounter it(begin, ID, IH);
    for (int64_t r = begin; r < end; ++r, it.next()) {
      const int64_t n = it.a, id = it.b, ih = it.c;
      for (int64_t iw = 0; iw < IW; ++iw) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t cd = t.d.first[id]; cd < t.d.first[id + 1]; ++cd) {
          const int64_t od = t.d.cover_o[cd];
          for (int64_t ch = t.h.first[ih]; ch < t.h.first[ih + 1]; ++ch) {
            const int64_t oh = t.h.cover_o[ch];
            for (int64_t cw = t.w.first[iw]; cw < t.w.first[iw + 1]; ++cw) {
              const int64_t ow = t.w.cover_o[cw];
              convert(gout + (((n * OD + od) * OH + oh) * OW + ow) * C, grad.data(), C);
              std::fill(div.begin(), div.end(), static_cast<acc_t>(t.divisor(od, oh, ow)));
              divide(grad.data(), div.data(), scaled.data(), C);
              sum_pass(scaled.data(), acc.data(), C);
            }
          }
        }
        convert(acc.data(), gin + (r * IW + iw) * C, C);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Global pools over P spatial cells. Planar: one plane of P values per (n, c). Channels-last:
// per n, P rows of C values.

#if defined(TORCHPOOL_AVX2)
// The sums of 8 consecutive planes of n < 2^31 elements each (src: the first plane), as one
// float vector: each plane's cells summed in one vector accumulator, then the 8 accumulators
// reduced together by a transpose of pairwise adds. For short planes, where one plane at a time
// spends more on its horizontal sum and tail than on its loads. A plane's last n % 8 cells: float
// by a masked load; the half types (n >= 8) by a load of the plane's last 8 cells, zeroing the
// lanes that were summed already.
template <typename T>
inline __m256 sum_planes8(const T* __restrict src, int64_t n) {
  const int64_t full = n / 8 * 8, rem = n - full;
  const __m256i tail = std::is_same_v<T, float> ? lanes_inside(0, rem) : lanes_inside(rem - 8, rem);
  __m256 a[8];
  const bool pf = reductions_prefetch<T>();
  for (int p = 0; p < 8; ++p) {
    const T* s = src + p * n;
    __m256 acc = full > 0 ? loadf(s) : _mm256_setzero_ps();
    for (int64_t i = 8; i < full; i += 8) {
      if (pf) prefetch_ahead<2048, 1>(s + i);
      acc = _mm256_add_ps(acc, loadf(s + i));
    }
    if (rem > 0) {
      if constexpr (std::is_same_v<T, float>) {
        acc = _mm256_add_ps(acc, _mm256_maskload_ps(s + full, tail));
      } else {
        acc = _mm256_add_ps(acc, _mm256_and_ps(loadf(s + n - 8), _mm256_castsi256_ps(tail)));
      }
    }
    a[p] = acc;
  }
  const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20),
                       _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

// Eight vectors folded into one whose lane p is op over the lanes of v[p]: pairs of lanes
// reduced as _mm256_hadd_ps adds them, then the two halves.
template <typename Op>
inline __m256 fold8(Op op, const __m256* v) {
  auto pairs = [&](__m256 a, __m256 b) {
    return op(_mm256_shuffle_ps(a, b, 0x88), _mm256_shuffle_ps(a, b, 0xDD));
  };
  const __m256 lo = pairs(pairs(v[0], v[1]), pairs(v[2], v[3]));
  const __m256 hi = pairs(pairs(v[4], v[5]), pairs(v[6], v[7]));
  return op(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
}

// Lane p: the maximum of m[p]'s lanes, NaN where nan[p] has a lane set.
inline __m256 fold_max8(const __m256* m, const __m256* nan) {
  const __m256 mx = fold8([](__m256 a, __m256 b) { return _mm256_max_ps(a, b); }, m);
  const __m256 un = fold8([](__m256 a, __m256 b) { return _mm256_or_ps(a, b); }, nan);
  return _mm256_blendv_ps(mx, _mm256_set1_ps(std::numeric_limits<float>::quiet_NaN()), un);
}

// The maxima of 8 consecutive planes of n >= 8 cells each, as sum_planes8 (a plane's last partial
// vector is its last 8 cells: cells seen twice do not change a maximum), NaN where a plane holds
// one. Which of +0 and -0 comes out of a tie is not torch's rule: callers redo zero results.
template <typename T>
inline __m256 max_planes8(const T* __restrict src, int64_t n) {
  const int64_t full = n / 8 * 8;
  __m256 m[8], nan[8];
  const bool pf = reductions_prefetch<T>();
  for (int p = 0; p < 8; ++p) {
    const T* s = src + p * n;
    __m256 a = loadf(s), u = _mm256_cmp_ps(a, a, _CMP_UNORD_Q);
    auto add = [&](__m256 v) {
      a = _mm256_max_ps(v, a);
      u = _mm256_or_ps(u, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    };
    for (int64_t i = 8; i < full; i += 8) {
      if (pf) prefetch_ahead<2048, 1>(s + i);
      add(loadf(s + i));
    }
    if (full < n) add(loadf(s + n - 8));
    m[p] = a;
    nan[p] = u;
  }
  return fold_max8(m, nan);
}

// Short planes of the global pools, eight at a time: group(pl) for every whole group of 8 planes
// from pl, one(q) for each plane of a last partial group.
template <typename Group, typename One>
void for_plane_groups8(int64_t planes, int64_t P, const Group& group, const One& one) {
  at::parallel_for(0, (planes + 7) / 8, grain_for(8 * P), [&](int64_t begin, int64_t end) {
    // Local copies of the closures: the vector stores may alias anything, so captures read
    // through a reference would be reloaded after every store.
    const Group grp = group;
    const One single = one;
    const int64_t all = planes;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t pl = 8 * b;
      if (pl + 8 <= all) {
        grp(pl);
      } else {
        for (int64_t q = pl; q < all; ++q) single(q);
      }
    }
  });
}

// The cell of a plane of n >= 8 cells that holds its maximum m (a value of the plane, as float):
// the last NaN when m is NaN, else the first cell equal to m, +0 and -0 alike (reduce_argmax's
// rule). The plane is in L1 right after max_planes8 read it.
template <typename T>
inline int64_t find_max_cell(const T* __restrict src, int64_t n, float m) {
  if (std::isnan(m)) {
    int64_t at = n - 1;
    while (at > 0 && !std::isnan(static_cast<float>(src[at]))) --at;
    return at;
  }
  const __m256 mv = _mm256_set1_ps(m);
  auto eq = [&](int64_t at) { return _mm256_cmp_ps(loadf(src + at), mv, _CMP_EQ_OQ); };
  auto bits = [](__m256 e) { return static_cast<uint32_t>(_mm256_movemask_ps(e)); };
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {  // 32 cells a branch: the exit is mispredicted once anyway
    const __m256 e0 = eq(i), e1 = eq(i + 8), e2 = eq(i + 16), e3 = eq(i + 24);
    if (bits(_mm256_or_ps(_mm256_or_ps(e0, e1), _mm256_or_ps(e2, e3))) != 0) {
      return i + __builtin_ctz(bits(e0) | bits(e1) << 8 | bits(e2) << 16 | bits(e3) << 24);
    }
  }
  for (;; i += 8) {
    const int64_t at = std::min(i, n - 8);  // the last vector: the plane's last 8 cells
    const uint32_t hit = bits(eq(at));
    if (hit != 0) return at + __builtin_ctz(hit);
    if (at == n - 8) return 0;  // not reached: m is a value of the plane
  }
}

// Eight planes' results merged: lane j of m[p] and at[p] holds the largest value a lane of plane
// p saw and the first of its cells that held it, nan[p] its NaNs. The planes' maxima by
// max_planes8's fold, and per plane the smallest cell among the lanes holding its maximum by the
// same fold with an integer minimum; out and pos are written for the planes without a NaN.
// Returns the mask of planes holding a NaN, whose out and pos are left for the caller (the last
// NaN's cell is reduce_argmax's to find).
template <typename T, typename pos_t>
inline int merge_argmax8(const T* __restrict src, int64_t n, const __m256* m, const __m256i* at,
                         const __m256* nan, T* __restrict out, pos_t* __restrict pos) {
  const __m256 mx = fold8([](__m256 a, __m256 b) { return _mm256_max_ps(a, b); }, m);
  const int has_nan =
      _mm256_movemask_ps(fold8([](__m256 a, __m256 b) { return _mm256_or_ps(a, b); }, nan));
  // Per plane, the cells of the lanes holding its maximum (others the largest int), then their
  // minimum for all eight planes by the fold.
  const __m256i none = _mm256_set1_epi32(std::numeric_limits<int32_t>::max());
  __m256 cand[8];
  for (int p = 0; p < 8; ++p) {
    const __m256 mp = _mm256_permutevar8x32_ps(mx, _mm256_set1_epi32(p));
    cand[p] = _mm256_blendv_ps(_mm256_castsi256_ps(none), _mm256_castsi256_ps(at[p]),
                               _mm256_cmp_ps(m[p], mp, _CMP_EQ_OQ));
  }
  const __m256i cells = _mm256_castps_si256(fold8(
      [](__m256 a, __m256 b) {
        return _mm256_castsi256_ps(_mm256_min_epi32(_mm256_castps_si256(a), _mm256_castps_si256(b)));
      },
      cand));
  alignas(32) int32_t c[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(c), cells);
  for (int p = 0; p < 8; ++p) {
    if (has_nan >> p & 1) continue;
    pos[p] = c[p];
    out[p] = src[p * n + c[p]];  // the cell itself (+0 and -0 compare equal)
  }
  return has_nan;
}

// The maxima of eight planes of n cells (8 <= n < 2^31) and their cells, in one pass over each
// plane: each lane keeps its largest value and the first of its cells that held it (a compare and
// a blend a vector; two chains, even and odd vectors), the plane's last partial vector loaded as
// its last 8 cells. Then the eight planes are merged together (merge_argmax8). No branch depends
// on the data, and eight planes give the out-of-order core independent work where one plane's
// merge is a chain of dependent shuffles (NOTES §97). Returns merge_argmax8's mask of planes
// holding a NaN. +0 and -0 compare equal, so a zero maximum is the first zero.
template <typename T, typename pos_t>
inline int argmax_planes8(const T* __restrict src, int64_t n, T* __restrict out,
                          pos_t* __restrict pos) {
  const int64_t full = n / 8 * 8;
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256 m[8];
  __m256i at[8];
  __m256 nan[8];
  for (int p = 0; p < 8; ++p) {
    const T* s = src + p * n;
    __m256 a0 = loadf(s), a1 = a0;
    __m256i c0 = lane, c1 = lane;
    __m256 u = _mm256_cmp_ps(a0, a0, _CMP_UNORD_Q);
    __m256i i0 = _mm256_add_epi32(lane, _mm256_set1_epi32(8));  // the cells of the vector at 8
    const __m256i step = _mm256_set1_epi32(16), eight = _mm256_set1_epi32(8);
    auto take = [](__m256& a, __m256i& c, __m256 v, __m256i cells) {
      const __m256 gt = _mm256_cmp_ps(v, a, _CMP_GT_OQ);
      a = _mm256_max_ps(v, a);  // v > a ? v : a
      c = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(c), _mm256_castsi256_ps(cells), gt));
    };
    int64_t i = 8;
    for (; i + 16 <= full; i += 16) {
      const __m256 v0 = loadf(s + i), v1 = loadf(s + i + 8);
      take(a0, c0, v0, i0);
      take(a1, c1, v1, _mm256_add_epi32(i0, eight));
      u = _mm256_or_ps(u, _mm256_cmp_ps(v0, v1, _CMP_UNORD_Q));
      i0 = _mm256_add_epi32(i0, step);
    }
    auto one = [&](int64_t at_cell) {
      const __m256 v = loadf(s + at_cell);
      take(a0, c0, v, _mm256_add_epi32(lane, _mm256_set1_epi32(static_cast<int32_t>(at_cell))));
      u = _mm256_or_ps(u, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    };
    if (i < full) one(i);
    if (full < n) one(n - 8);
    // The two chains of each lane merged: the larger value, or the smaller cell of equal ones.
    const __m256 gt = _mm256_cmp_ps(a1, a0, _CMP_GT_OQ);
    const __m256 eq = _mm256_cmp_ps(a1, a0, _CMP_EQ_OQ);
    const __m256i lower = _mm256_min_epi32(c0, c1);
    m[p] = _mm256_max_ps(a1, a0);
    at[p] = _mm256_castps_si256(_mm256_blendv_ps(
        _mm256_blendv_ps(_mm256_castsi256_ps(c0), _mm256_castsi256_ps(c1), gt),
        _mm256_castsi256_ps(lower), eq));
    nan[p] = u;
  }
  return merge_argmax8(src, n, m, at, nan, out, pos);
}

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f")
// 16 cells as floats (the half types converted in registers).
template <typename T>
inline __m512 load16f(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_loadu_ps(p);
  } else {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else {
      return _mm512_cvtph_ps(h);
    }
  }
}

// argmax_planes8 for planes of 16 <= n < 2^31 cells in AVX-512, where the tuning takes it
// (Intel, whose variable blend is several instructions: NOTES §115, 117): 16 cells a vector, each
// lane's greater-than a mask register and its cell kept by a masked move, two chains (even and
// odd vectors), the plane's last partial vector loaded as its last 16 cells (cells seen twice
// keep the earlier); then per plane its maximum and the smallest cell among the lanes holding it,
// by reductions. cells[p] is plane p's cell; returns the mask of planes holding a NaN, whose
// cells are left for the caller. Only pointers cross from the AVX2 callers, which do not inline
// it. +0 and -0 compare equal, so a zero maximum is the first zero.
template <typename T>
__attribute__((noinline)) int argmax_planes8_avx512(const T* __restrict src, int64_t n,
                                                    int32_t* __restrict cells, bool pf) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i sixteen = _mm512_set1_epi32(16), step = _mm512_set1_epi32(32);
  const int64_t full = n / 16 * 16;
  int has_nan = 0;
  for (int p = 0; p < 8; ++p) {
    const T* s = src + p * n;
    __m512 a0 = load16f(s), a1 = a0;
    __m512i c0 = lane, c1 = lane, i0 = _mm512_add_epi32(lane, sixteen);
    __mmask16 nan = _mm512_cmp_ps_mask(a0, a0, _CMP_UNORD_Q);
    int64_t i = 16;
    for (; i + 32 <= full; i += 32) {
      if (pf) {
        _mm_prefetch(reinterpret_cast<const char*>(s + i) + 2048, _MM_HINT_T0);
        if (sizeof(T) == 4) {  // 32 cells: two lines
          _mm_prefetch(reinterpret_cast<const char*>(s + i) + 2048 + 64, _MM_HINT_T0);
        }
      }
      const __m512 v0 = load16f(s + i), v1 = load16f(s + i + 16);
      c0 = _mm512_mask_mov_epi32(c0, _mm512_cmp_ps_mask(v0, a0, _CMP_GT_OQ), i0);
      c1 = _mm512_mask_mov_epi32(c1, _mm512_cmp_ps_mask(v1, a1, _CMP_GT_OQ),
                                 _mm512_add_epi32(i0, sixteen));
      a0 = _mm512_max_ps(v0, a0);
      a1 = _mm512_max_ps(v1, a1);
      nan |= _mm512_cmp_ps_mask(v0, v1, _CMP_UNORD_Q);
      i0 = _mm512_add_epi32(i0, step);
    }
    const int64_t rest[2] = {i < full ? i : -1, full < n ? n - 16 : -1};
    for (const int64_t at : rest) {
      if (at < 0) continue;
      const __m512 v = load16f(s + at);
      c0 = _mm512_mask_mov_epi32(c0, _mm512_cmp_ps_mask(v, a0, _CMP_GT_OQ),
                                 _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int32_t>(at))));
      a0 = _mm512_max_ps(v, a0);
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    }
    if (nan) {
      has_nan |= 1 << p;
      continue;
    }
    // The two chains of each lane merged: the larger value, or the smaller cell of equal ones.
    const __m512 m = _mm512_max_ps(a1, a0);
    __m512i c = _mm512_mask_mov_epi32(c0, _mm512_cmp_ps_mask(a1, a0, _CMP_GT_OQ), c1);
    c = _mm512_mask_mov_epi32(c, _mm512_cmp_ps_mask(a1, a0, _CMP_EQ_OQ), _mm512_min_epi32(c0, c1));
    const __mmask16 top = _mm512_cmp_ps_mask(m, _mm512_set1_ps(_mm512_reduce_max_ps(m)), _CMP_EQ_OQ);
    cells[p] = _mm512_mask_reduce_min_epi32(top, c);
  }
  return has_nan;
}
#pragma GCC pop_options

// Eight planes of 2 to 7 cells: plane p as one vector m[p], its cells in lanes 0 .. n-1 and -inf
// in the others (the lanes past a plane never hold its maximum ahead of its own cells: they are
// -inf and come after them), nan[p] its NaNs. Reads 8 cells from each plane's start, so up to
// 8 - n past the last plane: the caller keeps that inside the tensor.
template <typename T>
inline void short_planes8(const T* __restrict src, int64_t n, __m256* m, __m256* nan) {
  const __m256 inside = _mm256_castsi256_ps(lanes_inside(0, n));
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  for (int p = 0; p < 8; ++p) {
    m[p] = _mm256_blendv_ps(ninf, loadf(src + p * n), inside);
    nan[p] = _mm256_cmp_ps(m[p], m[p], _CMP_UNORD_Q);
  }
}

// A plane's maximum with torch's rule for +0 and -0 (the first of equal values): reduce_max's
// lanes do not keep it, so a zero maximum (rare) is found again by reduce_argmax.
template <typename T>
inline T plane_max(const T* __restrict src, int64_t n) {
  const float m = reduce_max(src, n);
  if (m == 0.f && n < (int64_t{1} << 31)) {
    T v;
    reduce_argmax(src, n, &v);
    return v;
  }
  return static_cast<T>(m);  // an input value: exact
}

// reduce_argmax for long planes (n >= kArgmaxLong): the plane read once, block by block, as
// reduce_max reads it; after each block every lane keeps its largest value and the first block
// where that value appeared (a compare and a blend, no fold per block: NOTES §102). Then the first
// block holding the plane's maximum is the smallest such block among the lanes holding it, and
// that block (in L2) is searched for the first cell equal to it. The same rule: the last NaN if
// there is one, else the first maximum, +0 and -0 alike.
constexpr int64_t kArgmaxBlock = 512;
constexpr int64_t kArgmaxLong = 4096;

template <typename T>
inline int64_t reduce_argmax_blocked(const T* __restrict src, int64_t n, T* value) {
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 best = ninf, nan = _mm256_setzero_ps();
  __m256i first = _mm256_setzero_si256();
  const bool pf = reductions_prefetch<T>();
  // Folds a block's lane maxima (m0, m1) into best and first.
  auto take = [&](__m256 m0, __m256 m1, int32_t block) {
    const __m256 m = _mm256_max_ps(m0, m1);
    const __m256 gt = _mm256_cmp_ps(m, best, _CMP_GT_OQ);
    best = _mm256_max_ps(m, best);  // m > best ? m : best
    first = _mm256_castps_si256(_mm256_blendv_ps(
        _mm256_castsi256_ps(first), _mm256_castsi256_ps(_mm256_set1_epi32(block)), gt));
  };
  int64_t i = 0;
  int32_t block = 0;
  for (; i + kArgmaxBlock <= n; i += kArgmaxBlock, ++block) {
    __m256 m0 = ninf, m1 = ninf;
    max_lanes16(src + i, kArgmaxBlock, m0, m1, nan, pf);
    take(m0, m1, block);
  }
  if (i < n) {  // the last, partial block; its last partial vector loaded as the plane's last 8 cells
    __m256 m0 = ninf, m1 = ninf;
    for (; i + 8 <= n; i += 8) {
      const __m256 v = loadf(src + i);
      m0 = _mm256_max_ps(m0, v);
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    if (i < n) {
      const __m256 v = loadf(src + n - 8);
      m1 = v;
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    take(m0, m1, block);
  }
  float m;
  int64_t from = 0;
  if (_mm256_movemask_ps(nan) != 0) {
    m = std::numeric_limits<float>::quiet_NaN();  // the plane's last NaN: find_max_cell from the end
  } else {
    const __m256 mx = hmax_all(best);
    m = _mm256_cvtss_f32(mx);
    const __m256i none = _mm256_set1_epi32(std::numeric_limits<int32_t>::max());
    const __m256i cand = _mm256_castps_si256(_mm256_blendv_ps(
        _mm256_castsi256_ps(none), _mm256_castsi256_ps(first), _mm256_cmp_ps(best, mx, _CMP_EQ_OQ)));
    // Cells before the block are all below m, so the search may start up to 8 cells early.
    from = std::min(int64_t{hmin_epi32(cand)} * kArgmaxBlock, n - 8);
  }
  const int64_t at = from + find_max_cell(src + from, n - from, m);
  *value = src[at];
  return at;
}
#endif

constexpr int64_t kLanes = 16;  // independent partial results: vectorizable, and more accurate

// Planes of one cell, in either layout (the two are the same then): a plane's maximum and its
// average are its cell (x / 1 is x), and so is a gradient's one cell; a maximum's saved position
// is 0 (pos may be null).
template <typename scalar_t, typename pos_t>
void one_cell_planes(const scalar_t* in, scalar_t* out, pos_t* pos, int64_t planes) {
  at::parallel_for(0, planes, 16384, [&](int64_t begin, int64_t end) {
    std::memcpy(static_cast<void*>(out + begin), in + begin, (end - begin) * sizeof(scalar_t));
    if (pos) std::fill(pos + begin, pos + end, pos_t{0});
  });
}

// pos (kPos): each maximum's cell, of the plane's global_position_dtype (common.h).
template <typename scalar_t, bool kPos, typename pos_t>
void global_max_planar(const scalar_t* in, scalar_t* out, pos_t* pos, int64_t planes,
                       int64_t P) {
  using acc_t = acc_type<scalar_t>;
  if (P == 1) {
    one_cell_planes(in, out, kPos ? pos : nullptr, planes);
    return;
  }
#if defined(TORCHPOOL_AVX2)
  // Planes of 2 to 7 cells: a vector each (short_planes8), eight planes at a time; a group whose
  // reads would pass the tensor's end, and a plane holding a NaN (with positions) or a zero
  // maximum (without: torch's rule for +0 and -0), redone alone.
  if constexpr (kFusedType<scalar_t>) {
    if (P >= 2 && P < 8) {
      auto single = [=](int64_t q) {
        if (kPos) {
          pos[q] = reduce_argmax(in + q * P, P, out + q);
        } else {
          out[q] = plane_max(in + q * P, P);
        }
      };
      const int64_t cells = planes * P;
      for_plane_groups8(
          planes, P,
          [=](int64_t pl) {
            if ((pl + 7) * P + 8 > cells) {
              for (int64_t q = pl; q < pl + 8; ++q) single(q);
              return;
            }
            __m256 m[8], nan[8];
            short_planes8(in + pl * P, P, m, nan);
            int redo;
            if constexpr (kPos) {
              __m256i at[8];
              for (int p = 0; p < 8; ++p) at[p] = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
              redo = merge_argmax8(in + pl * P, P, m, at, nan, out + pl, pos + pl);
            } else {
              const __m256 mx = fold_max8(m, nan);
              storef<true>(out + pl, mx);
              redo = _mm256_movemask_ps(_mm256_cmp_ps(mx, _mm256_setzero_ps(), _CMP_EQ_OQ));
            }
            for (; redo != 0; redo &= redo - 1) single(pl + __builtin_ctz(redo));
          },
          single);
      return;
    }
  }
  // Short planes with positions where the tuning says (Intel) and the CPU has AVX-512: eight
  // planes' maxima and cells in one pass over each plane (NOTES §115, the half types §117); a
  // plane holding a NaN redone alone.
  if constexpr (kPos && kFusedType<scalar_t>) {
    if (P >= 16 && P < 256 && tuning().argmax_avx512 && avx512_parts()) {
      const bool pf = reductions_prefetch<scalar_t>();
      for_plane_groups8(
          planes, P,
          [=](int64_t pl) {
            alignas(32) int32_t c[8];
            const int nan = argmax_planes8_avx512(in + pl * P, P, c, pf);
            for (int j = 0; j < 8; ++j) {
              const int64_t q = pl + j;
              if (nan >> j & 1) {
                pos[q] = reduce_argmax(in + q * P, P, out + q);
              } else {
                pos[q] = c[j];
                out[q] = in[q * P + c[j]];  // the cell itself (+0 and -0 compare equal)
              }
            }
          },
          [=](int64_t q) { pos[q] = reduce_argmax(in + q * P, P, out + q); });
      return;
    }
  }
  // Short planes with positions, where the tuning says (AMD): eight planes' maxima and their
  // cells in one pass over each plane (NOTES §97); a plane holding a NaN redone alone.
  if constexpr (kPos && kFusedType<scalar_t>) {
    if (P >= 8 && P < 256 && !tuning().argmax_after_max) {
      for_plane_groups8(
          planes, P,
          [=](int64_t pl) {
            int nan = argmax_planes8(in + pl * P, P, out + pl, pos + pl);
            for (; nan != 0; nan &= nan - 1) {
              const int64_t q = pl + __builtin_ctz(nan);
              pos[q] = reduce_argmax(in + q * P, P, out + q);
            }
          },
          [=](int64_t q) { pos[q] = reduce_argmax(in + q * P, P, out + q); });
      return;
    }
  }
  // Elsewhere (Intel), float short planes with positions: the maxima eight at a time, then their
  // cells (the half types were slower so, their second pass converting every cell again: §70).
  if constexpr (kPos && std::is_same_v<scalar_t, float>) {
    if (P >= 8 && P < 256 && tuning().argmax_after_max) {
      for_plane_groups8(
          planes, P,
          [=](int64_t pl) {
            alignas(32) float m[8];
            _mm256_store_ps(m, max_planes8(in + pl * P, P));
            for (int j = 0; j < 8; ++j) {
              const scalar_t* src = in + (pl + j) * P;
              const int64_t at = find_max_cell(src, P, m[j]);
              pos[pl + j] = at;
              out[pl + j] = src[at];
            }
          },
          [=](int64_t q) { pos[q] = reduce_argmax(in + q * P, P, out + q); });
      return;
    }
  }
  if constexpr (!kPos && kFusedType<scalar_t>) {
    if (P >= 8 && P < 256) {  // short planes: eight at a time (max_planes8)
      for_plane_groups8(
          planes, P,
          [=](int64_t pl) {
            const __m256 m = max_planes8(in + pl * P, P);
            storef<true>(out + pl, m);
            int zeros = _mm256_movemask_ps(_mm256_cmp_ps(m, _mm256_setzero_ps(), _CMP_EQ_OQ));
            for (; zeros != 0; zeros &= zeros - 1) {
              const int64_t q = pl + __builtin_ctz(zeros);
              out[q] = plane_max(in + q * P, P);
            }
          },
          [=](int64_t q) { out[q] = plane_max(in + q * P, P); });
      return;
    }
  }
#endif
  at::parallel_for(0, planes, grain_for(P), [&](int64_t begin, int64_t end) {
    acc_t lane[kLanes], tmp[kLanes];
    int32_t lane_best[kLanes];
    for (int64_t pl = begin; pl < end; ++pl) {
      const scalar_t* src = in + pl * P;
#if defined(TORCHPOOL_AVX2)
      if constexpr (kFusedType<scalar_t>) {
        if (kPos && P >= kArgmaxLong) {
          pos[pl] = reduce_argmax_blocked(src, P, out + pl);
          continue;
        }
        if (kPos && P < (int64_t{1} << 31)) {
          pos[pl] = reduce_argmax(src, P, out + pl);
          continue;
        }
        if (!kPos) {
          out[pl] = plane_max(src, P);
          continue;
        }
      }
#endif
      // Lane j scans cells j, j + kLanes, ... in order; the lanes are then merged so that the
      // result is the sequential scan's: the last NaN if any, else the first maximum.
      for (int64_t j = 0; j < kLanes; ++j) { lane[j] = neg_inf<acc_t>(); lane_best[j] = -1; }
      int64_t i = 0;
      for (; i + kLanes <= P; i += kLanes) {
        const acc_t* v = src_as_acc(src + i, tmp, kLanes);
        if (kPos) {
          max_pass_pos(v, lane, lane_best, static_cast<int32_t>(i / kLanes), kLanes);
        } else {
          max_pass(v, lane, kLanes);
        }
      }
      ScanMerge<acc_t> merged;
      for (int64_t j = 0; j < kLanes; ++j) {
        if (kPos && lane_best[j] < 0) continue;  // the lane never left -inf
        merged.add(lane[j], static_cast<int64_t>(lane_best[j]) * kLanes + j);
      }
      merged.tail(src, i, P);
      if (kPos) pos[pl] = merged.at;
      out[pl] = static_cast<scalar_t>(merged.value);
    }
  });
}

// How far on the channels-last global pools prefetch, in elements: the same channels some rows
// on, 4 KiB or more further in the task's walk.
template <typename scalar_t>
inline int64_t cl_rows_ahead(int64_t C, int64_t cn) {
  const int64_t row_bytes = cn * static_cast<int64_t>(sizeof(scalar_t));
  return C * ((4096 + row_bytes - 1) / row_bytes);
}

// Channels per task of the channels-last global pools: whole rows of C up to 2048 (one stream
// through memory, accumulators in L1), halved while there are fewer than 4 tasks per thread.
inline int64_t cl_channel_block(int64_t N, int64_t C) {
  int64_t b = std::min<int64_t>(C, 2048);
  while (b > 64 && N * ((C + b - 1) / b) < 4 * at::get_num_threads()) b = (b + 1) / 2;
  return b;
}

template <typename scalar_t, bool kPos, typename pos_t>
void global_max_cl(const scalar_t* in, scalar_t* out, pos_t* pos, int64_t N, int64_t C,
                   int64_t P) {
  using acc_t = acc_type<scalar_t>;
  const int64_t kBlock = cl_channel_block(N, C);
  const int64_t cblocks = (C + kBlock - 1) / kBlock;
  at::parallel_for(0, N * cblocks, grain_for(P * std::min(C, kBlock)), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> m(kBlock), tmp(kBlock);
    std::vector<int32_t> best(kPos ? kBlock : 0);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / cblocks, c0 = (t % cblocks) * kBlock;
      const int64_t cn = std::min(kBlock, C - c0);
      std::fill(m.begin(), m.end(), neg_inf<acc_t>());
      if (kPos) std::fill(best.begin(), best.end(), 0);
      const int64_t ahead = cl_rows_ahead<scalar_t>(C, cn);
      for (int64_t i = 0; i < P; ++i) {
        const auto* v = pass_input(in + (n * P + i) * C + c0, tmp.data(), cn);
        if (kPos) {
          max_pass_pos(v, m.data(), best.data(), static_cast<int32_t>(i), cn, ahead);
        } else {
          max_pass(v, m.data(), cn, ahead);
        }
      }
      for (int64_t c = 0; c < cn; ++c) out[n * C + c0 + c] = static_cast<scalar_t>(m[c]);
      if (kPos) {
        for (int64_t c = 0; c < cn; ++c) pos[n * C + c0 + c] = best[c];
      }
    }
  });
}

template <typename scalar_t>
void global_avg_planar(const scalar_t* in, scalar_t* out, int64_t planes, int64_t P) {
  using acc_t = acc_type<scalar_t>;
  if (P == 1) {
    one_cell_planes(in, out, static_cast<uint8_t*>(nullptr), planes);
    return;
  }
#if defined(TORCHPOOL_AVX2)
  if constexpr (kFusedType<scalar_t>) {
    // Short planes: eight at a time (sum_planes8); the half types' tails need planes of 8 or more.
    if (P < 256 && (std::is_same_v<scalar_t, float> || P >= 8)) {
      const __m256 count = _mm256_set1_ps(static_cast<float>(P));
      for_plane_groups8(
          planes, P,
          [=](int64_t pl) { storef(out + pl, _mm256_div_ps(sum_planes8(in + pl * P, P), count)); },
          [=](int64_t q) {
            out[q] = static_cast<scalar_t>(reduce_sum(in + q * P, P) / static_cast<float>(P));
          });
      return;
    }
  }
#endif
  at::parallel_for(0, planes, grain_for(P), [&](int64_t begin, int64_t end) {
    for (int64_t pl = begin; pl < end; ++pl) {
      const scalar_t* src = in + pl * P;
#if defined(TORCHPOOL_AVX2)
      if constexpr (kFusedType<scalar_t>) {
        out[pl] = static_cast<scalar_t>(reduce_sum(src, P) / static_cast<float>(P));
        continue;
      }
#endif
      acc_t lane[kLanes] = {}, tmp[kLanes];
      int64_t i = 0;
      for (; i + kLanes <= P; i += kLanes) sum_pass(src_as_acc(src + i, tmp, kLanes), lane, kLanes);
      acc_t s = 0;
      for (; i < P; ++i) s += static_cast<acc_t>(src[i]);
      for (int64_t j = 0; j < kLanes; ++j) s += lane[j];
      out[pl] = static_cast<scalar_t>(s / static_cast<acc_t>(P));
    }
  });
}

template <typename scalar_t>
void global_avg_cl(const scalar_t* in, scalar_t* out, int64_t N, int64_t C, int64_t P) {
  using acc_t = acc_type<scalar_t>;
  const int64_t kBlock = cl_channel_block(N, C);
  const int64_t cblocks = (C + kBlock - 1) / kBlock;
  at::parallel_for(0, N * cblocks, grain_for(P * std::min(C, kBlock)), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> s(kBlock), tmp(kBlock);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / cblocks, c0 = (t % cblocks) * kBlock;
      const int64_t cn = std::min(kBlock, C - c0);
      std::fill(s.begin(), s.end(), acc_t(0));
      const int64_t ahead = cl_rows_ahead<scalar_t>(C, cn);
      int64_t i = 0;
#if defined(TORCHPOOL_AVX2)
      if constexpr (kFusedType<scalar_t>) {
        // Four rows a step, each prefetched a whole number of steps ahead (at least `ahead`).
        const int64_t ahead4 = (ahead / C + 3) / 4 * 4 * C;
        for (; i + 4 <= P; i += 4) sum_rows4(in + (n * P + i) * C + c0, C, s.data(), cn, ahead4);
      }
#endif
      for (; i < P; ++i) {
        sum_pass(pass_input(in + (n * P + i) * C + c0, tmp.data(), cn), s.data(), cn, ahead);
      }
      for (int64_t c = 0; c < cn; ++c) {
        out[n * C + c0 + c] = static_cast<scalar_t>(s[c] / static_cast<acc_t>(P));
      }
    }
  });
}

// Streaming for the global backwards in both builds: the AVX2 build's streams() and
// StagedRuns, the baseline's ordinary stores. From half the window backwards' size: these write
// nothing but their result, mostly without staging it (on the Xeon VM a 22 MB window backward
// streamed was no faster, these of 26 MB were: NOTES §74).
#if defined(TORCHPOOL_AVX2)
template <typename T>
inline bool streams_out(int64_t elems) { return streams<T>(elems, kStreamBytes / 2); }
// The half types stream only fills of planes too long to stage (their staged copies cost more than
// they saved, §69), from 8 MiB of result: a 12.8 MB bfloat16 fill ran ×2.3 faster where its block
// had left the cache, 9 % slower where it had not (§77).
template <typename T>
inline bool fills_stream(int64_t elems, int64_t plane) {
  return kFusedType<T> && !std::is_same_v<T, float> && plane > StagedRuns<T>::kCap &&
         elems * static_cast<int64_t>(sizeof(T)) >= kStreamBytes / 4;
}
// The half types' average gradients stream from 8 MiB of result, as fills_stream: NCHW planes of
// 16 cells or more, channels-last rows of whole lines, written as float's (NOTES §122).
template <typename T>
inline bool half_means_stream(int64_t elems) {
  return elems * static_cast<int64_t>(sizeof(T)) >= kStreamBytes / 4;
}
template <typename T>
using Staged = StagedRuns<T>;
#else
template <typename T>
inline bool streams_out(int64_t) { return false; }
template <typename T>
inline bool fills_stream(int64_t, int64_t) { return false; }
template <typename T>
struct Staged {
  static constexpr int64_t kCap = 0;
  explicit Staged(bool, int64_t = 0) {}
  T* at(T* dst, int64_t) { return dst; }
};
#endif

// Staging capacity of the global backwards for runs (planes, or channels-last rows) of n cells:
// 8 KiB, or one run where longer; runs over 32 KiB are not staged. A 32 KiB capacity was slower
// (global-avg's backward 0.92–0.95 against 0.88 ms, channels-last 1.09–1.10 against 0.94–0.95),
// 1 KiB too (each copy's partial end lines written by ordinary stores; NOTES §80).
template <typename T>
inline int64_t global_staged(int64_t n) {
  return n > Staged<T>::kCap ? Staged<T>::kCap
                             : std::max<int64_t>(n, 8192 / static_cast<int64_t>(sizeof(T)));
}

// dst[0, n) = 0; `stream` (float and the half types): by non-temporal stores, fenced so that
// ordinary stores may follow.
template <typename T>
inline void zero_out(T* dst, int64_t n, bool stream) {
#if defined(TORCHPOOL_AVX2)
  if constexpr (kFusedType<T>) {
    if (stream) {
      stream_fill(dst, n, T(0));
      stream_fence();
      return;
    }
  }
#endif
  std::memset(static_cast<void*>(dst), 0, n * sizeof(T));
}

// dst[0, n) = v. The half types fill their 16-bit patterns: std::fill on the c10 structs goes
// one element at a time.
template <typename T>
inline void fill_value(T* dst, int64_t n, T v) {
  if constexpr (std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>) {
    std::fill(reinterpret_cast<uint16_t*>(dst), reinterpret_cast<uint16_t*>(dst) + n, v.x);
  } else {
    std::fill(dst, dst + n, v);
  }
}

// dst[0, n) = v where dst came from Staged::at (or is a plane too long to stage: `stream`
// fills it by non-temporal stores).
template <typename T>
inline void fill_out(T* dst, int64_t n, T v, bool stream) {
#if defined(TORCHPOOL_AVX2)
  if constexpr (kFusedType<T>) {
    if (stream && n > StagedRuns<T>::kCap) {
      stream_fill(dst, n, v);
      stream_fence();
      return;
    }
  }
#endif
  fill_value(dst, n, v);
}

#if defined(TORCHPOOL_AVX2)
// The average's large NCHW gradient, planes begin .. end of P cells, P at least a vector's
// (8 floats, 16 of the half types): plane r is gout[r] / P throughout (the half types: the float
// quotient rounded). Written straight out, whole lines by non-temporal stores (the partial lines
// at the range's ends by ordinary ones), each vector built in registers: at most two planes meet
// in it, blended where one ends. Staged instead, short planes cost a fill and a copy each, and
// the copy's loads wait on the fill's stores (NOTES §93).
template <typename T>
void stream_plane_means(T* gin, const T* gout, int64_t begin, int64_t end, int64_t P) {
  constexpr int64_t kVec = 32 / sizeof(T);
  T* const d = gin + begin * P;
  const int64_t n = (end - begin) * P;
  const float count = static_cast<float>(P);
  auto mean = [&](int64_t r) {
    return static_cast<T>(r < end ? static_cast<float>(gout[r]) / count : 0.0f);
  };
  // v in every lane of a vector.
  auto splat = [](T v) {
    if constexpr (sizeof(T) == 2) {
      return _mm256_set1_epi16(static_cast<int16_t>(v.x));
    } else {
      return _mm256_castps_si256(_mm256_set1_ps(v));
    }
  };
  int64_t r = begin, next = P;  // the plane of the cells being written; where the next starts
  T v = mean(r);
  auto scalar_to = [&](int64_t i, int64_t stop) {
    for (; i < stop; ++i) {
      if (i == next) {
        v = mean(++r);
        next += P;
      }
      d[i] = v;
    }
  };
  const int64_t head =
      std::min<int64_t>(n, (64 - reinterpret_cast<uintptr_t>(d) % 64) % 64 / sizeof(T));
  scalar_to(0, head);
  const int64_t body_end = head + (n - head) / (2 * kVec) * (2 * kVec);
  const __m256i lane = sizeof(T) == 2
      ? _mm256_setr_epi16(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
      : _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256i cur = splat(v), after = splat(mean(r + 1));
  for (int64_t i = head; i < body_end; i += kVec) {
    // next >= i: a plane of a vector's cells or more ends in a vector at most once.
    __m256i x = cur;
    if (next < i + kVec) {
      const int32_t last = static_cast<int32_t>(next - i - 1);  // the ending plane's last lane
      const __m256i later = sizeof(T) == 2
          ? _mm256_cmpgt_epi16(lane, _mm256_set1_epi16(static_cast<int16_t>(last)))
          : _mm256_cmpgt_epi32(lane, _mm256_set1_epi32(last));
      x = _mm256_blendv_epi8(cur, after, later);
      ++r;
      next += P;
      cur = after;
      after = splat(mean(r + 1));
    }
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i), x);
  }
  v = mean(r);
  scalar_to(body_end, n);
  stream_fence();
}
#endif

// grad_in = 0 except grad at the saved position (max), or grad / P everywhere (avg).
template <typename scalar_t, bool kMax, typename pos_t>
void global_bwd(const scalar_t* gout, const pos_t* pos, scalar_t* gin, int64_t N, int64_t C,
                int64_t P, bool cl) {
  using acc_t = acc_type<scalar_t>;
  if (P == 1) {  // each cell's gradient is its plane's (a maximum's position can only be 0)
    one_cell_planes(gout, gin, static_cast<uint8_t*>(nullptr), N * C);
    return;
  }
  const int64_t rows = cl ? N * P : N * C;   // contiguous runs of the output
  const int64_t run = cl ? C : P;
  at::parallel_for(0, rows, grain_for(run), [&](int64_t begin, int64_t end) {
    // Channels-last average of half types: every cell of sample n gets the same C values, worked
    // out once per sample and copied, not converted again per cell. (Float writes g / P
    // directly into staged rows: the compiler vectorizes that loop, and it beat the copy; but
    // large results with rows of whole lines are copied straight out, below.)
    constexpr bool kHalf = !std::is_same_v<scalar_t, acc_t>;
    std::vector<scalar_t> scaled(!kMax && cl ? C : 0);
    int64_t scaled_n = -1;
    // Max (but for the staged planes below): the task's whole range zeroed at once, then the one
    // gradient per plane (per channel, channels-last) goes in. Large float results (streams_out)
    // are zeroed by non-temporal stores and the averages' staged and streamed out, or, planes too
    // long to stage, filled by non-temporal stores: on the Xeon VM, writing lines not in the cache
    // by ordinary stores ran at a third of that speed (NOTES §74). Otherwise one memset, whose
    // string stores write whole lines without reading them first: on the EPYC VM about twice the
    // speed of vector stores, and of one memset per short plane (§47). The half types stage
    // nothing: their averages write large results as float's do, straight out (§77, §122), and
    // where the tuning says (Intel), the max's zeros of planes too long to stage stream (§114).
    const bool stream =
        streams_out<scalar_t>(rows * run) ||
        (!cl && fills_stream<scalar_t>(rows * run, run) && (!kMax || tuning().half_max_zeros_stream));
    // Large float max results with planes short enough to stage: each plane zeroed and given its
    // gradient in the staging buffer, then streamed out like the averages' (§79); stored into
    // lines just streamed out, the gradients each read their line back from memory first.
    const bool stage_max = kMax && !cl && stream && run <= Staged<scalar_t>::kCap;
#if defined(TORCHPOOL_AVX2)
    if constexpr (!kMax && kFusedType<scalar_t>) {
      // The averages' large results: float's where streams_out says, the half types' where
      // half_means_stream does (NOTES §122).
      const bool means_stream = kHalf ? half_means_stream<scalar_t>(rows * run) : stream;
      if (means_stream && !cl && run >= 32 / static_cast<int64_t>(sizeof(scalar_t))) {
        stream_plane_means(gin, gout, begin, end, run);
        return;
      }
      if (means_stream && cl && C % StagedRuns<scalar_t>::kLineCells == 0) {
        // Channels-last rows of whole lines: each sample's C means worked out once, then copied
        // straight out to each of its cells (NOTES §93).
        for (int64_t r = begin; r < end; ++r) {
          if (r / P != scaled_n) {
            scaled_n = r / P;
            const scalar_t* g = gout + scaled_n * C;
            for (int64_t c = 0; c < C; ++c) {
              scaled[c] = static_cast<scalar_t>(static_cast<float>(g[c]) / static_cast<float>(P));
            }
          }
          stream_copy(gin + r * C, scaled.data(), C);
        }
        stream_fence();
        return;
      }
    }
#endif
    if (kMax && !stage_max) zero_out(gin + begin * run, (end - begin) * run, stream);
    if (kMax && cl) {
      // Channels-last: each channel's one gradient scattered to its saved cell, where that cell's
      // row is in this task's range (NOTES §94).
      for (int64_t n = begin / P; n <= (end - 1) / P; ++n) {
        for (int64_t c = 0; c < C; ++c) {
          const int64_t r = n * P + pos[n * C + c];
          if (r >= begin && r < end) gin[r * C + c] = gout[n * C + c];
        }
      }
      return;
    }
    Staged<scalar_t> out(stream && (!kMax || stage_max), global_staged<scalar_t>(run));
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* dst = kMax && !stage_max ? gin + r * run : out.at(gin + r * run, run);
      if (stage_max) {
        fill_value(dst, run, scalar_t(0));
        dst[pos[r]] = gout[r];
      } else if (kMax) {
        dst[pos[r]] = gout[r];
      } else if (cl && !kHalf) {
        const scalar_t* g = gout + (r / P) * C;
        for (int64_t c = 0; c < C; ++c) dst[c] = g[c] / static_cast<acc_t>(P);
      } else if (cl) {
        if (r / P != scaled_n) {
          scaled_n = r / P;
          const scalar_t* g = gout + scaled_n * C;
          for (int64_t c = 0; c < C; ++c) {
            scaled[c] = static_cast<scalar_t>(static_cast<acc_t>(g[c]) / static_cast<acc_t>(P));
          }
        }
        std::copy_n(scaled.data(), C, dst);
      } else {
        const scalar_t v =
            static_cast<scalar_t>(static_cast<acc_t>(gout[r]) / static_cast<acc_t>(P));
        fill_out(dst, run, v, stream);
      }
    }
  });
}

}  // namespace TORCHPOOL_CPU_NS
