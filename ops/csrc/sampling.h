// Bilinear sampling geometry shared by the CPU and CUDA kernels.
//
// Layouts (all contiguous):
//   value               (B, S, heads, C)
//   spatial_shapes      (levels, 2)  int64 (H, W)
//   level_start_index   (levels,)    int64
//   sampling_locations  (B, Lq, heads, levels, points, 2)  normalised (x, y)
//   attention_weights   (B, Lq, heads, levels, points)
//   output              (B, Lq, heads, C)
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace deformable_detr {

// The four bilinear corners of one sample: 0 = (y0, x0), 1 = (y0, x1), 2 = (y1, x0),
// 3 = (y1, x1). `offset` is the element offset of the corner's channel vector from the start
// of the (batch, head) slice of value, or -1 when the corner lies outside the level (zero
// padding). `frac_x` and `frac_y` are the distances of the sample from x0 and y0.
template <typename acc_t>
struct Corners {
  int64_t offset[4];
  acc_t weight[4];
  acc_t frac_x;
  acc_t frac_y;
};

// A level may be read only if it is non-empty and lies inside the S tokens of value; the
// kernels skip any other level, so inconsistent metadata can never index out of bounds. The
// size test divides instead of forming height * width, which can overflow for absurd shapes.
C10_HOST_DEVICE inline bool level_in_bounds(int64_t height, int64_t width, int64_t start,
                                            int64_t spatial) {
  return height > 0 && width > 0 && start >= 0 && start <= spatial &&
         height <= (spatial - start) / width;
}

// What is wrong with the level metadata, if anything: spatial_shapes (levels, 2) must be
// positive, level_start_index the running sum of H * W, and the levels must hold exactly S
// tokens. `level` is the first offending level (`levels` when only the total is wrong) and
// `tokens` the number of tokens held by the levels before it.
enum class LevelsError : int { kNone, kNotPositive, kStart, kTooManyTokens, kTokenCount };

struct LevelsCheck {
  LevelsError error;
  int64_t level;
  int64_t tokens;
};

// One pass over the levels, shared by the host check and the CUDA device check; never forms a
// product or sum that could overflow.
C10_HOST_DEVICE inline LevelsCheck check_level_metadata(const int64_t* shapes,
                                                       const int64_t* starts, int64_t levels,
                                                       int64_t spatial) {
  int64_t tokens = 0;
  for (int64_t l = 0; l < levels; ++l) {
    const int64_t height = shapes[2 * l];
    const int64_t width = shapes[2 * l + 1];
    if (height <= 0 || width <= 0) {
      return {LevelsError::kNotPositive, l, tokens};
    }
    if (starts[l] != tokens) {
      return {LevelsError::kStart, l, tokens};
    }
    if (height > (spatial - tokens) / width) {
      return {LevelsError::kTooManyTokens, l, tokens};
    }
    tokens += height * width;
  }
  if (tokens != spatial) {
    return {LevelsError::kTokenCount, levels, tokens};
  }
  return {LevelsError::kNone, levels, tokens};
}

// Fills `corners` for the normalised location (x, y) on a level of size height x width whose
// tokens start at `start` in value; `token_stride` is heads * C. The pixel coordinate is
// loc * size - 0.5 (align_corners=False). Returns false when no corner is inside the level,
// in which case the sample is zero and so are its gradients.
template <typename acc_t>
C10_HOST_DEVICE inline bool locate_corners(acc_t x, acc_t y, int64_t height, int64_t width,
                                           int64_t start, int64_t token_stride,
                                           Corners<acc_t>& corners) {
  const acc_t px = x * static_cast<acc_t>(width) - acc_t(0.5);
  const acc_t py = y * static_cast<acc_t>(height) - acc_t(0.5);
  // Written so that NaN locations fail the test.
  if (!(px > acc_t(-1) && py > acc_t(-1) && px < static_cast<acc_t>(width) &&
        py < static_cast<acc_t>(height))) {
    return false;
  }
  // px, py > -1, so floor() is -1 on (-1, 0) and truncation elsewhere.
  const int64_t x0 = px < acc_t(0) ? -1 : static_cast<int64_t>(px);
  const int64_t y0 = py < acc_t(0) ? -1 : static_cast<int64_t>(py);
  const int64_t x1 = x0 + 1;
  const int64_t y1 = y0 + 1;
  const acc_t lx = px - static_cast<acc_t>(x0);
  const acc_t ly = py - static_cast<acc_t>(y0);
  const acc_t hx = acc_t(1) - lx;
  const acc_t hy = acc_t(1) - ly;
  const bool x0_in = x0 >= 0;
  const bool x1_in = x1 < width;
  const bool y0_in = y0 >= 0;
  const bool y1_in = y1 < height;
  const int64_t row0 = (start + y0 * width) * token_stride;
  const int64_t row1 = (start + y1 * width) * token_stride;
  corners.offset[0] = (y0_in && x0_in) ? row0 + x0 * token_stride : -1;
  corners.offset[1] = (y0_in && x1_in) ? row0 + x1 * token_stride : -1;
  corners.offset[2] = (y1_in && x0_in) ? row1 + x0 * token_stride : -1;
  corners.offset[3] = (y1_in && x1_in) ? row1 + x1 * token_stride : -1;
  corners.weight[0] = hy * hx;
  corners.weight[1] = hy * lx;
  corners.weight[2] = ly * hx;
  corners.weight[3] = ly * lx;
  corners.frac_x = lx;
  corners.frac_y = ly;
  return true;
}

// Gradients of one sample given d[k] = <grad_output, value at corner k> (zero for corners
// outside): the attention-weight gradient, and the location gradients for weight `attn`.
template <typename acc_t>
struct SampleGrad {
  acc_t attn;
  acc_t x;
  acc_t y;
};

template <typename acc_t>
C10_HOST_DEVICE inline SampleGrad<acc_t> sample_grad(const Corners<acc_t>& corners,
                                                     const acc_t (&d)[4], acc_t attn,
                                                     int64_t height, int64_t width) {
  const acc_t lx = corners.frac_x;
  const acc_t ly = corners.frac_y;
  const acc_t hx = acc_t(1) - lx;
  const acc_t hy = acc_t(1) - ly;
  SampleGrad<acc_t> grad;
  grad.attn = corners.weight[0] * d[0] + corners.weight[1] * d[1] + corners.weight[2] * d[2] +
              corners.weight[3] * d[3];
  // d(sample)/d(px) and d(sample)/d(py), times d(px)/dx = W and d(py)/dy = H.
  grad.x = attn * (hy * (d[1] - d[0]) + ly * (d[3] - d[2])) * static_cast<acc_t>(width);
  grad.y = attn * (hx * (d[2] - d[0]) + lx * (d[3] - d[1])) * static_cast<acc_t>(height);
  return grad;
}

}  // namespace deformable_detr
