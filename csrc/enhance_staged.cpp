// Progressive enhancement, staged strategy: the three stages as batched matrix products and
// elementwise ATen ops, on whatever device the tensors are (cuBLAS on a GPU). Same contract and
// formulas as native_enhance_fwd / native_enhance_bwd (cssfe.h, cssfe/ops/reference.py).
//
// Why it exists: the CUDA block program (cuda/enhance_block.h) keeps a tile of every class's rows in
// shared memory and reads the whole C x C affinity per tile; the tiles narrow as C grows, so its
// affinity traffic grows as C^3 (on an H200 it is the fastest at 80 classes and 4x slower than Triton
// at 1,000). Here the work is the products' 2 B L C^2 multiply-adds per direction, whatever C, plus a
// few passes over [B, C, L] memory. The Python layer (cssfe/ops/library.py) picks the strategy.
//
// Everything runs in group order (the classes sorted by group, `order`), where every stage's rows
// and every "earlier groups" column set are contiguous slices: stage g's message is
//   m = R[rows, :b0] out[:, :b0] + R[rows, b0:] z[:, b0:]      (b0 = where stage g starts).
// The second product is left out where the caller's earlier_only says that R is zero there (the
// distribution-aware mask): with three equal groups, two thirds of the multiply-adds.
#include "cssfe.h"

namespace cssfe {
namespace {

struct Staged {
  at::ScalarType ct;                 // compute type: fp32, fp64 for fp64 z
  at::Tensor order, inverse;         // group order and its inverse permutation, on z's device
  at::Tensor r, w, row_sum;          // affinity [C, C], w [B, C] and R's row sums [C], in group order
  int64_t bounds[4];
  int64_t earlier_only;              // bit g: stage g takes nothing from positions >= bounds[g]
};

Staged prepare(const at::Tensor& z, const at::Tensor& affinity, const at::Tensor& order, const at::Tensor& bounds,
               const at::Tensor& w, int64_t earlier_only) {
  TORCH_CHECK(z.dim() == 3, "native_enhance_staged: z must be [B, C, L], got ", z.sizes());
  const int64_t B = z.size(0), C = z.size(1);
  TORCH_CHECK(affinity.dim() == 2 && affinity.size(0) == C && affinity.size(1) == C,
              "native_enhance_staged: affinity must be [C, C] with C=", C, ", got ", affinity.sizes());
  TORCH_CHECK(order.dim() == 1 && order.size(0) == C, "native_enhance_staged: order must be [C], got ", order.sizes());
  TORCH_CHECK(bounds.numel() == 4, "native_enhance_staged: bounds must hold 4 values, got ", bounds.numel());
  TORCH_CHECK(w.dim() == 2 && w.size(0) == B && w.size(1) == C, "native_enhance_staged: w must be [B, C], got ",
              w.sizes());
  Staged s;
  s.ct = z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  s.order = order.to(z.device(), at::kLong);
  s.inverse = at::argsort(s.order);
  s.r = affinity.to(z.device(), s.ct).index_select(0, s.order).index_select(1, s.order);
  s.w = w.to(z.device(), s.ct).index_select(1, s.order);
  s.row_sum = s.r.sum(1);
  s.earlier_only = earlier_only;
  const at::Tensor bd = bounds.to(at::kCPU, at::kLong).contiguous();  // launch parameters: already on the host
  for (int k = 0; k < 4; ++k) s.bounds[k] = bd.data_ptr<int64_t>()[k];
  TORCH_CHECK(s.bounds[0] == 0 && s.bounds[3] == C && s.bounds[1] <= s.bounds[2] && s.bounds[1] >= 0 &&
                  s.bounds[2] <= C,
              "native_enhance_staged: bounds must run from 0 to C=", C, " without decreasing");
  return s;
}

// [B, C, L] in z's class order -> group order, in the compute type
at::Tensor grouped(const at::Tensor& x, const Staged& s) { return x.index_select(1, s.order).to(s.ct); }

// group order -> the caller's class order (dim 1)
at::Tensor ungrouped(const at::Tensor& x, const Staged& s) { return x.index_select(1, s.inverse); }

// a [rows, cols] block of R, shared by every image of the batch (batch stride 0, no copy)
at::Tensor batched(const at::Tensor& block, int64_t B) { return block.unsqueeze(0).expand({B, block.size(0), block.size(1)}); }

// Whether stage g's rows may take something from their own or a later group.
bool later_sources(const Staged& s, int g) { return !((s.earlier_only >> g) & 1); }

// Stage g's messages [B, rows, L] (see the top of the file); x holds the earlier stages' outputs.
at::Tensor messages(const Staged& s, int g, const at::Tensor& x, const at::Tensor& z) {
  const int64_t B = z.size(0), C = z.size(1), b0 = s.bounds[g], b1 = s.bounds[g + 1];
  const at::Tensor rows = s.r.slice(0, b0, b1);
  if (!later_sources(s, g)) {
    if (b0 == 0) return at::zeros({B, b1 - b0, z.size(2)}, z.options());  // no sources at all
    return at::bmm(batched(rows.slice(1, 0, b0), B), x.slice(1, 0, b0));
  }
  at::Tensor m = at::bmm(batched(rows.slice(1, b0, C), B), z.slice(1, b0, C));
  if (b0 > 0) m.baddbmm_(batched(rows.slice(1, 0, b0), B), x.slice(1, 0, b0));
  return m;
}

// 1 + w * rowsum(R) of stage g's rows: [B, rows]
at::Tensor denominators(const Staged& s, int g) {
  const int64_t b0 = s.bounds[g], b1 = s.bounds[g + 1];
  return s.w.slice(1, b0, b1) * s.row_sum.slice(0, b0, b1).unsqueeze(0) + 1;
}

}  // namespace

at::Tensor enhance_staged_fwd(const at::Tensor& z, const at::Tensor& affinity, const at::Tensor& order,
                              const at::Tensor& bounds, const at::Tensor& w, int64_t earlier_only) {
  const NoAutocast no_autocast;
  const Staged s = prepare(z, affinity, order, bounds, w, earlier_only);
  if (z.numel() == 0) return at::empty(z.sizes(), z.options());
  const at::Tensor zp = grouped(z, s);
  at::Tensor outp = at::empty_like(zp);  // every stage writes its rows; the stages cover [0, C)
  for (int g = 0; g < 3; ++g) {
    const int64_t b0 = s.bounds[g], b1 = s.bounds[g + 1];
    if (b1 == b0) continue;
    at::Tensor m = messages(s, g, outp, zp);
    m.mul_(s.w.slice(1, b0, b1).unsqueeze(-1)).add_(zp.slice(1, b0, b1)).div_(denominators(s, g).unsqueeze(-1));
    outp.slice(1, b0, b1).copy_(m);
  }
  return ungrouped(outp, s).to(z.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> enhance_staged_bwd(const at::Tensor& grad, const at::Tensor& z,
                                                                  const at::Tensor& affinity, const at::Tensor& order,
                                                                  const at::Tensor& bounds, const at::Tensor& w,
                                                                  const at::Tensor& out, int64_t earlier_only) {
  const NoAutocast no_autocast;
  const Staged s = prepare(z, affinity, order, bounds, w, earlier_only);
  TORCH_CHECK(grad.sizes() == z.sizes() && out.sizes() == z.sizes(),
              "native_enhance_staged: grad and out must have z's shape ", z.sizes(), ", got ", grad.sizes(), " and ",
              out.sizes());
  const auto aux = z.options().dtype(s.ct);
  if (z.numel() == 0) {
    return {at::empty(z.sizes(), z.options()), at::empty(z.sizes(), aux), at::zeros({z.size(0), z.size(1)}, aux)};
  }
  const int64_t C = z.size(1);
  const at::Tensor zp = grouped(z, s), outp = grouped(out, s);
  // acc: the gradient reaching each class's output, completed stage by stage from the tail back
  at::Tensor acc = grouped(grad, s);  // a new tensor (index_select copies), updated in place
  at::Tensor dzp = at::zeros_like(zp), dmp = at::empty_like(zp), dwp = at::empty({z.size(0), C}, aux);
  for (int g = 2; g >= 0; --g) {
    const int64_t b0 = s.bounds[g], b1 = s.bounds[g + 1];
    if (b1 == b0) continue;
    const at::Tensor acc_g = acc.slice(1, b0, b1), den = denominators(s, g);
    dzp.slice(1, b0, b1).add_(acc_g / den.unsqueeze(-1));
    const at::Tensor dm = acc_g * (s.w.slice(1, b0, b1) / den).unsqueeze(-1);
    dmp.slice(1, b0, b1).copy_(dm);
    // d w: sum_l acc (m - rowsum * out) / den, with m recomputed from the saved output (not kept
    // from the forward: one [B, C, L] buffer less between the passes)
    at::Tensor m = messages(s, g, outp, zp);
    m.sub_(outp.slice(1, b0, b1) * s.row_sum.slice(0, b0, b1).view({1, -1, 1}));
    dwp.slice(1, b0, b1).copy_((acc_g * m).sum(-1) / den);
    // the messages read the earlier stages' outputs (their gradient continues through acc) and the
    // inputs of this and later stages (straight into dz)
    const at::Tensor rows = s.r.slice(0, b0, b1);
    if (b0 > 0) acc.slice(1, 0, b0).baddbmm_(batched(rows.slice(1, 0, b0).t(), z.size(0)), dm);
    if (later_sources(s, g)) dzp.slice(1, b0, C).baddbmm_(batched(rows.slice(1, b0, C).t(), z.size(0)), dm);
  }
  return {ungrouped(dzp, s).to(z.scalar_type()), ungrouped(dmp, s), ungrouped(dwp, s)};
}

// Any device: only ATen operators inside.
TORCH_LIBRARY_IMPL(cssfe, CompositeExplicitAutograd, m) {
  m.impl("native_enhance_staged_fwd", &enhance_staged_fwd);
  m.impl("native_enhance_staged_bwd", &enhance_staged_bwd);
}

}  // namespace cssfe
