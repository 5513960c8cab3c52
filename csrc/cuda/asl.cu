// Asymmetric loss on CUDA: loss and gradient in one pass over memory, in one launch.
//
// - Bytes in flight: each thread moves 16-byte packs of logits (and the matching targets and
//   gradient), so a resident block set keeps enough loads outstanding to reach the memory
//   bandwidth; scalar 2-byte loads cannot (inputs not aligned to a pack take the scalar loop).
// - Math: csrc/asl_element.h, the same per-element functions as the CPU kernel. 0/1 targets with
//   integer gammas take the branch-free form (one exp, one log, one division, powers by
//   multiplication); other elements the general one.
// - Reduction: each block writes its partial sum; the last block to finish adds them in a fixed
//   order (deterministic) and writes the loss, so no second kernel or host-side sum is needed.
// - Backward: asl_scale_kernel multiplies the saved gradient by the incoming loss gradient in
//   place, reading it on the device; when that is 1 no block touches memory.
#include <ATen/Dispatch.h>

#include <type_traits>

#include "../asl_element.h"
#include "../cssfe.h"
#include "common.cuh"

namespace cssfe {
namespace cuda {

// The Math policy of asl_binary_element on the GPU: hardware approximations (a few ulp).
struct FastMath {
  static __device__ __forceinline__ float exp_nonpositive(float x) { return __expf(x); }
  static __device__ __forceinline__ float log_positive(float x) { return __logf(x); }
  static __device__ __forceinline__ float divide(float a, float b) { return __fdividef(a, b); }
};

struct AslArgs {
  AslBinaryParams binary;
  float gamma_pos, gamma_neg, clip, eps;
  float grad_scale;  // 1 for sum, 1 / numel for mean
  bool focal, focal_grad, binary_ok;
};

// kDefaults: A holds the default parameters (launch_asl checked), fixed at compile time.
template <bool kDefaults>
__device__ __forceinline__ AslValue asl_one(float x, float y, const AslArgs& A) {
  if (A.binary_ok && (y == 0.0f || y == 1.0f))
    return asl_binary_element<FastMath, kDefaults>(x, y != 0.0f, A.binary);
  float g;
  const float l = asl_element<float>(x, y, A.gamma_pos, A.gamma_neg, A.clip, A.eps, A.focal, A.focal_grad, &g);
  return {l, g};
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int Bytes>
struct WordOf;
template <>
struct WordOf<1> { using type = uint8_t; };
template <>
struct WordOf<2> { using type = uint16_t; };
template <>
struct WordOf<4> { using type = uint32_t; };
template <>
struct WordOf<8> { using type = uint64_t; };

// The targets of one pack: its values, whether all are 0 or 1, and which are 1.
template <typename target_t, int N>
struct TargetPack {
  Pack<target_t, N> pack;
  __device__ __forceinline__ TargetPack(const target_t* t, int64_t p)
      : pack(reinterpret_cast<const Pack<target_t, N>*>(t)[p]) {}
  __device__ __forceinline__ float operator[](int j) const { return static_cast<float>(pack.v[j]); }
  __device__ __forceinline__ bool positive(int j) const { return pack.v[j] != target_t(0); }
  __device__ __forceinline__ bool all_binary() const {
    bool binary = true;
#pragma unroll
    for (int j = 0; j < N; ++j) binary &= pack.v[j] == target_t(0) || pack.v[j] == target_t(1);
    return binary;
  }
};

// Byte targets (bool, uint8) as one word: one test for the whole pack (per byte, the compiler
// unpacks a byte array and packs it again for such a test).
template <int N>
struct TargetPack<uint8_t, N> {
  using word_t = typename WordOf<N>::type;
  word_t word;
  __device__ __forceinline__ TargetPack(const uint8_t* t, int64_t p) : word(reinterpret_cast<const word_t*>(t)[p]) {}
  __device__ __forceinline__ float operator[](int j) const { return static_cast<float>((word >> (8 * j)) & 0xFF); }
  __device__ __forceinline__ bool positive(int j) const { return (word >> (8 * j)) & 1; }
  __device__ __forceinline__ bool all_binary() const {
    return (word & static_cast<word_t>(0xFEFEFEFEFEFEFEFEull)) == 0;  // no byte above 1
  }
};

constexpr int kThreads = 256;

template <typename scalar_t, typename target_t, typename loss_t, int VEC, bool kDefaults>
__global__ void __launch_bounds__(kThreads)
    asl_kernel(const scalar_t* __restrict__ x, const target_t* __restrict__ t, scalar_t* __restrict__ grad,
               float* __restrict__ partial, unsigned int* __restrict__ arrived, loss_t* __restrict__ loss, int64_t n,
               AslArgs A, double loss_scale) {
  using XPack = Pack<scalar_t, VEC>;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t packs = n / VEC;
  float local = 0.0f;
  for (int64_t p = first; p < packs; p += stride) {
    const XPack xp = reinterpret_cast<const XPack*>(x)[p];
    const TargetPack<target_t, VEC> tp(t, p);
    XPack gp;
    // A pack of 0/1 targets (the usual case) runs the binary form without a branch per element, so
    // the compiler interleaves the pack's independent elements.
    if (A.binary_ok && tp.all_binary()) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const AslValue r =
            asl_binary_element<FastMath, kDefaults>(static_cast<float>(xp.v[j]), tp.positive(j), A.binary);
        local += r.loss;
        gp.v[j] = static_cast<scalar_t>(r.grad * A.grad_scale);
      }
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const AslValue r = asl_one<kDefaults>(static_cast<float>(xp.v[j]), tp[j], A);
        local += r.loss;
        gp.v[j] = static_cast<scalar_t>(r.grad * A.grad_scale);
      }
    }
    if (grad != nullptr) reinterpret_cast<XPack*>(grad)[p] = gp;
  }
  for (int64_t i = packs * VEC + first; i < n; i += stride) {  // the n % VEC elements after the last pack
    const AslValue r = asl_one<kDefaults>(static_cast<float>(x[i]), static_cast<float>(t[i]), A);
    local += r.loss;
    if (grad != nullptr) grad[i] = static_cast<scalar_t>(r.grad * A.grad_scale);
  }

  __shared__ float red[32];
  __shared__ double red64[32];
  __shared__ bool last;
  const float block_total = block_sum(local, red);
  if (threadIdx.x == 0) {
    partial[blockIdx.x] = block_total;
    __threadfence();  // the partial is visible to every block before this block counts as arrived
    last = atomicAdd(arrived, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  double acc = 0.0;
  for (int i = threadIdx.x; i < static_cast<int>(gridDim.x); i += blockDim.x)
    acc += static_cast<double>(__ldcg(partial + i));  // from L2: other blocks wrote them
  acc = block_sum(acc, red64);
  if (threadIdx.x == 0) *loss = static_cast<loss_t>(acc * loss_scale);
}

// Blocks for a grid-stride kernel over `items`: as many as fit on the device at once (a second,
// partial wave would run with too few loads in flight); the count per SM depends on the registers
// this build's kernel uses.
template <typename Kernel>
int resident_blocks(Kernel kernel, int64_t items) {
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
  const int64_t resident =
      static_cast<int64_t>(std::max(1, per_sm)) * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((items + kThreads - 1) / kThreads, resident)));
}

template <typename T>
bool aligned_to(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % alignof(T) == 0;
}

template <typename scalar_t, typename target_t>
void launch_asl(const at::Tensor& logits, const at::Tensor& targets, at::Tensor& grad, bool need_grad,
                at::Tensor& loss, const AslArgs& A, double loss_scale) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  using loss_t = typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type;
  const int64_t n = logits.numel();
  const scalar_t* x = logits.data_ptr<scalar_t>();
  const target_t* t = targets.data_ptr<target_t>();
  scalar_t* g = need_grad ? grad.data_ptr<scalar_t>() : nullptr;
  const bool packed = aligned_to<Pack<scalar_t, VEC>>(x) && aligned_to<Pack<target_t, VEC>>(t) &&
                      (g == nullptr || aligned_to<Pack<scalar_t, VEC>>(g));
  const int64_t items = packed ? (n + VEC - 1) / VEC : n;  // packs, or elements
  // The project's default parameters get kernels with them fixed at compile time (packed inputs
  // only: the scalar kernel is for misaligned views).
  const bool fixed = packed && A.binary_ok && asl_default_params(A.binary);
  auto kernel = fixed    ? asl_kernel<scalar_t, target_t, loss_t, VEC, true>
                : packed ? asl_kernel<scalar_t, target_t, loss_t, VEC, false>
                         : asl_kernel<scalar_t, target_t, loss_t, 1, false>;
  const int blocks = resident_blocks(kernel, items);
  // [arrival counter, partial sums of the blocks]: one memset
  at::Tensor work = at::zeros({blocks + 1}, logits.options().dtype(at::kInt));
  auto* arrived = reinterpret_cast<unsigned int*>(work.data_ptr<int>());
  auto* partial = reinterpret_cast<float*>(work.data_ptr<int>() + 1);
  auto stream = at::cuda::getCurrentCUDAStream();
  loss_t* out = loss.data_ptr<loss_t>();
  kernel<<<blocks, kThreads, 0, stream>>>(x, t, g, partial, arrived, out, n, A, loss_scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// grad *= *scale (the incoming loss gradient, read here so the host never waits for it); every
// block returns at once when it is 1, the usual case of a loss that is the last op.
template <typename scalar_t, typename scale_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    asl_scale_kernel(scalar_t* __restrict__ grad, const scale_t* __restrict__ scale, int64_t n) {
  using acc_t = typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type;
  const acc_t s = static_cast<acc_t>(*scale);
  if (s == acc_t(1)) return;
  using GPack = Pack<scalar_t, VEC>;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t packs = n / VEC;
  for (int64_t p = first; p < packs; p += stride) {
    GPack gp = reinterpret_cast<const GPack*>(grad)[p];
#pragma unroll
    for (int j = 0; j < VEC; ++j) gp.v[j] = static_cast<scalar_t>(static_cast<acc_t>(gp.v[j]) * s);
    reinterpret_cast<GPack*>(grad)[p] = gp;
  }
  for (int64_t i = packs * VEC + first; i < n; i += stride)
    grad[i] = static_cast<scalar_t>(static_cast<acc_t>(grad[i]) * s);
}

template <typename scalar_t, typename scale_t>
void launch_asl_scale(const at::Tensor& grad, const at::Tensor& scale) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  const int64_t n = grad.numel();
  scalar_t* g = grad.data_ptr<scalar_t>();
  const bool packed = aligned_to<Pack<scalar_t, VEC>>(g);
  auto kernel = packed ? asl_scale_kernel<scalar_t, scale_t, VEC> : asl_scale_kernel<scalar_t, scale_t, 1>;
  const int64_t items = packed ? (n + VEC - 1) / VEC : n;
  const int blocks = resident_blocks(kernel, items);
  kernel<<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(g, scale.data_ptr<scale_t>(), n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda

void asl_scale_grad_cuda(const at::Tensor& grad, const at::Tensor& scale) {
  CSSFE_CHECK_CUDA(grad, "grad");
  TORCH_CHECK(scale.device() == grad.device() && scale.numel() == 1 &&
                  (scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kDouble),
              "native_asl_scale_grad_: scale must be a one-element fp32 or fp64 tensor on ", grad.device(), ", got ",
              scale.sizes(), " ", scale.scalar_type(), " on ", scale.device());
  if (grad.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(grad.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "cssfe_asl_scale_cuda", [&] {
    if (scale.scalar_type() == at::kDouble)
      cuda::launch_asl_scale<scalar_t, double>(grad, scale);
    else
      cuda::launch_asl_scale<scalar_t, float>(grad, scale);
  });
}

std::tuple<at::Tensor, at::Tensor> asl_cuda(const at::Tensor& logits, const at::Tensor& targets, double gamma_pos,
                                            double gamma_neg, double clip, double eps, bool focal_grad, bool mean,
                                            bool need_grad) {
  CSSFE_CHECK_CUDA(logits, "logits");
  CSSFE_CHECK_CUDA(targets, "targets");
  TORCH_CHECK(logits.sizes() == targets.sizes(), "native_asl: logits and targets shapes differ");
  TORCH_CHECK(logits.device() == targets.device(), "native_asl: logits are on ", logits.device(), ", targets on ",
              targets.device());
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t n = logits.numel();
  const double scale = mean ? (n > 0 ? 1.0 / static_cast<double>(n) : std::nan("")) : 1.0;
  cuda::AslArgs A;
  A.binary = asl_binary_params(gamma_pos, gamma_neg, clip, eps, focal_grad);
  A.gamma_pos = static_cast<float>(gamma_pos);
  A.gamma_neg = static_cast<float>(gamma_neg);
  A.clip = static_cast<float>(clip);
  A.eps = static_cast<float>(eps);
  A.grad_scale = static_cast<float>(scale);
  A.focal = gamma_pos > 0 || gamma_neg > 0;
  A.focal_grad = focal_grad;
  A.binary_ok = asl_binary_supported(gamma_pos, gamma_neg, clip, eps);
  at::Tensor grad = need_grad ? at::empty_like(logits) : at::empty({0}, logits.options());
  const auto loss_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor loss = at::empty({}, logits.options().dtype(loss_dtype));
  // Kernels for bool/uint8 and fp32 targets; the rarer fp16/bf16/fp64 targets are widened (or
  // narrowed) to fp32 first, which keeps the number of kernels to compile down.
  const at::Tensor tgt = targets.scalar_type() == at::kBool   ? targets.view(at::kByte)
                         : targets.scalar_type() == at::kByte ? targets
                                                              : targets.to(at::kFloat);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cssfe_asl_cuda", [&] {
    if (tgt.scalar_type() == at::kByte)
      cuda::launch_asl<scalar_t, uint8_t>(logits, tgt, grad, need_grad, loss, A, scale);
    else
      cuda::launch_asl<scalar_t, float>(logits, tgt, grad, need_grad, loss, A, scale);
  });
  return {loss, grad};
}

}  // namespace cssfe
