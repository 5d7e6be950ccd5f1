// Cyclic Jacobi on W interleaved symmetric matrices (header-only, no torch dependency).
// See jacobi_cpu.cpp for the method and the torch glue.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace ctm_jacobi {

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

// Rotation parameters for one pair (p, q) on W lanes, branch-free so that the divisions
// and square roots vectorise; lanes that do not rotate get the identity (t = 0, c = 1,
// s = 0). Writes c, s, the new a_pq (0, or a_pq if skipped) and the new diagonal
// entries; returns nonzero when some lane rotates.
template <typename S, int W>
static inline __attribute__((always_inline)) int rotation(const S* xpp, const S* xqq, const S* xpq, const bool* done,
                                                          const S* tresh, bool late, S* c, S* s, S* pq, S* dpp,
                                                          S* dqq) {
  int any = 0;
#pragma omp simd reduction(| : any)
  for (int l = 0; l < W; ++l) {
    const S apq = xpq[l], app = xpp[l], aqq = xqq[l];
    const S g = S(100) * std::abs(apq);
    // below the last bit of both diagonal entries: set to zero without rotating
    // (bitwise & and |: no short-circuit branches, so the loop if-converts)
    const bool tiny = late & (std::abs(app) + g == std::abs(app)) & (std::abs(aqq) + g == std::abs(aqq));
    const bool rot = !done[l] & !tiny & (std::abs(apq) > tresh[l]);
    const S h = aqq - app;
    const S theta = S(0.5) * h / apq;
    const S t_reg = std::copysign(S(1) / (std::abs(theta) + std::sqrt(S(1) + theta * theta)), theta);
    // theta = h / (2 apq) so large that theta^2 would lose a_pq: t = 1 / (2 theta)
    const S t_big = apq / h;
    const S tt = rot ? (std::abs(h) + g == std::abs(h) ? t_big : t_reg) : S(0);
    const S cc = S(1) / std::sqrt(S(1) + tt * tt);
    c[l] = cc;
    s[l] = tt * cc;
    pq[l] = (rot | (tiny & !done[l])) ? S(0) : apq;
    dpp[l] = app - tt * apq;
    dqq[l] = aqq + tt * apq;
    any |= rot;
  }
  return any;
}

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

  bool done[W];  // lanes whose off-diagonal norm is below tol: identity rotations from then on
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
    const bool late = sweep > 3;

    for (int p = 0; p < n - 1; ++p) {
      for (int q = p + 1; q < n; ++q) {
        S* xpq = at(p, q);
        S* xpp = at(p, p);
        S* xqq = at(q, q);
        const int any =
            rotation<S, W>(xpp, xqq, xpq, done, tresh, late, c, s, pq, dpp, dqq);
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
        // columns p and q of (J^T A) J equal the new rows by symmetry; the 2x2 block
        // (also written here) is then set exactly
        for (int k = 0; k < n; ++k) {
          // one W-lane vector each (memcpy: a single unaligned vector move)
          std::memcpy(at(k, p), rp + k * W, sizeof(S) * W);
          std::memcpy(at(k, q), rq + k * W, sizeof(S) * W);
        }
        for (int l = 0; l < W; ++l) {
          xpp[l] = dpp[l];
          xqq[l] = dqq[l];
          xpq[l] = at(q, p)[l] = pq[l];
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

}  // namespace ctm_jacobi
