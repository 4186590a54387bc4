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
// location and weight gradients of a sample are summed over the channel threads of its
// (batch, query, head) with warp shuffles before anything is written: over aligned runs of lanes
// when the group size allows, otherwise over the warp-local segments of each group, so a group
// leaves one sum per run or segment (stored directly when the group is one run, else added
// atomically).
//
// Under torch.use_deterministic_algorithms(True) the backward runs chunk by chunk of queries and
// does not scatter: a second kernel lists every corner's grad_value row and contribution, and
// index_put_ with accumulation, deterministic in that mode, sums them in a fixed order; a group
// that leaves several sums stores them as partials, which are then summed in a fixed order too.
//
// Level metadata is checked as on the CPU. Metadata on the CPU is checked there and copied to the
// GPU from pinned memory (no host synchronisation). Metadata on the GPU is checked by the first
// thread of the call's first sampling kernel once it has sampled, a failure being a device-side
// assertion: no launch of its own and no host synchronisation (and a call that launches no
// sampling kernel, having nothing to sample, checks nothing on the GPU).
#include "../ms_deform_attn.h"
#include "../sampling.h"

#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/Atomic.cuh>
#include <ATen/ops/empty.h>
#include <ATen/ops/index_put.h>
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
constexpr unsigned int kFullMask = 0xffffffffu;

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
// use the 16- and 8-byte vector atomics: dst points into grad_value at an offset that is a
// multiple of CPT, and channels_per_thread has checked grad_value's own alignment for them.
// Elsewhere one atomic per channel.
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

// The device-side counterpart of check_levels, run by one thread: on inconsistent metadata it
// prints what is wrong, worded as check_levels words it, and stops the kernel with a device-side
// assertion. The sampling loops skip any level that does not fit in value, so the threads that
// run before the assertion never read out of bounds.
__device__ __noinline__ void assert_levels(const int64_t* shapes, const int64_t* starts,
                                           int64_t levels, int64_t spatial) {
  const LevelsCheck check = check_level_metadata(shapes, starts, levels, spatial);
  const long long l = check.level;
  switch (check.error) {
    case LevelsError::kNone:
      return;
    case LevelsError::kNotPositive:
      printf("ms_deform_attn: spatial_shapes must be positive, level %lld is (%lld, %lld)\n", l,
             static_cast<long long>(shapes[2 * l]), static_cast<long long>(shapes[2 * l + 1]));
      break;
    case LevelsError::kStart:
      printf(
          "ms_deform_attn: level_start_index[%lld] is %lld but the levels before it hold %lld "
          "tokens (it must be the running sum of H * W)\n",
          l, static_cast<long long>(starts[l]), static_cast<long long>(check.tokens));
      break;
    case LevelsError::kTooManyTokens:
      printf(
          "ms_deform_attn: value has S = %lld tokens but level %lld of spatial_shapes, (%lld, "
          "%lld), does not fit in the %lld tokens left after the levels before it\n",
          static_cast<long long>(spatial), l, static_cast<long long>(shapes[2 * l]),
          static_cast<long long>(shapes[2 * l + 1]),
          static_cast<long long>(spatial - check.tokens));
      break;
    case LevelsError::kTokenCount:
      printf("ms_deform_attn: value has S = %lld tokens but spatial_shapes sums to %lld\n",
             static_cast<long long>(spatial), static_cast<long long>(check.tokens));
      break;
  }
  CUDA_KERNEL_ASSERT(check.error == LevelsError::kNone);
}

// With levels_unchecked (metadata that came from the GPU) the first thread checks the level
// metadata (assert_levels) once it has sampled: the check adds no launch, and at the end of the
// thread's work it holds the fewest registers across the call (see ops/README.md on spills).
template <typename scalar_t, typename loc_t, int CPT>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                   const int64_t* __restrict__ starts, const loc_t* __restrict__ locations,
                   const loc_t* __restrict__ weights, scalar_t* __restrict__ output,
                   Geometry g, int64_t total, bool levels_unchecked) {
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
  if (levels_unchecked && index == 0) {
    assert_levels(shapes, starts, g.levels, g.spatial);
  }
}

// How the channel threads of one (batch, query, head) sum their location and weight gradients:
// `width` > 0 sums over aligned runs of that many lanes (a power of two <= 32 dividing the group
// size, so runs never straddle a group or a warp); `width` == 0 sums over each group's
// warp-local segments. `per_group` bounds the sums one group leaves (1: the group is one run).
struct Reduction {
  int width;
  int64_t per_group;
};

Reduction reduction_for(int64_t groups) {
  if (groups <= kWarpSize && (groups & (groups - 1)) == 0) {
    return {static_cast<int>(groups), 1};
  }
  if (groups % kWarpSize == 0) {
    return {kWarpSize, groups / kWarpSize};
  }
  // A group of G consecutive lanes touches at most (G + 30) / 32 + 1 warps.
  return {0, (groups + kWarpSize - 2) / kWarpSize + 1};
}

// Sums grad over aligned runs of `width` lanes; lane 0 of each run gets the total. Every lane of
// the warp must call it.
template <typename acc_t>
__device__ __forceinline__ SampleGrad<acc_t> run_sum(SampleGrad<acc_t> grad, int width) {
  for (int offset = width / 2; offset > 0; offset /= 2) {
    grad.attn += __shfl_down_sync(kFullMask, grad.attn, offset, width);
    grad.x += __shfl_down_sync(kFullMask, grad.x, offset, width);
    grad.y += __shfl_down_sync(kFullMask, grad.y, offset, width);
  }
  return grad;
}

// Sums grad over the lanes of the warp that share `group` (groups are runs of consecutive
// lanes): each lane gets the sum from itself to the end of its group's segment, so the first
// lane of a segment gets the segment's total. Every lane of the warp must call it.
template <typename acc_t>
__device__ __forceinline__ SampleGrad<acc_t> segment_sum(SampleGrad<acc_t> grad, int64_t group) {
  const int lane = static_cast<int>(threadIdx.x % kWarpSize);
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
    const int64_t other = __shfl_down_sync(kFullMask, group, offset);
    const acc_t attn = __shfl_down_sync(kFullMask, grad.attn, offset);
    const acc_t x = __shfl_down_sync(kFullMask, grad.x, offset);
    const acc_t y = __shfl_down_sync(kFullMask, grad.y, offset);
    // A lane past the warp's end would hand back this lane's own value.
    if (lane + offset < kWarpSize && other == group) {
      grad.attn += attn;
      grad.x += x;
      grad.y += y;
    }
  }
  return grad;
}

// Backward over the queries [q_begin, q_begin + launch_queries). With grad_value null nothing is
// scattered (deterministic mode). The location and weight sums go to grad_locations and
// grad_weights directly when each group leaves one, else to `partials`, (B, launch_queries,
// heads, levels, points, per_group, 3) for [attn, x, y] and zero-filled, when it is given, else
// atomically. levels_unchecked: as in forward_kernel.
template <typename scalar_t, typename loc_t, int CPT>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ value,
                    const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
                    const loc_t* __restrict__ locations, const loc_t* __restrict__ weights,
                    at::opmath_type<scalar_t>* __restrict__ grad_value,
                    at::opmath_type<scalar_t>* __restrict__ grad_locations,
                    at::opmath_type<scalar_t>* __restrict__ grad_weights, Geometry g,
                    int64_t q_begin, int64_t launch_queries, int64_t total, Reduction reduction,
                    at::opmath_type<scalar_t>* __restrict__ partials, bool levels_unchecked) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  // Threads past the end stay to the end: they take part in the shuffles with zeros. Whole
  // channel groups are either all active or all inactive because total is a multiple of the
  // group size.
  const bool active = index < total;
  const ThreadItem t = thread_item<CPT>(active ? index : 0, g, q_begin, launch_queries);
  const scalar_t* value_bh = value + t.slice + t.channel;
  acc_t* grad_value_bh = grad_value != nullptr ? grad_value + t.slice + t.channel : nullptr;
  const int64_t groups = g.channels / CPT;
  const int64_t group = index / groups;
  const int64_t rank = index % groups;
  const int lane = static_cast<int>(threadIdx.x % kWarpSize);
  // The lane that writes a run's or segment's sum, and which of its group's sums it is.
  const bool leader = reduction.width > 0 ? lane % reduction.width == 0 : (lane == 0 || rank == 0);
  const int64_t part = reduction.width > 0 ? rank / reduction.width
                                           : index / kWarpSize - (index - rank) / kWarpSize;

  acc_t grad_out[CPT];
  load_acc<CPT>(grad_output + t.bqh * g.channels + t.channel, active, grad_out);
  for_each_sample<acc_t>(
      g, shapes, starts, locations, t.bqh, active,
      [&](int64_t sample, int64_t s, int64_t height, int64_t width, bool hit,
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
              if (grad_value_bh != nullptr) {
                atomic_add_scaled<CPT>(grad_value_bh + offset, attn * corners.weight[k],
                                       grad_out);
              }
            }
          }
          grad = sample_grad(corners, d, attn, height, width);
        }
        grad = reduction.width > 0 ? run_sum(grad, reduction.width) : segment_sum(grad, group);
        if (!(hit && leader)) {
          return;
        }
        if (reduction.per_group == 1) {
          grad_weights[sample] = grad.attn;
          grad_locations[2 * sample] = grad.x;
          grad_locations[2 * sample + 1] = grad.y;
        } else if (partials != nullptr) {
          const int64_t local_sample = t.item * g.levels * g.points + s;
          acc_t* partial = partials + (local_sample * reduction.per_group + part) * 3;
          partial[0] = grad.attn;
          partial[1] = grad.x;
          partial[2] = grad.y;
        } else {
          gpuAtomicAdd(grad_weights + sample, grad.attn);
          gpuAtomicAdd(grad_locations + 2 * sample, grad.x);
          gpuAtomicAdd(grad_locations + 2 * sample + 1, grad.y);
        }
      });
  if (levels_unchecked && index == 0) {
    assert_levels(shapes, starts, g.levels, g.spatial);
  }
}

// Deterministic mode: for the queries [q_begin, q_begin + chunk_queries), lists what backward
// would add into grad_value. Corner slot ((b * chunk_queries + q - q_begin) * heads + h) *
// levels * points * 4 + (l * points + p) * 4 + k gets rows[slot], the row of grad_value viewed as
// (B * S * heads, C) that corner k of sample (l, p) adds to, and contributions[slot, :], the C
// values it adds. A corner outside its level, or of a sample that misses, adds zeros to row
// slot % value_rows: spread over all rows, such corners cost index_put_ nothing extra, where one
// shared row would be summed serially.
template <typename scalar_t, typename loc_t, int CPT>
__global__ void __launch_bounds__(kThreads)
    corner_contributions_kernel(const scalar_t* __restrict__ grad_output,
                                const int64_t* __restrict__ shapes,
                                const int64_t* __restrict__ starts,
                                const loc_t* __restrict__ locations,
                                const loc_t* __restrict__ weights,
                                at::opmath_type<scalar_t>* __restrict__ contributions,
                                int64_t* __restrict__ rows, Geometry g, int64_t q_begin,
                                int64_t chunk_queries, int64_t total, int64_t value_rows) {
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
            rows[slot] = inside ? (t.slice + corners.offset[k]) / g.channels : slot % value_rows;
          }
        }
      });
}

// Bytes of scratch per chunk of queries in deterministic mode: corner contributions and rows,
// index_put_'s sort of the rows, and the partial sums.
constexpr int64_t kDeterministicChunkBytes = int64_t(256) << 20;

// index_put_ with accumulation sorts the rows it is given; its index copies and sort scratch are
// budgeted at four int64 per row (an estimate, not measured on a GPU yet).
constexpr int64_t kSortBytesPerRow = 4 * int64_t(sizeof(int64_t));

// A buffer that a kernel reads or writes CPT elements of element_size bytes at a time: with one
// vector load or store (value, grad_output, output), or with vector atomics of at most
// kMaxVectorBytes (grad_value, whose elements are the accumulation type's, not value's).
struct VectorBuffer {
  const void* data;
  int64_t element_size;
};

// Channels per thread: the most (8, 4, 2 or 1) whose vector of value's elements (element_size
// bytes) fits kMaxVectorBytes, that divide C, and for which every buffer is aligned for its
// accesses of that many elements.
int channels_per_thread(int64_t channels, int64_t element_size,
                        std::initializer_list<VectorBuffer> buffers) {
  int cpt = static_cast<int>(std::min<int64_t>(8, kMaxVectorBytes / element_size));
  const auto fits = [&](int n) {
    if (channels % n != 0) {
      return false;
    }
    for (const VectorBuffer& buffer : buffers) {
      const int64_t bytes = std::min<int64_t>(n * buffer.element_size, kMaxVectorBytes);
      if (reinterpret_cast<std::uintptr_t>(buffer.data) % bytes != 0) {
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

// A level metadata tensor (integer, on the CPU or on value's device) as contiguous int64: on the
// CPU it is copied into pinned memory, from which the copy to the GPU is asynchronous (one from
// pageable memory would make the host wait for the stream).
at::Tensor staged_int64(const at::Tensor& meta) {
  if (!meta.is_cpu()) {
    return meta.to(at::kLong).contiguous();
  }
  at::Tensor pinned =
      at::empty(meta.sizes(), at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  pinned.copy_(meta);
  return pinned;
}

// A staged_int64 tensor on `device`.
at::Tensor on_device(const at::Tensor& staged, const at::Device& device) {
  if (!staged.is_cpu()) {
    return staged;
  }
  at::Tensor copy = at::empty(staged.sizes(), at::TensorOptions().dtype(at::kLong).device(device));
  copy.copy_(staged, /*non_blocking=*/true);
  return copy;
}

// spatial_shapes and level_start_index as contiguous int64 tensors on value's device. When both
// are on the CPU they are checked there (ValueError, as by the CPU kernel); otherwise `unchecked`
// is set, and the call's first sampling kernel checks them on the device (assert_levels).
struct LevelTensors {
  at::Tensor shapes;
  at::Tensor starts;
  bool unchecked;
};

LevelTensors level_metadata(const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                            const at::Tensor& value) {
  const at::Tensor shapes = staged_int64(spatial_shapes);
  const at::Tensor starts = staged_int64(level_start_index);
  const bool on_host = shapes.is_cpu() && starts.is_cpu();
  if (on_host) {
    check_levels(shapes.const_data_ptr<int64_t>(), starts.const_data_ptr<int64_t>(),
                 shapes.size(0), value.size(1));
  }
  return {on_device(shapes, value.device()), on_device(starts, value.device()), !on_host};
}

at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index,
                                       const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const c10::cuda::CUDAGuard guard(value.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Geometry g = geometry_of(value, sampling_locations);
  const LevelTensors meta = level_metadata(spatial_shapes, level_start_index, value);
  const at::Tensor& shapes = meta.shapes;
  const at::Tensor& starts = meta.starts;
  const at::Tensor value_c = value.contiguous();
  const at::Tensor locations_c = sampling_locations.contiguous();
  const at::Tensor weights_c = attention_weights.contiguous();
  at::Tensor output = at::empty({g.batch, g.queries, g.heads * g.channels}, value.options());
  const int64_t element_size = static_cast<int64_t>(value.element_size());
  const int cpt = channels_per_thread(g.channels, element_size,
                                      {{value_c.const_data_ptr(), element_size},
                                       {output.const_data_ptr(), element_size}});
  const int64_t total = g.batch * g.queries * g.heads * (g.channels / cpt);
  if (total == 0) {
    return output.zero_();
  }
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
                    total, meta.unchecked);
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
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  const Geometry g = geometry_of(value, sampling_locations);
  const LevelTensors meta = level_metadata(spatial_shapes, level_start_index, value);
  const at::Tensor& shapes = meta.shapes;
  const at::Tensor& starts = meta.starts;
  const at::Tensor grad_output_c = grad_output.contiguous();
  const at::Tensor value_c = value.contiguous();
  const at::Tensor locations_c = sampling_locations.contiguous();
  const at::Tensor weights_c = attention_weights.contiguous();
  const at::ScalarType dtype = value.scalar_type();
  const auto acc_options = value.options().dtype(at::toOpMathType(dtype));
  at::Tensor grad_value = at::zeros(value.sizes(), acc_options);
  at::Tensor grad_locations = at::zeros(sampling_locations.sizes(), acc_options);
  at::Tensor grad_weights = at::zeros(attention_weights.sizes(), acc_options);
  // grad_value is in the list for the sm_90 vector atomics, with its own (float32 for half and
  // bfloat16) element size.
  const int64_t element_size = static_cast<int64_t>(value.element_size());
  const int cpt = channels_per_thread(
      g.channels, element_size,
      {{value_c.const_data_ptr(), element_size},
       {grad_output_c.const_data_ptr(), element_size},
       {grad_value.const_data_ptr(), static_cast<int64_t>(grad_value.element_size())}});
  const int64_t groups = g.channels / cpt;
  const Reduction reduction = reduction_for(groups);
  const int64_t threads_per_query = g.batch * g.heads * groups;
  if (threads_per_query * g.queries > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, dtype, "ms_deform_attn_backward_cuda", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          with_location_type<scalar_t>(locations_c.scalar_type(), [&](auto* location_tag) {
            using loc_t = std::remove_pointer_t<decltype(location_tag)>;
            with_channels_per_thread<scalar_t>(cpt, [&](auto width) {
              constexpr int kCPT = decltype(width)::value;
              const auto launch_backward = [&](int64_t q_begin, int64_t queries, acc_t* scatter,
                                               acc_t* partials) {
                const int64_t threads = threads_per_query * queries;
                backward_kernel<scalar_t, loc_t, kCPT>
                    <<<blocks_for(threads), kThreads, 0, stream>>>(
                        grad_output_c.const_data_ptr<scalar_t>(),
                        value_c.const_data_ptr<scalar_t>(), shapes.const_data_ptr<int64_t>(),
                        starts.const_data_ptr<int64_t>(), locations_c.const_data_ptr<loc_t>(),
                        weights_c.const_data_ptr<loc_t>(), scatter,
                        grad_locations.mutable_data_ptr<acc_t>(),
                        grad_weights.mutable_data_ptr<acc_t>(), g, q_begin, queries, threads,
                        reduction, partials, meta.unchecked && q_begin == 0);
                C10_CUDA_KERNEL_LAUNCH_CHECK();
              };
              if (!deterministic) {
                launch_backward(0, g.queries, grad_value.mutable_data_ptr<acc_t>(), nullptr);
                return;
              }
              const int64_t value_rows = g.batch * g.spatial * g.heads;
              const int64_t samples_per_query = g.batch * g.heads * g.levels * g.points;
              const int64_t corners_per_query = samples_per_query * 4;
              const bool with_partials = reduction.per_group > 1;
              const int64_t partials_per_query =
                  with_partials ? samples_per_query * reduction.per_group * 3 : 0;
              const int64_t bytes_per_query =
                  corners_per_query *
                      (g.channels * static_cast<int64_t>(sizeof(acc_t)) +
                       static_cast<int64_t>(sizeof(int64_t)) + kSortBytesPerRow) +
                  partials_per_query * static_cast<int64_t>(sizeof(acc_t));
              const int64_t chunk = std::clamp<int64_t>(
                  kDeterministicChunkBytes / std::max<int64_t>(bytes_per_query, 1), 1, g.queries);
              at::Tensor partials = at::empty({chunk * partials_per_query}, acc_options);
              at::Tensor contributions =
                  at::empty({chunk * corners_per_query, g.channels}, acc_options);
              at::Tensor rows =
                  at::empty({chunk * corners_per_query}, value.options().dtype(at::kLong));
              at::Tensor grad_value_rows = grad_value.view({value_rows, g.channels});
              for (int64_t q_begin = 0; q_begin < g.queries; q_begin += chunk) {
                const int64_t queries = std::min(chunk, g.queries - q_begin);
                at::Tensor chunk_partials = partials.narrow(0, 0, queries * partials_per_query);
                if (with_partials) {
                  chunk_partials.zero_();
                }
                launch_backward(q_begin, queries, nullptr,
                                with_partials ? chunk_partials.mutable_data_ptr<acc_t>() : nullptr);
                if (with_partials) {
                  const at::Tensor sums =
                      chunk_partials
                          .view({g.batch, queries, g.heads, g.levels, g.points,
                                 reduction.per_group, 3})
                          .sum(5);
                  grad_weights.narrow(1, q_begin, queries).copy_(sums.select(5, 0));
                  grad_locations.narrow(1, q_begin, queries).copy_(sums.narrow(5, 1, 2));
                }
                if (corners_per_query == 0 || value_rows == 0) {
                  continue;
                }
                const int64_t threads = threads_per_query * queries;
                corner_contributions_kernel<scalar_t, loc_t, kCPT>
                    <<<blocks_for(threads), kThreads, 0, stream>>>(
                        grad_output_c.const_data_ptr<scalar_t>(), shapes.const_data_ptr<int64_t>(),
                        starts.const_data_ptr<int64_t>(), locations_c.const_data_ptr<loc_t>(),
                        weights_c.const_data_ptr<loc_t>(), contributions.mutable_data_ptr<acc_t>(),
                        rows.mutable_data_ptr<int64_t>(), g, q_begin, queries, threads,
                        value_rows);
                C10_CUDA_KERNEL_LAUNCH_CHECK();
                const int64_t used = queries * corners_per_query;
                grad_value_rows.index_put_({rows.narrow(0, 0, used)},
                                           contributions.narrow(0, 0, used),
                                           /*accumulate=*/true);
              }
            });
          });
        });
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
