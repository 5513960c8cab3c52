// Class attention on CPU, one image per task: the image's C x N scores go from one GEMM into a
// per-thread scratch, the softmax runs on them in place (vectorized exp), and a second GEMM pools
// the values; backward recomputes the maps from the saved log-sum-exp (the B x C x N maps are never
// stored). Images are spread over the threads and each GEMM runs on its thread, so an image's
// scores, values and gradients stay in that core's cache; eager PyTorch instead runs each step over
// the whole batch. Measured against eager and the earlier batched-GEMM kernel in docs/performance.md.
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../cssfe.h"
#include "blas.h"
#include "image_tasks.h"
#include "simd_math.h"

namespace cssfe {
namespace {

void check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_cpu_contig(q, "q");
  check_cpu_contig(k, "k");
  check_cpu_contig(v, "v");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.sizes() == k.sizes(), "native_attention: bad shapes");
  TORCH_CHECK(q.size(2) == k.size(1) && (q.size(0) == 1 || q.size(0) == k.size(0)), "native_attention: bad q shape");
  TORCH_CHECK(k.size(1) > 0 && k.size(2) > 0, "native_attention: d and N must be positive");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(), "native_attention: dtypes differ");
}

// One row of scores -> its softmax numerators in place; returns their sum, the row's max in *max_out.
CSSFE_SIMD_CLONES
float softmax_numerators(float* __restrict row, int64_t n, float* max_out) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = std::max(m, row[i]);
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    row[i] = simd::exp_nonpositive(row[i] - m);
    sum += row[i];
  }
  *max_out = m;
  return sum;
}

double softmax_numerators(double* row, int64_t n, double* max_out) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) m = std::max(m, row[i]);
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    row[i] = std::exp(row[i] - m);
    sum += row[i];
  }
  *max_out = m;
  return sum;
}

// Scores -> maps P = exp(s - lse) in place, and g V -> dS = P * (g V - delta) in place. s - lse <= 0
// up to the GEMM's rounding, where the polynomial exp is still accurate.
CSSFE_SIMD_CLONES
void softmax_backward_row(float* __restrict p, float* __restrict ds, int64_t n, float lse, float delta) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    p[i] = simd::exp_nonpositive(p[i] - lse);
    ds[i] = p[i] * (ds[i] - delta);
  }
}

void softmax_backward_row(double* p, double* ds, int64_t n, double lse, double delta) {
  for (int64_t i = 0; i < n; ++i) {
    p[i] = std::exp(p[i] - lse);
    ds[i] = p[i] * (ds[i] - delta);
  }
}

CSSFE_SIMD_CLONES
float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

double dot(const double* a, const double* b, int64_t n) {
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

struct Sizes {
  int64_t C, d, N;
};

// z [C, d] and lse [C] of one image; q is already scaled by 1/sqrt(d); s [C, N] and inv_sum [C]
// are scratch.
template <typename T>
void forward_image(bool blas, const T* q, const T* k, const T* v, T* z, float* lse, T* s, T* inv_sum, Sizes n) {
  cpu_blas::gemm<T>(blas, false, false, n.C, n.N, n.d, T(1), q, n.d, k, n.N, T(0), s, n.N);  // S = q K
  for (int64_t c = 0; c < n.C; ++c) {
    T m;
    const T sum = softmax_numerators(s + c * n.N, n.N, &m);
    inv_sum[c] = T(1) / sum;
    lse[c] = static_cast<float>(m + std::log(sum));
  }
  cpu_blas::gemm<T>(blas, false, true, n.C, n.d, n.N, T(1), s, n.N, v, n.N, T(0), z, n.d);  // Z = exp(S - m) V^T
  for (int64_t c = 0; c < n.C; ++c) {
    for (int64_t j = 0; j < n.d; ++j) z[c * n.d + j] *= inv_sum[c];
  }
}

// dk, dv [d, N] of one image; dq [C, d] = dq_beta * dq + dS K^T / sqrt(d). p and ds are [C, N] scratch.
template <typename T>
void backward_image(bool blas, const T* g, const T* q, const T* k, const T* v, const T* z, const float* lse, T* dq,
                    T dq_beta, T* dk, T* dv, T* p, T* ds, Sizes n, T scale) {
  cpu_blas::gemm<T>(blas, false, false, n.C, n.N, n.d, T(1), q, n.d, k, n.N, T(0), p, n.N);   // scores again
  cpu_blas::gemm<T>(blas, false, false, n.C, n.N, n.d, T(1), g, n.d, v, n.N, T(0), ds, n.N);  // g V
  for (int64_t c = 0; c < n.C; ++c) {
    const T delta = dot(g + c * n.d, z + c * n.d, n.d);  // sum_n P dP = g . z
    softmax_backward_row(p + c * n.N, ds + c * n.N, n.N, static_cast<T>(lse[c]), delta);
  }
  cpu_blas::gemm<T>(blas, true, false, n.d, n.N, n.C, T(1), g, n.d, p, n.N, T(0), dv, n.N);         // dV = g^T P
  cpu_blas::gemm<T>(blas, true, false, n.d, n.N, n.C, T(1), q, n.d, ds, n.N, T(0), dk, n.N);        // dK = (scale q)^T dS
  cpu_blas::gemm<T>(blas, false, true, n.C, n.d, n.N, scale, ds, n.N, k, n.N, dq_beta, dq, n.d);    // dQ (+)= scale dS K^T
}

bool fits_blas(Sizes n) { return cpu_blas::direct({n.C, n.d, n.N}); }

// Half precision computes in fp32; fp32 and fp64 in their own type.
at::ScalarType compute_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  const NoAutocast no_autocast;
  check_attention(q, k, v);
  const int64_t B = k.size(0), C = q.size(1), Bq = q.size(0);
  const Sizes n{C, k.size(1), k.size(2)};
  const at::ScalarType ct = compute_type(v);
  const at::Tensor qs = q.to(ct).mul(1.0 / std::sqrt(static_cast<double>(n.d))).contiguous();
  const at::Tensor kc = k.to(ct).contiguous(), vc = v.to(ct).contiguous();
  at::Tensor z = at::empty({B, C, n.d}, qs.options());
  at::Tensor lse = at::empty({B, C}, qs.options().dtype(at::kFloat));
  const bool blas = fits_blas(n);
  const ImageRuns runs = split_images(B);
  AT_DISPATCH_FLOATING_TYPES(ct, "cssfe_attention_fwd_cpu", [&] {
    const scalar_t *qp = qs.data_ptr<scalar_t>(), *kp = kc.data_ptr<scalar_t>(), *vp = vc.data_ptr<scalar_t>();
    scalar_t* zp = z.data_ptr<scalar_t>();
    float* lp = lse.data_ptr<float>();
    for_each_run(runs, [&](int64_t t) {
      std::vector<scalar_t> s(C * n.N), inv_sum(C);
      for (int64_t b = runs.begin(t); b < runs.end(t); ++b) {
        forward_image<scalar_t>(blas, qp + (Bq == 1 ? 0 : b) * C * n.d, kp + b * n.d * n.N, vp + b * n.d * n.N,
                                zp + b * C * n.d, lp + b * C, s.data(), inv_sum.data(), n);
      }
    });
  });
  return {z.to(v.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(const at::Tensor& grad_z, const at::Tensor& q,
                                                                 const at::Tensor& k, const at::Tensor& v,
                                                                 const at::Tensor& z, const at::Tensor& lse) {
  const NoAutocast no_autocast;
  check_attention(q, k, v);
  check_cpu_contig(grad_z, "grad_z");
  check_cpu_contig(z, "z");
  check_cpu_contig(lse, "lse");
  const int64_t B = k.size(0), C = q.size(1), Bq = q.size(0);
  const Sizes n{C, k.size(1), k.size(2)};
  TORCH_CHECK(grad_z.sizes() == z.sizes() && z.dim() == 3 && z.size(0) == B && z.size(1) == C && z.size(2) == n.d,
              "native_attention_bwd: grad_z and z must be [B, C, d]");
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == B && lse.size(1) == C && lse.scalar_type() == at::kFloat,
              "native_attention_bwd: lse must be fp32 [B, C]");
  if (B == 0) return {at::zeros_like(q), at::zeros_like(k), at::zeros_like(v)};  // shared queries: dQ [1, C, d]
  const at::ScalarType ct = compute_type(v);
  const double scale = 1.0 / std::sqrt(static_cast<double>(n.d));
  const at::Tensor qs = q.to(ct).mul(scale).contiguous();
  const at::Tensor kc = k.to(ct).contiguous(), vc = v.to(ct).contiguous();
  const at::Tensor g = grad_z.to(ct).contiguous(), zc = z.to(ct).contiguous();
  const bool shared = Bq == 1 && B > 1;
  const ImageRuns runs = split_images(B);
  // Shared queries: one dQ partial per task, summed after (a fixed order for a given thread count).
  at::Tensor dq = at::empty({shared ? runs.tasks : B, C, n.d}, qs.options());
  at::Tensor dk = at::empty({B, n.d, n.N}, qs.options()), dv = at::empty({B, n.d, n.N}, qs.options());
  const bool blas = fits_blas(n);
  AT_DISPATCH_FLOATING_TYPES(ct, "cssfe_attention_bwd_cpu", [&] {
    const scalar_t *qp = qs.data_ptr<scalar_t>(), *kp = kc.data_ptr<scalar_t>(), *vp = vc.data_ptr<scalar_t>();
    const scalar_t *gp = g.data_ptr<scalar_t>(), *zp = zc.data_ptr<scalar_t>();
    const float* lp = lse.data_ptr<float>();
    scalar_t *dqp = dq.data_ptr<scalar_t>(), *dkp = dk.data_ptr<scalar_t>(), *dvp = dv.data_ptr<scalar_t>();
    for_each_run(runs, [&](int64_t t) {
      std::vector<scalar_t> p(C * n.N), ds(C * n.N);
      const int64_t first = runs.begin(t);
      for (int64_t b = first; b < runs.end(t); ++b) {
        scalar_t* dq_b = dqp + (shared ? t : b) * C * n.d;
        const scalar_t beta = shared && b != first ? scalar_t(1) : scalar_t(0);
        backward_image<scalar_t>(blas, gp + b * C * n.d, qp + (Bq == 1 ? 0 : b) * C * n.d, kp + b * n.d * n.N,
                                 vp + b * n.d * n.N, zp + b * C * n.d, lp + b * C, dq_b, beta, dkp + b * n.d * n.N,
                                 dvp + b * n.d * n.N, p.data(), ds.data(), n, static_cast<scalar_t>(scale));
      }
    });
  });
  if (shared) dq = dq.sum(0, true);
  return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type())};
}

}  // namespace cssfe
