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


def lora_head_policy(base, kind: str = "lora", *, r: int = 4, seed: int = 1):
    """``(policy, base)``: ``base`` (float64) under a real PEFT adapter that changes its LM head, and a
    float64 copy of ``base`` untouched (the reference).

    ``kind="lora"``: LoRA on ``q_proj`` and on the ``lm_head`` itself (lora_B drawn non-zero, so the adapter
    matters); ``kind="modules_to_save"``: LoRA on ``q_proj`` and a trainable copy of ``lm_head`` (perturbed).
    """
    import copy

    import peft
    import torch

    base = base.double()
    ref = copy.deepcopy(base)
    if kind == "lora":
        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "lm_head"], lora_dropout=0.0)
    elif kind == "modules_to_save":
        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj"], modules_to_save=["lm_head"],
                              lora_dropout=0.0)
    else:
        raise ValueError(f"kind must be 'lora' or 'modules_to_save', got {kind!r}")
    policy = peft.get_peft_model(base, cfg).double().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name or ("modules_to_save" in name and "lm_head" in name):
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return policy, ref
