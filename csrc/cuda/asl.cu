// Asymmetric loss on CUDA: loss and gradient in one pass; per-block partial sums (deterministic).
#include <ATen/Dispatch.h>

#include "../cssfe.h"
#include "common.cuh"

namespace cssfe {
namespace cuda {

template <typename scalar_t, typename target_t>
__global__ void asl_kernel(const scalar_t* __restrict__ x, const target_t* __restrict__ t, scalar_t* __restrict__ grad,
                           float* __restrict__ partial, int64_t n, float gp, float gn, float clip, float eps,
                           bool focal, bool focal_grad, float scale) {
  __shared__ float red[32];
  float local = 0.f;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const float xi = static_cast<float>(x[i]);
    const float y = static_cast<float>(t[i]);
    const float p = 1.f / (1.f + __expf(-xi));
    const float dp = p * (1.f - p);
    float xn = 1.f - p, dxn = -dp;
    if (clip > 0.f) {
      const float c = xn + clip;
      if (c > 1.f) { xn = 1.f; dxn = 0.f; } else { xn = c; }
    }
    const float base = y * logf(fmaxf(p, eps)) + (1.f - y) * logf(fmaxf(xn, eps));
    const float dbase = y * (p >= eps ? 1.f - p : 0.f) + (1.f - y) * (xn >= eps ? dxn / xn : 0.f);
    float l, g;
    if (focal) {
      const float pt = p * y + xn * (1.f - y);
      const float ge = gp * y + gn * (1.f - y);
      const float w = ge == 0.f ? 1.f : powf(1.f - pt, ge);
      float d = dbase * w;
      if (focal_grad && ge != 0.f) d += base * ge * powf(1.f - pt, ge - 1.f) * -(y * dp + (1.f - y) * dxn);
      l = -base * w;
      g = -d;
    } else {
      l = -base;
      g = -dbase;
    }
    local += l;
    if (grad) grad[i] = static_cast<scalar_t>(g * scale);
  }
  const float s = block_sum(local, red);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

}  // namespace cuda

std::tuple<at::Tensor, at::Tensor> asl_cuda(const at::Tensor& logits, const at::Tensor& targets, double gamma_pos,
                                            double gamma_neg, double clip, double eps, bool focal_grad, bool mean,
                                            bool need_grad) {
  CSSFE_CHECK_CUDA(logits, "logits");
  CSSFE_CHECK_CUDA(targets, "targets");
  TORCH_CHECK(logits.sizes() == targets.sizes(), "native_asl: logits and targets shapes differ");
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t n = logits.numel();
  const int threads = 256;
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, 1024)));
  at::Tensor partial = at::zeros({blocks}, logits.options().dtype(at::kFloat));
  at::Tensor grad = need_grad ? at::empty_like(logits) : at::empty({0}, logits.options());
  const double scale = mean ? 1.0 / static_cast<double>(std::max<int64_t>(n, 1)) : 1.0;
  at::Tensor tgt = targets.scalar_type() == at::kBool ? targets.view(at::kByte) : targets;
  auto stream = at::cuda::getCurrentCUDAStream();
  const bool focal = gamma_pos > 0 || gamma_neg > 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cssfe_asl_cuda", [&] {
    using logit_t = scalar_t;
    logit_t* g = need_grad ? grad.data_ptr<logit_t>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kByte, tgt.scalar_type(), "cssfe_asl_cuda_t", [&] {
      if (n > 0)
        cuda::asl_kernel<logit_t, scalar_t><<<blocks, threads, 0, stream>>>(
            logits.data_ptr<logit_t>(), tgt.data_ptr<scalar_t>(), g, partial.data_ptr<float>(), n, (float)gamma_pos,
            (float)gamma_neg, (float)clip, (float)eps, focal, focal_grad, (float)scale);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto loss_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor loss = (partial.to(at::kDouble).sum() * scale).to(loss_dtype);
  return {loss, grad};
}

}  // namespace cssfe
