// Module init and every op schema. Device kernels register in csrc/cpu and csrc/cuda, autograd in
// csrc/autograd.cpp; fake kernels are registered from Python (torchpool/_fake.py).
//
// Conventions shared by all ops:
//   * `self` / `grad_output` are batched: (N, C, *spatial) with 1 to 3 spatial dims;
//   * kernel_size, stride, pad_before, pad_after and dilation have one value per spatial dim;
//   * `input_size` is the full shape of the pooled input;
//   * outputs keep the layout (contiguous or channels_last) of the first tensor argument; the
//     global backward ops take it as `channels_last`.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Makes `import torchpool._C` work; the ops register through TORCH_LIBRARY at load time.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(torchpool, m) {
  // Max pool, inference: no window position is written.
  m.def("max_pool(Tensor self, int[] kernel_size, int[] stride, int[] pad_before, int[] pad_after, "
        "int[] dilation, bool ceil_mode) -> Tensor");
  // Max pool, training: also the position of the maximum inside its window (flat over the
  // kernel, scan order), uint8 when the window has <= 256 cells, int32 otherwise.
  m.def("max_pool_with_pos(Tensor self, int[] kernel_size, int[] stride, int[] pad_before, "
        "int[] pad_after, int[] dilation, bool ceil_mode) -> (Tensor, Tensor)");
  // The window backwards' channels_last: the layout of grad_input (and the order grad_output is
  // read in). None takes grad_output's layout, which cannot tell channels_last from contiguous
  // when the output has one channel or one cell.
  // check_pos: refuse a position outside its window or on a window cell in the padding (on the
  // CPU a pass over the positions; on other devices a few elementwise ops and a read back, which
  // waits for the device). The forwards never write one: their autograd skips the check.
  m.def("max_pool_backward(Tensor grad_output, Tensor pos, int[] input_size, int[] kernel_size, "
        "int[] stride, int[] pad_before, int[] pad_after, int[] dilation, bool ceil_mode, "
        "bool? channels_last=None, *, bool check_pos=True) -> Tensor");
  // Window positions -> int64 flat indices into the input's spatial plane (torch's return_indices).
  m.def("max_pool_indices(Tensor pos, int[] input_size, int[] kernel_size, int[] stride, "
        "int[] pad_before, int[] pad_after, int[] dilation, bool ceil_mode, *, "
        "bool check_pos=True) -> Tensor");
  m.def("avg_pool(Tensor self, int[] kernel_size, int[] stride, int[] pad_before, int[] pad_after, "
        "bool ceil_mode, bool count_include_pad, int? divisor_override) -> Tensor");
  m.def("avg_pool_backward(Tensor grad_output, int[] input_size, int[] kernel_size, int[] stride, "
        "int[] pad_before, int[] pad_after, bool ceil_mode, bool count_include_pad, "
        "int? divisor_override, bool? channels_last=None) -> Tensor");
  // Global pools reduce every spatial dim: (N, C, *spatial) -> (N, C).
  m.def("global_max_pool(Tensor self) -> Tensor");
  // Also the int64 flat index of the first maximum in the spatial plane.
  m.def("global_max_pool_with_pos(Tensor self) -> (Tensor, Tensor)");
  // check_pos: refuse a cell outside the plane (as max_pool_backward's).
  m.def("global_max_pool_backward(Tensor grad_output, Tensor pos, int[] input_size, "
        "bool channels_last, *, bool check_pos=True) -> Tensor");
  m.def("global_avg_pool(Tensor self) -> Tensor");
  m.def("global_avg_pool_backward(Tensor grad_output, int[] input_size, bool channels_last) -> Tensor");
  // The checks of check_pos=True as every device but the CPU makes them (positions.h), on any
  // device: they raise the ops' errors, under their own names.
  m.def("_check_max_positions(Tensor pos, int[] input_size, int[] kernel_size, int[] stride, "
        "int[] pad_before, int[] pad_after, int[] dilation, bool ceil_mode) -> ()");
  m.def("_check_global_positions(Tensor pos, int[] input_size) -> ()");
}
