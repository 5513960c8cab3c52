// Progressive enhancement on CUDA, all three stages in one launch: one block per tile (an image
// and up to 64 of its columns), the tile's C rows in scratch, the work shared by the block's
// threads phase by phase. The block program is enhance_block.h, which the CPU tests also run.
#include <algorithm>
#include <limits>

#include "../cssfe.h"
#include "common.cuh"
#include "enhance_block.h"

namespace cssfe {
namespace cuda {
namespace {

struct DeviceExec {
  template <class F>
  __device__ __forceinline__ void parallel(int n, F&& f) {
    for (int k = threadIdx.x; k < n; k += blockDim.x) f(k);
    __syncthreads();
  }
  // A warp per row, its lanes along the row (coalesced, no index division).
  template <class F>
  __device__ __forceinline__ bool any(int p0, int p1, int q0, int q1, F&& f) {
    const int warps = static_cast<int>(blockDim.x) / 32, lane = threadIdx.x % 32;
    int found = 0;
    for (int p = p0 + static_cast<int>(threadIdx.x) / 32; p < p1 && !found; p += warps)
      for (int q = q0 + lane; q < q1 && !found; q += 32) found = f(p, q);
    return __syncthreads_or(found) != 0;
  }
};

// kShared: the tiles live in dynamic shared memory (known at compile time, so the loads are shared-memory
// loads); else in scratch, a global buffer with one slice per block.
template <bool kShared>
__global__ void enhance_fwd_kernel(enhance_block::Args a, float* out, float* scratch) {
  extern __shared__ float smem[];
  float* tiles = kShared ? smem : scratch + blockIdx.x * (enhance_block::kForwardTiles * a.C * a.width);
  DeviceExec ex;
  const int64_t n = enhance_block::num_tiles(a);
  for (int64_t t = blockIdx.x; t < n; t += gridDim.x) enhance_block::forward_tile(ex, a, out, t, tiles);
}

template <bool kShared>
__global__ void enhance_bwd_kernel(enhance_block::Args a, const float* grad, const float* out, float* dz, float* dm,
                                   float* dw_part, float* scratch) {
  extern __shared__ float smem[];
  float* tiles = kShared ? smem : scratch + blockIdx.x * (enhance_block::kBackwardTiles * a.C * a.width);
  DeviceExec ex;
  const int64_t n = enhance_block::num_tiles(a);
  for (int64_t t = blockIdx.x; t < n; t += gridDim.x)
    enhance_block::backward_tile(ex, a, grad, out, dz, dm, dw_part, t, tiles);
}

constexpr int kThreads = 256;
constexpr int64_t kSharedBytes = 48 * 1024;            // the default per-block limit: no opt-in needed
constexpr int64_t kGlobalScratchBytes = 256ll << 20;   // bound on the fallback's scratch

struct Plan {
  int64_t width, grid;
  bool shared;
  size_t smem;
};

// The widest tile (a power of two, at most 64 columns and no wider than needed) whose rows fit in
// shared memory; when even one column does not (thousands of classes), the rows go to a global
// scratch buffer and a bounded number of blocks stride over the tiles.
Plan plan(int64_t B, int64_t C, int64_t L, int tiles, const at::Tensor& like) {
  int64_t width = 1;
  while (width < 64 && width < L) width *= 2;
  while (width > 1 && tiles * C * width * 4 > kSharedBytes) width /= 2;
  const int64_t bytes = tiles * C * width * 4;
  if (bytes <= kSharedBytes) {  // the blocks stride over the tiles, so the grid can be capped
    const int64_t n = B * ((L + width - 1) / width);
    return {width, std::min<int64_t>(n, std::numeric_limits<int>::max()), true, static_cast<size_t>(bytes)};
  }
  width = 1;
  while (width < 8 && width < L) width *= 2;
  const int64_t n = B * ((L + width - 1) / width), per_block = tiles * C * width * 4;
  const int sms = at::cuda::getDeviceProperties(like.get_device())->multiProcessorCount;
  const int64_t grid = std::max<int64_t>(1, std::min<int64_t>({n, 2 * sms, kGlobalScratchBytes / per_block}));
  return {width, grid, false, 0};
}

enhance_block::Args make_args(const at::Tensor& zf, const at::Tensor& rp, const at::Tensor& wp, const at::Tensor& rsp,
                              const at::Tensor& ord, const at::Tensor& bounds, int64_t width, int64_t earlier_only) {
  const at::Tensor bd = bounds.cpu();
  return {zf.data_ptr<float>(), rp.data_ptr<float>(), wp.data_ptr<float>(), rsp.data_ptr<float>(),
          ord.data_ptr<int64_t>(), zf.size(0), zf.size(1), zf.size(2), bd[1].item<int64_t>(), bd[2].item<int64_t>(),
          width, earlier_only};
}

// The affinity, its row sums and w in group order (the block program indexes by position).
struct Ordered {
  at::Tensor ord, rp, wp, rsp;
};

Ordered ordered(const at::Tensor& z, const at::Tensor& affinity, const at::Tensor& order, const at::Tensor& w) {
  at::Tensor ord = order.to(z.device(), at::kLong).contiguous();
  at::Tensor rp = affinity.to(at::kFloat).index_select(0, ord).index_select(1, ord).contiguous();
  at::Tensor wp = w.to(at::kFloat).index_select(1, ord).contiguous();
  return {ord, rp, wp, rp.sum(1).contiguous()};
}

}  // namespace
}  // namespace cuda

at::Tensor enhance_fwd_cuda(const at::Tensor& z, const at::Tensor& affinity, const at::Tensor& order,
                            const at::Tensor& bounds, const at::Tensor& w, int64_t earlier_only) {
  CSSFE_CHECK_CUDA(z, "z");
  CSSFE_CHECK_CUDA(affinity, "affinity");
  CSSFE_CHECK_CUDA(w, "w");
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t B = z.size(0), C = z.size(1), L = z.size(2);
  at::Tensor zf = z.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({B, C, L}, z.options().dtype(at::kFloat));
  if (B * C * L > 0) {
    const cuda::Ordered o = cuda::ordered(z, affinity, order, w);
    const cuda::Plan p = cuda::plan(B, C, L, enhance_block::kForwardTiles, z);
    at::Tensor scratch;
    if (!p.shared) scratch = at::empty({p.grid * enhance_block::kForwardTiles * C * p.width}, zf.options());
    auto kernel = p.shared ? cuda::enhance_fwd_kernel<true> : cuda::enhance_fwd_kernel<false>;
    kernel<<<p.grid, cuda::kThreads, p.smem, at::cuda::getCurrentCUDAStream()>>>(
        cuda::make_args(zf, o.rp, o.wp, o.rsp, o.ord, bounds, p.width, earlier_only), out.data_ptr<float>(),
        p.shared ? nullptr : scratch.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out.to(z.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> enhance_bwd_cuda(const at::Tensor& grad, const at::Tensor& z,
                                                                const at::Tensor& affinity, const at::Tensor& order,
                                                                const at::Tensor& bounds, const at::Tensor& w,
                                                                const at::Tensor& out, int64_t earlier_only) {
  CSSFE_CHECK_CUDA(z, "z");
  CSSFE_CHECK_CUDA(grad, "grad");
  CSSFE_CHECK_CUDA(affinity, "affinity");
  CSSFE_CHECK_CUDA(w, "w");
  CSSFE_CHECK_CUDA(out, "out");
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t B = z.size(0), C = z.size(1), L = z.size(2);
  at::Tensor zf = z.to(at::kFloat).contiguous(), of = out.to(at::kFloat).contiguous();
  at::Tensor gf = grad.to(at::kFloat).contiguous();
  at::Tensor dz = at::empty({B, C, L}, zf.options());
  at::Tensor dm = at::empty({B, C, L}, zf.options());
  if (B * C * L == 0) return {dz.to(z.scalar_type()), dm, at::zeros({B, C}, zf.options())};
  const cuda::Ordered o = cuda::ordered(z, affinity, order, w);
  const cuda::Plan p = cuda::plan(B, C, L, enhance_block::kBackwardTiles, z);
  const int64_t per_image = (L + p.width - 1) / p.width;
  at::Tensor dw_part = at::empty({B, per_image, C}, zf.options());
  at::Tensor scratch;
  if (!p.shared) scratch = at::empty({p.grid * enhance_block::kBackwardTiles * C * p.width}, zf.options());
  auto kernel = p.shared ? cuda::enhance_bwd_kernel<true> : cuda::enhance_bwd_kernel<false>;
  kernel<<<p.grid, cuda::kThreads, p.smem, at::cuda::getCurrentCUDAStream()>>>(
      cuda::make_args(zf, o.rp, o.wp, o.rsp, o.ord, bounds, p.width, earlier_only), gf.data_ptr<float>(),
      of.data_ptr<float>(), dz.data_ptr<float>(), dm.data_ptr<float>(), dw_part.data_ptr<float>(),
      p.shared ? nullptr : scratch.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dz.to(z.scalar_type()), dm, dw_part.sum(1)};
}

TORCH_LIBRARY_IMPL(cssfe, CUDA, m) {
  m.impl("native_asl", &asl_cuda);
  m.impl("native_asl_scale_grad_", &asl_scale_grad_cuda);
  m.impl("native_attention_fwd", &attention_fwd_cuda);
  m.impl("native_attention_bwd", &attention_bwd_cuda);
  m.impl("native_enhance_fwd", &enhance_fwd_cuda);
  m.impl("native_enhance_bwd", &enhance_bwd_cuda);
}

}  // namespace cssfe
