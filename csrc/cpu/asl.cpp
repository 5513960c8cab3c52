// Asymmetric loss on CPU: loss and gradient w.r.t. the logits in one pass over memory (OpenMP).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <cmath>
#include <algorithm>
#include <type_traits>
#include <vector>

#include "../cssfe.h"
#include "../asl_element.h"
#include "simd_math.h"

namespace cssfe {
namespace {

// Binary targets in fp32 with integer gammas (the usual case): branch-free, vectorized by the
// compiler. Returns the chunk's loss; writes d loss / d x * scale to g. kDefaults: see
// asl_binary_element.
template <bool kDefaults>
inline float asl_binary_loop(const float* __restrict x, const float* __restrict y, float* __restrict g, int64_t n,
                             const AslBinaryParams& P, float scale) {
  float total = 0.0f;
#pragma omp simd reduction(+ : total)
  for (int64_t i = 0; i < n; ++i) {
    const AslValue r = asl_binary_element<simd::SimdMath, kDefaults>(x[i], y[i] != 0.0f, P);
    g[i] = r.grad * scale;
    total += r.loss;
  }
  return total;
}

// One non-template function per variant: target_clones (CSSFE_SIMD_CLONES) takes plain functions.
CSSFE_SIMD_CLONES
float asl_binary_chunk(const float* __restrict x, const float* __restrict y, float* __restrict g, int64_t n,
                       AslBinaryParams P, float scale) {
  return asl_binary_loop<false>(x, y, g, n, P, scale);
}

CSSFE_SIMD_CLONES
float asl_binary_chunk_default_params(const float* __restrict x, const float* __restrict y, float* __restrict g,
                                      int64_t n, AslBinaryParams P, float scale) {
  return asl_binary_loop<true>(x, y, g, n, P, scale);
}

constexpr int64_t kChunk = 1024;

template <typename scalar_t, typename target_t>
void asl_kernel(const scalar_t* x, const target_t* t, scalar_t* grad, int64_t n, double gamma_pos, double gamma_neg,
                double clip, double eps, bool focal_grad, double scale, double* loss_out) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool focal = gamma_pos > 0 || gamma_neg > 0;
  const acc_t gp_ = gamma_pos, gn_ = gamma_neg, clip_ = clip, eps_ = eps, scale_ = scale;
  // Soft targets, fractional gammas, fp64 and tiny eps take the per-element path below.
  const bool binary_ok = std::is_same<acc_t, float>::value && asl_binary_supported(gamma_pos, gamma_neg, clip, eps);
  const AslBinaryParams P = asl_binary_params(gamma_pos, gamma_neg, clip, eps, focal_grad);
  const bool default_params = binary_ok && asl_default_params(P);
  const float scale_f = static_cast<float>(scale);
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
      total += default_params ? asl_binary_chunk_default_params(xs, yf, gs, len, P, scale_f)
                              : asl_binary_chunk(xs, yf, gs, len, P, scale_f);
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

void asl_scale_grad_cpu(const at::Tensor& grad, const at::Tensor& scale) {
  check_cpu_contig(grad, "grad");
  TORCH_CHECK(scale.device().is_cpu() && scale.numel() == 1 && scale.is_floating_point(),
              "native_asl_scale_grad_: scale must be a one-element floating CPU tensor, got ", scale.sizes(), " ",
              scale.scalar_type(), " on ", scale.device());
  const double s = scale.item<double>();
  if (s == 1.0) return;  // autograd's seed when the loss is the last op
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "cssfe_asl_scale_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t sf = static_cast<acc_t>(s);
    scalar_t* g = grad.data_ptr<scalar_t>();
    at::parallel_for(0, grad.numel(), 1 << 15, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) g[i] = static_cast<scalar_t>(static_cast<acc_t>(g[i]) * sf);
    });
  });
}

}  // namespace cssfe
