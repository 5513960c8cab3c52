// Row-major GEMM for the CPU kernels, on the Fortran BLAS that torch links (MKL on x86-64 wheels).
// ATen's matmul costs a few microseconds of dispatch per call, comparable to one image's GEMM at
// the head's sizes, and the kernels make several per image. The symbols are weak: a torch without
// them still loads the extension, and gemm() then goes through ATen.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <type_traits>

extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*, const int*,
            const double*, const int*, const double*, double*, const int*) __attribute__((weak));
}

namespace cssfe {
namespace cpu_blas {

// Whether gemm() may call the BLAS directly for operands of these sizes (LP64: 32-bit sizes).
// CSSFE_CPU_GEMM=aten forces the ATen path (tests use it; it is the path of a torch whose BLAS
// symbols are not visible).
inline bool direct(std::initializer_list<int64_t> sizes) {
  const char* env = std::getenv("CSSFE_CPU_GEMM");
  if (!sgemm_ || !dgemm_ || (env && std::strcmp(env, "aten") == 0)) return false;
  return std::all_of(sizes.begin(), sizes.end(), [](int64_t s) { return s <= INT_MAX; });
}

// C[M, Nc] = alpha * op(A) op(B) + beta * C, row-major, op(A) [M, K] and op(B) [K, Nc]; beta = 0
// ignores C's old contents (NaN included). The column-major BLAS computes C^T = op(B)^T op(A)^T.
template <typename T>
void gemm(bool use_blas, bool trans_a, bool trans_b, int64_t M, int64_t Nc, int64_t K, T alpha, const T* A,
          int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 0 || Nc == 0) return;
  if (K == 0) {  // BLAS leaves C alone; here too, except for the scaling by beta
    for (int64_t i = 0; i < M; ++i) {
      for (int64_t j = 0; j < Nc; ++j) C[i * ldc + j] = beta == T(0) ? T(0) : beta * C[i * ldc + j];
    }
    return;
  }
  if (use_blas) {
    const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
    const int m = static_cast<int>(Nc), n = static_cast<int>(M), k = static_cast<int>(K);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    if constexpr (std::is_same<T, float>::value) {
      sgemm_(&ta, &tb, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
    } else {
      dgemm_(&ta, &tb, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
    }
    return;
  }
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor a = at::from_blob(const_cast<T*>(A), {trans_a ? K : M, trans_a ? M : K}, {lda, 1}, opts);
  at::Tensor b = at::from_blob(const_cast<T*>(B), {trans_b ? Nc : K, trans_b ? K : Nc}, {ldb, 1}, opts);
  at::Tensor c = at::from_blob(C, {M, Nc}, {ldc, 1}, opts);
  at::addmm_out(c, c, trans_a ? a.t() : a, trans_b ? b.t() : b, beta, alpha);
}

}  // namespace cpu_blas
}  // namespace cssfe
