// Registers the native kernels of the cssfe operators with torch.library.
//
// The public operators (cssfe::asymmetric_loss, cssfe::class_attention, ...) are defined in Python
// (cssfe/ops/library.py) with a backend argument; for backend "cpu" / "cuda" they call the
// cssfe::native_* operators defined here. CPU kernels live in cpu/*.cpp, CUDA kernels in cuda/*.cu
// (which add their own TORCH_LIBRARY_IMPL(cssfe, CUDA, ...) blocks when built).
#include "cssfe.h"

// The build passes -DCSSFE_BUILD_HASH=h<hash of csrc/ and the compiler flags> (unquoted: quotes do
// not survive ninja); cssfe/ops/backends/build_spec.py computes it.
#define CSSFE_STR2(x) #x
#define CSSFE_STR(x) CSSFE_STR2(x)
#ifdef CSSFE_BUILD_HASH
#define CSSFE_BUILD_HASH_STR CSSFE_STR(CSSFE_BUILD_HASH)
#else
#define CSSFE_BUILD_HASH_STR "unknown"
#endif
// The GPU code a CUDA build carries, as build_spec.arch_define writes it: sm_XY (machine code) and
// compute_XY (PTX) names joined by "-" (build_spec.runs_on reads them against the device).
#ifdef CSSFE_CUDA_ARCHS
#define CSSFE_CUDA_ARCHS_STR CSSFE_STR(CSSFE_CUDA_ARCHS)
#else
#define CSSFE_CUDA_ARCHS_STR ""
#endif

TORCH_LIBRARY_FRAGMENT(cssfe, m) {
  m.def(
      "native_asl(Tensor logits, Tensor targets, float gamma_pos, float gamma_neg, float clip, float eps, "
      "bool focal_grad, bool mean, bool need_grad) -> (Tensor, Tensor)");
  m.def("native_asl_scale_grad_(Tensor(a!) grad, Tensor scale) -> ()");
  m.def("native_attention_fwd(Tensor q, Tensor k, Tensor v) -> (Tensor, Tensor)");
  m.def(
      "native_attention_bwd(Tensor grad_z, Tensor q, Tensor k, Tensor v, Tensor z, Tensor lse) -> "
      "(Tensor, Tensor, Tensor)");
  // earlier_only: bit g set when the caller knows that stage g's rows take nothing from their own or
  // a later group (cssfe.h); the kernels then skip those sources without reading the affinity there.
  m.def(
      "native_enhance_fwd(Tensor z, Tensor affinity, Tensor order, Tensor bounds, Tensor w, int earlier_only=0) -> "
      "Tensor");
  m.def(
      "native_enhance_bwd(Tensor grad, Tensor z, Tensor affinity, Tensor order, Tensor bounds, Tensor w, "
      "Tensor out, int earlier_only=0) -> (Tensor, Tensor, Tensor)");
  // the same contract, computed as batched matrix products on any device (enhance_staged.cpp)
  m.def(
      "native_enhance_staged_fwd(Tensor z, Tensor affinity, Tensor order, Tensor bounds, Tensor w, "
      "int earlier_only=0) -> Tensor");
  m.def(
      "native_enhance_staged_bwd(Tensor grad, Tensor z, Tensor affinity, Tensor order, Tensor bounds, Tensor w, "
      "Tensor out, int earlier_only=0) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(cssfe, CPU, m) {
  m.impl("native_asl", &cssfe::asl_cpu);
  m.impl("native_asl_scale_grad_", &cssfe::asl_scale_grad_cpu);
  m.impl("native_attention_fwd", &cssfe::attention_fwd_cpu);
  m.impl("native_attention_bwd", &cssfe::attention_bwd_cpu);
  m.impl("native_enhance_fwd", &cssfe::enhance_fwd_cpu);
  m.impl("native_enhance_bwd", &cssfe::enhance_bwd_cpu);
}

// Shapes only (fake tensors: torch.compile, compiled autograd, opcheck): the in-place scaling returns
// nothing and changes no metadata. The other native operators are called only from inside the
// registered Python operators (cssfe/ops/library.py), whose fake implementations cover them; this one
// is also called by the eager ASL's backward, which compiled autograd traces.
TORCH_LIBRARY_IMPL(cssfe, Meta, m) {
  m.impl("native_asl_scale_grad_", [](const at::Tensor&, const at::Tensor&) {});
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("build_hash") = CSSFE_BUILD_HASH_STR;
#ifdef CSSFE_WITH_CUDA
  m.attr("with_cuda") = true;
  m.attr("cuda_archs") = CSSFE_CUDA_ARCHS_STR;
#else
  m.attr("with_cuda") = false;
  m.attr("cuda_archs") = "";
#endif
}
