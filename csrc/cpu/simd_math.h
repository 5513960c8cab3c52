// Branch-free float exp/log (Cephes polynomials, about 1 ulp) that compilers vectorize inside
// `#pragma omp simd` loops; libm's scalar calls stop the loop from vectorizing.
#pragma once
#include <cstdint>
#include <cstring>

// Functions marked CSSFE_SIMD_CLONES get AVX-512 / AVX2 copies chosen at load time (ifunc),
// so one binary runs on any x86-64 and uses the widest vectors the machine has.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__) && defined(__linux__)
#define CSSFE_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CSSFE_SIMD_CLONES
#endif

namespace cssfe {
namespace simd {

inline float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}

inline int32_t float_to_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}

// exp(x) for x <= 0 (NaN propagates); results below 2^-126 are returned as about 1e-38.
inline float exp_nonpositive(float x) {
  x = x < -87.3f ? -87.3f : x;
  const float shifted = x * 1.44269504088896341f + 12582912.0f;  // round to nearest via 1.5 * 2^23
  const float n = shifted - 12582912.0f;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  return y * bits_to_float((static_cast<int32_t>(n) + 127) << 23);
}

// Natural log of a positive normal float; NaN gives NaN (the ASL kernel relies on it).
inline float log_positive(float x) {
  const int32_t bits = float_to_bits(x);
  float e = static_cast<float>(((bits >> 23) & 0xff) - 126);
  float m = bits_to_float((bits & 0x007fffff) | 0x3f000000);  // mantissa in [0.5, 1)
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1.0f : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += e * -2.12194440e-4f;
  y += -0.5f * z;
  const float r = m + y + e * 0.693359375f;
  return x != x ? x : r;  // a NaN's exponent bits would otherwise give a finite result
}

// The Math policy of asl_binary_element (csrc/asl_element.h) on CPU.
struct SimdMath {
  static inline float exp_nonpositive(float x) { return simd::exp_nonpositive(x); }
  static inline float log_positive(float x) { return simd::log_positive(x); }
  static inline float divide(float a, float b) { return a / b; }
};

}  // namespace simd
}  // namespace cssfe
