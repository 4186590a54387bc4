// Operator schemas, input checks and the Python module of the extension ops._C.
#include "ms_deform_attn.h"

#include "sampling.h"

#include <Python.h>
#include <torch/library.h>

namespace deformable_detr {

namespace {

bool is_index_dtype(at::ScalarType dtype) {
  return at::isIntegralType(dtype, /*includeBool=*/false);
}

// The dtypes of value the kernels are compiled for.
bool is_supported_float(at::ScalarType dtype) {
  return dtype == at::kDouble || dtype == at::kFloat || is_reduced_float(dtype);
}

}  // namespace

bool is_reduced_float(at::ScalarType dtype) {
  return dtype == at::kHalf || dtype == at::kBFloat16;
}

void check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                  const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                  const at::Tensor& attention_weights) {
  TORCH_CHECK_VALUE(value.dim() == 4, "value must be (B, S, heads, C), got shape ",
                    value.sizes());
  TORCH_CHECK_VALUE(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
                    "spatial_shapes must be (levels, 2), got shape ", spatial_shapes.sizes());
  const int64_t levels = spatial_shapes.size(0);
  TORCH_CHECK_VALUE(level_start_index.dim() == 1 && level_start_index.size(0) == levels,
                    "level_start_index must be (levels,) = (", levels, ",), got shape ",
                    level_start_index.sizes());
  TORCH_CHECK_VALUE(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
                    "sampling_locations must be (B, Lq, heads, levels, points, 2), got shape ",
                    sampling_locations.sizes());
  TORCH_CHECK_VALUE(sampling_locations.size(0) == value.size(0) &&
                        sampling_locations.size(2) == value.size(2) &&
                        sampling_locations.size(3) == levels,
                    "sampling_locations ", sampling_locations.sizes(),
                    " does not match value (B, S, heads, C) = ", value.sizes(), " and ", levels,
                    " levels");
  TORCH_CHECK_VALUE(attention_weights.sizes() == sampling_locations.sizes().slice(0, 5),
                    "attention_weights must be (B, Lq, heads, levels, points) = ",
                    sampling_locations.sizes().slice(0, 5), ", got shape ",
                    attention_weights.sizes());
  // An allowlist: float8 types count as floating point, but no kernel is compiled for them.
  TORCH_CHECK_VALUE(is_supported_float(value.scalar_type()),
                    "value's dtype must be float64, float32, float16 or bfloat16; ",
                    value.scalar_type(), " is not supported");
  TORCH_CHECK_VALUE(attention_weights.scalar_type() == sampling_locations.scalar_type() &&
                        (sampling_locations.scalar_type() == value.scalar_type() ||
                         (is_reduced_float(value.scalar_type()) &&
                          sampling_locations.scalar_type() == at::kFloat)),
                    "value, sampling_locations and attention_weights must share a dtype (or, for a "
                    "float16 / bfloat16 value, sampling_locations and attention_weights may be "
                    "float32), got ",
                    value.scalar_type(), ", ", sampling_locations.scalar_type(), " and ",
                    attention_weights.scalar_type());
  TORCH_CHECK_VALUE(is_index_dtype(spatial_shapes.scalar_type()) &&
                        is_index_dtype(level_start_index.scalar_type()),
                    "spatial_shapes and level_start_index must be integer tensors, got ",
                    spatial_shapes.scalar_type(), " and ", level_start_index.scalar_type());
  TORCH_CHECK_VALUE(sampling_locations.device() == value.device() &&
                        attention_weights.device() == value.device(),
                    "value, sampling_locations and attention_weights must be on one device, got ",
                    value.device(), ", ", sampling_locations.device(), " and ",
                    attention_weights.device());
  for (const at::Tensor* meta : {&spatial_shapes, &level_start_index}) {
    TORCH_CHECK_VALUE(meta->device() == value.device() || meta->device().is_cpu(),
                      "spatial_shapes and level_start_index must be on the CPU or on ",
                      value.device(), ", got ", meta->device());
  }
}

void check_levels(const int64_t* shapes, const int64_t* starts, int64_t levels, int64_t spatial) {
  const LevelsCheck check = check_level_metadata(shapes, starts, levels, spatial);
  const int64_t l = check.level;
  switch (check.error) {
    case LevelsError::kNone:
      return;
    case LevelsError::kNotPositive:
      TORCH_CHECK_VALUE(false, "spatial_shapes must be positive, level ", l, " is (",
                        shapes[2 * l], ", ", shapes[2 * l + 1], ")");
    case LevelsError::kStart:
      TORCH_CHECK_VALUE(false, "level_start_index[", l, "] is ", starts[l],
                        " but the levels before it hold ", check.tokens,
                        " tokens (it must be the running sum of H * W)");
    case LevelsError::kTooManyTokens:
      TORCH_CHECK_VALUE(false, "value has S = ", spatial, " tokens but level ", l,
                        " of spatial_shapes, (", shapes[2 * l], ", ", shapes[2 * l + 1],
                        "), does not fit in the ", spatial - check.tokens,
                        " tokens left after the levels before it");
    case LevelsError::kTokenCount:
      TORCH_CHECK_VALUE(false, "value has S = ", spatial, " tokens but spatial_shapes sums to ",
                        check.tokens);
  }
}

Geometry geometry_of(const at::Tensor& value, const at::Tensor& sampling_locations) {
  return {value.size(0),
          value.size(1),
          value.size(2),
          value.size(3),
          sampling_locations.size(1),
          sampling_locations.size(3),
          sampling_locations.size(4)};
}

void check_backward_inputs(const at::Tensor& grad_output, const at::Tensor& value,
                           const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                           const at::Tensor& sampling_locations,
                           const at::Tensor& attention_weights) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  TORCH_CHECK_VALUE(grad_output.dim() == 3 && grad_output.size(0) == value.size(0) &&
                        grad_output.size(1) == sampling_locations.size(1) &&
                        grad_output.size(2) == value.size(2) * value.size(3),
                    "grad_output must be (B, Lq, heads * C), got shape ", grad_output.sizes());
  TORCH_CHECK_VALUE(grad_output.scalar_type() == value.scalar_type() &&
                        grad_output.device() == value.device(),
                    "grad_output must match value's dtype and device, got ",
                    grad_output.scalar_type(), " on ", grad_output.device());
}

TORCH_LIBRARY(deformable_detr, m) {
  m.def(
      "ms_deform_attn(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
      "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights) "
      "-> (Tensor, Tensor, Tensor)");
}

}  // namespace deformable_detr

namespace {

PyModuleDef extension_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "Compiled multi-scale deformable attention kernels; importing it registers the "
    "deformable_detr operators with torch.library.",
    -1,
    nullptr,
};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&extension_module);
  if (module == nullptr) {
    return nullptr;
  }
#ifdef WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (PyModule_AddIntConstant(module, "with_cuda", with_cuda) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
