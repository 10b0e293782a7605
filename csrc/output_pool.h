// Reused memory for the native kernels' output tensors (CPU).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace dynprune {

// at::empty for a float32/any-dtype CPU output, its memory taken from blocks
// of freed outputs of the same byte size where there is one. A fresh block
// from glibc above its mmap threshold is a fresh mapping: every 4 KB page of
// it faults on first write (see output_pool.cpp). The tensor is an ordinary,
// resizable CPU tensor.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// Frees the idle blocks; returns their bytes.
int64_t release_idle_outputs();

// Bytes held idle now.
int64_t idle_output_bytes();

}  // namespace dynprune
