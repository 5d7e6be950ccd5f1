// Batched symmetric eigensolver for many small matrices on the CPU: cyclic Jacobi.
//
// LAPACK's syevd is fast for one big matrix, but torch.linalg.eigh calls it once per
// matrix, so for thousands of 16..256-sized problems the per-call overhead and the
// scalar code paths for small n dominate. Here W matrices (4 doubles or 8 floats, one
// AVX2 register) are interleaved element by element and diagonalised together: every
// rotation step of the cyclic sweep is the same instruction stream for all W lanes,
// so the inner loops are plain SIMD over lanes. Groups of W matrices are spread over
// the intra-op thread pool.
//
// Rotation: Rutishauser's stable form (t = tan of the angle that zeroes a_pq, with
// a_pp -= t a_pq, a_qq += t a_pq), threshold sweeps for the first three sweeps and
// the rule that an off-diagonal entry below the last bit of both diagonal entries is
// set to zero (after sweep four), as in the classical formulation (Numerical Recipes,
// "jacobi"). A lane stops rotating once its off-diagonal Frobenius norm is at most
// tol * ||A||_F.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "jacobi_cpu_kernel.h"

namespace {

using ctm_jacobi::jacobi_group_impl;
using ctm_jacobi::Lanes;

// One symbol per dtype so that GCC can clone it for AVX2+FMA and pick the clone at
// load time; CPUs without AVX2 run the baseline clone.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define CTM_CLONES __attribute__((target_clones("arch=haswell", "default")))
#else
#define CTM_CLONES
#endif

CTM_CLONES int jacobi_group_f64(double* a, double* vt, int n, int max_sweeps, double tol) {
  return jacobi_group_impl<double, Lanes<double>::W>(a, vt, n, max_sweeps, tol);
}
CTM_CLONES int jacobi_group_f32(float* a, float* vt, int n, int max_sweeps, float tol) {
  return jacobi_group_impl<float, Lanes<float>::W>(a, vt, n, max_sweeps, tol);
}

inline int jacobi_group(double* a, double* vt, int n, int ms, double tol) {
  return jacobi_group_f64(a, vt, n, ms, tol);
}
inline int jacobi_group(float* a, float* vt, int n, int ms, float tol) { return jacobi_group_f32(a, vt, n, ms, tol); }

template <typename S>
void jacobi_batch(const S* in, S* evals, S* evecs, int64_t batch, int n, int max_sweeps, S tol) {
  constexpr int W = Lanes<S>::W;
  const int64_t nn = static_cast<int64_t>(n) * n;
  const int64_t groups = (batch + W - 1) / W;
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    std::vector<S> a(nn * W), vt(nn * W);
    std::vector<int> order(n);
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t b0 = g * W;
      const int lanes = static_cast<int>(std::min<int64_t>(W, batch - b0));
      // interleave; missing lanes of the last group are zero matrices (already diagonal)
      std::fill(a.begin(), a.end(), S(0));
      std::fill(vt.begin(), vt.end(), S(0));
      for (int l = 0; l < lanes; ++l) {
        const S* src = in + (b0 + l) * nn;
        for (int64_t e = 0; e < nn; ++e) a[e * W + l] = src[e];
      }
      for (int i = 0; i < n; ++i)
        for (int l = 0; l < W; ++l) vt[(static_cast<int64_t>(i) * n + i) * W + l] = S(1);
      jacobi_group(a.data(), vt.data(), n, max_sweeps, tol);
      for (int l = 0; l < lanes; ++l) {
        const int64_t b = b0 + l;
        auto diag = [&](int i) { return a[(static_cast<int64_t>(i) * n + i) * W + l]; };
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(), [&](int i, int j) { return diag(i) < diag(j); });
        S* w = evals + b * n;
        S* v = evecs + b * nn;
        for (int j = 0; j < n; ++j) {
          const int src = order[j];
          w[j] = diag(src);
          for (int k = 0; k < n; ++k) v[static_cast<int64_t>(k) * n + j] = vt[(static_cast<int64_t>(src) * n + k) * W + l];
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> jacobi_eigh_cpu(const at::Tensor& A, int64_t max_sweeps, double tol) {
  TORCH_CHECK(A.dim() >= 2 && A.size(-1) == A.size(-2), "jacobi_eigh: expected a [..., n, n] tensor, got ",
              A.sizes());
  TORCH_CHECK(A.scalar_type() == at::kFloat || A.scalar_type() == at::kDouble,
              "jacobi_eigh: expected float32 or float64, got ", A.scalar_type());
  TORCH_CHECK(max_sweeps >= 0, "jacobi_eigh: max_sweeps must be >= 0");
  const int64_t n = A.size(-1);
  const at::Tensor X = A.contiguous();
  const int64_t batch = n == 0 ? 0 : X.numel() / (n * n);
  auto evals_shape = A.sizes().vec();
  evals_shape.pop_back();
  at::Tensor evals = at::empty(evals_shape, X.options());
  at::Tensor evecs = at::empty(A.sizes(), X.options());
  if (batch == 0) return {evals, evecs};
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "jacobi_eigh_cpu", [&] {
    const scalar_t t = tol > 0 ? static_cast<scalar_t>(tol) : std::numeric_limits<scalar_t>::epsilon();
    jacobi_batch<scalar_t>(X.const_data_ptr<scalar_t>(), evals.mutable_data_ptr<scalar_t>(),
                           evecs.mutable_data_ptr<scalar_t>(), batch, static_cast<int>(n),
                           static_cast<int>(max_sweeps), t);
  });
  return {evals, evecs};
}

}  // namespace

TORCH_LIBRARY_IMPL(ctm_kernels, CPU, m) { m.impl("jacobi_eigh", &jacobi_eigh_cpu); }
