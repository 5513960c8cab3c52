// Progressive enhancement on CUDA, all three stages in one launch: each thread owns one column
// (batch b, position l) and walks the classes in group order, so no inter-thread barrier is
// needed; dw (a sum over l) is accumulated with atomics.
#include "../cssfe.h"
#include "common.cuh"

namespace cssfe {
namespace cuda {

__device__ __forceinline__ float message(const float* r, const int64_t* order, const float* z, const float* out,
                                         int64_t i, int64_t lo, int64_t C, int64_t L, int64_t l) {
  float m = 0.f;
  for (int64_t pj = 0; pj < C; ++pj) {
    const int64_t j = order[pj];
    const float rij = r[i * C + j];
    if (rij != 0.f) m += rij * (pj < lo ? out : z)[j * L + l];
  }
  return m;
}

__global__ void enhance_fwd_kernel(const float* z, const float* r, const int64_t* order, int64_t s1, int64_t s2,
                                   const float* w, const float* rs, float* out, int64_t B, int64_t C, int64_t L) {
  const int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (idx >= B * L) return;
  const int64_t b = idx / L, l = idx % L;
  const float* zb = z + b * C * L;
  float* ob = out + b * C * L;
  const int64_t bounds[4] = {0, s1, s2, C};
  for (int g = 0; g < 3; ++g)
    for (int64_t pi = bounds[g]; pi < bounds[g + 1]; ++pi) {
      const int64_t i = order[pi];
      const float wi = w[b * C + i];
      const float m = message(r, order, zb, ob, i, bounds[g], C, L, l);
      ob[i * L + l] = (zb[i * L + l] + wi * m) / (1.f + wi * rs[i]);
    }
}

__global__ void enhance_bwd_kernel(const float* z, const float* r, const int64_t* order, int64_t s1, int64_t s2,
                                   const float* w, const float* rs, const float* out, float* acc, float* dz,
                                   float* dm, float* dw, int64_t B, int64_t C, int64_t L) {
  const int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (idx >= B * L) return;
  const int64_t b = idx / L, l = idx % L;
  const int64_t o = b * C * L;
  const int64_t bounds[4] = {0, s1, s2, C};
  for (int g = 2; g >= 0; --g) {
    for (int64_t pi = bounds[g]; pi < bounds[g + 1]; ++pi) {
      const int64_t i = order[pi];
      const float wi = w[b * C + i], den = 1.f + wi * rs[i];
      const float gi = acc[o + i * L + l];
      const float m = message(r, order, z + o, out + o, i, bounds[g], C, L, l);
      dz[o + i * L + l] += gi / den;
      dm[o + i * L + l] = gi * wi / den;
      atomicAdd(dw + b * C + i, gi * (m - rs[i] * out[o + i * L + l]) / den);
    }
    for (int64_t pi = bounds[g]; pi < bounds[g + 1]; ++pi) {
      const int64_t i = order[pi];
      const float dmi = dm[o + i * L + l];
      for (int64_t pj = 0; pj < C; ++pj) {
        const int64_t j = order[pj];
        const float rij = r[i * C + j];
        if (rij != 0.f) (pj < bounds[g] ? acc : dz)[o + j * L + l] += rij * dmi;
      }
    }
  }
}

}  // namespace cuda

at::Tensor enhance_fwd_cuda(const at::Tensor& z, const at::Tensor& affinity, const at::Tensor& order,
                            const at::Tensor& bounds, const at::Tensor& w) {
  CSSFE_CHECK_CUDA(z, "z");
  CSSFE_CHECK_CUDA(affinity, "affinity");
  CSSFE_CHECK_CUDA(w, "w");
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t B = z.size(0), C = z.size(1), L = z.size(2);
  at::Tensor zf = z.to(at::kFloat).contiguous();
  at::Tensor ord = order.to(z.device()).contiguous();
  at::Tensor bd = bounds.cpu();
  at::Tensor rs = affinity.sum(1).contiguous();
  at::Tensor out = at::empty({B, C, L}, z.options().dtype(at::kFloat));
  const int threads = 128;
  const int64_t blocks = (B * L + threads - 1) / threads;
  if (blocks > 0) {
    cuda::enhance_fwd_kernel<<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
        zf.data_ptr<float>(), affinity.data_ptr<float>(), ord.data_ptr<int64_t>(), bd[1].item<int64_t>(),
        bd[2].item<int64_t>(), w.data_ptr<float>(), rs.data_ptr<float>(), out.data_ptr<float>(), B, C, L);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out.to(z.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> enhance_bwd_cuda(const at::Tensor& grad, const at::Tensor& z,
                                                                const at::Tensor& affinity, const at::Tensor& order,
                                                                const at::Tensor& bounds, const at::Tensor& w,
                                                                const at::Tensor& out) {
  CSSFE_CHECK_CUDA(z, "z");
  CSSFE_CHECK_CUDA(grad, "grad");
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t B = z.size(0), C = z.size(1), L = z.size(2);
  at::Tensor zf = z.to(at::kFloat).contiguous(), of = out.to(at::kFloat).contiguous();
  at::Tensor acc = grad.to(at::kFloat).clone().contiguous();
  at::Tensor ord = order.to(z.device()).contiguous();
  at::Tensor bd = bounds.cpu();
  at::Tensor rs = affinity.sum(1).contiguous();
  at::Tensor dz = at::zeros({B, C, L}, z.options().dtype(at::kFloat));
  at::Tensor dm = at::zeros({B, C, L}, z.options().dtype(at::kFloat));
  at::Tensor dw = at::zeros({B, C}, z.options().dtype(at::kFloat));
  const int threads = 128;
  const int64_t blocks = (B * L + threads - 1) / threads;
  if (blocks > 0) {
    cuda::enhance_bwd_kernel<<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
        zf.data_ptr<float>(), affinity.data_ptr<float>(), ord.data_ptr<int64_t>(), bd[1].item<int64_t>(),
        bd[2].item<int64_t>(), w.data_ptr<float>(), rs.data_ptr<float>(), of.data_ptr<float>(), acc.data_ptr<float>(),
        dz.data_ptr<float>(), dm.data_ptr<float>(), dw.data_ptr<float>(), B, C, L);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {dz.to(z.scalar_type()), dm, dw};
}

TORCH_LIBRARY_IMPL(cssfe, CUDA, m) {
  m.impl("native_asl", &asl_cuda);
  m.impl("native_attention_fwd", &attention_fwd_cuda);
  m.impl("native_attention_bwd", &attention_bwd_cuda);
  m.impl("native_enhance_fwd", &enhance_fwd_cuda);
  m.impl("native_enhance_bwd", &enhance_bwd_cuda);
}

}  // namespace cssfe
