// Allocation of CPU outputs: large ones from a cache of freed blocks (output_cache.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace torchpool::cpu {

// An uninitialized CPU tensor like at::empty(shape, options).
at::Tensor empty_output(c10::IntArrayRef shape, const at::TensorOptions& options);

// [free bytes held, free blocks held, allocations served from the cache, allocations mapped
// fresh, the cap on free bytes]
std::vector<int64_t> output_cache_stats();

// Unmaps every free block held; returns their bytes.
int64_t output_cache_empty();

}  // namespace torchpool::cpu
