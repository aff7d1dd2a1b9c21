"""The private torch APIs megatron_jp relies on, each behind one function that checks it exists.

torch may rename or drop a private name in any release. Each function below is the only place its API
is touched; on a torch that lacks it, the function raises `UnsupportedTorch` naming the API, the
installed version and the versions tested, instead of an AttributeError deep inside a step or a save.
Tested: torch 2.13 (CI, the pinned CPU build); the device check (bench/gpu_check.sh) targets 2.11.
"""

from __future__ import annotations

import inspect

import torch

TESTED = "2.13 (CPU, CI); 2.11 is the device check's target"


class UnsupportedTorch(RuntimeError):
    """The installed torch lacks a private API megatron_jp uses."""


def _missing(api: str) -> UnsupportedTorch:
    return UnsupportedTorch(f"torch {torch.__version__} has no {api}, which megatron_jp uses (tested with torch "
                            f"{TESTED}): install a tested torch, or report the version at the project's issues")


def fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr: float, beta1: float, beta2: float,
                 eps: float) -> None:
    """torch's fused AdamW kernel (torch._fused_adamw_) over lists of tensors, no weight decay."""
    kernel = getattr(torch, "_fused_adamw_", None)
    if kernel is None:
        raise _missing("torch._fused_adamw_")
    kernel(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=lr, beta1=beta1, beta2=beta2, weight_decay=0.0,
           eps=eps, amsgrad=False, maximize=False)


def storage_info(relative_path: str, offset: int, length: int):
    """DCP's record of where a written item lies in its file (filesystem._StorageInfo)."""
    from torch.distributed.checkpoint import filesystem

    cls = getattr(filesystem, "_StorageInfo", None)
    if cls is None:
        raise _missing("torch.distributed.checkpoint.filesystem._StorageInfo")
    return cls(relative_path, offset, length)


def check_writer_hook(writer_class) -> None:
    """The writer overrides FileSystemWriter.write_data(plan, planner); refuse a torch whose DCP calls
    it differently (the override would be skipped or called with other arguments)."""
    base = getattr(writer_class.__mro__[1], "write_data", None)
    if base is None or list(inspect.signature(base).parameters)[1:] != ["plan", "planner"]:
        raise _missing("FileSystemWriter.write_data(plan, planner)")
