"""sparsebert: fused Triton and C++/CUDA kernels for sparse and pruned BERT-family encoders.

Layers (bottom to top): backends (sparsebert.kernels, sparsebert._C) -> ops -> nn -> pruning/debias/data
-> cli. See docs/ARCHITECTURE.md.
"""
from .nn import (SparseLinear, compress, decompress, densify, from_pretrained, save_pretrained, sparsify,
                 sparsity_report)
from .ops import masked_linear, score_masked_linear, topk_threshold

__version__ = "0.1.0"
__all__ = ["SparseLinear", "sparsify", "compress", "decompress", "densify", "sparsity_report", "masked_linear", "score_masked_linear",
           "topk_threshold", "save_pretrained", "from_pretrained", "__version__"]
