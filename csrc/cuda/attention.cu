// Class attention on CUDA: one block per (batch, class); the class's softmax row lives in shared
// memory only (the B x C x N maps are never written to global memory). Backward recomputes it;
// dk / dv are accumulated with fp32 atomics. Straightforward, not tiled: correctness first.
#include <ATen/Dispatch.h>

#include "../cssfe.h"
#include "common.cuh"

namespace cssfe {
namespace cuda {

template <typename scalar_t>
__device__ void row_probs(const scalar_t* q, const scalar_t* k, int64_t d, int64_t n, float scale, float lse_or_nan,
                          float* s, float* red, float* lse_out) {
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    float acc = 0.f;
    for (int64_t e = 0; e < d; ++e) acc += static_cast<float>(q[e]) * static_cast<float>(k[e * n + j]);
    s[j] = acc * scale;
  }
  __syncthreads();
  float lse = lse_or_nan;
  if (isnan(lse)) {
    float mx = -INFINITY;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) mx = fmaxf(mx, s[j]);
    mx = block_max(mx, red);
    float sum = 0.f;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) sum += __expf(s[j] - mx);
    sum = block_sum(sum, red);
    lse = mx + logf(sum);
  }
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) s[j] = __expf(s[j] - lse);
  if (lse_out && threadIdx.x == 0) *lse_out = lse;
  __syncthreads();
}

template <typename scalar_t>
__global__ void attn_fwd_kernel(const scalar_t* q, const scalar_t* k, const scalar_t* v, scalar_t* z, float* lse,
                                int64_t C, int64_t d, int64_t n, int64_t q_bstride, float scale) {
  extern __shared__ float s[];
  __shared__ float red[32];
  const int64_t bc = blockIdx.x, b = bc / C, c = bc % C;
  row_probs(q + b * q_bstride + c * d, k + b * d * n, d, n, scale, NAN, s, red, lse + bc);
  const scalar_t* vb = v + b * d * n;
  for (int64_t e = threadIdx.x; e < d; e += blockDim.x) {
    float acc = 0.f;
    for (int64_t j = 0; j < n; ++j) acc += s[j] * static_cast<float>(vb[e * n + j]);
    z[bc * d + e] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t>
__global__ void attn_bwd_kernel(const float* g, const scalar_t* q, const scalar_t* k, const scalar_t* v,
                                const float* z, const float* lse, float* dq, float* dk, float* dv, int64_t C,
                                int64_t d, int64_t n, int64_t q_bstride, float scale) {
  extern __shared__ float s[];  // p[n], then ds[n]
  float* ds = s + n;
  __shared__ float red[32];
  const int64_t bc = blockIdx.x, b = bc / C, c = bc % C;
  const scalar_t* qr = q + b * q_bstride + c * d;
  const scalar_t* kb = k + b * d * n;
  const scalar_t* vb = v + b * d * n;
  const float* gr = g + bc * d;
  row_probs(qr, kb, d, n, scale, lse[bc], s, red, nullptr);
  float delta = 0.f;
  for (int64_t e = threadIdx.x; e < d; e += blockDim.x) delta += gr[e] * z[bc * d + e];
  delta = block_sum(delta, red);
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    float dp = 0.f;
    for (int64_t e = 0; e < d; ++e) dp += gr[e] * static_cast<float>(vb[e * n + j]);
    ds[j] = s[j] * (dp - delta) * scale;
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < d; e += blockDim.x) {
    float acc = 0.f;
    for (int64_t j = 0; j < n; ++j) acc += ds[j] * static_cast<float>(kb[e * n + j]);
    dq[bc * d + e] = acc;
  }
  for (int64_t idx = threadIdx.x; idx < d * n; idx += blockDim.x) {
    const int64_t e = idx / n, j = idx % n;
    atomicAdd(dk + b * d * n + idx, ds[j] * static_cast<float>(qr[e]));
    atomicAdd(dv + b * d * n + idx, s[j] * gr[e]);
  }
}

}  // namespace cuda

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  CSSFE_CHECK_CUDA(q, "q");
  CSSFE_CHECK_CUDA(k, "k");
  CSSFE_CHECK_CUDA(v, "v");
  const c10::cuda::CUDAGuard guard(k.device());
  const int64_t B = k.size(0), d = k.size(1), N = k.size(2), C = q.size(1);
  at::Tensor z = at::empty({B, C, d}, v.options());
  at::Tensor lse = at::empty({B, C}, v.options().dtype(at::kFloat));
  const int64_t qs = q.size(0) == 1 ? 0 : C * d;
  if (B * C == 0) return {z, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "cssfe_attention_fwd_cuda", [&] {
    cuda::attn_fwd_kernel<scalar_t><<<B * C, 128, N * sizeof(float), at::cuda::getCurrentCUDAStream()>>>(
        q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(),
        lse.data_ptr<float>(), C, d, N, qs, 1.f / sqrtf((float)d));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {z, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(const at::Tensor& grad_z, const at::Tensor& q,
                                                                  const at::Tensor& k, const at::Tensor& v,
                                                                  const at::Tensor& z, const at::Tensor& lse) {
  CSSFE_CHECK_CUDA(q, "q");
  CSSFE_CHECK_CUDA(k, "k");
  CSSFE_CHECK_CUDA(v, "v");
  const c10::cuda::CUDAGuard guard(k.device());
  const int64_t B = k.size(0), d = k.size(1), N = k.size(2), C = q.size(1);
  at::Tensor g = grad_z.to(at::kFloat).contiguous(), zf = z.to(at::kFloat).contiguous();
  at::Tensor lf = lse.to(at::kFloat).contiguous();
  at::Tensor dq = at::zeros({B, C, d}, k.options().dtype(at::kFloat));
  at::Tensor dk = at::zeros({B, d, N}, k.options().dtype(at::kFloat));
  at::Tensor dv = at::zeros({B, d, N}, k.options().dtype(at::kFloat));
  const int64_t qs = q.size(0) == 1 ? 0 : C * d;
  if (B * C > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "cssfe_attention_bwd_cuda", [&] {
      cuda::attn_bwd_kernel<scalar_t><<<B * C, 128, 2 * N * sizeof(float), at::cuda::getCurrentCUDAStream()>>>(
          g.data_ptr<float>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
          zf.data_ptr<float>(), lf.data_ptr<float>(), dq.data_ptr<float>(), dk.data_ptr<float>(), dv.data_ptr<float>(),
          C, d, N, qs, 1.f / sqrtf((float)d));
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  at::Tensor dqo = q.size(0) == 1 ? dq.sum(0, true) : dq;
  return {dqo.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type())};
}

}  // namespace cssfe
