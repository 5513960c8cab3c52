// Class attention on CPU, flash-style over blocks of positions: each block's scores come from one
// batched GEMM (ATen's bmm, i.e. MKL/oneDNN), the softmax is kept online (running max and sum), and
// the B x C x N maps are never stored whole; backward recomputes each block from the saved
// log-sum-exp. Plain per-element loops lost 5-13x to eager PyTorch's GEMMs (docs/performance.md).
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>

#include "../cssfe.h"

namespace cssfe {
namespace {

void check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_cpu_contig(q, "q");
  check_cpu_contig(k, "k");
  check_cpu_contig(v, "v");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.sizes() == k.sizes(), "native_attention: bad shapes");
  TORCH_CHECK(q.size(2) == k.size(1) && (q.size(0) == 1 || q.size(0) == k.size(0)), "native_attention: bad q shape");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(), "native_attention: dtypes differ");
}

// Half precision computes in fp32; fp32 and fp64 in their own type.
at::ScalarType compute_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Positions per block: the block's B x C x t scores stay within ~8 MB (fp32), at least 64.
// CSSFE_CPU_ATTENTION_BLOCK overrides it (tests use it to run the multi-block path on small inputs).
int64_t block_positions(int64_t B, int64_t C, int64_t N) {
  if (const char* env = std::getenv("CSSFE_CPU_ATTENTION_BLOCK")) {
    const long long forced = std::atoll(env);
    if (forced > 0) return std::min<int64_t>(N, forced);
  }
  const int64_t budget = int64_t(1) << 21;
  return std::min(N, std::max<int64_t>(64, budget / std::max<int64_t>(1, B * C)));
}

// q [Bq, C, d] -> [B, C, d] in the compute type (shared queries expanded once, not per block).
at::Tensor batched_queries(const at::Tensor& q, int64_t B, at::ScalarType ct) {
  at::Tensor qc = q.to(ct);
  return q.size(0) == B ? qc : qc.expand({B, q.size(1), q.size(2)}).contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_attention(q, k, v);
  const int64_t B = k.size(0), d = k.size(1), N = k.size(2), C = q.size(1);
  const at::ScalarType ct = compute_type(v);
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  const at::Tensor qs = batched_queries(q, B, ct).mul(scale);
  const at::Tensor kc = k.to(ct), vc = v.to(ct);
  const int64_t T = block_positions(B, C, N);
  if (T >= N) {  // one block: a plain softmax, no running rescale
    at::Tensor s = at::bmm(qs, kc);
    at::Tensor m = std::get<0>(s.max(-1, true));
    s.sub_(m).exp_();
    at::Tensor l = s.sum(-1, true);
    at::Tensor z = at::bmm(s, vc.transpose(1, 2)).div_(l).to(v.scalar_type());
    return {z, m.add_(l.log()).squeeze(-1).to(at::kFloat)};
  }
  const auto opts = qs.options();
  at::Tensor m = at::full({B, C}, -std::numeric_limits<double>::infinity(), opts);
  at::Tensor l = at::zeros({B, C}, opts);
  at::Tensor acc = at::zeros({B, C, d}, opts);
  for (int64_t n0 = 0; n0 < N; n0 += T) {
    const int64_t t = std::min(T, N - n0);
    at::Tensor s = at::bmm(qs, kc.narrow(2, n0, t));  // [B, C, t]
    at::Tensor m_new = at::maximum(m, std::get<0>(s.max(-1)));
    at::Tensor alpha = (m - m_new).exp_();  // 0 on the first block (m = -inf)
    s.sub_(m_new.unsqueeze(-1)).exp_();     // s now holds the block's unnormalised probabilities
    l.mul_(alpha).add_(s.sum(-1));
    acc.mul_(alpha.unsqueeze(-1)).baddbmm_(s, vc.narrow(2, n0, t).transpose(1, 2));
    m = m_new;
  }
  at::Tensor z = acc.div_(l.unsqueeze(-1)).to(v.scalar_type());
  at::Tensor lse = (m + l.log()).to(at::kFloat);
  return {z, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(const at::Tensor& grad_z, const at::Tensor& q,
                                                                 const at::Tensor& k, const at::Tensor& v,
                                                                 const at::Tensor& z, const at::Tensor& lse) {
  check_attention(q, k, v);
  check_cpu_contig(grad_z, "grad_z");
  check_cpu_contig(z, "z");
  check_cpu_contig(lse, "lse");
  const int64_t B = k.size(0), d = k.size(1), N = k.size(2), C = q.size(1);
  const at::ScalarType ct = compute_type(v);
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  const at::Tensor qs = batched_queries(q, B, ct).mul(scale);
  const at::Tensor qst = qs.transpose(1, 2);                         // [B, d, C]
  const at::Tensor kc = k.to(ct), vc = v.to(ct);
  const at::Tensor g = grad_z.to(ct);
  const at::Tensor gt = g.transpose(1, 2);                           // [B, d, C]
  const at::Tensor delta = (g * z.to(ct)).sum(-1).unsqueeze(-1);     // [B, C, 1]
  const at::Tensor lse_c = lse.to(ct).unsqueeze(-1);                 // [B, C, 1]
  const int64_t T = block_positions(B, C, N);
  at::Tensor dq, dk, dv;
  if (T >= N) {  // one block: the gradients come straight out of the GEMMs, no block copies
    at::Tensor p = at::bmm(qs, kc).sub_(lse_c).exp_();                // P [B, C, N]
    dv = at::bmm(gt, p);                                               // dV = g^T P
    at::Tensor ds = at::bmm(g, vc).sub_(delta).mul_(p);                // dS = P * (g V - delta)
    dq = at::bmm(ds, kc.transpose(1, 2));                              // dQ = dS K^T (scaled below)
    dk = at::bmm(qst, ds);                                             // dK = (scale Q)^T dS
  } else {
    dq = at::zeros({B, C, d}, qs.options());
    dk = at::empty({B, d, N}, qs.options());
    dv = at::empty({B, d, N}, qs.options());
    for (int64_t n0 = 0; n0 < N; n0 += T) {
      const int64_t t = std::min(T, N - n0);
      const at::Tensor kb = kc.narrow(2, n0, t), vb = vc.narrow(2, n0, t);
      at::Tensor p = at::bmm(qs, kb).sub_(lse_c).exp_();
      dv.narrow(2, n0, t).copy_(at::bmm(gt, p));
      at::Tensor ds = at::bmm(g, vb).sub_(delta).mul_(p);
      dq.baddbmm_(ds, kb.transpose(1, 2));
      dk.narrow(2, n0, t).copy_(at::bmm(qst, ds));
    }
  }
  dq.mul_(scale);
  if (q.size(0) == 1 && B != 1) dq = dq.sum(0, true);
  return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type())};
}

}  // namespace cssfe
