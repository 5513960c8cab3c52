// The CUDA progressive enhancement's block program, written once for two callers: the kernels in
// enhance.cu, and a host emulation that the CPU tests run (tests/ops/enhance_block_host.cpp), so
// the GPU's arithmetic and indexing are checked where no GPU is.
//
// One block owns a tile: one image b and `width` consecutive columns l of z [B, C, L]. The tile's
// C rows sit in scratch (shared memory, or global memory when C is too large for it) in group
// order, so each stage (head, medium, tail) is a block of rows, and the three stages run in one
// launch with barriers between them. The block's work is a sequence of phases; in a phase, the
// items 0..n-1 are independent (no item reads what another writes) and may run in any order.
// `Exec::parallel(n, f)` runs one phase: on the GPU the block's threads share the items and meet
// at a barrier; on the host, one loop (forwards or backwards: a dependency between items would
// show as a difference). `Exec::any(p0, p1, q0, q1, f)`: whether f(p, q) holds for some p in
// [p0, p1) and q in [q0, q1), known to every thread (a barrier on the GPU).
#pragma once
#include <cstdint>

#ifdef __CUDACC__
#define CSSFE_BLOCK __device__ __forceinline__
#else
#define CSSFE_BLOCK inline
#endif

namespace cssfe {
namespace enhance_block {

// Group order: position p holds class order[p]; group g holds positions [bounds[g], bounds[g+1]).
struct Args {
  const float* z;        // [B, C, L], class-indexed
  const float* rp;       // [C, C] affinity in group order: rp[p * C + q] = R[order[p], order[q]]
  const float* wp;       // [B, C] lam * gate, in group order
  const float* rsp;      // [C] row sums of rp
  const int64_t* order;  // [C]
  int64_t B, C, L, s1, s2;
  int64_t width;         // columns per tile
  int64_t earlier_only;  // bit g: the caller knows that stage g takes nothing from positions >= its start
};

// Scratch rows (each C x width floats) per tile.
constexpr int kForwardTiles = 2;
constexpr int kBackwardTiles = 6;

CSSFE_BLOCK int64_t tiles_per_image(const Args& a) { return (a.L + a.width - 1) / a.width; }
CSSFE_BLOCK int64_t num_tiles(const Args& a) { return a.B * tiles_per_image(a); }
// Where group g (0 head, 1 medium, 2 tail; 3: the end) starts, in group order.
CSSFE_BLOCK int group_start(const Args& a, int g) {
  return static_cast<int>(g == 0 ? 0 : g == 1 ? a.s1 : g == 2 ? a.s2 : a.C);
}

// Where the sources of stage g, rows [lo, hi), end: C if a row takes anything from the classes at or
// after lo (its own group and the later ones), else lo. Under the distribution-aware mask R is zero
// there, and the loops below stop at lo: about a third of the inner products with three equal
// groups. The check reads that part of R (a barrier on the GPU) unless the caller already knows.
template <class Exec>
CSSFE_BLOCK int sources_end(Exec& ex, const Args& a, int g, int lo, int hi) {
  if ((a.earlier_only >> g) & 1) return lo;  // uniform over the block
  const bool later =
      ex.any(lo, hi, lo, static_cast<int>(a.C), [&](int p, int q) { return a.rp[int64_t(p) * a.C + q] != 0.f; });
  return later ? static_cast<int>(a.C) : lo;
}

// sum over q in [from, to) of r[q] * rows[q * W + l]; the mask zeroes most of R: skip those loads.
CSSFE_BLOCK float row_message(const float* r, const float* rows, int64_t from, int64_t to, int64_t W, int l) {
  float m = 0.f;
  for (int64_t q = from; q < to; ++q)
    if (r[q] != 0.f) m += r[q] * rows[q * W + l];
  return m;
}

// out [B, C, L] fp32, class-indexed. scratch: kForwardTiles * C * width floats.
template <class Exec>
CSSFE_BLOCK void forward_tile(Exec& ex, const Args& a, float* out, int64_t tile, float* scratch) {
  const int64_t C = a.C, L = a.L, W = a.width, per_image = tiles_per_image(a);
  const int64_t b = tile / per_image, l0 = (tile % per_image) * W;
  const int lw = static_cast<int>(L - l0 < W ? L - l0 : W);
  float* S = scratch;          // sources: outputs of the finished stages, z for the rest
  float* T = scratch + C * W;  // the current stage's new rows
  const float* zb = a.z + b * C * L + l0;
  float* ob = out + b * C * L + l0;
  const int64_t* order = a.order;
  ex.parallel(static_cast<int>(C) * lw, [&](int k) {
    const int p = k / lw, l = k % lw;
    S[p * W + l] = zb[order[p] * L + l];
  });
  for (int g = 0; g < 3; ++g) {
    const int lo = group_start(a, g), hi = group_start(a, g + 1), n = (hi - lo) * lw;
    if (n == 0) continue;  // uniform over the block
    const int sources = sources_end(ex, a, g, lo, hi);
    ex.parallel(n, [&](int k) {
      const int p = lo + k / lw, l = k % lw;
      const float m = row_message(a.rp + p * C, S, 0, sources, W, l);
      const float w = a.wp[b * C + p];
      const float v = (S[p * W + l] + w * m) / (1.f + w * a.rsp[p]);
      T[p * W + l] = v;
      ob[order[p] * L + l] = v;
    });
    // The stage's sources include its own rows' z: they are overwritten only once all are read.
    ex.parallel(n, [&](int k) {
      const int p = lo + k / lw, l = k % lw;
      S[p * W + l] = T[p * W + l];
    });
  }
}

// grad, out [B, C, L] (out: the forward's result), class-indexed. Writes dz, dm [B, C, L] and the
// tile's share of dw: dw_part [B, tiles_per_image, C] (summed over tiles by the caller, in a fixed
// order: no atomics). scratch: kBackwardTiles * C * width floats.
template <class Exec>
CSSFE_BLOCK void backward_tile(Exec& ex, const Args& a, const float* grad, const float* out, float* dz, float* dm,
                               float* dw_part, int64_t tile, float* scratch) {
  const int64_t C = a.C, L = a.L, W = a.width, per_image = tiles_per_image(a), CW = C * W;
  const int64_t b = tile / per_image, l0 = (tile % per_image) * W;
  const int lw = static_cast<int>(L - l0 < W ? L - l0 : W);
  float* Z = scratch;           // z
  float* O = scratch + CW;      // the forward's outputs
  float* A = scratch + 2 * CW;  // gradient reaching each output so far
  float* D = scratch + 3 * CW;  // the current stage's message gradients
  float* DZ = scratch + 4 * CW;
  float* E = scratch + 5 * CW;  // per-column terms of d loss / d w
  const int64_t base = b * C * L + l0;
  const int64_t* order = a.order;
  ex.parallel(static_cast<int>(C) * lw, [&](int k) {
    const int p = k / lw, l = k % lw;
    const int64_t src = base + order[p] * L + l;
    Z[p * W + l] = a.z[src];
    O[p * W + l] = out[src];
    A[p * W + l] = grad[src];
    DZ[p * W + l] = 0.f;
  });
  for (int g = 2; g >= 0; --g) {
    const int lo = group_start(a, g), hi = group_start(a, g + 1), n = (hi - lo) * lw;
    if (n == 0) continue;  // uniform over the block
    const int sources = sources_end(ex, a, g, lo, hi);
    // The stage's rows: their output gradient is complete (later stages have added theirs).
    ex.parallel(n, [&](int k) {
      const int p = lo + k / lw, l = k % lw;
      const float* r = a.rp + p * C;
      const float m = row_message(r, O, 0, lo, W, l) + row_message(r, Z, lo, sources, W, l);
      const float w = a.wp[b * C + p], rs = a.rsp[p], den = 1.f + w * rs, gi = A[p * W + l];
      const float d = gi * w / den;
      DZ[p * W + l] += gi / den;
      D[p * W + l] = d;
      dm[base + order[p] * L + l] = d;
      E[p * W + l] = gi * (m - rs * O[p * W + l]) / den;
    });
    ex.parallel(hi - lo, [&](int k) {
      const int p = lo + k;
      float s = 0.f;
      for (int l = 0; l < lw; ++l) s += E[p * W + l];
      dw_part[tile * C + order[p]] = s;
    });
    // Each message's gradient goes to its sources: earlier stages' outputs, or z.
    ex.parallel(sources * lw, [&](int k) {
      const int q = k / lw, l = k % lw;
      float t = 0.f;
      for (int p = lo; p < hi; ++p) {
        const float r = a.rp[p * C + q];
        if (r != 0.f) t += r * D[p * W + l];
      }
      if (q < lo)
        A[q * W + l] += t;
      else
        DZ[q * W + l] += t;
    });
  }
  ex.parallel(static_cast<int>(C) * lw, [&](int k) {
    const int p = k / lw, l = k % lw;
    dz[base + order[p] * L + l] = DZ[p * W + l];
  });
}

}  // namespace enhance_block
}  // namespace cssfe
