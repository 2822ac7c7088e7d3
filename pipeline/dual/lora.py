"""LoRA adapters for the Coprocessor (paper 002, Table 5), merged on export.

`add_lora(module, rank, alpha)` swaps every `nn.Linear` inside `module` (except
those whose name matches `skip`) for a `LoRALinear` that keeps the original weight
frozen and adds `(alpha / rank) * B @ A`. `merge_lora(module)` folds the adapters
back into plain `nn.Linear` weights, so an export is an ordinary HF checkpoint.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LoRALinear(nn.Module):
    """y = x W^T + b + (alpha/r) * x A^T B^T, with W and b frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.base.weight.requires_grad_(False)
        if self.base.bias is not None:
            self.base.bias.requires_grad_(False)
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # B = 0: starts as the identity edit

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scale

    def merged(self) -> nn.Linear:
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None)
        out = out.to(device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.base.weight + self.scale * self.lora_b @ self.lora_a)
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out


def add_lora(module: nn.Module, rank: int, alpha: float, skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Replace the `nn.Linear` children of `module` by `LoRALinear`; returns how many."""
    targets = [
        (name, child)
        for name, child in module.named_modules()
        if isinstance(child, nn.Linear) and not any(s in name for s in skip)
    ]
    for name, child in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, LoRALinear(child, rank, alpha))
    return len(targets)


def merge_lora(module: nn.Module) -> int:
    """Fold every `LoRALinear` in `module` back into a plain `nn.Linear`; returns how many."""
    targets = [(n, m) for n, m in module.named_modules() if isinstance(m, LoRALinear)]
    for name, child in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, child.merged())
    return len(targets)
