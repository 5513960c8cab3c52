// Declarations of the native (C++/CUDA) kernels behind the cssfe::native_* operators.
// Semantics: see cssfe/ops/reference.py.
#pragma once
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/extension.h>
#include <tuple>

namespace cssfe {

// ASL: loss (0-d) and d loss / d logits in one pass. grad is empty when need_grad is false.
std::tuple<at::Tensor, at::Tensor> asl_cpu(const at::Tensor& logits, const at::Tensor& targets, double gamma_pos,
                                           double gamma_neg, double clip, double eps, bool focal_grad, bool mean,
                                           bool need_grad);
// ASL backward: grad *= scale in place (scale: the 0-d incoming loss gradient), nothing done when it
// is 1 (the loss was the last op). Computed in fp32 (fp64 for fp64 grad), rounded once.
void asl_scale_grad_cpu(const at::Tensor& grad, const at::Tensor& scale);
// Class attention: q [Bq, C, d] (Bq in {1, B}), k, v [B, d, N] -> z [B, C, d] (v's dtype), lse [B, C] fp32.
std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(const at::Tensor& grad_z, const at::Tensor& q,
                                                                 const at::Tensor& k, const at::Tensor& v,
                                                                 const at::Tensor& z, const at::Tensor& lse);
// Progressive enhancement: z [B, C, L], affinity [C, C] fp32, order [C] int64 (classes sorted by group),
// bounds [4] int64 (group g occupies order[bounds[g]:bounds[g+1]]), w = lam * gate [B, C] fp32.
// earlier_only: bit g set when the caller knows that R is zero from stage g's rows to the positions
// from bounds[g] on (their own and later groups, as under the distribution-aware mask); the kernels
// skip those sources unread. A clear bit: they check R themselves (or multiply the zeros).
at::Tensor enhance_fwd_cpu(const at::Tensor& z, const at::Tensor& affinity, const at::Tensor& order,
                           const at::Tensor& bounds, const at::Tensor& w, int64_t earlier_only);
// -> dz [B, C, L] (z's dtype), dm [B, C, L] fp32 (grad of each class's message), dw [B, C] fp32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> enhance_bwd_cpu(const at::Tensor& grad, const at::Tensor& z,
                                                               const at::Tensor& affinity, const at::Tensor& order,
                                                               const at::Tensor& bounds, const at::Tensor& w,
                                                               const at::Tensor& out, int64_t earlier_only);

// Excludes autocast for a native operator's lifetime: its products run in the dtypes it chooses, also
// when the caller is under autocast (which would otherwise turn an inner at::bmm into a half-precision
// one, and the next product's fp32 operands no longer match it).
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

inline void check_cpu_contig(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "cssfe native CPU kernel: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), "cssfe native kernel: ", name, " must be contiguous");
}

}  // namespace cssfe

#ifdef CSSFE_WITH_CUDA
namespace cssfe {
std::tuple<at::Tensor, at::Tensor> asl_cuda(const at::Tensor& logits, const at::Tensor& targets, double gamma_pos,
                                            double gamma_neg, double clip, double eps, bool focal_grad, bool mean,
                                            bool need_grad);
// The scale is read on the device: no synchronisation, and a 1 costs one launch and no memory traffic.
void asl_scale_grad_cuda(const at::Tensor& grad, const at::Tensor& scale);
std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(const at::Tensor& grad_z, const at::Tensor& q,
                                                                  const at::Tensor& k, const at::Tensor& v,
                                                                  const at::Tensor& z, const at::Tensor& lse);
at::Tensor enhance_fwd_cuda(const at::Tensor& z, const at::Tensor& affinity, const at::Tensor& order,
                            const at::Tensor& bounds, const at::Tensor& w, int64_t earlier_only);
std::tuple<at::Tensor, at::Tensor, at::Tensor> enhance_bwd_cuda(const at::Tensor& grad, const at::Tensor& z,
                                                                const at::Tensor& affinity, const at::Tensor& order,
                                                                const at::Tensor& bounds, const at::Tensor& w,
                                                                const at::Tensor& out, int64_t earlier_only);
}  // namespace cssfe
#endif
