// Asymmetric loss on CPU: loss and gradient w.r.t. the logits in one pass over memory (OpenMP).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <omp.h>

#include <cmath>
#include <algorithm>
#include <type_traits>
#include <vector>

#include "../cssfe.h"
#include "simd_math.h"

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

// Binary targets in fp32 with integer gammas (the usual case): branch-free, vectorized by the
// compiler (simd_math.h). Returns the chunk's loss; writes d loss / d x * scale to g.
struct BinaryParams {
  float clip, eps, scale;
  int32_t gamma_pos, gamma_neg;
  float focal_grad;  // 1 or 0: multiplies the focal-weight term of the gradient (no branch in the loop)
};

CSSFE_SIMD_CLONES
float asl_binary_chunk(const float* __restrict x, const float* __restrict y, float* __restrict g, int64_t n,
                       BinaryParams P) {
  float total = 0.0f;
#pragma omp simd reduction(+ : total)
  for (int64_t i = 0; i < n; ++i) {
    const float xi = x[i];
    const bool pos = y[i] != 0.0f;
    const float e = simd::exp_nonpositive(xi < 0.0f ? xi : -xi);  // exp(-|x|): no overflow
    const float inv = 1.0f / (1.0f + e);
    const float p = xi >= 0.0f ? inv : e * inv;  // sigmoid(x)
    const float q = xi >= 0.0f ? e * inv : inv;  // 1 - sigmoid(x), without cancellation
    const float dp = p * q;
    const float c = q + P.clip;  // shifted negative probability, clamped at 1 (no gradient past it)
    const float xn = c > 1.0f ? 1.0f : c;
    const float dxn = c > 1.0f ? 0.0f : -dp;
    const float a = pos ? p : xn;  // the probability whose log this element adds
    const float da = pos ? dp : dxn;
    const bool ok = a >= P.eps;
    const float base = simd::log_positive(ok ? a : P.eps);
    const float dbase = ok ? (pos ? q : dxn / a) : 0.0f;
    const int32_t k = pos ? P.gamma_pos : P.gamma_neg;
    const float one_minus = pos ? q : 1.0f - xn;
    const float w = simd::pow_small_int(one_minus, k);
    const float dw = base * static_cast<float>(k) * simd::pow_small_int(one_minus, k > 0 ? k - 1 : 0) * da;
    g[i] = (P.focal_grad * dw - dbase * w) * P.scale;
    total += -base * w;
  }
  return total;
}

constexpr int64_t kChunk = 1024;

template <typename scalar_t, typename target_t>
void asl_kernel(const scalar_t* x, const target_t* t, scalar_t* grad, int64_t n, double gamma_pos, double gamma_neg,
                double clip, double eps, bool focal_grad, double scale, double* loss_out) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool focal = gamma_pos > 0 || gamma_neg > 0;
  const acc_t gp_ = gamma_pos, gn_ = gamma_neg, clip_ = clip, eps_ = eps, scale_ = scale;
  auto small_int = [](double v) { return v >= 0 && v < 16 && v == static_cast<double>(static_cast<int32_t>(v)); };
  // Soft targets, fractional gammas, fp64 and tiny eps take the per-element path below.
  const bool binary_ok = std::is_same<acc_t, float>::value && small_int(gamma_pos) && small_int(gamma_neg) &&
                         eps >= 1.1754943508222875e-38 && eps <= 1.0 && clip >= 0 && clip < 1e30;
  const BinaryParams P{static_cast<float>(clip), static_cast<float>(eps), static_cast<float>(scale),
                       static_cast<int32_t>(gamma_pos), static_cast<int32_t>(gamma_neg), focal_grad ? 1.0f : 0.0f};
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  double total = 0;
  const int threads = n < 16384 ? 1 : at::get_num_threads();
#pragma omp parallel for num_threads(threads) reduction(+ : total) schedule(static)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t lo = c * kChunk, len = std::min(kChunk, n - lo);
    bool binary = binary_ok;
    float xf[kChunk], yf[kChunk], gf[kChunk];
    if (binary) {
      for (int64_t i = 0; i < len; ++i) {
        yf[i] = static_cast<float>(t[lo + i]);
        binary = binary && (yf[i] == 0.0f || yf[i] == 1.0f);
      }
    }
    if (binary) {
      const float* xs = reinterpret_cast<const float*>(x + lo);
      float* gs = grad && std::is_same<scalar_t, float>::value ? reinterpret_cast<float*>(grad + lo) : gf;
      if (!std::is_same<scalar_t, float>::value) {  // half precision: widen to fp32 first
        for (int64_t i = 0; i < len; ++i) xf[i] = static_cast<float>(x[lo + i]);
        xs = xf;
      }
      total += asl_binary_chunk(xs, yf, gs, len, P);
      if (grad && !std::is_same<scalar_t, float>::value) {
        for (int64_t i = 0; i < len; ++i) grad[lo + i] = static_cast<scalar_t>(gf[i]);
      }
      continue;
    }
    double part = 0;
    for (int64_t i = lo; i < lo + len; ++i) {
      acc_t g;
      const acc_t l = asl_element<acc_t>(static_cast<acc_t>(x[i]), static_cast<acc_t>(t[i]), gp_, gn_, clip_, eps_,
                                         focal, focal_grad, &g);
      part += static_cast<double>(l);
      if (grad) grad[i] = static_cast<scalar_t>(g * scale_);
    }
    total += part;
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
