// Class attention on CUDA, a chunk of images at a time: the five products are batched GEMMs (cuBLAS
// through ATen; half-precision operands with fp32 accumulation, the scores written in fp32) and the
// softmax and its gradient are row kernels, one warp per row. The same plan as the C++ CPU kernel
// (one image's scores at a time there) and the Triton GEMM strategy: only z and the log-sum-exp are
// kept for backward, which recomputes the scores; the chunk's scratch is bounded by kScratchBytes.
#include <ATen/Dispatch.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/version.h>

#include "../cssfe.h"
#include "common.cuh"

namespace cssfe {
namespace cuda {
namespace {

constexpr int64_t kScratchBytes = int64_t(32) << 20;
constexpr int kRowsPerBlock = 8;  // one warp per row

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
  return v;
}

// p = softmax(scale * s) over each row of n, and the row's log-sum-exp.
template <typename out_t>
__global__ void softmax_rows_kernel(const float* __restrict__ s, out_t* __restrict__ p, float* __restrict__ lse,
                                    int64_t rows, int64_t n, float scale) {
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;  // whole warps leave together: the shuffles below stay full-warp
  const float* sr = s + row * n;
  float m = -INFINITY;
  for (int64_t j = lane; j < n; j += 32) m = fmaxf(m, sr[j] * scale);
  m = warp_max(m);
  float l = 0.f;
  for (int64_t j = lane; j < n; j += 32) l += expf(sr[j] * scale - m);
  const float row_lse = m + logf(warp_sum(l));
  if (lane == 0) lse[row] = row_lse;
  out_t* pr = p + row * n;
  for (int64_t j = lane; j < n; j += 32) pr[j] = static_cast<out_t>(expf(sr[j] * scale - row_lse));
}

// p = exp(scale * s - lse) (recomputed) and ds = p * (dp - delta), per row (the 1/sqrt(d) of the scores
// is applied by the GEMMs that use ds, so small gradients are not scaled before rounding).
template <typename out_t>
__global__ void softmax_grad_rows_kernel(const float* __restrict__ s, const float* __restrict__ dp,
                                         const float* __restrict__ lse, const float* __restrict__ delta,
                                         out_t* __restrict__ p, out_t* __restrict__ ds, int64_t rows, int64_t n,
                                         float scale) {
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const float row_lse = lse[row], row_delta = delta[row];
  const int64_t base = row * n;
  for (int64_t j = lane; j < n; j += 32) {
    const float pj = expf(s[base + j] * scale - row_lse);
    p[base + j] = static_cast<out_t>(pj);
    ds[base + j] = static_cast<out_t>(pj * (dp[base + j] - row_delta));
  }
}

// a @ b in fp32: half-precision operands stay half (fp32 accumulation in cuBLAS) where torch has the
// out_dtype overload (2.8 on); else, and for fp64, the operands are converted first.
at::Tensor bmm_f32(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == at::kFloat) return at::bmm(a, b);
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
  if (a.scalar_type() == at::kHalf || a.scalar_type() == at::kBFloat16) return at::bmm(a, b, at::kFloat);
#endif
  return at::bmm(a.to(at::kFloat), b.to(at::kFloat));
}

// out = alpha * a @ b, into out (a view of the whole-batch output).
void bmm_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b, double alpha = 1.0) {
  at::baddbmm_out(out, out, a, b, /*beta=*/0.0, alpha);  // beta = 0: out's old contents are ignored
}

int64_t chunk_images(int64_t B, int64_t per_image_bytes) {
  return std::max<int64_t>(1, std::min<int64_t>(B, kScratchBytes / std::max<int64_t>(1, per_image_bytes)));
}

unsigned row_grid(int64_t rows) { return static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock); }

}  // namespace
}  // namespace cuda

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  CSSFE_CHECK_CUDA(q, "q");
  CSSFE_CHECK_CUDA(k, "k");
  CSSFE_CHECK_CUDA(v, "v");
  const c10::cuda::CUDAGuard guard(k.device());
  // The products run in the dtypes chosen here, also when the caller is under autocast.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t B = k.size(0), d = k.size(1), N = k.size(2), C = q.size(1);
  at::Tensor z = at::empty({B, C, d}, v.options());
  at::Tensor lse = at::empty({B, C}, v.options().dtype(at::kFloat));
  if (B * C == 0) return {z, lse};
  const float scale = 1.f / std::sqrt(static_cast<float>(d));
  // per image: the fp32 scores (and their fp64 source for fp64 inputs) and the probabilities
  const int64_t score_bytes = v.scalar_type() == at::kDouble ? 12 : 4;
  const int64_t step = cuda::chunk_images(B, C * N * (score_bytes + v.element_size()));
  for (int64_t b0 = 0; b0 < B; b0 += step) {
    const int64_t nb = std::min(step, B - b0);
    const at::Tensor qb = q.size(0) == 1 ? q.expand({nb, C, d}) : q.narrow(0, b0, nb);
    const at::Tensor s = cuda::bmm_f32(qb, k.narrow(0, b0, nb));  // [nb, C, N] fp32
    at::Tensor p = at::empty({nb, C, N}, v.options());
    at::Tensor lse_b = lse.narrow(0, b0, nb);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "cssfe_attention_fwd_cuda", [&] {
      cuda::softmax_rows_kernel<scalar_t><<<cuda::row_grid(nb * C), 32 * cuda::kRowsPerBlock, 0,
                                            at::cuda::getCurrentCUDAStream()>>>(
          s.data_ptr<float>(), p.data_ptr<scalar_t>(), lse_b.data_ptr<float>(), nb * C, N, scale);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    cuda::bmm_into(z.narrow(0, b0, nb), p, v.narrow(0, b0, nb).transpose(1, 2));
  }
  return {z, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(const at::Tensor& grad_z, const at::Tensor& q,
                                                                  const at::Tensor& k, const at::Tensor& v,
                                                                  const at::Tensor& z, const at::Tensor& lse) {
  CSSFE_CHECK_CUDA(q, "q");
  CSSFE_CHECK_CUDA(k, "k");
  CSSFE_CHECK_CUDA(v, "v");
  CSSFE_CHECK_CUDA(grad_z, "grad_z");
  const c10::cuda::CUDAGuard guard(k.device());
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t B = k.size(0), d = k.size(1), N = k.size(2), C = q.size(1);
  TORCH_CHECK(grad_z.sizes() == z.sizes() && z.dim() == 3 && z.size(0) == B && z.size(1) == C && z.size(2) == d,
              "cssfe native attention backward: grad_z and z must be [B, C, d] = [", B, ", ", C, ", ", d, "]");
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == B && lse.size(1) == C && lse.is_cuda(),
              "cssfe native attention backward: lse must be a CUDA tensor [B, C] = [", B, ", ", C, "]");
  const bool shared = q.size(0) == 1;
  at::Tensor dk = at::empty_like(k), dv = at::empty_like(v);
  at::Tensor dq = shared ? at::zeros({1, C, d}, q.options().dtype(at::kFloat)) : at::empty_like(q);
  if (B * C == 0) {
    dk.zero_();
    dv.zero_();
    return {shared ? dq.to(q.scalar_type()) : dq.zero_(), dk, dv};
  }
  const at::Tensor g = grad_z.to(v.scalar_type()).contiguous();
  const at::Tensor delta = (grad_z.to(at::kFloat) * z.to(at::kFloat)).sum(-1).contiguous();  // rowsum(dz * z)
  const at::Tensor lf = lse.to(at::kFloat).contiguous();
  const float scale = 1.f / std::sqrt(static_cast<float>(d));
  // per image: scores and their gradient in fp32 (plus fp64 sources), p and ds, and with shared q the
  // image's fp32 dq partial
  const int64_t score_bytes = v.scalar_type() == at::kDouble ? 12 : 4;
  const int64_t step =
      cuda::chunk_images(B, C * N * 2 * (score_bytes + v.element_size()) + (shared ? 4 * C * d : 0));
  for (int64_t b0 = 0; b0 < B; b0 += step) {
    const int64_t nb = std::min(step, B - b0);
    const at::Tensor qb = shared ? q.expand({nb, C, d}) : q.narrow(0, b0, nb);
    const at::Tensor gb = g.narrow(0, b0, nb), kb = k.narrow(0, b0, nb);
    at::Tensor p = at::empty({nb, C, N}, v.options()), ds = at::empty({nb, C, N}, v.options());
    {
      const at::Tensor s = cuda::bmm_f32(qb, kb), dp = cuda::bmm_f32(gb, v.narrow(0, b0, nb));
      const at::Tensor lse_b = lf.narrow(0, b0, nb), delta_b = delta.narrow(0, b0, nb);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "cssfe_attention_bwd_cuda", [&] {
        cuda::softmax_grad_rows_kernel<scalar_t><<<cuda::row_grid(nb * C), 32 * cuda::kRowsPerBlock, 0,
                                                   at::cuda::getCurrentCUDAStream()>>>(
            s.data_ptr<float>(), dp.data_ptr<float>(), lse_b.data_ptr<float>(), delta_b.data_ptr<float>(),
            p.data_ptr<scalar_t>(), ds.data_ptr<scalar_t>(), nb * C, N, scale);
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }  // the fp32 scores and their gradient are released before the next three products
    cuda::bmm_into(dv.narrow(0, b0, nb), gb.transpose(1, 2), p);
    cuda::bmm_into(dk.narrow(0, b0, nb), qb.transpose(1, 2), ds, scale);
    if (shared) {
      dq.add_(cuda::bmm_f32(ds, kb.transpose(1, 2)).sum(0, true));  // one fp32 partial per chunk
    } else {
      cuda::bmm_into(dq.narrow(0, b0, nb), ds, kb.transpose(1, 2), scale);
    }
  }
  if (shared) return {dq.mul_(scale).to(q.scalar_type()), dk, dv};
  return {dq, dk, dv};
}

}  // namespace cssfe
