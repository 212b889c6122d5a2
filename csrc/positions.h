// The saved positions given to the max backwards, checked on any device, and the errors that
// refuse them. The forwards write only cells that lie in the input; positions made elsewhere may
// not, and the backward kernels would then drop their gradient or add it to another cell.
//
// Each device finds the first misplaced position its own way (the CPU in one pass over the
// positions, cpu/position_check.h; other devices with the ATen ops below, which read the result
// back and so wait for the device) and raises the same error for it.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "geometry.h"

namespace torchpool {

// A misplaced saved position: its flat index in memory order (-1: none), its value, and whether
// it lies outside its window (not in [0, cells)) or names a window cell in the padding.
struct MisplacedPosition {
  int64_t index = -1;
  int64_t value = 0;
  bool outside_window = false;
};

// The first saved window position of a max pool (`pos` dense in its layout, channels-last where
// `cl`) outside [0, g.window_cells()), or, where there is none, the first that names a window
// cell in the padding. An output whose window misses the input in some dim sends no gradient
// wherever its position points and is never refused. ATen ops on pos's device.
MisplacedPosition misplaced_window_position(const at::Tensor& pos, const PoolGeometry& g, bool cl);

// The first saved cell of a global max (`pos` contiguous) outside [0, cells). ATen ops on pos's
// device.
MisplacedPosition misplaced_global_position(const at::Tensor& pos, int64_t cells);

// Raise the error for `bad` (nothing where bad.index < 0): the position's logical index, its
// value, and the rule; C: the channels.
void refuse_window_position(const char* op, const MisplacedPosition& bad, const PoolGeometry& g,
                            int64_t C, bool cl);
void refuse_global_position(const char* op, const MisplacedPosition& bad, int64_t cells);

}  // namespace torchpool
