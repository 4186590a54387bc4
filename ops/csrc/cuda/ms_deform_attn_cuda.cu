// CUDA forward and backward of the multi-scale deformable attention sampling core.
//
// One thread handles CPT consecutive channels of one (batch, query, head), moved with one vector
// load or store of CPT elements (up to 16 bytes) whenever value, grad_output and output are
// aligned for it; the C / CPT threads of a (batch, query, head) are consecutive, so they share a
// warp whenever C / CPT <= 32. All arithmetic is done in at::opmath_type (float for half and
// bfloat16), gradients are accumulated in buffers of that type, and every index is 64-bit.
// Beside a half or bfloat16 value, sampling_locations and attention_weights may be float32
// (loc_t), which keeps the sampling positions exact to float32.
//
// Backward scatters into grad_value with atomicAdd (vector atomics for float on sm_90). The
// location and weight gradients are summed over the channel threads of a sample with warp
// shuffles: over the whole group when it fits in an aligned run of lanes (then stored directly),
// otherwise over the largest aligned run and added atomically.
//
// Under torch.use_deterministic_algorithms(True) the backward does not scatter: a second kernel
// lists, chunk by chunk of queries, every corner's grad_value row and contribution, and
// index_add_, deterministic in that mode, sums them in a fixed order; a channel group that
// spans several runs stores each run's location and weight partial sums, which are then summed
// in a fixed order too.
#include "../ms_deform_attn.h"
#include "../sampling.h"

#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/Atomic.cuh>
#include <ATen/ops/empty.h>
#include <ATen/ops/index_add.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <type_traits>

namespace deformable_detr {

namespace {

constexpr int kThreads = 256;
constexpr int kWarpSize = 32;

// Bytes moved by the widest vector load or store.
constexpr int kMaxVectorBytes = 16;

// N consecutive elements, aligned so that the compiler moves them with one vector instruction.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load_pack(const T* ptr) {
  return *reinterpret_cast<const Pack<T, N>*>(ptr);
}

// Adds w * grad[c] to dst[c] for the CPT channels of one thread. On sm_90 and newer, float sums
// use the 16- and 8-byte vector atomics: dst points into grad_value, a fresh allocation, at an
// offset that is a multiple of CPT, so it is aligned for them. Elsewhere one atomic per channel.
template <int CPT, typename acc_t>
__device__ __forceinline__ void atomic_add_scaled(acc_t* dst, acc_t w, const acc_t (&grad)[CPT]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr bool vector_atomics = std::is_same_v<acc_t, float>;
#else
  constexpr bool vector_atomics = false;
#endif
  if constexpr (vector_atomics && CPT % 4 == 0) {
#pragma unroll
    for (int c = 0; c < CPT; c += 4) {
      atomicAdd(reinterpret_cast<float4*>(dst + c),
                make_float4(w * grad[c], w * grad[c + 1], w * grad[c + 2], w * grad[c + 3]));
    }
  } else if constexpr (vector_atomics && CPT % 2 == 0) {
#pragma unroll
    for (int c = 0; c < CPT; c += 2) {
      atomicAdd(reinterpret_cast<float2*>(dst + c), make_float2(w * grad[c], w * grad[c + 1]));
    }
  } else {
#pragma unroll
    for (int c = 0; c < CPT; ++c) {
      gpuAtomicAdd(dst + c, w * grad[c]);
    }
  }
}

// What one thread works on: CPT channels, from `channel`, of one (batch b, query q, head h).
// `item` numbers (b, q - q_begin, h) within a launch over launch_queries queries from q_begin;
// bqh = (b * queries + q) * heads + h indexes the inputs; `slice` is the offset of (b, h,
// channel 0) in value and grad_value, (B, S, heads, C).
struct ThreadItem {
  int64_t item;
  int64_t bqh;
  int64_t channel;
  int64_t slice;
};

template <int CPT>
__device__ __forceinline__ ThreadItem thread_item(int64_t index, const Geometry& g,
                                                  int64_t q_begin, int64_t launch_queries) {
  const int64_t groups = g.channels / CPT;
  ThreadItem t;
  t.channel = (index % groups) * CPT;
  t.item = index / groups;
  const int64_t h = t.item % g.heads;
  const int64_t b = t.item / (g.heads * launch_queries);
  const int64_t q = q_begin + (t.item / g.heads) % launch_queries;
  t.bqh = (b * g.queries + q) * g.heads + h;
  t.slice = b * g.spatial * g.heads * g.channels + h * g.channels;
  return t;
}

// Loads CPT elements as acc_t; zeros when `active` is false.
template <int CPT, typename scalar_t>
__device__ __forceinline__ void load_acc(const scalar_t* ptr, bool active,
                                         at::opmath_type<scalar_t> (&out)[CPT]) {
  const Pack<scalar_t, CPT> packed = load_pack<CPT>(ptr);
#pragma unroll
  for (int c = 0; c < CPT; ++c) {
    out[c] = active ? static_cast<at::opmath_type<scalar_t>>(packed.v[c])
                    : at::opmath_type<scalar_t>(0);
  }
}

// Calls visit(sample, s, height, width, hit, corners) for each of the levels * points samples
// of the (batch, query, head) `bqh`, in order: `sample` is the flat sample index, s = l * points
// + p, and hit is false (corners unset) for a sample outside its level, in a level that does not
// fit in value, or when `active` is false.
template <typename acc_t, typename scalar_t, typename Visit>
__device__ __forceinline__ void for_each_sample(const Geometry& g, const int64_t* shapes,
                                                const int64_t* starts, const scalar_t* locations,
                                                int64_t bqh, bool active, const Visit& visit) {
  const int64_t token_stride = g.heads * g.channels;
  int64_t sample = bqh * g.levels * g.points;
  for (int64_t l = 0; l < g.levels; ++l) {
    const int64_t height = shapes[2 * l];
    const int64_t width = shapes[2 * l + 1];
    const int64_t start = starts[l];
    const bool level_ok = active && level_in_bounds(height, width, start, g.spatial);
    for (int64_t p = 0; p < g.points; ++p, ++sample) {
      Corners<acc_t> corners;
      const bool hit = level_ok && locate_corners(static_cast<acc_t>(locations[2 * sample]),
                                                  static_cast<acc_t>(locations[2 * sample + 1]),
                                                  height, width, start, token_stride, corners);
      visit(sample, l * g.points + p, height, width, hit, corners);
    }
  }
}

template <typename scalar_t, typename loc_t, int CPT>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                   const int64_t* __restrict__ starts, const loc_t* __restrict__ locations,
                   const loc_t* __restrict__ weights, scalar_t* __restrict__ output,
                   Geometry g, int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= total) {
    return;
  }
  const ThreadItem t = thread_item<CPT>(index, g, 0, g.queries);
  const scalar_t* value_bh = value + t.slice + t.channel;

  acc_t acc[CPT];
#pragma unroll
  for (int c = 0; c < CPT; ++c) {
    acc[c] = acc_t(0);
  }
  for_each_sample<acc_t>(g, shapes, starts, locations, t.bqh, true,
                         [&](int64_t sample, int64_t, int64_t, int64_t, bool hit,
                             const Corners<acc_t>& corners) {
                           if (!hit) {
                             return;
                           }
                           const acc_t attn = static_cast<acc_t>(weights[sample]);
#pragma unroll
                           for (int k = 0; k < 4; ++k) {
                             if (corners.offset[k] >= 0) {
                               const acc_t w = attn * corners.weight[k];
                               const Pack<scalar_t, CPT> v =
                                   load_pack<CPT>(value_bh + corners.offset[k]);
#pragma unroll
                               for (int c = 0; c < CPT; ++c) {
                                 acc[c] += w * static_cast<acc_t>(v.v[c]);
                               }
                             }
                           }
                         });
  Pack<scalar_t, CPT> out;
#pragma unroll
  for (int c = 0; c < CPT; ++c) {
    out.v[c] = static_cast<scalar_t>(acc[c]);
  }
  *reinterpret_cast<Pack<scalar_t, CPT>*>(output + t.bqh * g.channels + t.channel) = out;
}

// Sums x over aligned runs of `width` lanes (a power of two <= 32); lane 0 of each run gets the
// total. Every lane of the warp must call it.
template <typename acc_t>
__device__ __forceinline__ acc_t run_sum(acc_t x, int width) {
  for (int offset = width / 2; offset > 0; offset /= 2) {
    x += __shfl_down_sync(0xffffffffu, x, offset, width);
  }
  return x;
}

template <typename scalar_t, typename loc_t, int CPT>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ value,
                    const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
                    const loc_t* __restrict__ locations, const loc_t* __restrict__ weights,
                    at::opmath_type<scalar_t>* __restrict__ grad_value,
                    at::opmath_type<scalar_t>* __restrict__ grad_locations,
                    at::opmath_type<scalar_t>* __restrict__ grad_weights, Geometry g,
                    int64_t total, int run_width, bool run_is_group, bool scatter,
                    at::opmath_type<scalar_t>* __restrict__ run_partials) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  // Threads past the end stay to the end: they take part in the shuffles with zeros. Whole
  // channel groups are either all active or all inactive because total is a multiple of the
  // group size.
  const bool active = index < total;
  const ThreadItem t = thread_item<CPT>(active ? index : 0, g, 0, g.queries);
  const scalar_t* value_bh = value + t.slice + t.channel;
  acc_t* grad_value_bh = scatter ? grad_value + t.slice + t.channel : nullptr;
  const bool leader = (threadIdx.x % run_width) == 0;
  const int64_t runs = g.channels / CPT / run_width;
  const int64_t run = t.channel / CPT / run_width;

  acc_t grad_out[CPT];
  load_acc<CPT>(grad_output + t.bqh * g.channels + t.channel, active, grad_out);
  for_each_sample<acc_t>(
      g, shapes, starts, locations, t.bqh, active,
      [&](int64_t sample, int64_t, int64_t height, int64_t width, bool hit,
          const Corners<acc_t>& corners) {
        SampleGrad<acc_t> grad = {acc_t(0), acc_t(0), acc_t(0)};
        if (hit) {
          const acc_t attn = static_cast<acc_t>(weights[sample]);
          acc_t d[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            const int64_t offset = corners.offset[k];
            if (offset >= 0) {
              const Pack<scalar_t, CPT> v = load_pack<CPT>(value_bh + offset);
#pragma unroll
              for (int c = 0; c < CPT; ++c) {
                d[k] += grad_out[c] * static_cast<acc_t>(v.v[c]);
              }
              if (scatter) {
                atomic_add_scaled<CPT>(grad_value_bh + offset, attn * corners.weight[k],
                                       grad_out);
              }
            }
          }
          grad = sample_grad(corners, d, attn, height, width);
        }
        grad.attn = run_sum(grad.attn, run_width);
        grad.x = run_sum(grad.x, run_width);
        grad.y = run_sum(grad.y, run_width);
        if (!(hit && leader)) {
          return;
        }
        if (run_is_group) {
          grad_weights[sample] = grad.attn;
          grad_locations[2 * sample] = grad.x;
          grad_locations[2 * sample + 1] = grad.y;
        } else if (run_partials != nullptr) {
          acc_t* partial = run_partials + (sample * runs + run) * 3;
          partial[0] = grad.attn;
          partial[1] = grad.x;
          partial[2] = grad.y;
        } else {
          gpuAtomicAdd(grad_weights + sample, grad.attn);
          gpuAtomicAdd(grad_locations + 2 * sample, grad.x);
          gpuAtomicAdd(grad_locations + 2 * sample + 1, grad.y);
        }
      });
}

// Deterministic mode: for the queries [q_begin, q_begin + chunk_queries), lists what backward
// would add into grad_value. Corner slot ((b * chunk_queries + q - q_begin) * heads + h) *
// levels * points * 4 + (l * points + p) * 4 + k gets rows[slot], the row of grad_value viewed as
// (B * S * heads, C) that corner k of sample (l, p) adds to (dummy_row when the corner lies
// outside its level or the sample misses), and contributions[slot, :], the C values it adds.
template <typename scalar_t, typename loc_t, int CPT>
__global__ void __launch_bounds__(kThreads)
    corner_contributions_kernel(const scalar_t* __restrict__ grad_output,
                                const int64_t* __restrict__ shapes,
                                const int64_t* __restrict__ starts,
                                const loc_t* __restrict__ locations,
                                const loc_t* __restrict__ weights,
                                at::opmath_type<scalar_t>* __restrict__ contributions,
                                int64_t* __restrict__ rows, Geometry g, int64_t q_begin,
                                int64_t chunk_queries, int64_t total, int64_t dummy_row) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= total) {
    return;
  }
  const ThreadItem t = thread_item<CPT>(index, g, q_begin, chunk_queries);
  const int64_t first_slot = t.item * g.levels * g.points * 4;

  acc_t grad_out[CPT];
  load_acc<CPT>(grad_output + t.bqh * g.channels + t.channel, true, grad_out);
  for_each_sample<acc_t>(
      g, shapes, starts, locations, t.bqh, true,
      [&](int64_t sample, int64_t s, int64_t, int64_t, bool hit, const Corners<acc_t>& corners) {
        const acc_t attn = hit ? static_cast<acc_t>(weights[sample]) : acc_t(0);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const int64_t slot = first_slot + s * 4 + k;
          const bool inside = hit && corners.offset[k] >= 0;
          const acc_t w = inside ? attn * corners.weight[k] : acc_t(0);
          acc_t* dst = contributions + slot * g.channels + t.channel;
#pragma unroll
          for (int c = 0; c < CPT; ++c) {
            dst[c] = inside ? w * grad_out[c] : acc_t(0);
          }
          if (t.channel == 0) {
            rows[slot] = inside ? (t.slice + corners.offset[k]) / g.channels : dummy_row;
          }
        }
      });
}

// Bytes of corner contributions and rows listed per chunk in deterministic mode.
constexpr int64_t kDeterministicChunkBytes = int64_t(256) << 20;

// Channels per thread: the most (8, 4, 2 or 1) that fit one vector of kMaxVectorBytes, divide C,
// and keep every pointer in `aligned` aligned for a vector of that many elements.
int channels_per_thread(int64_t channels, int64_t element_size,
                        std::initializer_list<const void*> aligned) {
  int cpt = static_cast<int>(std::min<int64_t>(8, kMaxVectorBytes / element_size));
  const auto fits = [&](int n) {
    if (channels % n != 0) {
      return false;
    }
    for (const void* ptr : aligned) {
      if (reinterpret_cast<std::uintptr_t>(ptr) % (n * element_size) != 0) {
        return false;
      }
    }
    return true;
  };
  while (cpt > 1 && !fits(cpt)) {
    cpt /= 2;
  }
  return cpt;
}

// Calls launch(std::integral_constant<int, CPT>{}) for cpt, instantiating only the widths whose
// vector fits kMaxVectorBytes for scalar_t.
template <typename scalar_t, typename Launch>
void with_channels_per_thread(int cpt, const Launch& launch) {
  switch (cpt) {
    case 8:
      if constexpr (sizeof(scalar_t) * 8 <= kMaxVectorBytes) {
        launch(std::integral_constant<int, 8>{});
        return;
      }
      break;
    case 4:
      if constexpr (sizeof(scalar_t) * 4 <= kMaxVectorBytes) {
        launch(std::integral_constant<int, 4>{});
        return;
      }
      break;
    case 2:
      launch(std::integral_constant<int, 2>{});
      return;
    case 1:
      launch(std::integral_constant<int, 1>{});
      return;
  }
  TORCH_CHECK(false, "ms_deform_attn: no kernel for ", cpt, " channels per thread");
}

// Calls launch(loc_t*{}) with loc_t the type of sampling_locations and attention_weights:
// scalar_t, or float beside a float16 / bfloat16 value.
template <typename scalar_t, typename Launch>
void with_location_type(at::ScalarType location_dtype, const Launch& launch) {
  if constexpr (std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>) {
    if (location_dtype == at::kFloat) {
      launch(static_cast<float*>(nullptr));
      return;
    }
  }
  launch(static_cast<scalar_t*>(nullptr));
}

unsigned int blocks_for(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(),
              "ms_deform_attn: input too large for one CUDA launch (", total, " threads)");
  return static_cast<unsigned int>(blocks);
}

at::Tensor index_on(const at::Tensor& t, const at::Device& device) {
  return t.to(device, at::kLong).contiguous();
}

at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index,
                                       const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const c10::cuda::CUDAGuard guard(value.device());
  const Geometry g = geometry_of(value, sampling_locations);
  const at::Tensor shapes = index_on(spatial_shapes, value.device());
  const at::Tensor starts = index_on(level_start_index, value.device());
  const at::Tensor value_c = value.contiguous();
  const at::Tensor locations_c = sampling_locations.contiguous();
  const at::Tensor weights_c = attention_weights.contiguous();
  at::Tensor output = at::empty({g.batch, g.queries, g.heads * g.channels}, value.options());
  const int cpt = channels_per_thread(g.channels, static_cast<int64_t>(value.element_size()),
                                      {value_c.const_data_ptr(), output.const_data_ptr()});
  const int64_t total = g.batch * g.queries * g.heads * (g.channels / cpt);
  if (total == 0) {
    return output.zero_();
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
        with_location_type<scalar_t>(locations_c.scalar_type(), [&](auto* location_tag) {
          using loc_t = std::remove_pointer_t<decltype(location_tag)>;
          with_channels_per_thread<scalar_t>(cpt, [&](auto width) {
            forward_kernel<scalar_t, loc_t, decltype(width)::value>
                <<<blocks_for(total), kThreads, 0, stream>>>(
                    value_c.const_data_ptr<scalar_t>(), shapes.const_data_ptr<int64_t>(),
                    starts.const_data_ptr<int64_t>(), locations_c.const_data_ptr<loc_t>(),
                    weights_c.const_data_ptr<loc_t>(), output.mutable_data_ptr<scalar_t>(), g,
                    total);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
        });
      });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  check_backward_inputs(grad_output, value, spatial_shapes, level_start_index,
                        sampling_locations, attention_weights);
  const c10::cuda::CUDAGuard guard(value.device());
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  const Geometry g = geometry_of(value, sampling_locations);
  const at::Tensor shapes = index_on(spatial_shapes, value.device());
  const at::Tensor starts = index_on(level_start_index, value.device());
  const at::Tensor grad_output_c = grad_output.contiguous();
  const at::Tensor value_c = value.contiguous();
  const at::Tensor locations_c = sampling_locations.contiguous();
  const at::Tensor weights_c = attention_weights.contiguous();
  const at::ScalarType dtype = value.scalar_type();
  const at::ScalarType acc_dtype = at::toOpMathType(dtype);
  const auto acc_options = value.options().dtype(acc_dtype);
  // In deterministic mode grad_value is row `row` of grad_rows, (B * S * heads + 1, C): the
  // extra last row collects the corners that add nothing.
  const int64_t value_rows = g.batch * g.spatial * g.heads;
  at::Tensor grad_rows =
      deterministic ? at::zeros({value_rows + 1, g.channels}, acc_options) : at::Tensor();
  at::Tensor grad_value = deterministic ? grad_rows.narrow(0, 0, value_rows).view(value.sizes())
                                        : at::zeros(value.sizes(), acc_options);
  at::Tensor grad_locations = at::zeros(sampling_locations.sizes(), acc_options);
  at::Tensor grad_weights = at::zeros(attention_weights.sizes(), acc_options);
  const int cpt = channels_per_thread(g.channels, static_cast<int64_t>(value.element_size()),
                                      {value_c.const_data_ptr(), grad_output_c.const_data_ptr()});
  const int64_t groups = g.channels / cpt;
  const int64_t total = g.batch * g.queries * g.heads * groups;
  if (total > 0) {
    // The largest power of two <= 32 dividing the group size: runs of that many lanes start at
    // multiples of it, so they never straddle a group or a warp.
    int run_width = 1;
    while (run_width < kWarpSize && groups % (2 * run_width) == 0) {
      run_width *= 2;
    }
    const bool run_is_group = run_width == groups;
    // Deterministic mode with several runs per channel group: each run stores its partial sums,
    // (sample, run, [attn, x, y]), and they are summed below in a fixed order.
    at::Tensor run_partials;
    if (deterministic && !run_is_group) {
      run_partials = at::zeros({attention_weights.numel(), groups / run_width, 3}, acc_options);
    }
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, dtype, "ms_deform_attn_backward_cuda", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          with_location_type<scalar_t>(locations_c.scalar_type(), [&](auto* location_tag) {
            using loc_t = std::remove_pointer_t<decltype(location_tag)>;
            with_channels_per_thread<scalar_t>(cpt, [&](auto width) {
              constexpr int kCPT = decltype(width)::value;
              backward_kernel<scalar_t, loc_t, kCPT><<<blocks_for(total), kThreads, 0, stream>>>(
                  grad_output_c.const_data_ptr<scalar_t>(), value_c.const_data_ptr<scalar_t>(),
                  shapes.const_data_ptr<int64_t>(), starts.const_data_ptr<int64_t>(),
                  locations_c.const_data_ptr<loc_t>(), weights_c.const_data_ptr<loc_t>(),
                  grad_value.mutable_data_ptr<acc_t>(), grad_locations.mutable_data_ptr<acc_t>(),
                  grad_weights.mutable_data_ptr<acc_t>(), g, total, run_width, run_is_group,
                  /*scatter=*/!deterministic,
                  run_partials.defined() ? run_partials.mutable_data_ptr<acc_t>() : nullptr);
              C10_CUDA_KERNEL_LAUNCH_CHECK();
              if (!deterministic) {
                return;
              }
              const int64_t corners_per_query = g.batch * g.heads * g.levels * g.points * 4;
              const int64_t bytes_per_query =
                  corners_per_query *
                  (g.channels * static_cast<int64_t>(sizeof(acc_t)) + int64_t(sizeof(int64_t)));
              const int64_t chunk = std::clamp<int64_t>(
                  kDeterministicChunkBytes / std::max<int64_t>(bytes_per_query, 1), 1, g.queries);
              at::Tensor contributions =
                  at::empty({chunk * corners_per_query, g.channels}, acc_options);
              at::Tensor rows =
                  at::empty({chunk * corners_per_query}, value.options().dtype(at::kLong));
              for (int64_t q_begin = 0; q_begin < g.queries; q_begin += chunk) {
                const int64_t chunk_queries = std::min(chunk, g.queries - q_begin);
                const int64_t threads = g.batch * chunk_queries * g.heads * groups;
                corner_contributions_kernel<scalar_t, loc_t, kCPT>
                    <<<blocks_for(threads), kThreads, 0, stream>>>(
                        grad_output_c.const_data_ptr<scalar_t>(), shapes.const_data_ptr<int64_t>(),
                        starts.const_data_ptr<int64_t>(), locations_c.const_data_ptr<loc_t>(),
                        weights_c.const_data_ptr<loc_t>(), contributions.mutable_data_ptr<acc_t>(),
                        rows.mutable_data_ptr<int64_t>(), g, q_begin, chunk_queries, threads,
                        value_rows);
                C10_CUDA_KERNEL_LAUNCH_CHECK();
                const int64_t used = chunk_queries * corners_per_query;
                grad_rows.index_add_(0, rows.narrow(0, 0, used), contributions.narrow(0, 0, used));
              }
            });
          });
        });
    if (run_partials.defined()) {
      const at::Tensor sums = run_partials.sum(1);
      grad_weights.copy_(sums.select(1, 0).reshape(attention_weights.sizes()));
      grad_locations.copy_(sums.narrow(1, 1, 2).reshape(sampling_locations.sizes()));
    }
  }
  return {grad_value.to(dtype), grad_locations.to(sampling_locations.scalar_type()),
          grad_weights.to(attention_weights.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(deformable_detr, CUDA, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_forward_cuda);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cuda);
}

}  // namespace deformable_detr
