// Checks of saved positions given to the backward ops. The forwards write only cells that lie in
// the input; positions made elsewhere may not, and the backward kernels would then drop their
// gradient or, where a window cell's offset crosses a row end, add it to another cell. The op
// bodies refuse them instead.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "geometry.h"
#include "positions.h"

namespace torchpool::cpu {

// The first of n saved cells outside [0, cells), or -1: one pass for the bounds, a second only
// where one is outside.
template <typename T>
int64_t first_cell_outside(const T* p, int64_t n, int64_t cells) {
  T lo = 0, hi = 0;
  for (int64_t i = 0; i < n; ++i) {
    lo = std::min(lo, p[i]);
    hi = std::max(hi, p[i]);
  }
  if (lo >= 0 && static_cast<int64_t>(hi) < cells) return -1;
  int64_t i = 0;
  while (p[i] >= 0 && static_cast<int64_t>(p[i]) < cells) ++i;
  return i;
}

// The window cells of the outputs whose window the input's border cuts, as runs of consecutive
// outputs (flat spatial index) that share a box of cells [lo, hi) per dim. An output whose window
// misses the input in some dim sends no gradient wherever its position points: it has no run, as
// the outputs whose windows lie whole in the input.
struct BorderWindows {
  struct Box {
    int64_t lo[kDims], hi[kDims];
    int64_t first = 0, end = 0;  // the box's cells, where they are one range of positions
    bool range = false;
    uint64_t bits[4] = {0, 0, 0, 0};  // the box's cells, for windows of at most 256 cells
  };
  struct Run {
    int64_t start, len;
    int box;
  };
  std::vector<Box> boxes;
  std::vector<Run> runs;

  explicit BorderWindows(const PoolGeometry& g) {
    std::vector<int64_t> lo[kDims], hi[kDims];
    for (int d = 0; d < kDims; ++d) {
      lo[d].resize(g.out[d]);
      hi[d].resize(g.out[d]);
      for (int64_t o = 0; o < g.out[d]; ++o) g.valid_cells(d, o, lo[d][o], hi[d][o]);
    }
    auto full = [&](int d, int64_t o) { return lo[d][o] == 0 && hi[d][o] == g.kernel[d]; };
    auto empty = [&](int d, int64_t o) { return lo[d][o] == hi[d][o]; };
    std::vector<int64_t> cut_w;  // the outputs along W whose window the border cuts
    for (int64_t ow = 0; ow < g.out[2]; ++ow) {
      if (!full(2, ow)) cut_w.push_back(ow);
    }
    for (int64_t od = 0, s = 0; od < g.out[0]; ++od) {
      for (int64_t oh = 0; oh < g.out[1]; ++oh, s += g.out[2]) {
        if (empty(0, od) || empty(1, oh)) continue;
        const bool whole_row = !full(0, od) || !full(1, oh);
        const int64_t n = whole_row ? g.out[2] : static_cast<int64_t>(cut_w.size());
        for (int64_t i = 0; i < n; ++i) {
          const int64_t ow = whole_row ? i : cut_w[i];
          if (empty(2, ow) || (full(0, od) && full(1, oh) && full(2, ow))) continue;
          add(g, s + ow, {lo[0][od], lo[1][oh], lo[2][ow]}, {hi[0][od], hi[1][oh], hi[2][ow]});
        }
      }
    }
  }

 private:
  void add(const PoolGeometry& g, int64_t s, const int64_t (&l)[kDims], const int64_t (&h)[kDims]) {
    int b = 0;
    const int nb = static_cast<int>(boxes.size());
    auto same = [&](const Box& x) {
      return std::equal(l, l + kDims, x.lo) && std::equal(h, h + kDims, x.hi);
    };
    while (b < nb && !same(boxes[b])) ++b;
    if (b == nb) boxes.push_back(make_box(g, l, h));
    if (!runs.empty() && runs.back().box == b && runs.back().start + runs.back().len == s) {
      ++runs.back().len;
    } else {
      runs.push_back({s, 1, b});
    }
  }

  static Box make_box(const PoolGeometry& g, const int64_t (&l)[kDims], const int64_t (&h)[kDims]) {
    Box box;
    std::copy(l, l + kDims, box.lo);
    std::copy(h, h + kDims, box.hi);
    // One range of positions where every dim inside the first cut one is whole and every dim
    // outside it holds one cell.
    bool inner_whole = true;
    box.range = true;
    for (int d = kDims - 1; d >= 0; --d) {
      if (!inner_whole && h[d] - l[d] != 1) box.range = false;
      if (l[d] != 0 || h[d] != g.kernel[d]) inner_whole = false;
    }
    auto cell = [&](int64_t kd, int64_t kh, int64_t kw) {
      return (kd * g.kernel[1] + kh) * g.kernel[2] + kw;
    };
    box.first = cell(l[0], l[1], l[2]);
    box.end = cell(h[0] - 1, h[1] - 1, h[2] - 1) + 1;
    if (g.window_cells() <= 256) {
      for (int64_t kd = l[0]; kd < h[0]; ++kd) {
        for (int64_t kh = l[1]; kh < h[1]; ++kh) {
          for (int64_t kw = l[2]; kw < h[2]; ++kw) {
            const int64_t k = cell(kd, kh, kw);
            box.bits[k >> 6] |= uint64_t{1} << (k & 63);
          }
        }
      }
    }
    return box;
  }
};

// Whether window cell k (in [0, cells)) lies in the box.
template <typename T>
bool in_box(const BorderWindows::Box& b, T k, const PoolGeometry& g) {
  if constexpr (std::is_same_v<T, uint8_t>) {
    return (b.bits[k >> 6] >> (k & 63)) & 1;
  } else {
    const int64_t c = static_cast<int64_t>(k), kw = c % g.kernel[2], kdh = c / g.kernel[2];
    const int64_t kh = kdh % g.kernel[1], kd = kdh / g.kernel[1];
    return kd >= b.lo[0] && kd < b.hi[0] && kh >= b.lo[1] && kh < b.hi[1] && kw >= b.lo[2] &&
           kw < b.hi[2];
  }
}

// The first of n positions outside the box, or -1 (all of them already in [0, cells)).
template <typename T>
int64_t first_outside_box(const T* p, int64_t n, const BorderWindows::Box& b,
                          const PoolGeometry& g) {
  if (b.range) {
    T lo = p[0], hi = p[0];
    for (int64_t i = 1; i < n; ++i) {
      lo = std::min(lo, p[i]);
      hi = std::max(hi, p[i]);
    }
    if (static_cast<int64_t>(lo) >= b.first && static_cast<int64_t>(hi) < b.end) return -1;
  }
  for (int64_t i = 0; i < n; ++i) {
    if (!in_box(b, p[i], g)) return i;
  }
  return -1;
}

// Finds the first (lowest flat index) saved position of a max pool's forward that names no cell of
// its window inside the input (its value left to the caller), as misplaced_window_position does
// with ATen ops. `planes` blocks of g.out_plane() spatial outputs of `group` positions each: N * C
// planes of group 1 in NCHW, N planes of group C in channels-last. A pass over all positions for
// the bounds, then one over the outputs of border windows.
template <typename T>
MisplacedPosition find_misplaced_position(const T* p, const PoolGeometry& g, int64_t planes,
                                          int64_t group) {
  constexpr int64_t kNone = std::numeric_limits<int64_t>::max();
  const int64_t total = planes * g.out_plane() * group;
  std::atomic<int64_t> first{kNone};
  auto lower = [&](int64_t i) {
    int64_t cur = first.load();
    while (i < cur && !first.compare_exchange_weak(cur, i)) {
    }
  };
  at::parallel_for(0, total, int64_t{1} << 16, [&](int64_t begin, int64_t end) {
    const int64_t at = first_cell_outside(p + begin, end - begin, g.window_cells());
    if (at >= 0) lower(begin + at);
  });
  if (first.load() != kNone) return {first.load(), 0, true};
  const BorderWindows border(g);
  if (border.runs.empty()) return {};
  int64_t per_plane = 0;
  for (const auto& r : border.runs) per_plane += r.len * group;
  const int64_t plane_size = g.out_plane() * group;
  at::parallel_for(0, planes, std::max<int64_t>(1, 16384 / per_plane), [&](int64_t b0, int64_t b1) {
    for (int64_t pl = b0; pl < b1; ++pl) {
      for (const auto& r : border.runs) {
        const int64_t start = pl * plane_size + r.start * group;
        const int64_t at = first_outside_box(p + start, r.len * group, border.boxes[r.box], g);
        if (at >= 0) {
          lower(start + at);
          break;
        }
      }
    }
  });
  return {first.load() == kNone ? -1 : first.load(), 0, false};
}

}  // namespace torchpool::cpu
