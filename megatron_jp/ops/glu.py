"""Gated linear units on a fused fc1 output laid out as [activated half; linear half].

SwiGLU: silu(a) * b (Llama's gate_proj is `a`, up_proj is `b`); GeGLU: gelu(a) * b with exact erf
GELU (ModernBERT's Wi = [input; gate]), or the tanh approximation.
"""

import torch
import torch.nn.functional as F

GLU_ACTIVATIONS = ("swiglu", "geglu", "geglu_tanh")


def glu_reference(x: torch.Tensor, activation: str) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    if activation == "swiglu":
        return F.silu(a) * b
    if activation == "geglu":
        return F.gelu(a) * b
    if activation == "geglu_tanh":
        return F.gelu(a, approximate="tanh") * b
    raise ValueError(f"unknown GLU activation {activation!r}; expected one of {GLU_ACTIVATIONS}")


def glu(x: torch.Tensor, activation: str) -> torch.Tensor:
    """The fused kernel where available, else the reference."""
    return glu_reference(x, activation)
