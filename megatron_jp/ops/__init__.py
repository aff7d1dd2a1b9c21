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


def load_extension(family: str):
    """The compiled `megatron_jp.ops._<family>` module, or None where it was not built."""
    try:
        return importlib.import_module(f"megatron_jp.ops._{family}")
    except ImportError:
        return None


def cuda_stream(tensor: torch.Tensor) -> int:
    """The raw cudaStream_t of the current stream on the tensor's device, as the bindings take it."""
    return torch.cuda.current_stream(tensor.device).cuda_stream
