"""One precision object: what `train.precision`, `train.fp8_recipe` and `parallel.grad_reduce_dtype`
mean for the model, the optimizer, the gradient sums, the memory plan, the checkpointer and MFU.

Decoded once from the run configuration (`Precision.of(cfg)`) and passed to whoever needs it; nothing
else compares precision strings.

  fp32  fp32 parameters, activations and optimizer (no separate master copy)
  bf16  bf16 parameters and activations; fp32 master weights, Adam moments and gradient accumulation
  fp8   bf16 as above, and the blocks' linears (attention qkv/out, MLP fc1/fc2) run their GEMMs in
        FP8 through torchao's float8 training (models/float8.py) with `fp8_recipe`'s scaling
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # the names config keys use for dtypes
FP8_RECIPES = ("tensorwise", "rowwise")  # torchao's Float8LinearRecipeName values we train with
FP8_MULTIPLE = 16  # both dims of an FP8 GEMM's weight must be multiples of 16 (Hopper's FP8 tensor cores)

# MFU denominators: H100 SXM dense peaks (NVIDIA H100 datasheet, without sparsity)
H100_BF16_PEAK_FLOPS = 989.4e12
H100_FP8_PEAK_FLOPS = 1978.9e12


@dataclass(frozen=True)
class Precision:
    """The data types of one run."""

    compute: torch.dtype = torch.float32
    """Activations, and every matmul outside the FP8 linears."""
    params: torch.dtype = torch.float32
    """The model's parameters, as forward reads them."""
    master: torch.dtype = torch.float32
    """The optimizer's copy of the parameters that updates accumulate in (checkpointed when it is not
    the parameters themselves)."""
    grad_reduce: torch.dtype = torch.float32
    """Data type of the data-parallel gradient sums (accumulation buffers stay fp32)."""
    fp8_recipe: str | None = None
    """torchao float8 recipe of the blocks' linears (tensorwise | rowwise); None: no FP8 GEMMs."""

    @classmethod
    def decode(cls, precision: str = "fp32", fp8_recipe: str = "tensorwise", grad_reduce: str = "fp32") -> Precision:
        """From the config's strings: train.precision, train.fp8_recipe, parallel.grad_reduce_dtype."""
        if precision not in (*DTYPES, "fp8") or fp8_recipe not in FP8_RECIPES or grad_reduce not in DTYPES:
            raise ValueError(f"unknown precision {precision!r}, FP8 recipe {fp8_recipe!r} or gradient-reduce "
                             f"dtype {grad_reduce!r}")
        dtype = DTYPES["bf16" if precision == "fp8" else precision]
        return cls(compute=dtype, params=dtype, master=torch.float32, grad_reduce=DTYPES[grad_reduce],
                   fp8_recipe=fp8_recipe if precision == "fp8" else None)

    @classmethod
    def of(cls, cfg) -> Precision:
        """The precision of a run configuration (megatron_jp.config.Config)."""
        return cls.decode(cfg.train.precision, cfg.train.fp8_recipe, cfg.parallel.grad_reduce_dtype)

    @property
    def fp8(self) -> bool:
        return self.fp8_recipe is not None

    @property
    def separate_master(self) -> bool:
        """Whether the optimizer keeps (and a checkpoint saves) master weights apart from the parameters."""
        return self.master != self.params

    @property
    def activation_bytes(self) -> int:
        """Bytes per saved activation element. FP8 runs keep bf16: torchao's Float8Linear saves its
        high-precision input for backward and casts it to FP8 again there."""
        return self.compute.itemsize

    @property
    def peak_flops(self) -> float:
        """The per-GPU peak MFU is measured against: H100 SXM dense FP8 for FP8 runs (twice bf16's),
        dense bf16 otherwise (fp32 runs too, as the tensor cores they could have used)."""
        return H100_FP8_PEAK_FLOPS if self.fp8 else H100_BF16_PEAK_FLOPS


def fp8_shape_problems(hidden: int, heads: int, kv_heads: int, head_dim: int, ffn: int, gated: bool,
                       tensor: int) -> list[str]:
    """The block linears whose local weight (on one of `tensor` ranks) FP8 GEMMs cannot take: both
    dims must be multiples of 16. Each entry names the linear, its shape and the keys that set it."""
    q, kv = heads // tensor, max(kv_heads // tensor, 1)
    ffn_local = ffn // tensor
    shapes = {"attn.qkv": ((q + 2 * kv) * head_dim, hidden, "model.num_heads, num_kv_heads, head_dim"),
              "attn.out": (hidden, q * head_dim, "model.num_heads, head_dim"),
              "mlp.fc1": (ffn_local * (2 if gated else 1), hidden, "model.ffn_hidden_size"),
              "mlp.fc2": (hidden, ffn_local, "model.ffn_hidden_size")}
    return [f"{name} weight {rows} x {cols} per tensor-parallel rank (set by model.hidden_size, {keys})"
            for name, (rows, cols, keys) in shapes.items() if rows % FP8_MULTIPLE or cols % FP8_MULTIPLE]
