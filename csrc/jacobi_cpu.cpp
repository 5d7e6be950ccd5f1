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

namespace {

template <typename S>
struct Lanes;
template <>
struct Lanes<double> {
  static constexpr int W = 4;
};
template <>
struct Lanes<float> {
  static constexpr int W = 8;
};

// a [n, n, W] interleaved symmetric matrices (overwritten by their diagonal form),
// vt [n, n, W] starts as the identity and ends with the eigenvectors as rows.
// Returns the number of sweeps used.
template <typename S, int W>
static inline __attribute__((always_inline)) int jacobi_group_impl(S* __restrict a, S* __restrict vt, int n,
                                                                   int max_sweeps, S tol) {
  auto at = [&](int i, int j) -> S* { return a + (static_cast<int64_t>(i) * n + j) * W; };
  auto vat = [&](int i, int j) -> S* { return vt + (static_cast<int64_t>(i) * n + j) * W; };

  S frob2[W] = {};
  for (int64_t e = 0; e < static_cast<int64_t>(n) * n; ++e)
    for (int l = 0; l < W; ++l) frob2[l] += a[e * W + l] * a[e * W + l];

  bool done[W];
  S tresh[W], c[W], s[W], pq[W], dpp[W], dqq[W];
  int sweep = 0;
  for (; sweep < max_sweeps; ++sweep) {
    S off2[W] = {}, sm[W] = {};
    for (int p = 0; p < n - 1; ++p)
      for (int q = p + 1; q < n; ++q) {
        const S* x = at(p, q);
        for (int l = 0; l < W; ++l) {
          off2[l] += x[l] * x[l];
          sm[l] += std::abs(x[l]);
        }
      }
    bool all_done = true;
    for (int l = 0; l < W; ++l) {
      // 2 * off2: the strict upper triangle counts each off-diagonal pair once.
      done[l] = !(2 * off2[l] > tol * tol * frob2[l]);
      all_done = all_done && done[l];
      tresh[l] = sweep < 3 ? S(0.2) * sm[l] / (S(n) * n) : S(0);
    }
    if (all_done) break;

    for (int p = 0; p < n - 1; ++p) {
      for (int q = p + 1; q < n; ++q) {
        bool any = false;
        S* xpq = at(p, q);
        S* xpp = at(p, p);
        S* xqq = at(q, q);
        for (int l = 0; l < W; ++l) {
          const S apq = xpq[l], app = xpp[l], aqq = xqq[l];
          const S g = S(100) * std::abs(apq);
          S cc = 1, ss = 0, tt = 0, newpq = apq;
          if (done[l]) {
            // converged lane: identity rotation
          } else if (sweep > 3 && std::abs(app) + g == std::abs(app) && std::abs(aqq) + g == std::abs(aqq)) {
            newpq = 0;  // below the last bit of both diagonal entries
          } else if (std::abs(apq) > tresh[l]) {
            const S h = aqq - app;
            if (std::abs(h) + g == std::abs(h)) {
              tt = apq / h;  // theta = h / (2 apq) so large that t = 1 / (2 theta)
            } else {
              const S theta = S(0.5) * h / apq;
              tt = S(1) / (std::abs(theta) + std::sqrt(S(1) + theta * theta));
              if (theta < 0) tt = -tt;
            }
            cc = S(1) / std::sqrt(S(1) + tt * tt);
            ss = tt * cc;
            newpq = 0;
            any = true;
          }
          c[l] = cc;
          s[l] = ss;
          pq[l] = newpq;
          dpp[l] = app - tt * apq;
          dqq[l] = aqq + tt * apq;
        }
        if (!any) {
          for (int l = 0; l < W; ++l) xpq[l] = at(q, p)[l] = pq[l];
          continue;
        }
        // rows p and q of J^T A (all columns; the 2x2 block is set exactly afterwards)
        S* rp = at(p, 0);
        S* rq = at(q, 0);
        for (int k = 0; k < n; ++k)
          for (int l = 0; l < W; ++l) {
            const S ap = rp[k * W + l], aq = rq[k * W + l];
            rp[k * W + l] = c[l] * ap - s[l] * aq;
            rq[k * W + l] = s[l] * ap + c[l] * aq;
          }
        for (int l = 0; l < W; ++l) {
          xpp[l] = dpp[l];
          xqq[l] = dqq[l];
          xpq[l] = at(q, p)[l] = pq[l];
        }
        // columns p and q of (J^T A) J equal the new rows by symmetry
        for (int k = 0; k < n; ++k) {
          if (k == p || k == q) continue;
          S* cp = at(k, p);
          S* cq = at(k, q);
          for (int l = 0; l < W; ++l) {
            cp[l] = rp[k * W + l];
            cq[l] = rq[k * W + l];
          }
        }
        S* vp = vat(p, 0);
        S* vq = vat(q, 0);
        for (int k = 0; k < n; ++k)
          for (int l = 0; l < W; ++l) {
            const S x = vp[k * W + l], y = vq[k * W + l];
            vp[k * W + l] = c[l] * x - s[l] * y;
            vq[k * W + l] = s[l] * x + c[l] * y;
          }
      }
    }
  }
  return sweep;
}

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
