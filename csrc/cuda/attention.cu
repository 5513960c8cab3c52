// Class attention on CUDA, a chunk of images at a time: the five products are batched GEMMs (cuBLAS
// through ATen; half-precision operands with fp32 accumulation, the scores written in fp32) and the
// softmax and its gradient are row kernels, one warp per row. The same plan as the C++ CPU kernel
// (one image's scores at a time there) and the Triton GEMM strategy: only z and the log-sum-exp are
// kept for backward, which recomputes the scores; the chunk's scratch is bounded by kScratchBytes.
#include <ATen/Dispatch.h>
#include <torch/version.h>

#include "../cssfe.h"
#include "common.cuh"

namespace cssfe {
namespace cuda {

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

// p = exp(scale * s - lse) (recomputed) and ds = scale * p * (dp - delta), per row.
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
    ds[base + j] = static_cast<out_t>(scale * pj * (dp[base + j] - row_delta));
  }
}

// a @ b with fp32 output: half-precision operands stay half (fp32 accumulation in cuBLAS).
at::Tensor bmm_f32(const at::Tensor& a, const at::Tensor& b) {
  const bool half = a.scalar_type() == at::kHalf || a.scalar_type() == at::kBFloat16;
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
  if (half) return at::bmm(a, b, at::kFloat);
#endif
  if (half || a.scalar_type() == at::kDouble) return at::bmm(a, b).to(at::kFloat);
  return at::bmm(a, b);
}

int64_t chunk_images(int64_t B, int64_t C, int64_t N, int64_t bytes_per_score) {
  const int64_t per_image = std::max<int64_t>(1, C * N * bytes_per_score);
  return std::max<int64_t>(1, std::min<int64_t>(B, kScratchBytes / per_image));
}

unsigned row_grid(int64_t rows) { return static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock); }

}  // namespace cuda

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  CSSFE_CHECK_CUDA(q, "q");
  CSSFE_CHECK_CUDA(k, "k");
  CSSFE_CHECK_CUDA(v, "v");
  const c10::cuda::CUDAGuard guard(k.device());
  const int64_t B = k.size(0), d = k.size(1), N = k.size(2), C = q.size(1);
  at::Tensor z = at::empty({B, C, d}, v.options());
  at::Tensor lse = at::empty({B, C}, v.options().dtype(at::kFloat));
  if (B * C == 0) return {z, lse};
  const float scale = 1.f / std::sqrt(static_cast<float>(d));
  const int64_t step = cuda::chunk_images(B, C, N, 4 + v.element_size());
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
    at::Tensor z_b = z.narrow(0, b0, nb);
    at::bmm_out(z_b, p, v.narrow(0, b0, nb).transpose(1, 2));
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
  const int64_t B = k.size(0), d = k.size(1), N = k.size(2), C = q.size(1);
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
  const int64_t step = cuda::chunk_images(B, C, N, 8 + 2 * v.element_size());
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
    at::Tensor dv_b = dv.narrow(0, b0, nb), dk_b = dk.narrow(0, b0, nb);
    at::bmm_out(dv_b, gb.transpose(1, 2), p);
    at::bmm_out(dk_b, qb.transpose(1, 2), ds);
    if (shared) {
      dq.add_(cuda::bmm_f32(ds, kb.transpose(1, 2)).sum(0, true));  // one fp32 partial per chunk
    } else {
      at::Tensor dq_b = dq.narrow(0, b0, nb);
      at::bmm_out(dq_b, ds, kb.transpose(1, 2));
    }
  }
  return {shared ? dq.to(q.scalar_type()) : dq, dk, dv};
}

}  // namespace cssfe
