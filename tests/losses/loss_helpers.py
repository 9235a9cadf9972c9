"""Helpers shared by the loss tests."""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode


class MatmulFlops(TorchDispatchMode):
    """Counts 2*M*K*N of every mm/addmm (also in place and out=) below the autograd layer."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "addmm_"):
            a, b = (args[0], args[1]) if name == "mm" else (args[1], args[2])
            self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        return func(*args, **(kwargs or {}))
