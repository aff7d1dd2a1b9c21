"""Fused ops. Each module holds a pure-torch reference (the CPU fallback and the test oracle) and, where
the CUDA extension was built, a fused kernel behind the same function.

Dispatch, in every op module: CPU tensors (or no built extension) go straight to the reference, so
the CPU path is the reference itself at the cost of one attribute check; CUDA tensors in eager mode go
through a torch.autograd.Function around the kernel; under torch.compile they go through the
torch.library custom op (`torch.ops.megatron_jp.*`), which has a fake implementation and an autograd
formula, so the compiled graph holds the kernel as one opaque node.
"""

import importlib

import torch

# The dtypes the kernels are instantiated for; anything else takes the reference, on any device.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# A fused kernel earns its place by beating torch.compile of its reference (what train.compile runs
# otherwise) by MIN_SPEEDUP, forward + backward, on every seed shape. The figures come from
# `python bench/fused_kernels.py` on the device (it prints this line); a kernel below the bar stops
# being the default (the reference runs, compiled with its block) but stays built and tested.
# None: not measured on a device yet, so the kernel stays the default.
MIN_SPEEDUP = 1.2
KERNEL_SPEEDUP_VS_COMPILED: dict[str, float | None] = {"rope": None, "qkv_rope": None, "glu": None}


def kernel_is_default(family: str, speedups: dict | None = None) -> bool:
    """Whether `family`'s kernel runs by default where it is built (see KERNEL_SPEEDUP_VS_COMPILED)."""
    speedup = (KERNEL_SPEEDUP_VS_COMPILED if speedups is None else speedups).get(family)
    return speedup is None or speedup >= MIN_SPEEDUP


def load_extension(family: str):
    """The compiled `megatron_jp.ops._<family>` module, or None where it was not built."""
    try:
        return importlib.import_module(f"megatron_jp.ops._{family}")
    except ImportError:
        return None


def cuda_stream(tensor: torch.Tensor) -> int:
    """The raw cudaStream_t of the current stream on the tensor's device, as the bindings take it."""
    return torch.cuda.current_stream(tensor.device).cuda_stream
