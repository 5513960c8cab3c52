// Class attention on CPU (OpenMP). Forward: one softmax row per (batch, class) at a time, held in a
// thread-local buffer of N floats (the B x C x N maps are never stored); backward recomputes it.
#include <ATen/Dispatch.h>
#include <omp.h>

#include <cmath>
#include <limits>
#include <vector>

#include "../cssfe.h"

namespace cssfe {
namespace {

template <typename scalar_t>
void scores_row(const scalar_t* q, const scalar_t* k, int64_t d, int64_t n, float scale, float* s) {
  for (int64_t j = 0; j < n; ++j) s[j] = 0.f;
  for (int64_t e = 0; e < d; ++e) {
    const float qe = static_cast<float>(q[e]) * scale;
    const scalar_t* kr = k + e * n;
    for (int64_t j = 0; j < n; ++j) s[j] += qe * static_cast<float>(kr[j]);
  }
}

void check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_cpu_contig(q, "q");
  check_cpu_contig(k, "k");
  check_cpu_contig(v, "v");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.sizes() == k.sizes(), "native_attention: bad shapes");
  TORCH_CHECK(q.size(2) == k.size(1) && (q.size(0) == 1 || q.size(0) == k.size(0)), "native_attention: bad q shape");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(), "native_attention: dtypes differ");
}

template <typename scalar_t>
void fwd_impl(const scalar_t* qp, const scalar_t* kp, const scalar_t* vp, scalar_t* zp, float* lp, int64_t B,
              int64_t C, int64_t d, int64_t N, int64_t Bq, float scale) {
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<float> s(N);
#pragma omp for schedule(static)
    for (int64_t bc = 0; bc < B * C; ++bc) {
      const int64_t b = bc / C, c = bc % C;
      const scalar_t* qr = qp + ((Bq == 1 ? 0 : b) * C + c) * d;
      scores_row(qr, kp + b * d * N, d, N, scale, s.data());
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < N; ++j) mx = std::max(mx, s[j]);
      float sum = 0.f;
      for (int64_t j = 0; j < N; ++j) {
        s[j] = std::exp(s[j] - mx);
        sum += s[j];
      }
      const float inv = 1.f / sum;
      lp[bc] = mx + std::log(sum);
      const scalar_t* vb = vp + b * d * N;
      for (int64_t e = 0; e < d; ++e) {
        const scalar_t* vr = vb + e * N;
        float acc = 0.f;
        for (int64_t j = 0; j < N; ++j) acc += s[j] * static_cast<float>(vr[j]);
        zp[bc * d + e] = static_cast<scalar_t>(acc * inv);
      }
    }
  }
}

template <typename scalar_t>
void bwd_impl(const scalar_t* qp, const scalar_t* kp, const scalar_t* vp, const float* gp, const float* zp,
              const float* lp, float* dqp, float* dk_all, float* dv_all, int64_t B, int64_t C, int64_t d, int64_t N,
              int64_t Bq, float scale, int T) {
#pragma omp parallel num_threads(T)
  {
    const int tid = omp_get_thread_num();
    float* dkp = dk_all + tid * B * d * N;
    float* dvp = dv_all + tid * B * d * N;
    std::vector<float> p(N), ds(N);
#pragma omp for schedule(static)
    for (int64_t bc = 0; bc < B * C; ++bc) {
      const int64_t b = bc / C, c = bc % C;
      const scalar_t* qr = qp + ((Bq == 1 ? 0 : b) * C + c) * d;
      const scalar_t* kb = kp + b * d * N;
      const scalar_t* vb = vp + b * d * N;
      const float* g = gp + bc * d;
      scores_row(qr, kb, d, N, scale, p.data());
      const float l = lp[bc];
      float delta = 0.f;
      for (int64_t e = 0; e < d; ++e) delta += g[e] * zp[bc * d + e];
      for (int64_t j = 0; j < N; ++j) {
        p[j] = std::exp(p[j] - l);
        ds[j] = 0.f;
      }
      for (int64_t e = 0; e < d; ++e) {  // dP = g . v ; dv += p g
        const scalar_t* vr = vb + e * N;
        float* dvr = dvp + (b * d + e) * N;
        const float ge = g[e];
        for (int64_t j = 0; j < N; ++j) {
          ds[j] += ge * static_cast<float>(vr[j]);
          dvr[j] += p[j] * ge;
        }
      }
      for (int64_t j = 0; j < N; ++j) ds[j] = p[j] * (ds[j] - delta) * scale;
      for (int64_t e = 0; e < d; ++e) {  // dq = ds . k ; dk += ds q
        const scalar_t* kr = kb + e * N;
        float* dkr = dkp + (b * d + e) * N;
        const float qe = static_cast<float>(qr[e]);
        float acc = 0.f;
        for (int64_t j = 0; j < N; ++j) {
          acc += ds[j] * static_cast<float>(kr[j]);
          dkr[j] += ds[j] * qe;
        }
        dqp[bc * d + e] = acc;
      }
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_attention(q, k, v);
  const int64_t B = k.size(0), d = k.size(1), N = k.size(2), C = q.size(1), Bq = q.size(0);
  at::Tensor z = at::empty({B, C, d}, v.options());
  at::Tensor lse = at::empty({B, C}, v.options().dtype(at::kFloat));
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "cssfe_attention_fwd_cpu", [&] {
    fwd_impl<scalar_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(),
                       lse.data_ptr<float>(), B, C, d, N, Bq, scale);
  });
  return {z, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(const at::Tensor& grad_z, const at::Tensor& q,
                                                                 const at::Tensor& k, const at::Tensor& v,
                                                                 const at::Tensor& z, const at::Tensor& lse) {
  check_attention(q, k, v);
  check_cpu_contig(grad_z, "grad_z");
  check_cpu_contig(z, "z");
  check_cpu_contig(lse, "lse");
  const int64_t B = k.size(0), d = k.size(1), N = k.size(2), C = q.size(1), Bq = q.size(0);
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const int T = at::get_num_threads();
  // fp32 accumulators: dq per batch row, dk / dv per thread (summed at the end).
  at::Tensor dq32 = at::empty({B, C, d}, q.options().dtype(at::kFloat));
  at::Tensor dk32 = at::zeros({T, B, d, N}, q.options().dtype(at::kFloat));
  at::Tensor dv32 = at::zeros({T, B, d, N}, q.options().dtype(at::kFloat));
  at::Tensor gz = grad_z.to(at::kFloat).contiguous();
  at::Tensor zf = z.to(at::kFloat).contiguous();
  at::Tensor lf = lse.to(at::kFloat).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "cssfe_attention_bwd_cpu", [&] {
    bwd_impl<scalar_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), gz.data_ptr<float>(),
                       zf.data_ptr<float>(), lf.data_ptr<float>(), dq32.data_ptr<float>(), dk32.data_ptr<float>(),
                       dv32.data_ptr<float>(), B, C, d, N, Bq, scale, T);
  });
  at::Tensor dq = Bq == 1 ? dq32.sum(0, true) : dq32;
  return {dq.to(q.scalar_type()), dk32.sum(0).to(k.scalar_type()), dv32.sum(0).to(v.scalar_type())};
}

}  // namespace cssfe
