// Progressive head -> medium -> tail enhancement on CPU, all three stages in one call (OpenMP over
// the batch). Classes are visited in group order (order / bounds from the host).
#include <ATen/Dispatch.h>
#include <omp.h>

#include <vector>

#include "../cssfe.h"

namespace cssfe {
namespace {

void check_enhance(const at::Tensor& z, const at::Tensor& r, const at::Tensor& order, const at::Tensor& bounds,
                   const at::Tensor& w) {
  check_cpu_contig(z, "z");
  check_cpu_contig(r, "affinity");
  check_cpu_contig(order, "order");
  check_cpu_contig(bounds, "bounds");
  check_cpu_contig(w, "w");
  TORCH_CHECK(z.dim() == 3, "native_enhance: z must be [B, C, L]");
  const int64_t C = z.size(1);
  TORCH_CHECK(r.scalar_type() == at::kFloat && r.dim() == 2 && r.size(0) == C && r.size(1) == C,
              "native_enhance: affinity must be fp32 [C, C]");
  TORCH_CHECK(order.scalar_type() == at::kLong && order.numel() == C, "native_enhance: order must be int64 [C]");
  TORCH_CHECK(bounds.scalar_type() == at::kLong && bounds.numel() == 4, "native_enhance: bounds must be int64 [4]");
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.dim() == 2 && w.size(0) == z.size(0) && w.size(1) == C,
              "native_enhance: w must be fp32 [B, C]");
}

}  // namespace

at::Tensor enhance_fwd_cpu(const at::Tensor& z, const at::Tensor& affinity, const at::Tensor& order,
                           const at::Tensor& bounds, const at::Tensor& w) {
  check_enhance(z, affinity, order, bounds, w);
  const int64_t B = z.size(0), C = z.size(1), L = z.size(2);
  at::Tensor zf = z.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({B, C, L}, z.options().dtype(at::kFloat));
  const float* zp = zf.data_ptr<float>();
  const float* rp = affinity.data_ptr<float>();
  const int64_t* op = order.data_ptr<int64_t>();
  const int64_t* bd = bounds.data_ptr<int64_t>();
  const float* wp = w.data_ptr<float>();
  float* outp = out.data_ptr<float>();
  std::vector<float> rs(C, 0.f);
  for (int64_t i = 0; i < C; ++i)
    for (int64_t j = 0; j < C; ++j) rs[i] += rp[i * C + j];
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<float> m(L);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      const float* zb = zp + b * C * L;
      float* ob = outp + b * C * L;
      for (int g = 0; g < 3; ++g) {
        for (int64_t pi = bd[g]; pi < bd[g + 1]; ++pi) {
          const int64_t i = op[pi];
          std::fill(m.begin(), m.end(), 0.f);
          for (int64_t pj = 0; pj < C; ++pj) {
            const int64_t j = op[pj];
            const float r = rp[i * C + j];
            if (r == 0.f) continue;
            const float* s = (pj < bd[g] ? ob : zb) + j * L;  // earlier groups: updated rows
            for (int64_t l = 0; l < L; ++l) m[l] += r * s[l];
          }
          const float wi = wp[b * C + i];
          const float inv = 1.f / (1.f + wi * rs[i]);
          const float* zi = zb + i * L;
          float* oi = ob + i * L;
          for (int64_t l = 0; l < L; ++l) oi[l] = (zi[l] + wi * m[l]) * inv;
        }
      }
    }
  }
  return out.to(z.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> enhance_bwd_cpu(const at::Tensor& grad, const at::Tensor& z,
                                                               const at::Tensor& affinity, const at::Tensor& order,
                                                               const at::Tensor& bounds, const at::Tensor& w,
                                                               const at::Tensor& out) {
  check_enhance(z, affinity, order, bounds, w);
  check_cpu_contig(grad, "grad");
  check_cpu_contig(out, "out");
  const int64_t B = z.size(0), C = z.size(1), L = z.size(2);
  at::Tensor zf = z.to(at::kFloat).contiguous();
  at::Tensor of = out.to(at::kFloat).contiguous();
  at::Tensor acc = grad.to(at::kFloat).clone().contiguous();  // running grad w.r.t. each class's output
  at::Tensor dz = at::zeros({B, C, L}, z.options().dtype(at::kFloat));
  at::Tensor dm = at::zeros({B, C, L}, z.options().dtype(at::kFloat));
  at::Tensor dw = at::zeros({B, C}, z.options().dtype(at::kFloat));
  const float* zp = zf.data_ptr<float>();
  const float* outp = of.data_ptr<float>();
  const float* rp = affinity.data_ptr<float>();
  const int64_t* op = order.data_ptr<int64_t>();
  const int64_t* bd = bounds.data_ptr<int64_t>();
  const float* wp = w.data_ptr<float>();
  float* accp = acc.data_ptr<float>();
  float* dzp = dz.data_ptr<float>();
  float* dmp = dm.data_ptr<float>();
  float* dwp = dw.data_ptr<float>();
  std::vector<float> rs(C, 0.f);
  for (int64_t i = 0; i < C; ++i)
    for (int64_t j = 0; j < C; ++j) rs[i] += rp[i * C + j];
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<float> m(L);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      const float* zb = zp + b * C * L;
      const float* ob = outp + b * C * L;
      float* ab = accp + b * C * L;
      float* dzb = dzp + b * C * L;
      float* dmb = dmp + b * C * L;
      for (int g = 2; g >= 0; --g) {
        for (int64_t pi = bd[g]; pi < bd[g + 1]; ++pi) {
          const int64_t i = op[pi];
          std::fill(m.begin(), m.end(), 0.f);
          for (int64_t pj = 0; pj < C; ++pj) {
            const int64_t j = op[pj];
            const float r = rp[i * C + j];
            if (r == 0.f) continue;
            const float* s = (pj < bd[g] ? ob : zb) + j * L;
            for (int64_t l = 0; l < L; ++l) m[l] += r * s[l];
          }
          const float wi = wp[b * C + i];
          const float inv = 1.f / (1.f + wi * rs[i]);
          const float* gi = ab + i * L;
          const float* oi = ob + i * L;
          float* dmi = dmb + i * L;
          float* dzi = dzb + i * L;
          float dwi = 0.f;
          for (int64_t l = 0; l < L; ++l) {
            dzi[l] += gi[l] * inv;
            dmi[l] = gi[l] * wi * inv;
            dwi += gi[l] * (m[l] - rs[i] * oi[l]);
          }
          dwp[b * C + i] = dwi * inv;
        }
        // Send each message's gradient to its sources: earlier groups' outputs, or the original z.
        for (int64_t pi = bd[g]; pi < bd[g + 1]; ++pi) {
          const int64_t i = op[pi];
          const float* dmi = dmb + i * L;
          for (int64_t pj = 0; pj < C; ++pj) {
            const int64_t j = op[pj];
            const float r = rp[i * C + j];
            if (r == 0.f) continue;
            float* dst = (pj < bd[g] ? ab : dzb) + j * L;
            for (int64_t l = 0; l < L; ++l) dst[l] += r * dmi[l];
          }
        }
      }
    }
  }
  return {dz.to(z.scalar_type()), dm, dw};
}

}  // namespace cssfe
