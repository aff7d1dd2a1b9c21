"""FP8 training of the blocks' linears through torchao (`train.precision fp8`).

torchao's `convert_to_float8_training` swaps an nn.Linear for a Float8Linear that casts its input,
weight and output gradient to FP8 with dynamic scales (tensorwise: one scale per tensor; rowwise:
one per row) and runs the three GEMMs of forward and backward on FP8 tensor cores; parameters,
activations between linears and gradients stay bf16. Every projection is an nn.Linear built by
models/linear.py, so the swap (through swap_linears, which keeps tensor-parallel collectives)
reaches them in any layout.

Only the blocks' linears are converted, where nearly all the FLOPs are:
- the embedding is a lookup, not a GEMM, and the norms are reductions whose statistics need bf16's
  range and precision;
- the MLM head's decoder is fused with the loss (parallel/loss.py runs its GEMMs chunk by chunk on
  the weight it shares with the embedding), and its logits feed a softmax over ~100k classes where
  FP8's 3 mantissa bits would show: torchtitan and Megatron also keep the output layer in bf16; the
  head's transform runs on the masked ~15% of tokens only, for little gain.
Where CUDA with FP8 tensor cores (compute capability 8.9+) is absent, torchao emulates the FP8 GEMMs
(same casts and scales, matmuls in high precision): CPU tests then prove the numerics.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from megatron_jp.models.linear import swap_linears

BLOCK_LINEARS = ("attn.qkv", "attn.out", "mlp.fc1", "mlp.fc2")  # names inside a block, converted to FP8


def is_block_linear(name: str) -> bool:
    """Whether the module at `name` (in an Encoder or a pipeline chunk) is one of a block's linears."""
    parts = name.split(".")
    return len(parts) == 4 and parts[0] == "layers" and ".".join(parts[2:]) in BLOCK_LINEARS


def fp8_hardware(device: torch.device) -> bool:
    """Whether `device` has FP8 tensor cores (Ada, Hopper and later); elsewhere torchao emulates."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


# loggers that torchao's import makes warn about what FP8 training does not use: prebuilt CUDA
# extensions a CPU or another GPU build cannot load, and a deprecated pytree registration
_IMPORT_NOISE = ("torchao", "torch.utils._pytree")


def _torchao_float8():
    """torchao.float8, imported on first use (FP8 runs only need it), without its import-time noise."""
    loggers = [logging.getLogger(name) for name in _IMPORT_NOISE]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        import torchao.float8 as float8
    except ImportError as e:
        raise RuntimeError("train.precision fp8 needs torchao: pip install 'megatron_jp[fp8]' "
                           "(or pip install torchao)") from e
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)
    return float8


def float8_config(recipe: str, emulate: bool):
    """torchao's Float8LinearConfig of a recipe (tensorwise | rowwise), emulated or on FP8 hardware."""
    float8 = _torchao_float8()
    return dataclasses.replace(float8.Float8LinearConfig.from_recipe_name(recipe), emulate=emulate)


def convert_to_fp8(chunk: nn.Module, recipe: str, emulate: bool) -> list[str]:
    """Swap the blocks' linears of `chunk` for torchao Float8Linear (parameters unchanged: same
    objects, same names); returns the swapped names."""
    float8, config = _torchao_float8(), float8_config(recipe, emulate)
    return swap_linears(chunk, lambda m: float8.convert_to_float8_training(m, config=config),
                        lambda m, name: is_block_linear(name))
