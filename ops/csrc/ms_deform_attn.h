// Multi-scale deformable attention: operator declarations shared by the backends.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace deformable_detr {

// Checks the ranks, sizes, dtypes and devices of the forward inputs (the metadata only, so no
// device synchronisation); raises ValueError on a mismatch.
void check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                  const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                  const at::Tensor& attention_weights);

// As check_inputs, plus grad_output against the forward output shape (B, Lq, heads * C).
void check_backward_inputs(const at::Tensor& grad_output, const at::Tensor& value,
                           const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                           const at::Tensor& sampling_locations,
                           const at::Tensor& attention_weights);

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index,
                                      const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights);

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights);

}  // namespace deformable_detr
