"""sparsebert.nn: SparseLinear and model surgery (sparsify, densify, sparsity_report)."""
from .sparse_linear import SparseLinear
from .sparsify import densify, encoder_linears, head_linears, linear_role, sparse_linears, sparsify, sparsity_report

__all__ = ["SparseLinear", "sparsify", "densify", "sparsity_report", "encoder_linears", "head_linears",
           "linear_role", "sparse_linears"]
