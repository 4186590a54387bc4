// Multi-scale deformable attention: the call geometry and input checks shared by the backends.
// Each backend registers its kernels with TORCH_LIBRARY_IMPL in its own file.
#pragma once

#include <ATen/core/Tensor.h>

namespace deformable_detr {

// The sizes of one call: value (batch, spatial, heads, channels), sampling_locations
// (batch, queries, heads, levels, points, 2). Passed by value to the CUDA kernels.
struct Geometry {
  int64_t batch;
  int64_t spatial;
  int64_t heads;
  int64_t channels;
  int64_t queries;
  int64_t levels;
  int64_t points;
};

// float16 or bfloat16: computed in float32, and the dtypes whose sampling_locations and
// attention_weights may be float32 (the sampling positions then keep float32 precision).
bool is_reduced_float(at::ScalarType dtype);

// Reads the Geometry off checked inputs.
Geometry geometry_of(const at::Tensor& value, const at::Tensor& sampling_locations);

// Checks the ranks, sizes, dtypes and devices of the forward inputs (the metadata only, so no
// device synchronisation); raises ValueError on a mismatch.
void check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                  const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                  const at::Tensor& attention_weights);

// Checks the level metadata's values on the host (see check_level_metadata); shapes and starts
// point to levels * 2 and levels int64 values. Raises ValueError naming the offending level.
void check_levels(const int64_t* shapes, const int64_t* starts, int64_t levels, int64_t spatial);

// As check_inputs, plus grad_output against the forward output shape (B, Lq, heads * C).
void check_backward_inputs(const at::Tensor& grad_output, const at::Tensor& value,
                           const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                           const at::Tensor& sampling_locations,
                           const at::Tensor& attention_weights);

}  // namespace deformable_detr
