// Registration of the ctm_kernels torch ops and the Python module that loads them.
//
// The schema lives here; each device file (jacobi_cpu.cpp, jacobi_cuda.cu) registers
// its own implementation with TORCH_LIBRARY_IMPL, so a build without CUDA simply has
// no CUDA kernel for the op.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import ctm_kernels._C` loads this shared library, which runs the static
// registrations below; the module itself has no Python-level members.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "ctm_kernels compiled ops (torch.ops.ctm_kernels)", -1, nullptr,
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(ctm_kernels, m) {
  // A [..., n, n] symmetric (only read as a full matrix; symmetry is assumed)
  // -> (eigenvalues [..., n] ascending, eigenvectors [..., n, n] as columns), like torch.linalg.eigh.
  // max_sweeps bounds the cyclic Jacobi sweeps; tol is the relative off-diagonal Frobenius
  // norm at which a matrix counts as diagonal (0 picks the unit roundoff of the dtype).
  m.def("jacobi_eigh(Tensor A, int max_sweeps=30, float tol=0.0) -> (Tensor, Tensor)");
}
