// Host emulation of the CUDA progressive enhancement (csrc/cuda/enhance_block.h): the same block
// program, its phases run as plain loops, forwards or backwards, and its scratch filled with NaN
// before each tile so that a read of a row no phase wrote shows. Built and called by
// tests/ops/test_cuda.py with the system C++ compiler (no CUDA needed).
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "../../csrc/cuda/enhance_block.h"

namespace {

struct HostExec {
  bool reverse;
  template <class F>
  void parallel(int n, F&& f) {
    if (reverse)
      for (int k = n - 1; k >= 0; --k) f(k);
    else
      for (int k = 0; k < n; ++k) f(k);
  }
  template <class F>
  bool any(int p0, int p1, int q0, int q1, F&& f) {
    for (int i = 0; i < p1 - p0; ++i)
      for (int j = 0; j < q1 - q0; ++j)
        if (reverse ? f(p1 - 1 - i, q1 - 1 - j) : f(p0 + i, q0 + j)) return true;
    return false;
  }
};

cssfe::enhance_block::Args args(const float* z, const float* rp, const float* wp, const float* rsp,
                                const int64_t* order, int64_t B, int64_t C, int64_t L, int64_t s1, int64_t s2,
                                int64_t width, int64_t earlier_only) {
  return {z, rp, wp, rsp, order, B, C, L, s1, s2, width, earlier_only};
}

template <class Run>
void each_tile(const cssfe::enhance_block::Args& a, int tiles, bool reverse, Run run) {
  std::vector<float> scratch(static_cast<size_t>(tiles * a.C * a.width));
  const int64_t n = cssfe::enhance_block::num_tiles(a);
  for (int64_t i = 0; i < n; ++i) {
    std::fill(scratch.begin(), scratch.end(), std::numeric_limits<float>::quiet_NaN());
    run(reverse ? n - 1 - i : i, scratch.data());
  }
}

}  // namespace

extern "C" void enhance_fwd_host(const float* z, const float* rp, const float* wp, const float* rsp,
                                 const int64_t* order, int64_t B, int64_t C, int64_t L, int64_t s1, int64_t s2,
                                 int64_t width, int64_t earlier_only, int reverse, float* out) {
  const auto a = args(z, rp, wp, rsp, order, B, C, L, s1, s2, width, earlier_only);
  HostExec ex{reverse != 0};
  each_tile(a, cssfe::enhance_block::kForwardTiles, reverse != 0, [&](int64_t t, float* scratch) {
    cssfe::enhance_block::forward_tile(ex, a, out, t, scratch);
  });
}

extern "C" void enhance_bwd_host(const float* z, const float* rp, const float* wp, const float* rsp,
                                 const int64_t* order, int64_t B, int64_t C, int64_t L, int64_t s1, int64_t s2,
                                 int64_t width, int64_t earlier_only, int reverse, const float* grad, const float* out,
                                 float* dz, float* dm, float* dw_part) {
  const auto a = args(z, rp, wp, rsp, order, B, C, L, s1, s2, width, earlier_only);
  HostExec ex{reverse != 0};
  each_tile(a, cssfe::enhance_block::kBackwardTiles, reverse != 0, [&](int64_t t, float* scratch) {
    cssfe::enhance_block::backward_tile(ex, a, grad, out, dz, dm, dw_part, t, scratch);
  });
}
