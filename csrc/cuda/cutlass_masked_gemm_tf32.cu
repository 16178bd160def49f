// The tf32 instantiations of the CUTLASS sm90 GEMMs (cutlass_masked_gemm.cuh): the forward and input grad
// (no fp32 weight grad: see MaskedWeightGradGemm).
// One compile unit per element type so that a parallel build compiles them side by side.
#if defined(SPARSEBERT_WITH_CUTLASS)

#include "cutlass_masked_gemm.cuh"

namespace sparsebert {
namespace cuda {

SPARSEBERT_CUTLASS_ENTRY_POINTS(tf32, float)

}  // namespace cuda
}  // namespace sparsebert

#endif  // SPARSEBERT_WITH_CUTLASS
