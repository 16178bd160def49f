// The bf16 instantiations of the CUTLASS sm90 GEMMs (cutlass_masked_gemm.cuh): the forward and input grad and the weight grad.
// One compile unit per element type so that a parallel build compiles them side by side.
#if defined(SPARSEBERT_WITH_CUTLASS)

#include "cutlass_masked_gemm.cuh"

namespace sparsebert {
namespace cuda {

SPARSEBERT_CUTLASS_ENTRY_POINTS(bf16, cutlass::bfloat16_t)
SPARSEBERT_CUTLASS_WEIGHT_GRAD_ENTRY_POINT(bf16, cutlass::bfloat16_t)

}  // namespace cuda
}  // namespace sparsebert

#endif  // SPARSEBERT_WITH_CUTLASS
