"""AdamW's math without the learning-rate schedule: which parameters decay, and the update itself.

`adamw_update_` is torch.optim.AdamW's single-tensor update written out, so the sharded optimizer
(parallel/optimizer.py), which updates flat fp32 slices of many parameters at once, matches the
single-process torch optimizer step for step. Schedules live in training/schedules.py.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from megatron_jp.config import OptimConfig
from megatron_jp.torch_compat import fused_adamw_


def decays(param: torch.Tensor) -> bool:
    """Weight decay on matrices (linear weights, embedding tables), never on norm scales or biases:
    these are exactly the one-dimensional parameters of the encoder."""
    return param.dim() >= 2


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two torch.optim parameter groups: decayed matrices and undecayed vectors."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if decays(p)], "weight_decay": weight_decay},
            {"params": [p for p in params if not decays(p)], "weight_decay": 0.0}]


def torch_adamw(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """The plain single-process optimizer with the same hyper-parameters (reference and tools)."""
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps, foreach=False)


@torch.no_grad()
def adamw_update_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                  exp_avg_sqs: list[torch.Tensor], *, step: int, lr: float, beta1: float, beta2: float, eps: float,
                  fused: bool | None = None) -> None:
    """One Adam step in place on lists of fp32 tensors (decoupled weight decay is applied by the
    caller, on the decayed ranges only, before this call: param *= 1 - lr * weight_decay).

    fused (default: on CUDA) runs torch's fused AdamW kernel over all the tensors in one launch, one
    pass over the four tensors instead of seven, with the step count made on the device (no host
    copy); the written-out form stays the CPU path, identical to torch.optim.AdamW(foreach=False).
    """
    if not params:
        return
    if params[0].is_cuda if fused is None else fused:
        steps = [torch.full((), float(step), device=p.device) for p in params]
        fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, steps, lr=lr, beta1=beta1, beta2=beta2, eps=eps)
        return
    bias_correction1 = 1 - beta1 ** step
    bias_correction2_sqrt = math.sqrt(1 - beta2 ** step)
    for param, grad, exp_avg, exp_avg_sq in zip(params, grads, exp_avgs, exp_avg_sqs):
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


def clip_coefficient(total_norm: float, max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_'s factor: max_norm / (norm + 1e-6), at most 1; 0 disables."""
    if max_norm <= 0:
        return 1.0
    return min(max_norm / (total_norm + 1e-6), 1.0)
