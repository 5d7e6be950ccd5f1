// Batched symmetric eigensolver for many small matrices on the GPU: parallel Jacobi,
// one thread block per matrix.
//
// Each sweep runs the round-robin ("parallel") ordering: n - 1 rounds of n / 2 disjoint
// pairs (p, q). The rotations of a round commute, so a round is three data-parallel
// steps over the block's threads: rotation parameters (one thread per pair), the row
// rotations A <- J^T A (one thread per row element), then the column rotations
// A <- A J and V <- V J (one thread per row and pair). The 2x2 blocks are then set
// exactly (Rutishauser's update a_pp -= t a_pq, a_qq += t a_pq, a_pq = 0), as on the CPU.
// The matrix lives in shared memory when it fits in 48 KiB (float n <= 104, double
// n <= 72), else in a global workspace (L2-resident for these sizes).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

namespace {

constexpr int kThreads = 256;
constexpr size_t kSharedLimit = 48 * 1024;

template <typename S>
__device__ S block_sum(S x, S* red) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // red may still be read from the previous call
  if (lane == 0) red[warp] = x;
  __syncthreads();
  if (warp == 0) {
    x = lane < (blockDim.x >> 5) ? red[lane] : S(0);
    for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
    if (lane == 0) red[0] = x;
  }
  __syncthreads();
  return red[0];
}

template <typename S>
__global__ void __launch_bounds__(kThreads) jacobi_kernel(const S* __restrict__ in, S* __restrict__ evals,
                                                          S* __restrict__ evecs, S* __restrict__ work_a,
                                                          S* __restrict__ work_v, int n, int max_sweeps, S tol,
                                                          bool a_shared) {
  extern __shared__ unsigned char smem_raw[];
  __shared__ S red[32];
  const int64_t b = blockIdx.x;
  const int64_t nn = static_cast<int64_t>(n) * n;
  const int m = n + (n & 1);  // round-robin players; index n is a bye when n is odd
  const int half = m / 2;
  S* base = reinterpret_cast<S*>(smem_raw);
  S* a = a_shared ? base : work_a + b * nn;
  S* cs = a_shared ? base + nn : base;  // [half] each: c, s, new a_pp, new a_qq, rotate flag
  S* ss = cs + half;
  S* dp = ss + half;
  S* dq = dp + half;
  S* rot = dq + half;
  int* pp = reinterpret_cast<int*>(rot + half);
  int* qq = pp + half;
  S* v = work_v + b * nn;  // eigenvectors as columns: v[k * n + j]

  const S* src = in + b * nn;
  S f2 = 0;
  for (int64_t e = threadIdx.x; e < nn; e += blockDim.x) {
    const S x = src[e];
    a[e] = x;
    v[e] = (e / n == e % n) ? S(1) : S(0);
    f2 += x * x;
  }
  const S frob2 = block_sum(f2, red);

  for (int sweep = 0; sweep < max_sweeps; ++sweep) {
    S o2 = 0;
    for (int64_t e = threadIdx.x; e < nn; e += blockDim.x)
      if (e / n != e % n) o2 += a[e] * a[e];
    const S off2 = block_sum(o2, red);
    if (!(off2 > tol * tol * frob2)) break;  // uniform across the block

    for (int round = 0; round < m - 1; ++round) {
      for (int j = threadIdx.x; j < half; j += blockDim.x) {
        // circle method: player m-1 stays, the others rotate by one each round
        int p = j == 0 ? m - 1 : (round + j) % (m - 1);
        int q = (round - j + (m - 1)) % (m - 1);
        if (p > q) {
          const int t = p;
          p = q;
          q = t;
        }
        S c = 1, s = 0, r = 0;
        if (q < n) {
          const S apq = a[p * n + q], app = a[p * n + p], aqq = a[q * n + q];
          const S g = S(100) * fabs(apq);
          const bool tiny = fabs(app) + g == fabs(app) && fabs(aqq) + g == fabs(aqq);
          if (apq != S(0) && !tiny) {
            const S h = aqq - app;
            S t;
            if (fabs(h) + g == fabs(h)) {
              t = apq / h;
            } else {
              const S theta = S(0.5) * h / apq;
              t = S(1) / (fabs(theta) + sqrt(S(1) + theta * theta));
              if (theta < 0) t = -t;
            }
            c = S(1) / sqrt(S(1) + t * t);
            s = t * c;
            r = 1;
            dp[j] = app - t * apq;
            dq[j] = aqq + t * apq;
          } else if (tiny) {
            a[p * n + q] = a[q * n + p] = S(0);
          }
        }
        pp[j] = q < n ? p : -1;
        qq[j] = q;
        cs[j] = c;
        ss[j] = s;
        rot[j] = r;
      }
      __syncthreads();
      // rows p, q of every rotating pair: A <- J^T A
      for (int idx = threadIdx.x; idx < half * n; idx += blockDim.x) {
        const int j = idx / n, k = idx % n;
        if (rot[j] == S(0)) continue;
        const int p = pp[j], q = qq[j];
        const S x = a[p * n + k], y = a[q * n + k];
        a[p * n + k] = cs[j] * x - ss[j] * y;
        a[q * n + k] = ss[j] * x + cs[j] * y;
      }
      __syncthreads();
      // columns p, q: A <- A J and V <- V J
      for (int idx = threadIdx.x; idx < half * n; idx += blockDim.x) {
        const int k = idx / half, j = idx % half;
        if (rot[j] == S(0)) continue;
        const int p = pp[j], q = qq[j];
        const S c = cs[j], s = ss[j];
        const S x = a[k * n + p], y = a[k * n + q];
        a[k * n + p] = c * x - s * y;
        a[k * n + q] = s * x + c * y;
        const S vx = v[k * n + p], vy = v[k * n + q];
        v[k * n + p] = c * vx - s * vy;
        v[k * n + q] = s * vx + c * vy;
      }
      __syncthreads();
      for (int j = threadIdx.x; j < half; j += blockDim.x) {
        if (rot[j] == S(0)) continue;
        const int p = pp[j], q = qq[j];
        a[p * n + p] = dp[j];
        a[q * n + q] = dq[j];
        a[p * n + q] = a[q * n + p] = S(0);
      }
      __syncthreads();
    }
  }

  // ascending order: the rank of eigenvalue i (ties broken by index) is its output column
  S* w_out = evals + b * n;
  S* v_out = evecs + b * nn;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const S wi = a[i * n + i];
    int rank = 0;
    for (int j = 0; j < n; ++j) {
      const S wj = a[j * n + j];
      rank += (wj < wi) || (wj == wi && j < i);
    }
    w_out[rank] = wi;
    for (int k = 0; k < n; ++k) v_out[k * n + rank] = v[k * n + i];
  }
}

std::tuple<at::Tensor, at::Tensor> jacobi_eigh_cuda(const at::Tensor& A, int64_t max_sweeps, double tol) {
  TORCH_CHECK(A.dim() >= 2 && A.size(-1) == A.size(-2), "jacobi_eigh: expected a [..., n, n] tensor, got ",
              A.sizes());
  TORCH_CHECK(A.scalar_type() == at::kFloat || A.scalar_type() == at::kDouble,
              "jacobi_eigh: expected float32 or float64, got ", A.scalar_type());
  TORCH_CHECK(max_sweeps >= 0, "jacobi_eigh: max_sweeps must be >= 0");
  const c10::cuda::CUDAGuard guard(A.device());
  const int64_t n = A.size(-1);
  const at::Tensor X = A.contiguous();
  const int64_t batch = n == 0 ? 0 : X.numel() / (n * n);
  auto evals_shape = A.sizes().vec();
  evals_shape.pop_back();
  at::Tensor evals = at::empty(evals_shape, X.options());
  at::Tensor evecs = at::empty(A.sizes(), X.options());
  if (batch == 0) return {evals, evecs};
  TORCH_CHECK(batch <= std::numeric_limits<int32_t>::max(), "jacobi_eigh: too many matrices");
  at::Tensor work_v = at::empty({batch, n, n}, X.options());
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "jacobi_eigh_cuda", [&] {
    const int64_t half = (n + 1) / 2;
    const size_t params = half * (5 * sizeof(scalar_t) + 2 * sizeof(int));
    const size_t a_bytes = static_cast<size_t>(n * n) * sizeof(scalar_t);
    const bool a_shared = a_bytes + params <= kSharedLimit;
    TORCH_CHECK(params <= kSharedLimit, "jacobi_eigh: n = ", n, " is too large for the CUDA kernel");
    at::Tensor work_a = a_shared ? at::Tensor() : at::empty({batch, n, n}, X.options());
    const scalar_t t = tol > 0 ? static_cast<scalar_t>(tol) : std::numeric_limits<scalar_t>::epsilon();
    jacobi_kernel<scalar_t><<<static_cast<unsigned>(batch), kThreads, (a_shared ? a_bytes : 0) + params,
                              c10::cuda::getCurrentCUDAStream()>>>(
        X.const_data_ptr<scalar_t>(), evals.mutable_data_ptr<scalar_t>(), evecs.mutable_data_ptr<scalar_t>(),
        a_shared ? nullptr : work_a.mutable_data_ptr<scalar_t>(), work_v.mutable_data_ptr<scalar_t>(),
        static_cast<int>(n), static_cast<int>(max_sweeps), t, a_shared);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {evals, evecs};
}

}  // namespace

TORCH_LIBRARY_IMPL(ctm_kernels, CUDA, m) { m.impl("jacobi_eigh", &jacobi_eigh_cuda); }
