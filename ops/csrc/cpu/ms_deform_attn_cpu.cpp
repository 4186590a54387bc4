// CPU forward and backward of the multi-scale deformable attention sampling core.
//
// Forward is parallel over (batch, head, query) items. Backward is parallel over (batch, head)
// pairs: every scatter-add into grad_value then lands in a slice that only one task writes, and
// each task visits its queries in a fixed order, so the result is race-free and deterministic.
#include "../ms_deform_attn.h"
#include "../sampling.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

namespace deformable_detr {

namespace {

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__) && \
    defined(__linux__)
// The hot loops are compiled twice, for x86-64-v3 (AVX2, FMA) and for the baseline, and the
// loader picks the one the CPU supports.
#define MSDA_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MSDA_CPU_CLONES
#endif

// Partial sums kept in independent lanes so that the compiler can vectorise the channel loops
// without reassociating floating-point additions.
constexpr int64_t kLanes = 8;

// Roughly how many multiply-adds one parallel chunk should hold before it is worth a thread.
constexpr int64_t kGrainWork = int64_t(1) << 15;

template <typename scalar_t>
inline void axpy(int64_t n, scalar_t alpha, const scalar_t* __restrict__ x,
                 scalar_t* __restrict__ y) {
  for (int64_t c = 0; c < n; ++c) {
    y[c] += alpha * x[c];
  }
}

// Returns <g, v> and adds alpha * g to gv, in one pass over the channels.
template <typename scalar_t>
inline scalar_t dot_and_axpy(int64_t n, const scalar_t* __restrict__ g,
                             const scalar_t* __restrict__ v, scalar_t alpha,
                             scalar_t* __restrict__ gv) {
  scalar_t lanes[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) {
      lanes[j] += g[c + j] * v[c + j];
      gv[c + j] += alpha * g[c + j];
    }
  }
  scalar_t sum = 0;
  for (int64_t j = 0; j < kLanes; ++j) {
    sum += lanes[j];
  }
  for (; c < n; ++c) {
    sum += g[c] * v[c];
    gv[c] += alpha * g[c];
  }
  return sum;
}

// Bytes per cache line: the prefetch stride.
constexpr int64_t kCacheLine = 64;

// Prefetches the n elements from ptr.
template <int kForWrite, typename scalar_t>
inline void prefetch(const scalar_t* ptr, int64_t n) {
#if defined(__GNUC__)
  for (int64_t c = 0; c < n; c += kCacheLine / static_cast<int64_t>(sizeof(scalar_t))) {
    __builtin_prefetch(ptr + c, kForWrite);
  }
#endif
}

// Reads the level metadata to the host and checks it against value, which the kernels assume.
struct Levels {
  std::vector<int64_t> height;
  std::vector<int64_t> width;
  std::vector<int64_t> start;
};

Levels read_levels(const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                   int64_t spatial) {
  const at::Tensor shapes = spatial_shapes.to(at::kCPU, at::kLong).contiguous();
  const at::Tensor starts = level_start_index.to(at::kCPU, at::kLong).contiguous();
  const int64_t* shapes_ptr = shapes.const_data_ptr<int64_t>();
  const int64_t* starts_ptr = starts.const_data_ptr<int64_t>();
  const int64_t levels = shapes.size(0);
  Levels out;
  out.height.resize(levels);
  out.width.resize(levels);
  out.start.resize(levels);
  check_levels(shapes_ptr, starts_ptr, levels, spatial);
  for (int64_t l = 0; l < levels; ++l) {
    out.height[l] = shapes_ptr[2 * l];
    out.width[l] = shapes_ptr[2 * l + 1];
    out.start[l] = starts_ptr[l];
  }
  return out;
}

// Samples of one (batch, query, head) are located in chunks, and every corner of a chunk is
// prefetched before any is read, so that their cache misses overlap.
constexpr int64_t kChunk = 16;

// How many queries ahead the per-query inputs are prefetched.
constexpr int64_t kAhead = 2;

// Locates samples [first, first + count) of the (batch, query, head) whose samples start at
// flat index `base`; prefetches their value rows and, when grad_value_bh is given, their
// grad_value rows.
template <typename scalar_t>
inline void locate_chunk(const scalar_t* locations, int64_t base, int64_t first, int64_t count,
                         const Levels& lv, const Geometry& g, const scalar_t* value_bh,
                         scalar_t* grad_value_bh, Corners<scalar_t>* corners, bool* hit) {
  const int64_t token_stride = g.heads * g.channels;
  int64_t l = first / g.points;
  int64_t p = first % g.points;
  for (int64_t i = 0; i < count; ++i, ++p) {
    if (p == g.points) {
      p = 0;
      ++l;
    }
    const int64_t sample = base + first + i;
    hit[i] = locate_corners(locations[2 * sample], locations[2 * sample + 1], lv.height[l],
                            lv.width[l], lv.start[l], token_stride, corners[i]);
    if (!hit[i]) {
      continue;
    }
    for (int k = 0; k < 4; ++k) {
      const int64_t offset = corners[i].offset[k];
      if (offset >= 0) {
        prefetch<0>(value_bh + offset, g.channels);
        if (grad_value_bh != nullptr) {
          prefetch<1>(grad_value_bh + offset, g.channels);
        }
      }
    }
  }
}

// Forward over items [begin, end) in (batch, head, query) order: a run of consecutive items
// reads one head's slice of value, which stays in cache far better than all heads of a query.
template <typename scalar_t>
MSDA_CPU_CLONES void forward_items(int64_t begin, int64_t end, const scalar_t* value,
                                   const Levels& lv, const scalar_t* locations,
                                   const scalar_t* weights, scalar_t* output, const Geometry& g) {
  const int64_t token_stride = g.heads * g.channels;
  const int64_t samples = g.levels * g.points;
  Corners<scalar_t> corners[kChunk];
  bool hit[kChunk];
  for (int64_t item = begin; item < end; ++item) {
    const int64_t q = item % g.queries;
    const int64_t bh = item / g.queries;
    const int64_t b = bh / g.heads;
    const int64_t h = bh % g.heads;
    const int64_t bqh = (b * g.queries + q) * g.heads + h;
    if (q + kAhead < g.queries) {
      // Consecutive items are a head apart in the (batch, query, head) layout of the inputs.
      prefetch<0>(locations + 2 * (bqh + kAhead * g.heads) * samples, 2 * samples);
      prefetch<0>(weights + (bqh + kAhead * g.heads) * samples, samples);
    }
    const scalar_t* value_bh = value + b * g.spatial * token_stride + h * g.channels;
    scalar_t* out = output + bqh * g.channels;
    std::fill(out, out + g.channels, scalar_t(0));
    for (int64_t first = 0; first < samples; first += kChunk) {
      const int64_t count = std::min(kChunk, samples - first);
      locate_chunk<scalar_t>(locations, bqh * samples, first, count, lv, g, value_bh, nullptr,
                             corners, hit);
      for (int64_t i = 0; i < count; ++i) {
        if (!hit[i]) {
          continue;
        }
        const scalar_t attn = weights[bqh * samples + first + i];
        for (int k = 0; k < 4; ++k) {
          const int64_t offset = corners[i].offset[k];
          if (offset >= 0) {
            axpy(g.channels, attn * corners[i].weight[k], value_bh + offset, out);
          }
        }
      }
    }
  }
}

// Backward over (batch, head) pairs [begin, end).
template <typename scalar_t>
MSDA_CPU_CLONES void backward_pairs(int64_t begin, int64_t end, const scalar_t* grad_output,
                                    const scalar_t* value, const Levels& lv,
                                    const scalar_t* locations, const scalar_t* weights,
                                    scalar_t* grad_value, scalar_t* grad_locations,
                                    scalar_t* grad_weights, const Geometry& g) {
  const int64_t token_stride = g.heads * g.channels;
  const int64_t samples = g.levels * g.points;
  Corners<scalar_t> corners[kChunk];
  bool hit[kChunk];
  for (int64_t bh = begin; bh < end; ++bh) {
    const int64_t b = bh / g.heads;
    const int64_t h = bh % g.heads;
    const int64_t slice = b * g.spatial * token_stride + h * g.channels;
    const scalar_t* value_bh = value + slice;
    scalar_t* grad_value_bh = grad_value + slice;
    for (int64_t q = 0; q < g.queries; ++q) {
      const int64_t bqh = (b * g.queries + q) * g.heads + h;
      if (q + kAhead < g.queries) {
        const int64_t ahead = bqh + kAhead * g.heads;
        prefetch<0>(locations + 2 * ahead * samples, 2 * samples);
        prefetch<0>(weights + ahead * samples, samples);
        prefetch<0>(grad_output + ahead * g.channels, g.channels);
      }
      const scalar_t* grad_out = grad_output + bqh * g.channels;
      for (int64_t first = 0; first < samples; first += kChunk) {
        const int64_t count = std::min(kChunk, samples - first);
        locate_chunk<scalar_t>(locations, bqh * samples, first, count, lv, g, value_bh,
                               grad_value_bh, corners, hit);
        for (int64_t i = 0; i < count; ++i) {
          if (!hit[i]) {
            continue;
          }
          const int64_t sample = bqh * samples + first + i;
          const int64_t l = (first + i) / g.points;
          const scalar_t attn = weights[sample];
          scalar_t d[4] = {0, 0, 0, 0};
          for (int k = 0; k < 4; ++k) {
            const int64_t offset = corners[i].offset[k];
            if (offset >= 0) {
              d[k] = dot_and_axpy(g.channels, grad_out, value_bh + offset,
                                  attn * corners[i].weight[k], grad_value_bh + offset);
            }
          }
          const SampleGrad<scalar_t> grad =
              sample_grad(corners[i], d, attn, lv.height[l], lv.width[l]);
          grad_weights[sample] = grad.attn;
          grad_locations[2 * sample] = grad.x;
          grad_locations[2 * sample + 1] = grad.y;
        }
      }
    }
  }
}

template <typename scalar_t>
void forward_kernel(const scalar_t* value, const Levels& lv, const scalar_t* locations,
                    const scalar_t* weights, scalar_t* output, const Geometry& g) {
  const int64_t work_per_item = std::max<int64_t>(1, g.levels * g.points * 4 * g.channels);
  at::parallel_for(0, g.batch * g.heads * g.queries,
                   std::max<int64_t>(1, kGrainWork / work_per_item),
                   [&](int64_t begin, int64_t end) {
                     forward_items(begin, end, value, lv, locations, weights, output, g);
                   });
}

template <typename scalar_t>
void backward_kernel(const scalar_t* grad_output, const scalar_t* value, const Levels& lv,
                     const scalar_t* locations, const scalar_t* weights, scalar_t* grad_value,
                     scalar_t* grad_locations, scalar_t* grad_weights, const Geometry& g) {
  at::parallel_for(0, g.batch * g.heads, 1, [&](int64_t begin, int64_t end) {
    backward_pairs(begin, end, grad_output, value, lv, locations, weights, grad_value,
                   grad_locations, grad_weights, g);
  });
}

}  // namespace

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index,
                                      const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  if (is_reduced_float(value.scalar_type())) {
    return ms_deform_attn_forward_cpu(value.to(at::kFloat), spatial_shapes, level_start_index,
                                      sampling_locations.to(at::kFloat),
                                      attention_weights.to(at::kFloat))
        .to(value.scalar_type());
  }
  const Geometry g = geometry_of(value, sampling_locations);
  const Levels lv = read_levels(spatial_shapes, level_start_index, g.spatial);
  const at::Tensor value_c = value.contiguous();
  const at::Tensor locations_c = sampling_locations.contiguous();
  const at::Tensor weights_c = attention_weights.contiguous();
  at::Tensor output = at::empty({g.batch, g.queries, g.heads * g.channels}, value.options());
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    forward_kernel<scalar_t>(value_c.const_data_ptr<scalar_t>(), lv,
                             locations_c.const_data_ptr<scalar_t>(),
                             weights_c.const_data_ptr<scalar_t>(),
                             output.mutable_data_ptr<scalar_t>(), g);
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  check_backward_inputs(grad_output, value, spatial_shapes, level_start_index,
                        sampling_locations, attention_weights);
  const at::ScalarType dtype = value.scalar_type();
  if (is_reduced_float(dtype)) {
    auto [grad_value, grad_locations, grad_weights] = ms_deform_attn_backward_cpu(
        grad_output.to(at::kFloat), value.to(at::kFloat), spatial_shapes, level_start_index,
        sampling_locations.to(at::kFloat), attention_weights.to(at::kFloat));
    return {grad_value.to(dtype), grad_locations.to(sampling_locations.scalar_type()),
            grad_weights.to(attention_weights.scalar_type())};
  }
  const Geometry g = geometry_of(value, sampling_locations);
  const Levels lv = read_levels(spatial_shapes, level_start_index, g.spatial);
  const at::Tensor grad_output_c = grad_output.contiguous();
  const at::Tensor value_c = value.contiguous();
  const at::Tensor locations_c = sampling_locations.contiguous();
  const at::Tensor weights_c = attention_weights.contiguous();
  at::Tensor grad_value = at::zeros(value.sizes(), value.options());
  at::Tensor grad_locations = at::zeros(sampling_locations.sizes(), value.options());
  at::Tensor grad_weights = at::zeros(attention_weights.sizes(), value.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "ms_deform_attn_backward_cpu", [&] {
    backward_kernel<scalar_t>(grad_output_c.const_data_ptr<scalar_t>(),
                              value_c.const_data_ptr<scalar_t>(), lv,
                              locations_c.const_data_ptr<scalar_t>(),
                              weights_c.const_data_ptr<scalar_t>(),
                              grad_value.mutable_data_ptr<scalar_t>(),
                              grad_locations.mutable_data_ptr<scalar_t>(),
                              grad_weights.mutable_data_ptr<scalar_t>(), g);
  });
  return {grad_value, grad_locations, grad_weights};
}

TORCH_LIBRARY_IMPL(deformable_detr, CPU, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_forward_cpu);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cpu);
}

}  // namespace deformable_detr
