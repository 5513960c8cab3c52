// Asymmetric loss on CPU: loss and gradient w.r.t. the logits in one pass over memory (OpenMP).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <omp.h>

#include <cmath>
#include <vector>

#include "../cssfe.h"

namespace cssfe {
namespace {

template <typename T>
inline T ipow(T base, T e) {
  // (base)^e with the integer exponents ASL uses done by multiplication; 0^0 = 1 like torch.pow.
  if (e == T(0)) return T(1);
  int ie = static_cast<int>(e);
  if (static_cast<T>(ie) == e && ie > 0 && ie <= 8) {
    T r = base;
    for (int i = 1; i < ie; ++i) r *= base;
    return r;
  }
  return std::pow(base, e);
}

// One element: returns the loss, writes d loss / d x (unscaled) to *g.
template <typename T>
inline T asl_element(T x, T y, T gp_, T gn_, T clip, T eps, bool focal, bool focal_grad, T* g) {
  const T p = T(1) / (T(1) + std::exp(-x));
  const T dp = p * (T(1) - p);
  T xn = T(1) - p;
  T dxn = -dp;
  if (clip > T(0)) {
    const T c = xn + clip;
    if (c > T(1)) {  // clamp(max=1): no gradient past the clamp
      xn = T(1);
      dxn = T(0);
    } else {
      xn = c;
    }
  }
  T base = 0, dbase = 0;
  if (y != T(0)) {
    const bool ok = p >= eps;
    base += y * std::log(ok ? p : eps);
    dbase += ok ? y * (T(1) - p) : T(0);
  }
  if (y != T(1)) {
    const bool ok = xn >= eps;
    base += (T(1) - y) * std::log(ok ? xn : eps);
    dbase += ok ? (T(1) - y) * dxn / xn : T(0);
  }
  if (!focal) {
    *g = -dbase;
    return -base;
  }
  const T pt = p * y + xn * (T(1) - y);
  const T ge = gp_ * y + gn_ * (T(1) - y);
  const T w = ipow(T(1) - pt, ge);
  T d = dbase * w;
  if (focal_grad && ge != T(0)) {
    const T dpt = y * dp + (T(1) - y) * dxn;
    d += base * ge * ipow(T(1) - pt, ge - T(1)) * (-dpt);
  }
  *g = -d;
  return -base * w;
}

template <typename scalar_t, typename target_t>
void asl_kernel(const scalar_t* x, const target_t* t, scalar_t* grad, int64_t n, double gamma_pos, double gamma_neg,
                double clip, double eps, bool focal_grad, double scale, double* loss_out) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool focal = gamma_pos > 0 || gamma_neg > 0;
  const acc_t gp_ = gamma_pos, gn_ = gamma_neg, clip_ = clip, eps_ = eps, scale_ = scale;
  double total = 0;
  const int threads = n < 16384 ? 1 : at::get_num_threads();
#pragma omp parallel for num_threads(threads) reduction(+ : total) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    acc_t g;
    const acc_t l = asl_element<acc_t>(static_cast<acc_t>(x[i]), static_cast<acc_t>(t[i]), gp_, gn_, clip_, eps_,
                                       focal, focal_grad, &g);
    total += static_cast<double>(l);
    if (grad) grad[i] = static_cast<scalar_t>(g * scale_);
  }
  *loss_out = total * scale;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> asl_cpu(const at::Tensor& logits, const at::Tensor& targets, double gamma_pos,
                                           double gamma_neg, double clip, double eps, bool focal_grad, bool mean,
                                           bool need_grad) {
  check_cpu_contig(logits, "logits");
  check_cpu_contig(targets, "targets");
  TORCH_CHECK(logits.sizes() == targets.sizes(), "native_asl: logits and targets shapes differ");
  const int64_t n = logits.numel();
  const auto loss_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor grad = need_grad ? at::empty_like(logits) : at::empty({0}, logits.options());
  const double scale = mean ? (n > 0 ? 1.0 / static_cast<double>(n) : std::nan("")) : 1.0;
  double loss = 0;
  at::Tensor tgt = targets.scalar_type() == at::kBool ? targets.view(at::kByte) : targets;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cssfe_asl_cpu", [&] {
    using logit_t = scalar_t;
    scalar_t* g = need_grad ? grad.data_ptr<scalar_t>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kByte, tgt.scalar_type(), "cssfe_asl_cpu_t", [&] {
      asl_kernel<logit_t, scalar_t>(logits.data_ptr<logit_t>(), tgt.data_ptr<scalar_t>(), g, n, gamma_pos, gamma_neg,
                                    clip, eps, focal_grad, scale, &loss);
    });
  });
  return {at::scalar_tensor(loss, logits.options().dtype(loss_dtype)), grad};
}

}  // namespace cssfe
