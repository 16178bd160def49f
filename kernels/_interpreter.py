"""What differs when the Triton kernels run under the CPU interpreter (TRITON_INTERPRET=1, as in CI)."""
import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def exact_dot(dtype: torch.dtype) -> bool:
    """True when a kernel's tl.dot must compute exact fp32 products: fp32 operands always (no TF32), and
    16-bit operands under the interpreter, whose bf16 tl.dot is wrong (errors near 1e10 in triton 3.9);
    there the kernels upcast to fp32, the arithmetic the tensor cores do on the GPU."""
    return dtype == torch.float32 or INTERPRET
