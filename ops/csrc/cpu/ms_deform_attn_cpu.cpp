// CPU forward and backward of the multi-scale deformable attention sampling core.
//
// Forward is parallel over (batch, head, query) items. Backward is parallel over (batch, head)
// pairs: every scatter-add into grad_value then lands in a slice that only one task writes, and
// each task visits its queries in a fixed order, so the result is race-free and deterministic.
//
// A bfloat16 value is read and written in its own dtype and computed in float32: every element is
// widened exactly as it is loaded (a shift, which vectorises), sums are kept in float32 and
// rounded once when stored, so the results are those of the float32 kernel on the widened inputs,
// without float32 copies of value, grad_output or the output. float16, whose widening has no such
// shortcut here, is converted to float32 first, with the same results.
#include "../ms_deform_attn.h"
#include "../sampling.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <c10/util/bit_cast.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>
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

#if defined(__GNUC__)
#define MSDA_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define MSDA_ALWAYS_INLINE inline
#endif

// x widened exactly to acc_t; a bfloat16 through its bits, the upper half of a float's.
template <typename acc_t, typename scalar_t>
MSDA_ALWAYS_INLINE acc_t widen(scalar_t x) {
  return static_cast<acc_t>(x);
}
template <>
MSDA_ALWAYS_INLINE float widen<float, c10::BFloat16>(c10::BFloat16 x) {
  return c10::bit_cast<float>(static_cast<uint32_t>(x.x) << 16);
}

template <typename acc_t, typename scalar_t>
inline void axpy(int64_t n, acc_t alpha, const scalar_t* __restrict__ x, acc_t* __restrict__ y) {
  for (int64_t c = 0; c < n; ++c) {
    y[c] += alpha * widen<acc_t>(x[c]);
  }
}

// Returns <g, v> and adds alpha * g to gv, in one pass over the channels.
template <typename acc_t, typename scalar_t>
inline acc_t dot_and_axpy(int64_t n, const acc_t* __restrict__ g, const scalar_t* __restrict__ v,
                          acc_t alpha, acc_t* __restrict__ gv) {
  acc_t lanes[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) {
      lanes[j] += g[c + j] * widen<acc_t>(v[c + j]);
      gv[c + j] += alpha * g[c + j];
    }
  }
  acc_t sum = 0;
  for (int64_t j = 0; j < kLanes; ++j) {
    sum += lanes[j];
  }
  for (; c < n; ++c) {
    sum += g[c] * widen<acc_t>(v[c]);
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
template <typename acc_t, typename scalar_t>
inline void locate_chunk(const acc_t* locations, int64_t base, int64_t first, int64_t count,
                         const Levels& lv, const Geometry& g, const scalar_t* value_bh,
                         acc_t* grad_value_bh, Corners<acc_t>* corners, bool* hit) {
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

// The channels per head of every released configuration (hidden_dim 256, 8 heads). The forward
// loop is also instantiated with it fixed at compile time (kChannels), which unrolls the channel
// loops and keeps a query's sums in registers: the same operations in the same order, so the
// same results as the general instantiation (kChannels 0), in less time (ops/README.md).
constexpr int64_t kCommonChannels = 32;

// Forward over items [begin, end) in (batch, head, query) order: a run of consecutive items
// reads one head's slice of value, which stays in cache far better than all heads of a query.
// Each item's sum is kept in `acc` (channels elements: `scratch`, or a local array when
// kChannels fixes them) and stored once.
template <int64_t kChannels, typename scalar_t, typename acc_t>
MSDA_CPU_CLONES void forward_items(int64_t begin, int64_t end, const scalar_t* value,
                                   const Levels& lv, const acc_t* locations, const acc_t* weights,
                                   scalar_t* output, acc_t* scratch, const Geometry& g) {
  const int64_t channels = kChannels > 0 ? kChannels : g.channels;
  acc_t local[kChannels > 0 ? kChannels : 1];
  acc_t* acc = kChannels > 0 ? local : scratch;
  const int64_t token_stride = g.heads * channels;
  const int64_t samples = g.levels * g.points;
  Corners<acc_t> corners[kChunk];
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
    const scalar_t* value_bh = value + b * g.spatial * token_stride + h * channels;
    std::fill(acc, acc + channels, acc_t(0));
    for (int64_t first = 0; first < samples; first += kChunk) {
      const int64_t count = std::min(kChunk, samples - first);
      locate_chunk(locations, bqh * samples, first, count, lv, g, value_bh,
                   static_cast<acc_t*>(nullptr), corners, hit);
      for (int64_t i = 0; i < count; ++i) {
        if (!hit[i]) {
          continue;
        }
        const acc_t attn = weights[bqh * samples + first + i];
        for (int k = 0; k < 4; ++k) {
          const int64_t offset = corners[i].offset[k];
          if (offset >= 0) {
            axpy(channels, attn * corners[i].weight[k], value_bh + offset, acc);
          }
        }
      }
    }
    std::copy(acc, acc + channels, output + bqh * channels);
  }
}

// Backward over (batch, head) pairs [begin, end). grad_value is summed in acc_t; a reduced
// precision grad_output row is widened into `grad_row` (channels elements) first.
template <typename scalar_t, typename acc_t>
MSDA_CPU_CLONES void backward_pairs(int64_t begin, int64_t end, const scalar_t* grad_output,
                                    const scalar_t* value, const Levels& lv,
                                    const acc_t* locations, const acc_t* weights,
                                    acc_t* grad_value, acc_t* grad_locations, acc_t* grad_weights,
                                    acc_t* grad_row, const Geometry& g) {
  const int64_t token_stride = g.heads * g.channels;
  const int64_t samples = g.levels * g.points;
  Corners<acc_t> corners[kChunk];
  bool hit[kChunk];
  for (int64_t bh = begin; bh < end; ++bh) {
    const int64_t b = bh / g.heads;
    const int64_t h = bh % g.heads;
    const int64_t slice = b * g.spatial * token_stride + h * g.channels;
    const scalar_t* value_bh = value + slice;
    acc_t* grad_value_bh = grad_value + slice;
    for (int64_t q = 0; q < g.queries; ++q) {
      const int64_t bqh = (b * g.queries + q) * g.heads + h;
      if (q + kAhead < g.queries) {
        const int64_t ahead = bqh + kAhead * g.heads;
        prefetch<0>(locations + 2 * ahead * samples, 2 * samples);
        prefetch<0>(weights + ahead * samples, samples);
        prefetch<0>(grad_output + ahead * g.channels, g.channels);
      }
      const acc_t* grad_out;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        grad_out = grad_output + bqh * g.channels;
      } else {
        for (int64_t c = 0; c < g.channels; ++c) {
          grad_row[c] = widen<acc_t>(grad_output[bqh * g.channels + c]);
        }
        grad_out = grad_row;
      }
      for (int64_t first = 0; first < samples; first += kChunk) {
        const int64_t count = std::min(kChunk, samples - first);
        locate_chunk(locations, bqh * samples, first, count, lv, g, value_bh, grad_value_bh,
                     corners, hit);
        for (int64_t i = 0; i < count; ++i) {
          if (!hit[i]) {
            continue;
          }
          const int64_t sample = bqh * samples + first + i;
          const int64_t l = (first + i) / g.points;
          const acc_t attn = weights[sample];
          acc_t d[4] = {0, 0, 0, 0};
          for (int k = 0; k < 4; ++k) {
            const int64_t offset = corners[i].offset[k];
            if (offset >= 0) {
              d[k] = dot_and_axpy(g.channels, grad_out, value_bh + offset,
                                  attn * corners[i].weight[k], grad_value_bh + offset);
            }
          }
          const SampleGrad<acc_t> grad =
              sample_grad(corners[i], d, attn, lv.height[l], lv.width[l]);
          grad_weights[sample] = grad.attn;
          grad_locations[2 * sample] = grad.x;
          grad_locations[2 * sample + 1] = grad.y;
        }
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
void forward_kernel(const scalar_t* value, const Levels& lv, const acc_t* locations,
                    const acc_t* weights, scalar_t* output, const Geometry& g) {
  const int64_t work_per_item = std::max<int64_t>(1, g.levels * g.points * 4 * g.channels);
  at::parallel_for(0, g.batch * g.heads * g.queries,
                   std::max<int64_t>(1, kGrainWork / work_per_item),
                   [&](int64_t begin, int64_t end) {
                     if (g.channels == kCommonChannels) {
                       forward_items<kCommonChannels>(begin, end, value, lv, locations, weights,
                                                      output, static_cast<acc_t*>(nullptr), g);
                     } else {
                       std::vector<acc_t> scratch(g.channels);
                       forward_items<0>(begin, end, value, lv, locations, weights, output,
                                        scratch.data(), g);
                     }
                   });
}

template <typename scalar_t, typename acc_t>
void backward_kernel(const scalar_t* grad_output, const scalar_t* value, const Levels& lv,
                     const acc_t* locations, const acc_t* weights, acc_t* grad_value,
                     acc_t* grad_locations, acc_t* grad_weights, const Geometry& g) {
  at::parallel_for(0, g.batch * g.heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> grad_row(std::is_same_v<scalar_t, acc_t> ? 0 : g.channels);
    backward_pairs(begin, end, grad_output, value, lv, locations, weights, grad_value,
                   grad_locations, grad_weights, grad_row.data(), g);
  });
}

}  // namespace

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index,
                                      const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  if (value.scalar_type() == at::kHalf) {
    return ms_deform_attn_forward_cpu(value.to(at::kFloat), spatial_shapes, level_start_index,
                                      sampling_locations.to(at::kFloat),
                                      attention_weights.to(at::kFloat))
        .to(at::kHalf);
  }
  const Geometry g = geometry_of(value, sampling_locations);
  const Levels lv = read_levels(spatial_shapes, level_start_index, g.spatial);
  const at::Tensor value_c = value.contiguous();
  at::Tensor output = at::empty({g.batch, g.queries, g.heads * g.channels}, value.options());
  AT_DISPATCH_FLOATING_TYPES_AND(
      at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;  // float for bfloat16
        constexpr at::ScalarType acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
        const at::Tensor locations_c = sampling_locations.to(acc_dtype).contiguous();
        const at::Tensor weights_c = attention_weights.to(acc_dtype).contiguous();
        forward_kernel<scalar_t, acc_t>(
            value_c.const_data_ptr<scalar_t>(), lv, locations_c.const_data_ptr<acc_t>(),
            weights_c.const_data_ptr<acc_t>(), output.mutable_data_ptr<scalar_t>(), g);
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
  if (dtype == at::kHalf) {
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
  // Summed in the computation dtype; returned in the dtypes of the inputs they belong to.
  at::Tensor grad_value, grad_locations, grad_weights;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dtype, "ms_deform_attn_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;  // float for bfloat16
    const at::TensorOptions acc_options =
        value.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    const at::Tensor locations_c = sampling_locations.to(acc_options.dtype()).contiguous();
    const at::Tensor weights_c = attention_weights.to(acc_options.dtype()).contiguous();
    grad_value = at::zeros(value.sizes(), acc_options);
    grad_locations = at::zeros(sampling_locations.sizes(), acc_options);
    grad_weights = at::zeros(attention_weights.sizes(), acc_options);
    backward_kernel<scalar_t, acc_t>(
        grad_output_c.const_data_ptr<scalar_t>(), value_c.const_data_ptr<scalar_t>(), lv,
        locations_c.const_data_ptr<acc_t>(), weights_c.const_data_ptr<acc_t>(),
        grad_value.mutable_data_ptr<acc_t>(), grad_locations.mutable_data_ptr<acc_t>(),
        grad_weights.mutable_data_ptr<acc_t>(), g);
  });
  return {grad_value.to(dtype), grad_locations.to(sampling_locations.scalar_type()),
          grad_weights.to(attention_weights.scalar_type())};
}

TORCH_LIBRARY_IMPL(deformable_detr, CPU, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_forward_cpu);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cpu);
}

}  // namespace deformable_detr
