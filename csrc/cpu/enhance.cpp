// Progressive head -> medium -> tail enhancement on CPU, all three stages in one call. Classes are
// put in group order first (order / bounds from the host), so each stage is a block of rows: its
// messages M = R[rows, sources] X are GEMMs over the sources (earlier groups' outputs, and under no
// mask also the original z of the rest), one image per task (csrc/cpu/image_tasks.h). Under the
// distribution-aware mask R is zero outside the earlier groups' columns, and those GEMMs are skipped.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <vector>

#include "../cssfe.h"
#include "blas.h"
#include "image_tasks.h"

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

// The call's shared data, in group order: R permuted on both sides, its row sums, and for each
// stage whether any of its sources lies in its own or a later group (only without the mask; not
// looked up where the caller's earlier_only says so).
struct Plan {
  at::Tensor r;  // [C, C] fp32, rows and columns in group order
  std::vector<float> row_sum;
  int64_t bounds[4];
  bool later_sources[3];
  int64_t C, L;
  bool blas;
};

// Whether R (in group order) has a nonzero (or NaN) entry in rows [b0, b1) from column b0 on: a
// plain scan, where ATen's slice / ne / any / item cost a few microseconds each per call.
bool later_nonzero(const Plan& p, int64_t b0, int64_t b1) {
  const float* r = p.r.data_ptr<float>();
  for (int64_t i = b0; i < b1; ++i)
    for (int64_t j = b0; j < p.C; ++j)
      if (r[i * p.C + j] != 0.f) return true;
  return false;
}

Plan make_plan(const at::Tensor& affinity, const at::Tensor& order, const at::Tensor& bounds, int64_t L,
               int64_t earlier_only) {
  Plan p;
  p.C = affinity.size(0);
  p.L = L;
  p.r = affinity.index_select(0, order).index_select(1, order).contiguous();
  const at::Tensor rs = p.r.sum(1);
  p.row_sum.assign(rs.data_ptr<float>(), rs.data_ptr<float>() + p.C);
  for (int k = 0; k < 4; ++k) p.bounds[k] = bounds.data_ptr<int64_t>()[k];
  TORCH_CHECK(p.bounds[0] == 0 && p.bounds[3] == p.C, "native_enhance: bounds must run from 0 to C");
  for (int g = 0; g < 3; ++g) {
    const int64_t b0 = p.bounds[g], b1 = p.bounds[g + 1];
    p.later_sources[g] = b1 > b0 && !((earlier_only >> g) & 1) && later_nonzero(p, b0, b1);
  }
  p.blas = cpu_blas::direct({p.C, L});
  return p;
}

// m [rows of stage g, L] = R[stage rows, earlier] x[earlier] + R[stage rows, rest] z[rest] (all in
// group order; x holds the earlier stages' outputs).
void stage_messages(const Plan& p, int g, const float* x, const float* z, float* m) {
  const int64_t b0 = p.bounds[g], n = p.bounds[g + 1] - b0, C = p.C, L = p.L;
  const float* r = p.r.data_ptr<float>() + b0 * C;
  cpu_blas::gemm<float>(p.blas, false, false, n, L, b0, 1.f, r, C, x, L, 0.f, m, L);
  if (p.later_sources[g]) {
    cpu_blas::gemm<float>(p.blas, false, false, n, L, C - b0, 1.f, r + b0, C, z + b0 * L, L, 1.f, m, L);
  }
}

// One image in group order: z, w -> out.
void forward_image(const Plan& p, const float* z, const float* w, float* out) {
  const int64_t L = p.L;
  for (int g = 0; g < 3; ++g) {
    const int64_t b0 = p.bounds[g], b1 = p.bounds[g + 1];
    if (b1 == b0) continue;
    stage_messages(p, g, out, z, out + b0 * L);  // the stage's rows of out hold m until rescaled
    for (int64_t i = b0; i < b1; ++i) {
      const float inv = 1.f / (1.f + w[i] * p.row_sum[i]);
      float* o = out + i * L;
      const float* zi = z + i * L;
#pragma omp simd
      for (int64_t l = 0; l < L; ++l) o[l] = (zi[l] + w[i] * o[l]) * inv;
    }
  }
}

// One image in group order, stages in reverse. acc starts as the output's gradient and collects the
// gradient that later stages send to each output; dz, dm, dw are written; m is [C, L] scratch.
void backward_image(const Plan& p, const float* z, const float* w, const float* out, float* acc, float* dz,
                    float* dm, float* dw, float* m) {
  const int64_t C = p.C, L = p.L;
  std::fill(dz, dz + C * L, 0.f);
  for (int g = 2; g >= 0; --g) {
    const int64_t b0 = p.bounds[g], b1 = p.bounds[g + 1];
    if (b1 == b0) continue;
    stage_messages(p, g, out, z, m + b0 * L);
    for (int64_t i = b0; i < b1; ++i) {
      const float inv = 1.f / (1.f + w[i] * p.row_sum[i]), rs = p.row_sum[i];
      const float *a = acc + i * L, *o = out + i * L, *mi = m + i * L;
      float *dzi = dz + i * L, *dmi = dm + i * L;
      float dwi = 0.f;
#pragma omp simd reduction(+ : dwi)
      for (int64_t l = 0; l < L; ++l) {
        dzi[l] += a[l] * inv;
        dmi[l] = a[l] * w[i] * inv;
        dwi += a[l] * (mi[l] - rs * o[l]);
      }
      dw[i] = dwi * inv;
    }
    // Each message's gradient goes to its sources: earlier stages' outputs, or the original z.
    const float* r = p.r.data_ptr<float>() + b0 * C;
    const int64_t n = b1 - b0;
    cpu_blas::gemm<float>(p.blas, true, false, b0, L, n, 1.f, r, C, dm + b0 * L, L, 1.f, acc, L);
    if (p.later_sources[g]) {
      cpu_blas::gemm<float>(p.blas, true, false, C - b0, L, n, 1.f, r + b0, C, dm + b0 * L, L, 1.f, dz + b0 * L, L);
    }
  }
}

// Rows of one image between the caller's class order and group order, converting dtypes.
template <typename src_t, typename dst_t>
void gather_rows(const src_t* src, const int64_t* order, int64_t C, int64_t L, dst_t* dst) {
  for (int64_t p = 0; p < C; ++p) {
    const src_t* s = src + order[p] * L;
    dst_t* d = dst + p * L;
    for (int64_t l = 0; l < L; ++l) d[l] = static_cast<dst_t>(s[l]);
  }
}

template <typename src_t, typename dst_t>
void scatter_rows(const src_t* src, const int64_t* order, int64_t C, int64_t L, dst_t* dst) {
  for (int64_t p = 0; p < C; ++p) {
    const src_t* s = src + p * L;
    dst_t* d = dst + order[p] * L;
    for (int64_t l = 0; l < L; ++l) d[l] = static_cast<dst_t>(s[l]);
  }
}

}  // namespace

at::Tensor enhance_fwd_cpu(const at::Tensor& z, const at::Tensor& affinity, const at::Tensor& order,
                           const at::Tensor& bounds, const at::Tensor& w, int64_t earlier_only) {
  const NoAutocast no_autocast;
  check_enhance(z, affinity, order, bounds, w);
  const int64_t B = z.size(0), C = z.size(1), L = z.size(2);
  const Plan p = make_plan(affinity, order, bounds, L, earlier_only);
  at::Tensor out = at::empty({B, C, L}, z.options());
  const int64_t* ord = order.data_ptr<int64_t>();
  const float* wp = w.data_ptr<float>();
  const ImageRuns runs = split_images(B);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "cssfe_enhance_fwd_cpu", [&] {
    const scalar_t* zp = z.data_ptr<scalar_t>();
    scalar_t* outp = out.data_ptr<scalar_t>();
    for_each_run(runs, [&](int64_t t) {
      std::vector<float> zs(C * L), xs(C * L), ws(C);
      for (int64_t b = runs.begin(t); b < runs.end(t); ++b) {
        gather_rows(zp + b * C * L, ord, C, L, zs.data());
        gather_rows(wp + b * C, ord, C, 1, ws.data());
        forward_image(p, zs.data(), ws.data(), xs.data());
        scatter_rows(xs.data(), ord, C, L, outp + b * C * L);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> enhance_bwd_cpu(const at::Tensor& grad, const at::Tensor& z,
                                                               const at::Tensor& affinity, const at::Tensor& order,
                                                               const at::Tensor& bounds, const at::Tensor& w,
                                                               const at::Tensor& out, int64_t earlier_only) {
  const NoAutocast no_autocast;
  check_enhance(z, affinity, order, bounds, w);
  check_cpu_contig(grad, "grad");
  check_cpu_contig(out, "out");
  TORCH_CHECK(grad.sizes() == z.sizes() && out.sizes() == z.sizes(), "native_enhance_bwd: grad and out must be [B, C, L]");
  TORCH_CHECK(grad.scalar_type() == z.scalar_type() && out.scalar_type() == z.scalar_type(),
              "native_enhance_bwd: grad, z and out must share a dtype");
  const int64_t B = z.size(0), C = z.size(1), L = z.size(2);
  const Plan p = make_plan(affinity, order, bounds, L, earlier_only);
  at::Tensor dz = at::empty({B, C, L}, z.options());
  at::Tensor dm = at::empty({B, C, L}, z.options().dtype(at::kFloat));
  at::Tensor dw = at::empty({B, C}, z.options().dtype(at::kFloat));
  const int64_t* ord = order.data_ptr<int64_t>();
  const float* wp = w.data_ptr<float>();
  float *dmp = dm.data_ptr<float>(), *dwp = dw.data_ptr<float>();
  const ImageRuns runs = split_images(B);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "cssfe_enhance_bwd_cpu", [&] {
    const scalar_t *zp = z.data_ptr<scalar_t>(), *op = out.data_ptr<scalar_t>(), *gp = grad.data_ptr<scalar_t>();
    scalar_t* dzp = dz.data_ptr<scalar_t>();
    for_each_run(runs, [&](int64_t t) {
      std::vector<float> zs(C * L), os(C * L), acc(C * L), dzs(C * L), dms(C * L), m(C * L), ws(C), dws(C);
      for (int64_t b = runs.begin(t); b < runs.end(t); ++b) {
        gather_rows(zp + b * C * L, ord, C, L, zs.data());
        gather_rows(op + b * C * L, ord, C, L, os.data());
        gather_rows(gp + b * C * L, ord, C, L, acc.data());
        gather_rows(wp + b * C, ord, C, 1, ws.data());
        backward_image(p, zs.data(), ws.data(), os.data(), acc.data(), dzs.data(), dms.data(), dws.data(), m.data());
        scatter_rows(dzs.data(), ord, C, L, dzp + b * C * L);
        scatter_rows(dms.data(), ord, C, L, dmp + b * C * L);
        scatter_rows(dws.data(), ord, C, 1, dwp + b * C);
      }
    });
  });
  return {dz, dm, dw};
}

}  // namespace cssfe
