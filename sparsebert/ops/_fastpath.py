"""`custom_op`: a torch.library custom op that eager calls reach without the dispatcher's Python layers.

Every kernel of the ops layer is one `torch.library.custom_op` (FlashAttention's pattern), so that
torch.compile and torch.export trace it as one node with a fake implementation. In eager mode that op costs
its Python dispatch on every call (custom_op's wrapper, schema checks, the autograd kernel it registers):
about 90 us a call on the 2-core CI machine against 4-9 us for F.linear, and the first GPU run measured the
eager ops at 100-400 us where the kernels take 3-20 us (bench/results/README.md).

`custom_op(name, mutates_args=())` returns a `FastCustomOp` that registers the same torch.library op
(`.op`; `register_fake` and `register_autograd` go to it) and, when called:
  * tracing (torch.compile, export, a dispatch or torch-function mode, a tensor subclass such as
    FakeTensor): calls the registered op, as before;
  * eager with plain tensors: calls the Python body directly, through a `torch.autograd.Function` built
    from the same setup_context and backward when an input requires grad (an op with no backward then takes
    the registered op, whose backward error is the op's contract). The backward calls the other
    ops of the layer, which take the same path; so eager and traced runs execute the same body and the
    same backward, and tests compare the two (tests/test_fastpath.py).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

_PLAIN = (Tensor, torch.nn.Parameter)

ENABLED = True  # False: every call takes the registered op (the op-overhead benchmark's A/B, tests)


def _is_plain(value) -> bool:
    if isinstance(value, Tensor):
        return type(value) in _PLAIN
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    return True


def _requires_grad(args) -> bool:
    for a in args:
        if isinstance(a, Tensor) and a.requires_grad:
            return True
        if isinstance(a, (list, tuple)) and _requires_grad(a):
            return True
    return False


def _tracing() -> bool:
    return (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
            or torch._C._is_torch_function_mode_enabled())


def _scan(args) -> Optional[bool]:
    """None when an argument is a tensor subclass (or holds one); else whether a tensor argument requires grad.
    One pass: it runs on every eager call, where each Python-level helper call showed in the op-overhead
    benchmark."""
    needs_grad = False
    for a in args:
        if isinstance(a, Tensor):
            if type(a) not in _PLAIN:
                return None
            needs_grad = needs_grad or a.requires_grad
        elif isinstance(a, (list, tuple)):
            if not _is_plain(a):
                return None
            needs_grad = needs_grad or _requires_grad(a)
    return needs_grad


def eager_with_plain_tensors(args) -> bool:
    """True when a call may skip the registered op: not tracing, no mode active, no tensor subclass."""
    return ENABLED and not _tracing() and _scan(args) is not None


class FastCustomOp:
    """A torch.library custom op plus its body, called directly in eager (see the module docstring)."""

    def __init__(self, name: str, body: Callable, mutates_args=()):
        if mutates_args:
            raise ValueError("the eager fast path is for pure ops: mutates_args must be empty")
        self.name = name
        self.body = body
        self.op = torch.library.custom_op(name, mutates_args=mutates_args)(body)
        self._function: Optional[type] = None
        self.__doc__ = body.__doc__
        self.__name__ = getattr(body, "__name__", name)

    def register_fake(self, fn: Callable) -> Callable:
        return self.op.register_fake(fn)

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        self.op.register_autograd(backward, setup_context=setup_context)
        body = self.body

        class _Eager(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *args):
                out = body(*args)
                setup_context(ctx, args, out)
                return out

            @staticmethod
            def backward(ctx, *grads):
                return backward(ctx, *grads)

        _Eager.__name__ = _Eager.__qualname__ = f"{self.__name__}_eager"
        self._function = _Eager

    def __call__(self, *args):
        needs_grad = _scan(args) if ENABLED and not _tracing() else None
        if needs_grad is None:
            return self.op(*args)
        if needs_grad and torch.is_grad_enabled():
            if self._function is None:  # no backward registered: the op's own error on backward, not a silent
                return self.op(*args)   # no-grad output (a Triton body) or an unplanned torch-op gradient
            return self._function.apply(*args)
        return self.body(*args)


def custom_op(name: str, *, mutates_args=()) -> Callable[[Callable], FastCustomOp]:
    """Decorator: `torch.library.custom_op(name, mutates_args=())` with the eager fast path."""
    def wrap(body: Callable) -> FastCustomOp:
        return FastCustomOp(name, body, mutates_args)
    return wrap
