// The asymmetric loss of one logit and its derivative, shared by the CPU and CUDA kernels (the
// reference is cssfe.losses.AsymmetricLoss; the formulas are in its docstring). Each kernel only
// adds memory access and the reduction, so the CPU tests check the math the GPU runs.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define CSSFE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define CSSFE_HOST_DEVICE inline
#endif

namespace cssfe {

// grad: d loss / d logit, before the reduction's scale (1 for sum, 1 / numel for mean).
struct AslValue {
  float loss;
  float grad;
};

// ---------------------------------------------------------------------- 0/1 targets, integer gammas
struct AslBinaryParams {
  float clip, eps;
  int32_t gamma_pos, gamma_neg;
  float focal_grad;  // 1 or 0: multiplies the focal weight's gradient term (no branch)
};

// Whether the binary form applies to these parameters (the targets are checked per element).
inline bool asl_binary_supported(double gamma_pos, double gamma_neg, double clip, double eps) {
  auto small_int = [](double v) { return v >= 0 && v < 16 && v == static_cast<double>(static_cast<int32_t>(v)); };
  return small_int(gamma_pos) && small_int(gamma_neg) && eps >= 1.1754943508222875e-38 && eps <= 1.0 && clip >= 0 &&
         clip < 1e30;
}

// The binary form's parameters. The gammas become integers only where the form applies (small
// integers then): a NaN or huge gamma never reaches an int conversion.
inline AslBinaryParams asl_binary_params(double gamma_pos, double gamma_neg, double clip, double eps,
                                         bool focal_grad) {
  const bool ok = asl_binary_supported(gamma_pos, gamma_neg, clip, eps);
  return {static_cast<float>(clip), static_cast<float>(eps), ok ? static_cast<int32_t>(gamma_pos) : 0,
          ok ? static_cast<int32_t>(gamma_neg) : 0, focal_grad ? 1.0f : 0.0f};
}

// base^k for an integer 0 <= k < 16 by its bits (0^0 = 1, like torch.pow).
CSSFE_HOST_DEVICE float pow_small_int(float base, int32_t k) {
  const float b2 = base * base, b4 = b2 * b2, b8 = b4 * b4;
  float r = (k & 1) ? base : 1.0f;
  r *= (k & 2) ? b2 : 1.0f;
  r *= (k & 4) ? b4 : 1.0f;
  r *= (k & 8) ? b8 : 1.0f;
  return r;
}

// The parameters the project trains with (ASL's defaults: gammas 0 and 4, no gradient through the
// focal weight): kernels instantiate the binary form for them with the power fixed at compile time
// and the focal weight's gradient term left out.
constexpr int32_t kDefaultGammaPos = 0, kDefaultGammaNeg = 4;

inline bool asl_default_params(const AslBinaryParams& P) {
  return P.gamma_pos == kDefaultGammaPos && P.gamma_neg == kDefaultGammaNeg && P.focal_grad == 0.0f;
}

// Branch-free: one exp, one log, one division. Math supplies exp_nonpositive(x <= 0),
// log_positive(x > 0; NaN gives NaN) and divide(a, b): vectorizable polynomials on CPU, hardware
// approximations on the GPU. kDefaults: P holds the default parameters above (the caller checked),
// so the power is a fixed product and the focal weight's gradient is not computed; else both are
// read from P. On the GPU the kernel is bound by the instructions it issues, not by memory: the
// run-time powers (bit tests and selects for both gammas) took about a third of the binary form's
// ~75 sm_90 instructions per element.
template <class Math, bool kDefaults = false>
CSSFE_HOST_DEVICE AslValue asl_binary_element(float x, bool pos, const AslBinaryParams& P) {
  const float e = Math::exp_nonpositive(-std::fabs(x));  // exp(-|x|): no overflow (one multiply on the GPU)
  const float inv = Math::divide(1.0f, 1.0f + e);
  const float p = x >= 0.0f ? inv : e * inv;  // sigmoid(x)
  const float q = x >= 0.0f ? e * inv : inv;  // 1 - sigmoid(x), without cancellation
  const float dp = p * q;
  const float c = q + P.clip;  // shifted negative probability, clamped at 1 (no gradient past it)
  const float xn = c > 1.0f ? 1.0f : c;
  const float dxn = c > 1.0f ? 0.0f : -dp;
  const float a = pos ? p : xn;  // the probability whose log this element adds
  // max(a, eps) as torch.clamp takes it: a NaN logit's NaN passes, so its loss and gradient are NaN
  const bool clamped = a < P.eps;
  const float base = Math::log_positive(clamped ? P.eps : a);
  const float dbase = clamped ? 0.0f : (pos ? q : Math::divide(dxn, a));
  const float one_minus = pos ? q : 1.0f - xn;
  if constexpr (kDefaults) {
    static_assert(kDefaultGammaPos == 0, "the default form takes a focal weight of 1 for positives");
    const float w = pos ? 1.0f : pow_small_int(one_minus, kDefaultGammaNeg);  // (1 - pt)^gamma
    return {-base * w, -dbase * w};
  } else {
    const int32_t k = pos ? P.gamma_pos : P.gamma_neg;
    const float w = pow_small_int(one_minus, k);
    const float da = pos ? dp : dxn;
    const float dw = base * static_cast<float>(k) * pow_small_int(one_minus, k > 0 ? k - 1 : 0) * da;
    return {-base * w, P.focal_grad * dw - dbase * w};
  }
}

// ---------------------------------------------------------------------- any targets and gammas
// (base)^e, with the integer exponents ASL uses done by multiplication; 0^0 = 1 like torch.pow.
template <typename T>
CSSFE_HOST_DEVICE T ipow(T base, T e) {
  using std::pow;
  if (e == T(0)) return T(1);
  const int ie = static_cast<int>(e);
  if (static_cast<T>(ie) == e && ie > 0 && ie <= 8) {
    T r = base;
    for (int i = 1; i < ie; ++i) r *= base;
    return r;
  }
  return pow(base, e);
}

// One element in T (float, or double for fp64 inputs on CPU): returns the loss, writes the
// derivative to *g.
template <typename T>
CSSFE_HOST_DEVICE T asl_element(T x, T y, T gamma_pos, T gamma_neg, T clip, T eps, bool focal, bool focal_grad, T* g) {
  using std::exp;
  using std::log;
  const T p = T(1) / (T(1) + exp(-x));
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
    const bool clamped = p < eps;  // lets a NaN through, as torch.clamp does
    base += y * log(clamped ? eps : p);
    dbase += clamped ? T(0) : y * (T(1) - p);
  }
  if (y != T(1)) {
    const bool clamped = xn < eps;
    base += (T(1) - y) * log(clamped ? eps : xn);
    dbase += clamped ? T(0) : (T(1) - y) * dxn / xn;
  }
  if (!focal) {
    *g = -dbase;
    return -base;
  }
  const T pt = p * y + xn * (T(1) - y);
  const T ge = gamma_pos * y + gamma_neg * (T(1) - y);
  const T w = ipow(T(1) - pt, ge);
  T d = dbase * w;
  if (focal_grad && ge != T(0)) {
    const T dpt = y * dp + (T(1) - y) * dxn;
    d += base * ge * ipow(T(1) - pt, ge - T(1)) * (-dpt);
  }
  *g = -d;
  return -base * w;
}

}  // namespace cssfe
