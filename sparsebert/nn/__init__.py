"""sparsebert.nn: SparseLinear, model surgery (sparsify, densify, sparsity_report) and compressed inference layers."""
from .compress import (BitmaskLinear, BSRLinear, SemiStructuredLinear, compress, decompress, footprint_report,
                       load_compressed, save_compressed)
from .cpu_sparse import SparseRowsLinear
from .inference import for_inference, pad_widths
from .persistence import export_onnx, from_pretrained, save_pretrained
from .sparse_linear import SparseLinear
from .sparsify import densify, encoder_linears, head_linears, linear_role, sparse_linears, sparsify, sparsity_report

__all__ = ["SparseLinear", "sparsify", "densify", "sparsity_report", "encoder_linears", "head_linears",
           "linear_role", "sparse_linears", "compress", "decompress", "footprint_report", "save_compressed",
           "load_compressed", "BitmaskLinear", "BSRLinear", "SemiStructuredLinear", "SparseRowsLinear", "save_pretrained",
           "from_pretrained", "export_onnx", "for_inference", "pad_widths"]
